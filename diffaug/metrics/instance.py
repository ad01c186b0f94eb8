"""Instance segmentation metrics with HoVer-Net's definitions: Dice, AJI, AJI+ and panoptic quality (DQ, SQ, PQ).

Every metric here gives the numbers of HoVer-Net's ``metrics/stats_utils.py`` (vqdang/hover_net, commit 67e2ce5),
called the way ``compute_stats.run_nuclei_inst_stat`` calls it: both maps renumbered to 1..N in id order first
(``remap_label(by_size=False)``). The golden values in ``shared/fixtures/hovernet_metrics`` are checked in CI to 1e-6.

How it is computed. The original builds one full-image mask per instance and does full-image arithmetic for each
overlapping pair, so its cost is (#instances × #pixels). Here every metric comes from one overlap table:

- both maps are renumbered to 1..N with a look-up table (ids need not be contiguous), and the instance areas come
  from the same ``bincount``;
- the intersections of all overlapping (true, pred) pairs come from one ``bincount`` over the combined key
  ``true_id · (n_pred + 1) + pred_id`` of the pixels that are foreground in both maps (or ``np.unique`` when that key
  space is too large to allocate);
- unions follow as ``|t| + |p| − |t ∩ p|``; the one-to-one assignments (AJI+, and PQ below an IoU of 0.5) run
  ``scipy.optimize.linear_sum_assignment`` on each connected component of the overlap graph separately.

Notation: for a true instance t and a predicted instance p, ``inter = |t ∩ p|``, ``union = |t ∪ p|``.

Empty maps. Where the original returned nan, so do these functions. Where the original raised, this module returns:

- ``aji`` with an empty prediction and a non-empty truth: **0.0** (the original raises ``ValueError`` from an
  ``argmax`` over no predictions). AJI is Σ inter / Σ union with no pairs, i.e. 0 / |truth| = 0, which is also what
  the original's AJI+ returns here. Returning nan would let a ``nanmean`` over images silently skip images where a
  model found nothing, inflating the mean.
- ``aji`` with both maps empty: **nan** (0/0; the original raises ``ValueError``), as Dice and AJI+ do.
- ``panoptic_quality`` with both maps empty: **(nan, nan, nan)** (DQ is 0/0; the original raises
  ``ZeroDivisionError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["dice", "aji", "aji_plus", "panoptic_quality", "instance_stats", "OverlapTable", "overlap_table"]

# HoVer-Net adds 1e-6 to the union in the IoUs of AJI/AJI+ (which decides argmax ties and the AJI+ assignment) and
# to TP in the denominator of SQ. Kept for parity: a perfect prediction of N nuclei has SQ = N / (N + 1e-6).
_EPS = 1.0e-6

# A look-up table renumbers ids in O(pixels) when the largest id is at most this many times the pixel count
# (plus a constant); above it, ``np.unique`` (a sort) is used instead.
_LUT_IDS_PER_PIXEL = 4
_LUT_MIN = 1 << 20
# The dense pair count (one bincount over all (true, pred) key values) is used while it has at most this many bins
# or 4 bins per overlapping pixel, whichever is larger; above it, the sparse ``np.unique`` path.
_DENSE_PAIR_BINS = 1 << 22


@dataclass(frozen=True)
class OverlapTable:
    """Areas of the instances of two maps and the intersections of every overlapping pair.

    Ids are the renumbered ones, 1..n in ascending order of the original ids (HoVer-Net's ``remap_label``).

    Attributes:
        true_areas: (n_true + 1,) pixel count of true ids 0..n_true; index 0 (background) is set to 0.
        pred_areas: (n_pred + 1,) the same for the prediction.
        true_ids: (K,) true id of each overlapping pair; pairs are sorted by (true id, pred id).
        pred_ids: (K,) pred id of each pair.
        inter: (K,) float64 intersection (pixels) of each pair, all > 0.
    """

    true_areas: np.ndarray
    pred_areas: np.ndarray
    true_ids: np.ndarray
    pred_ids: np.ndarray
    inter: np.ndarray

    @property
    def n_true(self) -> int:
        return self.true_areas.size - 1

    @property
    def n_pred(self) -> int:
        return self.pred_areas.size - 1

    @property
    def union(self) -> np.ndarray:
        """(K,) float64 ``|t| + |p| − |t ∩ p|`` of each pair."""
        return (self.true_areas[self.true_ids] + self.pred_areas[self.pred_ids]).astype(np.float64) - self.inter


def _check_inst_map(inst_map: Any, name: str) -> np.ndarray:
    arr = np.asarray(inst_map)
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D instance map (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        hint = (" (a boolean mask is not an instance map: label its connected components, or cast a single-instance"
                " mask with .astype(np.int32))" if arr.dtype.kind == "b" else
                "; if the values are whole numbers, convert with .astype(np.int32)")
        raise InvalidInputError(f"{name} has dtype {arr.dtype}, but instance maps must be integer "
                                f"(0 = background, ids > 0){hint}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise InvalidInputError(f"{name} has negative ids (min {int(arr.min())}); instance ids must be >= 0 "
                                "with 0 = background")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise InvalidInputError(f"{name} has ids above 2**63 - 1; renumber the instances first")
        arr = arr.astype(np.int64)
    return arr


def _check_pair(true_inst: Any, pred_inst: Any) -> tuple[np.ndarray, np.ndarray]:
    true_arr = _check_inst_map(true_inst, "true_inst")
    pred_arr = _check_inst_map(pred_inst, "pred_inst")
    if true_arr.shape != pred_arr.shape:
        raise InvalidInputError(f"true_inst has shape {true_arr.shape} but pred_inst has shape {pred_arr.shape}; "
                                "both maps must cover the same image")
    return true_arr, pred_arr


def _renumber(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber the ids of a flat map to 1..n in ascending order.

    Returns the new ids (int32 or int64) and the int64 areas of ids 0..n with a 0 at index 0.
    """
    top = int(flat.max(initial=0))
    if top <= max(_LUT_MIN, _LUT_IDS_PER_PIXEL * flat.size):
        counts = np.bincount(flat, minlength=top + 1)
        present = counts > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)
        lut[~present] = 0
        if lut[-1] <= np.iinfo(np.int32).max:
            lut = lut.astype(np.int32)  # a 4-byte gather over the image is markedly faster than an 8-byte one
        return lut[flat], np.concatenate([[0], counts[present]]).astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        counts[0] = 0
        return inverse.astype(np.int64), counts.astype(np.int64)
    return inverse.astype(np.int64) + 1, np.concatenate([[0], counts]).astype(np.int64)


def overlap_table(true_inst: Any, pred_inst: Any) -> OverlapTable:
    """Build the :class:`OverlapTable` of two instance maps; every metric of this module is a function of it.

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.

    Raises:
        InvalidInputError: the maps are not 2-D integer maps of the same shape with ids >= 0.
    """
    true_arr, pred_arr = _check_pair(true_inst, pred_inst)
    t, true_areas = _renumber(true_arr.ravel())
    p, pred_areas = _renumber(pred_arr.ravel())
    n_pred = pred_areas.size - 1
    both = (t > 0) & (p > 0)
    key = t[both].astype(np.int64) * (n_pred + 1) + p[both]
    n_bins = true_areas.size * pred_areas.size
    if n_bins <= max(_DENSE_PAIR_BINS, 4 * key.size):
        counts = np.bincount(key, minlength=n_bins)
        pair_key = np.flatnonzero(counts)
        inter = counts[pair_key]
    else:
        pair_key, inter = np.unique(key, return_counts=True)
    return OverlapTable(true_areas=true_areas, pred_areas=pred_areas, true_ids=pair_key // (n_pred + 1),
                        pred_ids=pair_key % (n_pred + 1), inter=inter.astype(np.float64))


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a Python float, nan for 0/0 (no warning)."""
    return float(num) / float(den) if den != 0 else float("nan")


def _max_weight_pairs(table: OverlapTable, weight: np.ndarray) -> np.ndarray:
    """One-to-one assignment of true to pred instances maximising the total ``weight`` over overlapping pairs.

    Equivalent to ``linear_sum_assignment(-W)`` on the dense (n_true, n_pred) matrix W that holds ``weight`` for
    overlapping pairs and 0 elsewhere, followed by dropping assigned pairs of weight 0 (HoVer-Net's AJI+ and its PQ
    below IoU 0.5). Non-overlapping entries are 0, so the problem splits into the connected components of the
    overlap graph and each is solved on its own small matrix. Returns a boolean mask over the table's pairs.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_pairs = table.inter.size
    selected = np.zeros(n_pairs, dtype=bool)
    if n_pairs == 0:
        return selected
    # Bipartite graph: node i < n_true + 1 is true id i, node n_true + 1 + j is pred id j.
    offset = table.n_true + 1
    n_nodes = offset + table.n_pred + 1
    graph = coo_matrix((np.ones(n_pairs), (table.true_ids, offset + table.pred_ids)), shape=(n_nodes, n_nodes))
    _, node_comp = connected_components(graph, directed=False)
    comp = node_comp[table.true_ids]
    pairs_per_comp = np.bincount(comp)
    single = pairs_per_comp[comp] == 1
    selected[single] = weight[single] > 0  # a 1x1 component: its only pair is the assignment
    multi = np.flatnonzero(~single)
    if multi.size == 0:
        return selected
    multi = multi[np.argsort(comp[multi], kind="stable")]
    bounds = np.flatnonzero(np.diff(comp[multi])) + 1
    for idx in np.split(multi, bounds):
        rows, r = np.unique(table.true_ids[idx], return_inverse=True)
        cols, c = np.unique(table.pred_ids[idx], return_inverse=True)
        dense = np.zeros((rows.size, cols.size))
        dense[r, c] = weight[idx]
        pair_of = np.full((rows.size, cols.size), -1, dtype=np.int64)
        pair_of[r, c] = idx
        ar, ac = linear_sum_assignment(dense, maximize=True)
        chosen = pair_of[ar, ac]
        chosen = chosen[chosen >= 0]
        selected[chosen[weight[chosen] > 0]] = True
    return selected


def _dice(table: OverlapTable) -> float:
    # 2|T ∩ P| / (|T| + |P|) on the binary foregrounds; every foreground-in-both pixel is in exactly one pair.
    return _ratio(2.0 * table.inter.sum(), table.true_areas.sum() + table.pred_areas.sum())


def _aji_from_pairs(table: OverlapTable, pairs: np.ndarray) -> float:
    """Σ inter / (Σ union + areas of true and pred instances in no pair), over the given pair indices."""
    union = table.union
    paired_true = np.zeros(table.n_true + 1, dtype=bool)
    paired_true[table.true_ids[pairs]] = True
    paired_pred = np.zeros(table.n_pred + 1, dtype=bool)
    paired_pred[table.pred_ids[pairs]] = True
    unpaired_area = table.true_areas[~paired_true].sum() + table.pred_areas[~paired_pred].sum()  # index 0 holds 0
    return _ratio(table.inter[pairs].sum(), union[pairs].sum() + unpaired_area)


def _aji(table: OverlapTable) -> float:
    # Each true instance takes the pred of largest inter / (union + 1e-6), ties to the lowest pred id (numpy argmax
    # order). One pred may serve several true instances; its pixels then count in the union of each such pair.
    if table.n_pred == 0:
        return 0.0 if table.n_true else float("nan")
    iou = table.inter / (table.union + _EPS)
    order = np.lexsort((table.pred_ids, -iou, table.true_ids))
    ranked_true = table.true_ids[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = ranked_true[1:] != ranked_true[:-1]
    return _aji_from_pairs(table, order[first])


def _aji_plus(table: OverlapTable) -> float:
    # One-to-one pairs maximising the summed inter / (union + 1e-6) (not the summed intersections).
    iou = table.inter / (table.union + _EPS)
    return _aji_from_pairs(table, np.flatnonzero(_max_weight_pairs(table, iou)))


def _panoptic_quality(table: OverlapTable, match_iou: float) -> tuple[float, float, float]:
    if not 0.0 <= match_iou < 1.0:
        raise InvalidInputError(f"match_iou must be in [0, 1), got {match_iou}")
    if table.n_true == 0 and table.n_pred == 0:
        return float("nan"), float("nan"), float("nan")
    iou = table.inter / table.union  # no epsilon here, as in the original
    if match_iou >= 0.5:
        matched = iou > match_iou  # IoU > 0.5 pairs are unique on both sides, no assignment needed
    else:
        matched = _max_weight_pairs(table, iou) & (iou > match_iou)
    tp = int(matched.sum())
    fp = table.n_pred - tp
    fn = table.n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[matched].sum()) / (tp + _EPS)
    return dq, sq, dq * sq


def dice(true_inst: Any, pred_inst: Any) -> float:
    """Dice coefficient of the binary foregrounds, ``2|T ∩ P| / (|T| + |P|)`` (HoVer-Net's ``get_dice_1``).

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.

    Returns:
        The Dice coefficient; nan when both maps are empty (as the original).

    Raises:
        InvalidInputError: the maps are not 2-D integer maps of the same shape with ids >= 0.

    Example:
        >>> import numpy as np
        >>> t = np.array([[1, 1, 0, 2]]); p = np.array([[5, 0, 0, 7]])
        >>> round(dice(t, p), 4)
        0.8
    """
    true_arr, pred_arr = _check_pair(true_inst, pred_inst)
    true_fg, pred_fg = true_arr > 0, pred_arr > 0  # no per-instance work: no renumbering or overlap table needed
    return _ratio(2.0 * np.count_nonzero(true_fg & pred_fg), np.count_nonzero(true_fg) + np.count_nonzero(pred_fg))


def aji(true_inst: Any, pred_inst: Any) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) as HoVer-Net's ``get_fast_aji`` computes it.

    Each true instance is paired with the predicted instance of largest ``inter / (union + 1e-6)`` (ties to the
    lower id); a predicted instance may be chosen by several true instances. AJI = Σ inter / (Σ union + areas of
    unpaired true instances + areas of predicted instances chosen by none).

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.

    Returns:
        AJI in [0, 1]. An empty prediction gives **0.0** and two empty maps give **nan**; the original raises
        ``ValueError`` in both cases (see the module docstring for why 0.0).

    Raises:
        InvalidInputError: the maps are not 2-D integer maps of the same shape with ids >= 0.

    Example:
        >>> import numpy as np
        >>> t = np.array([[1, 1, 0, 2]]); p = np.array([[5, 0, 0, 7]])
        >>> round(aji(t, p), 4)
        0.6667
    """
    return _aji(overlap_table(true_inst, pred_inst))


def aji_plus(true_inst: Any, pred_inst: Any) -> float:
    """AJI+ (Graham et al. 2019): AJI with a one-to-one pairing, as HoVer-Net's ``get_fast_aji_plus``.

    The pairing is the assignment that maximises the summed ``inter / (union + 1e-6)``; assigned pairs that do not
    overlap are dropped. AJI+ = Σ inter(pairs) / (Σ union(pairs) + areas of all unpaired true and pred instances).

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.

    Returns:
        AJI+ in [0, 1]; 0.0 when exactly one map is empty, nan when both are (as the original).

    Raises:
        InvalidInputError: the maps are not 2-D integer maps of the same shape with ids >= 0.
    """
    return _aji_plus(overlap_table(true_inst, pred_inst))


def panoptic_quality(true_inst: Any, pred_inst: Any, match_iou: float = 0.5) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al. 2019) as HoVer-Net's ``get_fast_pq``: returns ``(dq, sq, pq)``.

    A true and a predicted instance match when their IoU (``inter / union``, no epsilon) is **strictly** above
    ``match_iou``. For ``match_iou >= 0.5`` such pairs are unique; below 0.5 the pairs come from the assignment
    that maximises the summed IoU, then are thresholded. With TP matches, FP unmatched predictions and FN unmatched
    true instances:

    - DQ = TP / (TP + FP/2 + FN/2);
    - SQ = Σ IoU(matches) / (TP + 1e-6), so a perfect prediction of N nuclei has SQ = N / (N + 1e-6), as HoVer-Net;
    - PQ = DQ · SQ.

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.
        match_iou: IoU threshold in [0, 1).

    Returns:
        ``(dq, sq, pq)``; (0, 0, 0) when exactly one map is empty, and **(nan, nan, nan)** when both are (the
        original raises ``ZeroDivisionError``).

    Raises:
        InvalidInputError: bad maps (see :func:`dice`), or ``match_iou`` outside [0, 1).

    Example:
        >>> import numpy as np
        >>> t = np.array([[1, 1, 0, 2, 2]]); p = np.array([[3, 3, 0, 0, 0]])
        >>> [round(v, 4) for v in panoptic_quality(t, p)]
        [0.6667, 1.0, 0.6667]
    """
    return _panoptic_quality(overlap_table(true_inst, pred_inst), match_iou)


def instance_stats(true_inst: Any, pred_inst: Any, match_iou: float = 0.5) -> dict[str, float]:
    """All instance metrics of one image from a single overlap table.

    Args:
        true_inst: ground-truth instance map, integer (H, W), 0 = background; ids need not be contiguous.
        pred_inst: predicted instance map of the same shape.
        match_iou: the PQ matching threshold (see :func:`panoptic_quality`).

    Returns:
        ``{"dice", "aji", "aji_plus", "dq", "sq", "pq"}``, each as its own function returns it (empty maps
        included).

    Raises:
        InvalidInputError: bad maps (see :func:`dice`), or ``match_iou`` outside [0, 1).
    """
    table = overlap_table(true_inst, pred_inst)
    dq, sq, pq = _panoptic_quality(table, match_iou)
    return {"dice": _dice(table), "aji": _aji(table), "aji_plus": _aji_plus(table), "dq": dq, "sq": sq, "pq": pq}
