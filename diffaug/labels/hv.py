"""HoVer-Net's horizontal and vertical distance maps, the regression targets of its HV branch.

Graham et al., "HoVer-Net", Medical Image Analysis 58 (2019), §3.2: each nuclear pixel holds its horizontal and
vertical distance to the centre of mass of its nucleus; "for each nucleus, the values are normalised to the range
[-1, 1]". The normalisation is done separately on either side of the centre: for nucleus i with centroid
(c_x, c_y) and offsets d_x = x - c_x,

    h(x, y) = d_x / max_{p in i, d_x(p) > 0} d_x(p)        where d_x > 0,
    h(x, y) = d_x / max_{p in i, d_x(p) < 0} (-d_x(p))     where d_x < 0,

and likewise v from d_y, so every nucleus spans [-1, 1] on each axis (a side with no pixels stays 0). Background
is 0. The centroid is the exact mean pixel position. HoVer-Net's released target code rounds it to the nearest pixel
first; the offsets then differ from ours by less than half a pixel before normalisation.
"""

from __future__ import annotations

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["hv_maps"]


def _normalise_sides(offset: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Scale the negative offsets of each id by 1/|their minimum| and the positive ones by 1/their maximum."""
    neg_extent = np.zeros(n + 1, dtype=np.float64)
    np.minimum.at(neg_extent, ids, offset)  # most negative offset per id (0 when the side is empty)
    pos_extent = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(pos_extent, ids, offset)
    scale = np.where(offset < 0, -neg_extent[ids], pos_extent[ids])
    out = np.zeros_like(offset)
    nonzero = scale > 0
    out[nonzero] = offset[nonzero] / scale[nonzero]
    return out


def hv_maps(inst_map: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal/vertical target maps of an instance map.

    Args:
        inst_map: (H, W) integer instance ids, 0 background; ids need not be contiguous, and a nucleus in several
            pieces is treated as one nucleus (one centroid).

    Returns:
        float32 (2, H, W): channel 0 the horizontal map (x offsets), channel 1 the vertical map (y offsets), each
        normalised per nucleus and per side to [-1, 1] (see the module docstring); 0 on background.

    Example:
        >>> inst = np.array([[0, 1, 1, 1]], dtype=np.int32)
        >>> hv_maps(inst)[0].tolist()
        [[0.0, -1.0, 0.0, 1.0]]
    """
    if not isinstance(inst_map, np.ndarray) or inst_map.ndim != 2:
        raise InvalidInputError(f"hv_maps: inst_map must be a 2-D numpy array (H, W), got "
                                f"{getattr(inst_map, 'shape', type(inst_map).__name__)}")
    if not np.issubdtype(inst_map.dtype, np.integer):
        raise InvalidInputError(f"hv_maps: inst_map must hold integer ids, got {inst_map.dtype}")
    if inst_map.size and inst_map.min() < 0:
        raise InvalidInputError("hv_maps: inst_map has negative ids")
    out = np.zeros((2,) + inst_map.shape, dtype=np.float32)
    ys, xs = np.nonzero(inst_map)
    if ys.size == 0:
        return out
    ids = inst_map[ys, xs].astype(np.int64)
    n = int(ids.max())
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    area[area == 0] = 1.0  # absent ids are never indexed below
    centroid_x = np.bincount(ids, weights=xs, minlength=n + 1) / area
    centroid_y = np.bincount(ids, weights=ys, minlength=n + 1) / area
    out[0, ys, xs] = _normalise_sides(xs - centroid_x[ids], ids, n)
    out[1, ys, xs] = _normalise_sides(ys - centroid_y[ids], ids, n)
    return out
