"""Score predicted label maps against true ones with HoVer-Net's metrics (:mod:`diffaug.metrics`).

Instance metrics (Dice, AJI, AJI+, DQ/SQ/PQ) are computed per image and averaged over images, as HoVer-Net's
``compute_stats`` does, with :mod:`diffaug.metrics`' handling of empty maps:

- an image where exactly one side is empty scores 0 on every instance metric (no overlap is possible);
- an image where both the true and the predicted map are empty is left out of the instance means (every metric is
  0/0 there; HoVer-Net's code raises); ``n_images_scored`` says how many images entered them.

Type statistics (detection F1, classification accuracy, per-class F1) pool the matched centroids of all images,
as HoVer-Net's ``run_nuclei_type_stat`` does (radius 12 px by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["LabelMaps", "check_map_pairs", "score_maps", "scores_to_json", "INSTANCE_METRICS"]

INSTANCE_METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


@dataclass
class LabelMaps:
    """One image's instance map and, with classes, its type map."""

    inst_map: np.ndarray
    type_map: np.ndarray | None = None


def check_map_pairs(true: Sequence[LabelMaps], pred: Sequence[LabelMaps], *, need_types: bool) -> None:
    """Check what the metrics cannot see one image at a time: equal list lengths, and type maps on both sides
    when per-class metrics are asked for. (Each map's dtype, sign and shape are checked by :mod:`diffaug.metrics`;
    :func:`score_maps` adds the image index to its message.)"""
    if len(true) != len(pred):
        raise InvalidInputError(f"{len(true)} true maps but {len(pred)} predictions; give one prediction per image")
    if need_types:
        for i, (t, p) in enumerate(zip(true, pred)):
            for side, maps in (("true", t), ("predicted", p)):
                if maps.type_map is None:
                    raise InvalidInputError(f"per-class metrics need classes, but the {side} maps of image {i} have "
                                            "no type_map (instance-only data); score without classes")


def score_maps(true: Sequence[LabelMaps], pred: Sequence[LabelMaps], *, classes: Sequence[int] | None = None,
               radius: float = 12.0) -> dict[str, Any]:
    """HoVer-Net's instance and type metrics of ``pred`` against ``true`` (one entry per image).

    Args:
        true: ground-truth maps.
        pred: predicted maps, in the same order.
        classes: foreground class ids for the per-class F1 (HoVer-Net's ``type_uid_list``); ``None`` scores instances
            only. Needs type maps on both sides.
        radius: centroid matching radius of the type statistics, in pixels.

    Returns:
        ``{"n_images", "n_images_scored", "dice", "aji", "aji_plus", "dq", "sq", "pq"}`` and, with ``classes``,
        ``"f1_detection"``, ``"accuracy"`` and ``"f1_per_class"`` (``{class_id: F1}``; NaN where a class occurs on
        neither side). Undefined means are NaN.
    """
    from diffaug import metrics

    check_map_pairs(true, pred, need_types=classes is not None)
    per_image, points_true, points_pred = [], [], []
    for i, (t, p) in enumerate(zip(true, pred)):
        try:
            per_image.append(metrics.instance_stats(t.inst_map, p.inst_map))
            if classes is not None:
                points_true.append(metrics.instance_points(t.inst_map, t.type_map))
                points_pred.append(metrics.instance_points(p.inst_map, p.type_map))
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {i}: {exc}") from None
    # Both maps empty: every instance metric is 0/0 (NaN); such images are left out of the means.
    scored = [s for s in per_image if not math.isnan(s["dice"])]
    out: dict[str, Any] = {"n_images": len(true), "n_images_scored": len(scored)}
    for key in INSTANCE_METRICS:
        out[key] = float(np.mean([s[key] for s in scored])) if scored else math.nan
    if classes is not None:
        stats = metrics.type_stats(points_true, points_pred, list(classes), radius=radius)
        out["f1_detection"] = float(stats["f1_detection"])
        out["accuracy"] = float(stats["accuracy"])
        out["f1_per_class"] = {int(c): float(f) for c, f in stats["f1_per_class"].items()}
    return out


def scores_to_json(scores: dict[str, Any]) -> dict[str, Any]:
    """``score_maps`` output with string class keys, for JSON."""
    out = dict(scores)
    if "f1_per_class" in out:
        out["f1_per_class"] = {str(k): v for k, v in out["f1_per_class"].items()}
    return out
