"""PanNuke folds: ``images.npy`` (N, 256, 256, 3) and ``masks.npy`` (N, 256, 256, 6).

Mask channels 0..4 hold the instance ids of the nuclei of one class each, in the ``"pannuke"`` scheme order
(neoplastic, inflammatory, connective, dead, epithelial: class = channel + 1); channel 5 is background and is not
read (it is derived from the others). The released files store both arrays as float64; whole-number floats are
accepted, anything else is an error.

A pixel claimed by two class channels is an error (never resolved silently). Nuclei are numbered 1..N in order of
their stored id, then channel, and ``Tile.extra["orig_inst_id"]`` keeps each one's stored id. The fold is memory
mapped and read one image at a time, so a 2,600-image fold (8 GB of masks) costs no memory up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from diffaug.data.schemes import get_scheme, resolve_classes
from diffaug.data.tiles import Tile, as_label_array, assemble_tile
from diffaug.errors import DataFormatError

__all__ = ["PanNukeFold", "read_pannuke", "NUM_MASK_CHANNELS"]

#: Mask channels of a PanNuke fold: five classes and background.
NUM_MASK_CHANNELS = 6


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: PanNuke {what} file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npy array ({exc}); re-download the PanNuke fold") from None


class PanNukeFold(Sequence[Tile]):
    """A PanNuke fold as a lazy sequence of :class:`Tile` in the ``"pannuke"`` scheme.

    Args:
        images_path: ``images.npy``.
        masks_path: ``masks.npy``.
        classes: ``"default"``/``"raw"``/``"pannuke"`` (PanNuke has no standard merge).
        name_prefix: tile names are ``f"{name_prefix}{index:05d}"``; defaults to the images' folder name and ``_``
            (``fold1_00042``).

    Example:
        >>> fold = PanNukeFold("Fold 1/images/fold1/images.npy", "Fold 1/masks/fold1/masks.npy")  # doctest: +SKIP
        >>> write_tile_folder(fold, "pannuke_fold1", "pannuke")  # doctest: +SKIP
    """

    def __init__(self, images_path: str | os.PathLike[str], masks_path: str | os.PathLike[str], *,
                 classes: str = "default", name_prefix: str | None = None) -> None:
        self.images_path = Path(images_path)
        self.masks_path = Path(masks_path)
        self.raw_scheme = get_scheme("pannuke")
        self.scheme, _ = resolve_classes(self.raw_scheme, None, classes, where=str(self.masks_path))
        self._images = _load_npy(self.images_path, "images")
        self._masks = _load_npy(self.masks_path, "masks")
        imgs, masks = self._images.shape, self._masks.shape
        if len(imgs) != 4 or imgs[3] != 3:
            raise DataFormatError(f"{self.images_path}: images have shape {imgs}, expected (N, H, W, 3)")
        if len(masks) != 4 or masks[3] != NUM_MASK_CHANNELS:
            raise DataFormatError(f"{self.masks_path}: masks have shape {masks}, expected (N, H, W, "
                                  f"{NUM_MASK_CHANNELS}): five class channels of instance ids and background")
        if imgs[:3] != masks[:3]:
            raise DataFormatError(f"{self.images_path} has shape {imgs} but {self.masks_path} has {masks}; the "
                                  "images and masks of one fold must match in count and size")
        self.name_prefix = f"{self.images_path.parent.name}_" if name_prefix is None else name_prefix

    def __len__(self) -> int:
        return int(self._images.shape[0])

    @overload
    def __getitem__(self, index: int) -> Tile: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tile]: ...

    def __getitem__(self, index: int | slice) -> Tile | list[Tile]:
        if isinstance(index, slice):
            return [self.read(i) for i in range(*index.indices(len(self)))]
        return self.read(index)

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self)):
            yield self.read(i)

    def read(self, index: int) -> Tile:
        """Read image ``index`` of the fold."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.images_path}: index {index} out of range for {n} images")
        index %= n
        where = f"{self.masks_path}[{index}]"
        image = np.asarray(self._images[index])
        if image.dtype != np.uint8:
            pixels = as_label_array(image, key="image", where=f"{self.images_path}[{index}]")
            if pixels.size and pixels.max() > 255:
                raise DataFormatError(f"{self.images_path}[{index}]: pixel values up to {pixels.max()}; expected "
                                      "0..255")
            image = pixels.astype(np.uint8)
        channels = as_label_array(np.asarray(self._masks[index, ..., :NUM_MASK_CHANNELS - 1]), key="masks",
                                  where=where)
        claimed = (channels > 0).sum(axis=-1)
        if (claimed > 1).any():
            raise DataFormatError(f"{where}: {int((claimed > 1).sum())} pixels belong to nuclei of two classes; "
                                  "each pixel needs at most one non-zero class channel")
        fg = claimed == 1
        channel = channels.argmax(axis=-1)
        # One key per (stored id, channel): the same id in two channels is two nuclei.
        key = channels.max(axis=-1).astype(np.int64) * NUM_MASK_CHANNELS + channel
        keys, rank = np.unique(key[fg], return_inverse=True)
        inst_map = np.zeros(fg.shape, dtype=np.int32)
        inst_map[fg] = rank.reshape(-1) + 1
        type_map = np.where(fg, channel + 1, 0).astype(np.int32)
        return assemble_tile(f"{self.name_prefix}{index:05d}", inst_map=inst_map, type_map=type_map,
                             image=np.ascontiguousarray(image), raw_scheme=self.raw_scheme, merge=None, where=where,
                             extra={"orig_inst_id": (keys // NUM_MASK_CHANNELS).astype(np.int32)})


def read_pannuke(images_path: str | os.PathLike[str], masks_path: str | os.PathLike[str], *,
                 classes: str = "default", name_prefix: str | None = None) -> PanNukeFold:
    """Open a PanNuke fold (see :class:`PanNukeFold`); shapes are checked now, images are read on access."""
    return PanNukeFold(images_path, masks_path, classes=classes, name_prefix=name_prefix)
