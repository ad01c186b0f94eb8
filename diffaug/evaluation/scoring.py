"""Score predicted label maps against true ones with HoVer-Net's metrics (:mod:`diffaug.metrics`).

Instance metrics (Dice, AJI, AJI+, DQ/SQ/PQ) are computed per image and averaged over images, as HoVer-Net's
``compute_stats`` does. Where the original is undefined or raises, this module decides up front instead of calling
the metric:

- an image where both the true and the predicted map are empty is left out of the instance means (every metric is
  0/0 there); ``n_images_scored`` says how many images entered them;
- an image where exactly one side is empty scores 0 on every instance metric (no overlap is possible).

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
from diffaug.labels.instances import instance_centroids, instance_types, relabel_sequential

__all__ = ["LabelMaps", "check_map_pairs", "score_maps", "scores_to_json", "INSTANCE_METRICS"]

INSTANCE_METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


@dataclass
class LabelMaps:
    """One image's instance map and, with classes, its type map."""

    inst_map: np.ndarray
    type_map: np.ndarray | None = None


def _check_map(arr: Any, what: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{what} must be 2-D (H, W), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InvalidInputError(f"{what} must hold integer ids, got {arr.dtype}; convert label maps with "
                                ".astype(np.int32) only if they really are integer-valued")
    if arr.size and arr.min() < 0:
        raise InvalidInputError(f"{what} has negative ids ({int(arr.min())}); ids are 0 (background) or positive")


def check_map_pairs(true: Sequence[LabelMaps], pred: Sequence[LabelMaps], *, need_types: bool,
                    what: str = "") -> None:
    """Validate paired lists of label maps: equal lengths, integer non-negative maps, equal shapes per pair, and
    type maps on both sides when ``need_types``."""
    where = f"{what}: " if what else ""
    if len(true) != len(pred):
        raise InvalidInputError(f"{where}{len(true)} true maps but {len(pred)} predictions; give one prediction per "
                                "image")
    for i, (t, p) in enumerate(zip(true, pred)):
        _check_map(t.inst_map, f"{where}true inst_map of image {i}")
        _check_map(p.inst_map, f"{where}predicted inst_map of image {i}")
        if t.inst_map.shape != p.inst_map.shape:
            raise InvalidInputError(f"{where}image {i}: true map is {t.inst_map.shape} but prediction is "
                                    f"{p.inst_map.shape}; score maps of the same image size")
        if need_types:
            for side, maps in (("true", t), ("predicted", p)):
                if maps.type_map is None:
                    raise InvalidInputError(f"{where}per-class metrics need classes, but the {side} maps of image {i} "
                                            "have no type_map (instance-only data); score without classes")
                _check_map(maps.type_map, f"{where}{side} type_map of image {i}")
                if maps.type_map.shape != maps.inst_map.shape:
                    raise InvalidInputError(f"{where}image {i}: {side} type_map {maps.type_map.shape} and inst_map "
                                            f"{maps.inst_map.shape} differ in shape")


def _instance_scores(true_inst: np.ndarray, pred_inst: np.ndarray) -> dict[str, float] | None:
    from diffaug import metrics

    t_any, p_any = bool(true_inst.any()), bool(pred_inst.any())
    if not t_any and not p_any:
        return None
    if not (t_any and p_any):
        return dict.fromkeys(INSTANCE_METRICS, 0.0)
    dq, sq, pq = metrics.panoptic_quality(true_inst, pred_inst, match_iou=0.5)
    return {"dice": float(metrics.dice(true_inst, pred_inst)), "aji": float(metrics.aji(true_inst, pred_inst)),
            "aji_plus": float(metrics.aji_plus(true_inst, pred_inst)), "dq": float(dq), "sq": float(sq),
            "pq": float(pq)}


def _points(maps: LabelMaps) -> tuple[np.ndarray, np.ndarray]:
    inst = relabel_sequential(maps.inst_map)
    assert maps.type_map is not None
    return instance_centroids(inst), instance_types(inst, maps.type_map.astype(np.int64, copy=False))


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
    per_image = [_instance_scores(t.inst_map, p.inst_map) for t, p in zip(true, pred)]
    scored = [s for s in per_image if s is not None]
    out: dict[str, Any] = {"n_images": len(true), "n_images_scored": len(scored)}
    for key in INSTANCE_METRICS:
        out[key] = float(np.mean([s[key] for s in scored])) if scored else math.nan
    if classes is not None:
        stats = metrics.type_stats([_points(t) for t in true], [_points(p) for p in pred], list(classes),
                                   radius=radius)
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
