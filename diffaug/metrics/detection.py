"""Detection and classification statistics on nucleus centroids, as HoVer-Net's ``run_nuclei_type_stat``.

Given, for each image, the centroids and classes of the true and the predicted nuclei, :func:`type_stats` pairs them
per image, pools the pairs over all images and reports detection F1 (F_d), classification accuracy among detected
nuclei, and a weighted F1 per class (Graham et al. 2019, Eq. 12–13). The numbers equal those of HoVer-Net's
``compute_stats.run_nuclei_type_stat(..., exhaustive=True)`` (commit 67e2ce5), checked in CI against
``shared/fixtures/hovernet_metrics``.

Notation, pooled over images: TP_d = #pairs, FP_d = #unpaired predictions, FN_d = #unpaired true nuclei.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffaug.errors import DataFormatError, InvalidInputError
from diffaug.labels.instances import instance_centroids, instance_types, relabel_sequential
from diffaug.metrics.instance import _check_inst_map, _ratio

__all__ = ["pair_coordinates", "type_stats", "instance_points", "require_class_labels"]

PointSet = tuple[np.ndarray, np.ndarray]
"""One image's nuclei: centroids (N, 2) in (x, y) order and classes (N,)."""

# HoVer-Net's weights: [FP_d, FN_d] for detection F1, [FP_c, FN_c, FP_d, FN_d] for the per-class F1.
_W_DETECTION = (1, 1)
_W_CLASS = (2, 2, 1, 1)


def pair_coordinates(true_xy: Any, pred_xy: Any, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair two point sets one-to-one, as HoVer-Net's ``pair_coordinates``.

    The Hungarian algorithm runs on the **full** Euclidean distance matrix, minimising the total distance of a
    maximal assignment without a radius limit; then the assigned pairs with distance ``<= radius`` are kept. (A point
    can therefore stay unpaired although an unassigned partner lies within the radius.)

    Args:
        true_xy: (N, 2) true points.
        pred_xy: (M, 2) predicted points, in the same coordinate order.
        radius: the largest distance of a kept pair (inclusive).

    Returns:
        ``(paired, unpaired_true, unpaired_pred)``: (K, 2) int64 index pairs (true index, pred index), ordered by
        true index; and the int64 indices of the points in no pair.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if true_xy.shape[0] and pred_xy.shape[0]:
        dist = cdist(true_xy, pred_xy)
        rows, cols = linear_sum_assignment(dist)
        keep = dist[rows, cols] <= radius
        paired = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    else:
        paired = np.zeros((0, 2), dtype=np.int64)
    unpaired_true = np.setdiff1d(np.arange(true_xy.shape[0]), paired[:, 0]).astype(np.int64)
    unpaired_pred = np.setdiff1d(np.arange(pred_xy.shape[0]), paired[:, 1]).astype(np.int64)
    return paired, unpaired_true, unpaired_pred


def _check_points(item: Any, where: str) -> PointSet:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InvalidInputError(f"{where} must be a (centroids, types) pair, got {type(item).__name__}")
    centroids = np.asarray(item[0])
    types = np.asarray(item[1])
    if centroids.dtype.kind not in "iuf" or centroids.ndim != 2 or centroids.shape[1] != 2:
        raise InvalidInputError(f"{where}: centroids must be a real (N, 2) array in (x, y) order, got shape "
                                f"{centroids.shape} of dtype {centroids.dtype}; an image without nuclei is "
                                "np.zeros((0, 2))")
    if not np.isfinite(centroids).all():
        raise InvalidInputError(f"{where}: centroids contain nan or inf")
    if types.dtype.kind not in "iu" or types.ndim != 1:
        raise InvalidInputError(f"{where}: types must be a 1-D integer array (N,), got shape {types.shape} of dtype "
                                f"{types.dtype}" + ("; flatten HoVer-Net's (N, 1) inst_type with .ravel()"
                                                    if types.ndim == 2 else ""))
    if types.shape[0] != centroids.shape[0]:
        raise InvalidInputError(f"{where}: {centroids.shape[0]} centroids but {types.shape[0]} types; "
                                "give one class per nucleus")
    if types.size and types.min() < 0:
        raise InvalidInputError(f"{where}: types contain negative classes (min {int(types.min())})")
    return centroids.astype(np.float64), types.astype(np.int64)


def _check_classes(classes: Any) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence | np.ndarray):
        raise InvalidInputError(f"classes must be a list of foreground class ids such as [1, 2, 3, 4], got {classes!r}")
    out: list[int] = []
    for c in classes:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise InvalidInputError(f"classes must hold integer class ids, got {c!r} in {list(classes)!r}")
        if c <= 0:
            raise InvalidInputError(f"classes must be foreground ids > 0 (0 is background), got {int(c)} in "
                                    f"{[int(x) for x in classes]}")
        out.append(int(c))
    if not out:
        raise InvalidInputError("classes is empty; list the foreground class ids to score, such as [1, 2, 3, 4]")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"classes lists a class twice: {out}")
    return out


def type_stats(true: Sequence[PointSet], pred: Sequence[PointSet], classes: Sequence[int], radius: float = 12,
               *, empty_image_dummy: bool = True) -> dict[str, Any]:
    """Detection F1, classification accuracy and per-class F1 of nuclei, pooled over images (HoVer-Net's).

    Per image, true and predicted nuclei are paired by :func:`pair_coordinates` within ``radius`` pixels. The
    pairs and unpaired nuclei of all images are then pooled (counts are summed, not averaged per image):

    - ``f1_detection`` = 2·TP_d / (2·TP_d + FP_d + FN_d);
    - ``accuracy`` = #(pairs of equal class) / TP_d, nan when there is no pair;
    - ``f1_per_class[c]``, over the pairs where the true or the predicted class is c, with TP_c (both c), FP_c (only
      the prediction is c), FN_c (only the truth is c), and the unpaired predictions (FP_d,c) and true nuclei
      (FN_d,c) of class c: F1_c = 2·TP_c / (2·TP_c + 2·FP_c + 2·FN_c + FP_d,c + FN_d,c). A class present nowhere
      gives nan; a class predicted but absent from the truth gives 0.0.

    HoVer-Net quirk kept for parity (``empty_image_dummy=True``): an image with no true nuclei gets one dummy true
    point at (0, 0) of class 0, and likewise an image with no prediction. Dummies take part in everything: they can
    pair with a real point within ``radius`` of the origin, and an unpaired dummy counts as one FN_d (true) or FP_d
    (prediction). Class 0 is never in ``classes``, so per-class F1 changes only through such a pairing. Pass
    ``empty_image_dummy=False`` to score empty images without dummies.

    Centroids are used at the precision given (the original casts them to float32 on reading).

    Args:
        true: one ``(centroids, types)`` per image: centroids (N, 2) in (x, y) order, types (N,) integer classes.
        pred: the predictions, one per image, in the same order and coordinates.
        classes: the foreground class ids to score (HoVer-Net's ``type_uid_list``), e.g. ``[1, 2, 3, 4]``.
        radius: the largest centroid distance of a pair, in pixels (inclusive); HoVer-Net uses 12 at 40x.
        empty_image_dummy: add HoVer-Net's dummy point for an image with no true or no predicted nuclei.

    Returns:
        ``{"f1_detection": float, "accuracy": float, "f1_per_class": {class: float}}``.

    Raises:
        InvalidInputError: the lists differ in length or are empty, an item is not a ``(centroids, types)`` pair of
            an (N, 2) real array and an (N,) integer array, ``classes`` holds a non-integer or a class <= 0, or
            ``radius`` is not positive.

    Example:
        >>> import numpy as np
        >>> true = [(np.array([[10.0, 10.0], [50.0, 50.0]]), np.array([1, 2]))]
        >>> pred = [(np.array([[12.0, 11.0], [90.0, 90.0]]), np.array([1, 1]))]
        >>> stats = type_stats(true, pred, classes=[1, 2])
        >>> stats["f1_detection"], stats["accuracy"], stats["f1_per_class"]
        (0.5, 1.0, {1: 0.6666666666666666, 2: 0.0})
    """
    if isinstance(true, np.ndarray) or isinstance(pred, np.ndarray) or not isinstance(true, Sequence) \
            or not isinstance(pred, Sequence):
        raise InvalidInputError("true and pred must be lists with one (centroids, types) pair per image")
    for name, value in (("true", true), ("pred", pred)):
        if len(value) == 2 and isinstance(value[0], np.ndarray) and value[0].ndim == 2:
            raise InvalidInputError(f"{name} looks like one (centroids, types) pair; pass a list with one pair per "
                                    f"image, e.g. [{name}_pair]")
    if len(true) != len(pred):
        raise InvalidInputError(f"true has {len(true)} images but pred has {len(pred)}; give one (centroids, types) "
                                "pair per image to both, in the same order")
    if not true:
        raise InvalidInputError("true and pred are empty; give at least one image")
    class_ids = _check_classes(classes)
    if not isinstance(radius, (int, float, np.integer, np.floating)) or isinstance(radius, bool) \
            or not np.isfinite(radius) or radius <= 0:
        raise InvalidInputError(f"radius must be a positive number of pixels, got {radius!r}")

    dummy = (np.zeros((1, 2)), np.zeros(1, dtype=np.int64))
    paired_true, paired_pred, unpaired_true, unpaired_pred = [], [], [], []
    for i, (true_item, pred_item) in enumerate(zip(true, pred)):
        true_xy, true_type = _check_points(true_item, f"true[{i}]")
        pred_xy, pred_type = _check_points(pred_item, f"pred[{i}]")
        if empty_image_dummy:
            true_xy, true_type = (true_xy, true_type) if true_type.size else dummy
            pred_xy, pred_type = (pred_xy, pred_type) if pred_type.size else dummy
        paired, lone_true, lone_pred = pair_coordinates(true_xy, pred_xy, radius)
        paired_true.append(true_type[paired[:, 0]])
        paired_pred.append(pred_type[paired[:, 1]])
        unpaired_true.append(true_type[lone_true])
        unpaired_pred.append(pred_type[lone_pred])
    pt, pp = np.concatenate(paired_true), np.concatenate(paired_pred)
    ut, up = np.concatenate(unpaired_true), np.concatenate(unpaired_pred)

    tp_d, fp_d, fn_d = pt.size, up.size, ut.size
    f1_detection = _ratio(2 * tp_d, 2 * tp_d + _W_DETECTION[0] * fp_d + _W_DETECTION[1] * fn_d)
    accuracy = _ratio(int((pt == pp).sum()), tp_d)
    f1_per_class: dict[int, float] = {}
    for c in class_ids:
        is_t, is_p = pt == c, pp == c
        tp_c = int((is_t & is_p).sum())
        fp_c = int((~is_t & is_p).sum())
        fn_c = int((is_t & ~is_p).sum())
        # TN_c would count pairs where neither side is c; restricted to pairs with a c on one side, it is always 0.
        fp_dc, fn_dc = int((up == c).sum()), int((ut == c).sum())
        w = _W_CLASS
        f1_per_class[c] = _ratio(2 * tp_c, 2 * tp_c + w[0] * fp_c + w[1] * fn_c + w[2] * fp_dc + w[3] * fn_dc)
    return {"f1_detection": f1_detection, "accuracy": accuracy, "f1_per_class": f1_per_class}


def instance_points(inst_map: Any, type_map: Any) -> PointSet:
    """The ``(centroids, types)`` of the nuclei of one labelled image, as :func:`type_stats` takes them.

    Centroids are the mean pixel positions in (x, y) order; each nucleus takes the majority class of its pixels.
    Ids need not be contiguous; nuclei come in ascending id order.

    Args:
        inst_map: integer instance map (H, W), 0 = background.
        type_map: integer class map (H, W) of the same shape, 0 = background.

    Raises:
        InvalidInputError: the maps are not 2-D integer maps of one shape with values >= 0.
    """
    inst = _check_inst_map(inst_map, "inst_map")
    types = _check_inst_map(type_map, "type_map")
    if inst.shape != types.shape:
        raise InvalidInputError(f"inst_map has shape {inst.shape} but type_map has shape {types.shape}")
    inst = relabel_sequential(inst)
    return instance_centroids(inst), instance_types(inst, types).astype(np.int64)


def require_class_labels(folder: Any, metric: str = "per-class F1") -> None:
    """Raise a clear error when a tile folder has no classes but a per-class metric was asked for.

    Args:
        folder: a :class:`~diffaug.data.TileFolder` (anything with ``root`` and ``has_classes``).
        metric: the metric that needs classes, named in the message.

    Raises:
        DataFormatError: the folder is instance-only.
    """
    if not folder.has_classes:
        raise DataFormatError(f"{folder.root}: {metric} needs class labels, but this test folder is instance-only "
                              "(no classes.json or type_map); use a folder with classes, or score instance metrics "
                              "only (Dice, AJI, PQ)")
