"""The plan of a generation job: which outputs exist, in which order, with which seed, in which batches.

Every output is an *item* ``(tile, window, copy)`` with a fixed index in the plan: tiles in name order, for each
tile its model-size windows row by row, for each window ``per_tile`` copies. Its randomness (the label edit and the
start noise of the sampler) comes only from :func:`item_seed` ``(job_seed, index)``, and batches are fixed,
consecutive slices of the plan (:func:`batches`), so an output does not depend on the worker count, the engine, or on
interruptions. The batch size changes only the float rounding of the model's convolutions (the start noise of each
item is its own), never a label map or a record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from diffaug.data.patches import window_starts
from diffaug.errors import InvalidInputError

__all__ = ["Item", "plan_items", "tile_windows", "item_seed", "item_generators", "batches", "fingerprint"]

_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Item:
    """One output: copy ``copy`` of the ``size`` × ``size`` window at (``y0``, ``x0``) of tile ``tile``.

    Attributes:
        index: position in the plan (the item's seed derives from it).
        tile: source tile name.
        y0: top row of the window in the tile.
        x0: left column of the window in the tile.
        size: window side, the model's image size.
        copy: 0..per_tile-1.
        windowed: True when the tile is larger than one window (the name then carries the window's offsets).
    """

    index: int
    tile: str
    y0: int
    x0: int
    size: int
    copy: int
    windowed: bool

    @property
    def name(self) -> str:
        """Output file stem: the source tile's name, the window's offsets if windowed, and the copy number."""
        window = f"_y{self.y0:04d}x{self.x0:04d}" if self.windowed else ""
        return f"{self.tile}{window}_{self.copy:03d}"

    @property
    def window(self) -> tuple[slice, slice]:
        """Row and column slices of the window in the source tile."""
        return slice(self.y0, self.y0 + self.size), slice(self.x0, self.x0 + self.size)

    def to_dict(self) -> dict:
        return asdict(self)


def tile_windows(shape: tuple[int, int], size: int, *, tile: str = "tile") -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping ``size`` windows covering a tile, the last row/column flush.

    A 256-px side with 64-px windows gives starts 0, 64, 128, 192; a 1000-px side with 256-px windows gives 0, 256,
    512 and 744 (the last window overlaps its neighbour by 24 px rather than leaving pixels out).

    Raises:
        InvalidInputError: a side of the tile is smaller than ``size``.
    """
    h, w = (int(v) for v in shape)
    if h < size or w < size:
        raise InvalidInputError(f"tile {tile!r} is {h}×{w} px, smaller than the model's {size}×{size} px windows; "
                                f"use a model trained at {min(h, w)} px or less, or drop this tile")
    return [(y, x) for y in window_starts(h, size, size) for x in window_starts(w, size, size)]


def plan_items(tiles: Iterable[tuple[str, tuple[int, int]]], *, size: int, per_tile: int,
               limit: int | None = None) -> list[Item]:
    """The ordered items of a job.

    Args:
        tiles: ``(name, (H, W))`` per source tile, in the order to process them.
        size: the model's image size (window side).
        per_tile: outputs per window.
        limit: keep only the first ``limit`` items of the plan.

    Raises:
        InvalidInputError: ``per_tile`` or ``limit`` below 1, or a tile smaller than ``size``.
    """
    if isinstance(per_tile, bool) or not isinstance(per_tile, int) or per_tile < 1:
        raise InvalidInputError(f"--per-tile must be an integer >= 1, got {per_tile!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"--limit must be an integer >= 1, got {limit!r}")
    items: list[Item] = []
    for name, shape in tiles:
        windowed = tuple(shape) != (size, size)
        for y0, x0 in tile_windows(shape, size, tile=name):
            for k in range(per_tile):
                if limit is not None and len(items) >= limit:
                    return items
                items.append(Item(len(items), name, y0, x0, size, k, windowed))
    return items


def item_seed(job_seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of job ``job_seed``: independent streams via ``SeedSequence`` spawn keys."""
    if job_seed < 0 or index < 0:
        raise InvalidInputError(f"seeds and item indices must be >= 0, got seed {job_seed}, index {index}")
    state = np.random.SeedSequence(entropy=job_seed, spawn_key=(index,)).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & _SEED_MASK


def item_generators(seed: int) -> tuple[np.random.Generator, object]:
    """``(numpy Generator, torch Generator)`` of an item from its :func:`item_seed`.

    The numpy generator drives the label edit, the torch generator (CPU) the sampler's start noise. They are two
    independent children of the seed, so changing how many numbers the edit draws never shifts the noise.
    """
    import torch

    edit_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    torch_gen = torch.Generator().manual_seed(int(noise_seq.generate_state(1, dtype=np.uint64)[0]) & _SEED_MASK)
    return np.random.default_rng(edit_seq), torch_gen


def batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """The fixed batches of the plan: consecutive slices of ``batch_size`` items (the last may be shorter).

    A resumed job reruns whole batches of this plan, so every batch is always computed with the same members.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def fingerprint(obj: object) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
