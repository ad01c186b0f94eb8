"""Contour overlays of label maps on their image, to check edits by eye."""

from __future__ import annotations

import numpy as np

from diffaug.errors import InvalidInputError
from diffaug.labels.condition import instance_edges

__all__ = ["CLASS_COLOURS", "draw_contours", "before_after"]

#: RGB contour colour of class k at index k (cycled past the end); index 0 is the instance-only colour.
CLASS_COLOURS = np.array([
    (0, 255, 0),      # instance-only: green
    (255, 0, 0),      # 1 (CoNSeP "other"): red
    (0, 255, 255),    # 2: cyan
    (0, 90, 255),     # 3: blue
    (255, 230, 0),    # 4: yellow
    (255, 0, 255),    # 5: magenta
    (255, 140, 0),    # 6: orange
    (140, 255, 140),  # 7: light green
    (255, 255, 255),  # 8: white
], dtype=np.uint8)


def draw_contours(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None = None) -> np.ndarray:
    """The image with each nucleus's boundary pixels painted in its class colour (:data:`CLASS_COLOURS`).

    Args:
        image: RGB uint8 (H, W, 3).
        inst_map: (H, W) instance ids.
        type_map: (H, W) classes, or None (all contours green).

    Returns:
        A new RGB uint8 image.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != inst_map.shape:
        raise InvalidInputError(f"draw_contours: image must be uint8 (H, W, 3) matching inst_map {inst_map.shape}, "
                                f"got {image.dtype} {image.shape}")
    out = image.copy()
    boundary = instance_edges(inst_map) & (inst_map > 0)  # the nucleus side of every boundary
    if type_map is None:
        out[boundary] = CLASS_COLOURS[0]
    else:
        classes = type_map[boundary]
        out[boundary] = CLASS_COLOURS[1 + (classes - 1) % (len(CLASS_COLOURS) - 1)]
    return out


def before_after(image: np.ndarray, before: tuple[np.ndarray, np.ndarray | None],
                 after: tuple[np.ndarray, np.ndarray | None], *, gap: int = 4) -> np.ndarray:
    """Side-by-side overlays ``before | after`` of (inst_map, type_map) pairs on the same image, split by a white gap."""
    left = draw_contours(image, *before)
    right = draw_contours(image, *after)
    separator = np.full((image.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, separator, right], axis=1)
