"""The semantic condition ``y`` of SDM/DiffMix: one-hot class map plus instance edge map.

Layout (SDM's ``preprocess_input``, checked against ``fixtures/sdm_reference/condition_cases.npz``):

* channels ``0..num_classes-1``: one-hot of the type map; background is channel 0, class k is channel k;
* channel ``num_classes``: the instance edge map. A pixel is 1 where its instance id differs from its left, right, up
  or down neighbour (4-neighbourhood). Both pixels of a differing pair are marked, nucleus/background and
  nucleus/nucleus borders alike; diagonal neighbours are not compared, and the image border is not an edge. Only the
  instance map makes edges; ids need not be contiguous.

So ``label_nc = num_classes + 1``, where ``num_classes`` counts background (5 for CoNSeP's 4 HoVer-Net classes).
The null condition of classifier-free guidance is all zeros over every channel, the edge channel included.
"""

from __future__ import annotations

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["instance_edges", "sdm_condition"]


def _check_int_maps(what: str, *arrays: tuple[str, np.ndarray | None]) -> None:
    for key, arr in arrays:
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray):
            raise InvalidInputError(f"{what}: {key} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim not in (2, 3):
            raise InvalidInputError(f"{what}: {key} must be (H, W) or batched (B, H, W), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{what}: {key} must hold integers (int32), got {arr.dtype}; cast label maps "
                                    "with .astype(np.int32) only if they hold whole numbers")
        if arr.size and arr.min() < 0:
            raise InvalidInputError(f"{what}: {key} has negative values ({int(arr.min())}); ids and classes are >= 0")


def instance_edges(inst_map: np.ndarray) -> np.ndarray:
    """Boolean edge map of an instance map (H, W) or a batch (B, H, W), with SDM's 4-neighbour convention.

    Args:
        inst_map: integer instance ids, 0 background; ids need not be contiguous.

    Returns:
        bool array of the same shape: True where a pixel's id differs from a 4-neighbour's. Both sides of every
        boundary are marked; pixels are never compared across the image border.
    """
    _check_int_maps("instance_edges", ("inst_map", inst_map))
    edges = np.zeros(inst_map.shape, dtype=bool)
    horizontal = inst_map[..., :, 1:] != inst_map[..., :, :-1]  # pairs (x, x+1)
    edges[..., :, 1:] |= horizontal
    edges[..., :, :-1] |= horizontal
    vertical = inst_map[..., 1:, :] != inst_map[..., :-1, :]  # pairs (y, y+1)
    edges[..., 1:, :] |= vertical
    edges[..., :-1, :] |= vertical
    return edges


def sdm_condition(type_map: np.ndarray | None, inst_map: np.ndarray, num_classes: int) -> np.ndarray:
    """SDM's condition ``y`` for one label map (H, W) or a batch (B, H, W).

    Args:
        type_map: class ids 0..num_classes-1, 0 background, with the same foreground as ``inst_map``. ``None`` for
            instance-only data: every nucleus is then class 1 (so ``num_classes`` must be at least 2).
        inst_map: instance ids, 0 background; ids need not be contiguous.
        num_classes: number of classes **counting background** (SDM's ``num_classes``; 5 for CoNSeP in HoVer-Net's
            4 classes).

    Returns:
        float32 array of shape (num_classes + 1, H, W), or (B, num_classes + 1, H, W) for batched input, holding
        exactly 0.0 and 1.0: the one-hot class map (background channel 0) followed by the instance edge map.

    Raises:
        InvalidInputError: on non-integer or negative maps, shape mismatch, foreground disagreement between the two
            maps, or a class outside ``0..num_classes-1``.

    Example:
        >>> inst = np.array([[0, 1, 1], [0, 0, 2]], dtype=np.int32)
        >>> typ = np.array([[0, 3, 3], [0, 0, 1]], dtype=np.int32)
        >>> y = sdm_condition(typ, inst, num_classes=5)
        >>> y.shape, y[3, 0].tolist(), y[5, 1].tolist()
        ((6, 2, 3), [0.0, 1.0, 1.0], [0.0, 1.0, 1.0])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise InvalidInputError(f"sdm_condition: num_classes must be an int >= 2 counting background, "
                                f"got {num_classes!r}")
    _check_int_maps("sdm_condition", ("inst_map", inst_map), ("type_map", type_map))
    if type_map is None:
        type_map = (inst_map > 0).astype(np.int32)
    elif type_map.shape != inst_map.shape:
        raise InvalidInputError(f"sdm_condition: type_map {type_map.shape} and inst_map {inst_map.shape} differ in "
                                "shape")
    else:
        mismatch = int(((type_map > 0) != (inst_map > 0)).sum())
        if mismatch:
            raise InvalidInputError(f"sdm_condition: type_map and inst_map foregrounds disagree on {mismatch} pixels; "
                                    "every nucleus pixel needs a class > 0 and every background pixel class 0")
    if type_map.size and int(type_map.max()) >= num_classes:
        raise InvalidInputError(f"sdm_condition: type_map has class {int(type_map.max())} but num_classes="
                                f"{num_classes} allows only 0..{num_classes - 1}; pass the number of classes "
                                "counting background, in the scheme the maps are in")
    channel_axis = type_map.ndim - 2  # 0 for (H, W), 1 for (B, H, W)
    classes = np.arange(num_classes).reshape((num_classes, 1, 1))
    one_hot = np.expand_dims(type_map, channel_axis) == classes
    edges = np.expand_dims(instance_edges(inst_map), channel_axis)
    return np.concatenate([one_hot, edges], axis=channel_axis).astype(np.float32)
