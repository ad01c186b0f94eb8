"""Per-instance quantities derived from an instance map (and a type map): ids, classes, centroids, renumbering.

Pure numpy; no randomness. Instance ids need not be contiguous unless a function says so.
"""

from __future__ import annotations

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["instance_ids", "instance_types", "instance_centroids", "relabel_sequential", "instance_areas",
           "instance_piece_counts"]


def instance_ids(inst_map: np.ndarray) -> np.ndarray:
    """Sorted non-zero ids present in ``inst_map``."""
    top = int(inst_map.max(initial=0))
    if 0 <= top <= 4 * inst_map.size:  # a presence count is much faster than sorting when ids are not huge
        return np.flatnonzero(np.bincount(inst_map.ravel(), minlength=top + 1)[1:]).astype(inst_map.dtype) + 1
    ids = np.unique(inst_map)
    return ids[ids != 0]


def relabel_sequential(inst_map: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..N keeping their order (HoVer-Net's ``remap_label(by_size=False)``). Returns int32."""
    ids, inverse = np.unique(inst_map, return_inverse=True)
    if ids.size and ids[0] == 0:
        new = np.arange(ids.size, dtype=np.int32)
    else:
        new = np.arange(1, ids.size + 1, dtype=np.int32)
    return new[inverse.reshape(inst_map.shape)]


def instance_areas(inst_map: np.ndarray) -> np.ndarray:
    """Pixel count of ids 0..max (index = id)."""
    return np.bincount(inst_map.ravel(), minlength=int(inst_map.max(initial=0)) + 1)


def instance_types(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """Class of instances 1..N (index i holds id i+1) for a map with contiguous ids.

    Each instance takes the majority class of its pixels; a tie goes to the lower class. Instances with no pixels
    get class 0.
    """
    n = int(inst_map.max(initial=0))
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    fg = inst_map > 0
    k = int(type_map.max(initial=0)) + 1
    counts = np.bincount(inst_map[fg].astype(np.int64) * k + type_map[fg], minlength=(n + 1) * k).reshape(n + 1, k)
    counts[:, 0] = 0
    out = counts.argmax(axis=1).astype(np.int32)
    out[counts.sum(axis=1) == 0] = 0
    return out[1:]


def instance_centroids(inst_map: np.ndarray) -> np.ndarray:
    """Centroids of ids 1..N as float64 (N, 2) in **(x, y)** order (the CoNSeP/HoVer-Net convention).

    Row i is id i+1; an absent id gets NaN. The centroid is the mean pixel position (equal to cv2 moments).
    """
    if inst_map.ndim != 2:
        raise InvalidInputError(f"inst_map must be 2-D, got shape {inst_map.shape}")
    n = int(inst_map.max(initial=0))
    if n == 0:
        return np.zeros((0, 2), dtype=np.float64)
    ys, xs = np.nonzero(inst_map)  # foreground pixels only, in row-major order
    ids = inst_map[ys, xs]
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    sx = np.bincount(ids, weights=xs, minlength=n + 1)
    sy = np.bincount(ids, weights=ys, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cent = np.stack([sx / area, sy / area], axis=1)
    return cent[1:]


def instance_piece_counts(inst_map: np.ndarray) -> np.ndarray:
    """Number of disconnected pieces of ids 0..max (index = id; absent ids and background count 0).

    Pieces are 8-connected regions of equal id (skimage's full connectivity), so a nucleus whose parts touch only at
    a corner counts as one piece. Real annotations hold a few multi-piece nuclei; an edit must not add pieces.
    """
    from skimage.measure import label

    if inst_map.ndim != 2:
        raise InvalidInputError(f"inst_map must be 2-D, got shape {inst_map.shape}")
    n = int(inst_map.max(initial=0))
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    # skimage labels connected regions of *equal value*, so touching nuclei with different ids stay apart.
    regions = label(inst_map, background=0, connectivity=2)
    fg = regions > 0
    region_id = np.zeros(int(regions.max()) + 1, dtype=np.int64)
    region_id[regions[fg]] = inst_map[fg]  # every pixel of one region carries the same instance id
    return np.bincount(region_id[1:], minlength=n + 1).astype(np.int64)
