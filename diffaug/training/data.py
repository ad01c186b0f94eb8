"""Training data: a resumable, shardable stream of augmented crops from a tile folder.

**Data order.** The training set is read as an endless stream of samples, the concatenation of one permutation of the
tiles per epoch. The permutation of epoch ``e`` is a function of ``(seed, e)`` only, and global sample ``k`` is tile
``perm_{k // n}[k % n]``. A step on a run of W processes with batch size B takes the next W·B samples of the stream;
process r takes the r-th block of B. So the data position of a run is one integer, the number of samples consumed,
and resuming continues the stream exactly (:class:`ShardedBatchSampler`).

**Augmentation.** Sample ``k`` draws its crop offset and its element of the dihedral group (4 rotations by 90° times
an optional flip) from ``numpy.random.default_rng((seed, stream, k))``. Its randomness therefore depends on neither the
worker that loads it nor on what was loaded before, so DataLoader workers and resumption cannot change it. The image,
the instance map and the type map get the same crop, flip and rotation.

**Condition.** ``y`` is :func:`diffaug.labels.sdm_condition` of the augmented maps: one-hot classes with background in
channel 0, then the instance edge map (SPEC §2). An instance-only folder is trained with two classes, background and
``nucleus``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaug.data.schemes import ClassScheme
from diffaug.data.tiles import Tile, TileFolder
from diffaug.errors import ConfigError, DataFormatError

__all__ = ["NUCLEUS_SCHEME", "data_order", "tile_of_sample", "dihedral", "draw_augmentation", "Augmentation",
           "crop_and_augment", "TrainingTiles", "ShardedBatchSampler", "condition_scheme", "fixed_crops",
           "image_to_tensor", "tensor_to_image"]

#: The class scheme an instance-only folder is trained in: every nucleus is class 1.
NUCLEUS_SCHEME = ClassScheme("nucleus", {1: "nucleus"})

# Stream tags keep the random streams drawn from one seed independent of each other.
_ORDER_STREAM = 0x0D1A
_AUG_STREAM = 0xA06


def data_order(seed: int, epoch: int, num_tiles: int) -> np.ndarray:
    """The permutation of tile indices for one epoch: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng((seed, _ORDER_STREAM, epoch)).permutation(num_tiles)


def tile_of_sample(seed: int, sample: int, num_tiles: int) -> int:
    """Tile index of global sample ``sample`` of the stream (see the module docstring)."""
    epoch, position = divmod(sample, num_tiles)
    return int(data_order(seed, epoch, num_tiles)[position])


@dataclass(frozen=True)
class Augmentation:
    """A crop window and a dihedral transform: rotate by ``rot90`` quarter turns (counter-clockwise), then flip
    left-right when ``flip``."""

    top: int
    left: int
    size: int
    rot90: int
    flip: bool


def draw_augmentation(rng: np.random.Generator, shape: tuple[int, int], size: int) -> Augmentation:
    """Draw a uniform crop of ``size``² inside ``shape`` and a uniform element of the dihedral group D4."""
    top = int(rng.integers(0, shape[0] - size + 1))
    left = int(rng.integers(0, shape[1] - size + 1))
    return Augmentation(top, left, size, rot90=int(rng.integers(0, 4)), flip=bool(rng.integers(0, 2)))


def dihedral(array: np.ndarray, rot90: int, flip: bool) -> np.ndarray:
    """Rotate the first two axes by ``rot90`` quarter turns, then flip left-right; contiguous copy."""
    out = np.rot90(array, k=rot90, axes=(0, 1))
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def crop_and_augment(arrays: Sequence[np.ndarray | None], aug: Augmentation) -> list[np.ndarray | None]:
    """Apply the same crop and dihedral transform to every array (H, W[, C]); ``None`` entries pass through."""
    out: list[np.ndarray | None] = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        window = array[aug.top:aug.top + aug.size, aug.left:aug.left + aug.size]
        out.append(dihedral(window, aug.rot90, aug.flip))
    return out


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (3, H, W) in [−1, 1], as the reference scales images (x/127.5 − 1)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [−1, 1] → uint8 (H, W, 3), rounding half up like the reference quantisation."""
    scaled = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255)
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()


def condition_scheme(folder: TileFolder) -> ClassScheme:
    """The class scheme the model is conditioned on: the folder's (merged) scheme, or :data:`NUCLEUS_SCHEME` for an
    instance-only folder."""
    return folder.scheme if folder.has_classes else NUCLEUS_SCHEME


def _condition(type_map: np.ndarray | None, inst_map: np.ndarray, num_classes: int) -> np.ndarray:
    from diffaug.labels.condition import sdm_condition

    return sdm_condition(type_map, inst_map, num_classes)  # type_map None: every nucleus is class 1


class _StainNormaliser:
    """Stain normalisation to one target image (:class:`diffaug.data.StainNormalizer`), fitted on first use, so
    that each DataLoader worker fits its own and staintools is imported only when stain normalisation is asked for."""

    def __init__(self, target: str, method: str) -> None:
        self.target = Path(target)
        self.method = method
        if not self.target.is_file():
            raise DataFormatError(f"data.stain_target: {self.target} not found; pass an RGB tile (PNG) to normalise "
                                  "the stain to, or stain_target=null")
        self._normalizer: Any = None

    def __call__(self, image: np.ndarray, where: str) -> np.ndarray:
        from diffaug.errors import InvalidInputError

        if self._normalizer is None:
            from diffaug.data.stain import StainNormalizer
            from diffaug.data.tiles import read_image

            try:
                self._normalizer = StainNormalizer(self.method).fit(read_image(self.target))  # type: ignore[arg-type]
            except InvalidInputError as exc:
                raise DataFormatError(f"data.stain_target {self.target}: {exc}") from None
        try:
            return self._normalizer.transform(image)
        except InvalidInputError as exc:
            raise DataFormatError(f"{where}: stain normalisation failed ({exc}); hold the tile out with data.holdout "
                                  "or train without data.stain_target") from None


class TrainingTiles(torch.utils.data.Dataset):
    """Map-style dataset over the *global sample index* of the training stream (see the module docstring).

    ``dataset[k]`` is a dict with ``"image"`` float32 (3, S, S) in [−1, 1] and ``"y"`` float32 (C, S, S), where S is
    ``size`` and C = ``num_classes`` + 1. The index is unbounded: it runs over epochs.

    Args:
        folder: the tile folder (already opened, in the classes to train in).
        names: the training tiles (names in ``folder``).
        size: crop size (the model's image size).
        seed: the run's seed.
        stain: optional callable ``(image, where) -> image`` applied to each tile after reading (``where`` names the
            tile in errors).
        cache: keep decoded tiles in memory (per process).
    """

    def __init__(self, folder: TileFolder, names: Sequence[str], *, size: int, seed: int,
                 stain: Any = None, cache: bool = False) -> None:
        if not names:
            raise DataFormatError(f"{folder.root}: no training tiles left after data.holdout")
        self.folder = folder
        self.names = list(names)
        self.size = size
        self.seed = seed
        self.stain = stain
        self.cache: dict[str, Tile] | None = {} if cache else None
        self.scheme = condition_scheme(folder)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        """Classes counting background (the model's ``num_classes``)."""
        return self.scheme.num_classes

    def __len__(self) -> int:
        """Tiles per epoch (the index itself is unbounded)."""
        return len(self.names)

    def read(self, name: str) -> Tile:
        """Read one tile (stain-normalised when configured); the crop size must fit inside it."""
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        tile = self.folder.read(name)
        h, w = tile.shape
        if h < self.size or w < self.size:
            raise DataFormatError(f"{self.folder.root / name}.png: tile is {h}x{w}, smaller than the model's image "
                                  f"size {self.size}; remove it or train a smaller model")
        if self.stain is not None:
            tile.image = self.stain(tile.image, f"{self.folder.root / name}.png")
        if self.cache is not None:
            self.cache[name] = tile
        return tile

    def tile_index(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.names))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, data_order(self.seed, epoch, len(self.names)))
        return int(self._order[1][position])

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        if sample < 0:
            raise IndexError(sample)
        tile = self.read(self.names[self.tile_index(sample)])
        rng = np.random.default_rng((self.seed, _AUG_STREAM, sample))
        aug = draw_augmentation(rng, tile.shape, self.size)
        image, inst_map, type_map = crop_and_augment([tile.image, tile.inst_map, tile.type_map], aug)
        y = _condition(type_map, inst_map, self.num_classes)  # type: ignore[arg-type]
        return {"image": image_to_tensor(image), "y": torch.from_numpy(y)}  # type: ignore[arg-type]


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of global sample indices for one process of a (possibly distributed) run.

    Step i (counted from this sampler's start) covers samples ``start + i·W·B … start + (i+1)·W·B − 1`` of the stream;
    rank r takes ``start + i·W·B + r·B + (0..B−1)``. Every rank sees disjoint samples, together they see all, and the
    whole state is ``start``: resumption builds a new sampler at the number of samples consumed so far.
    """

    def __init__(self, *, start: int, num_steps: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.start, self.num_steps, self.batch_size = start, num_steps, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.world_size
        for i in range(self.num_steps):
            base = self.start + i * per_step + self.rank * self.batch_size
            yield list(range(base, base + self.batch_size))


def split_holdout(names: Sequence[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) tile names; a pattern that matches no tile is a :class:`ConfigError`."""
    held = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(f"data.holdout: pattern {pattern!r} matches no tile; tile names look like {names[0]!r}")
        held.update(hits)
    return [n for n in names if n not in held], [n for n in names if n in held]


def fixed_crops(dataset: TrainingTiles, names: Sequence[str], count: int) -> list[dict[str, Any]]:
    """``count`` deterministic crops (no augmentation) from ``names``, cycling over the tiles and, on later passes,
    over the centre, then the four corners. Each item has ``image`` (uint8 H×W×3), ``inst_map``, ``type_map`` (None
    for instance-only), ``y`` (float32) and ``name``."""
    if not names:
        return []
    items = []
    for i in range(count):
        name = names[i % len(names)]
        tile = dataset.read(name)
        h, w = tile.shape
        s = dataset.size
        anchors = [((h - s) // 2, (w - s) // 2), (0, 0), (0, w - s), (h - s, 0), (h - s, w - s)]
        top, left = anchors[(i // len(names)) % len(anchors)]
        aug = Augmentation(top, left, s, rot90=0, flip=False)
        image, inst_map, type_map = crop_and_augment([tile.image, tile.inst_map, tile.type_map], aug)
        y = _condition(type_map, inst_map, dataset.num_classes)  # type: ignore[arg-type]
        items.append({"name": name, "image": image, "inst_map": inst_map, "type_map": type_map, "y": y})
    return items


def open_training_data(root: str | os.PathLike[str], *, classes: str, holdout: Sequence[str], size: int, seed: int,
                       stain_target: str | None, stain_method: str,
                       cache: bool) -> tuple[TrainingTiles, list[str]]:
    """Open the tile folder and build the training dataset; returns it with the held-out tile names.

    Raises:
        DataFormatError: the folder is missing, empty or malformed, or the stain target is missing.
        ConfigError: a holdout pattern matches nothing.
    """
    folder = TileFolder(root, classes=classes)
    train_names, held = split_holdout(folder.names, holdout)
    stain = _StainNormaliser(stain_target, stain_method) if stain_target is not None else None
    return TrainingTiles(folder, train_names, size=size, seed=seed, stain=stain, cache=cache), held
