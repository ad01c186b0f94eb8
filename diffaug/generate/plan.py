"""The plan of a generation job: which outputs exist, in which order, with which seed.

Every output is an *item* ``(tile, window, copy)`` with a fixed index in the plan. Its randomness (the label edit and
the start noise of the sampler) comes only from ``item_seed(job_seed, index)``, and batches are consecutive slices
of the plan, so outputs do not depend on the batch size, the worker count, the engine or on interruptions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["Item", "window_starts", "plan_items", "item_seed", "item_generators", "batches"]


@dataclass(frozen=True)
class Item:
    """One output: copy ``copy`` of the window at (``y0``, ``x0``) of size ``size`` of tile ``tile``."""

    index: int
    tile: str
    y0: int
    x0: int
    size: int
    copy: int
    windowed: bool

    @property
    def name(self) -> str:
        """Output name; starts with the source tile's name."""
        window = f"_y{self.y0:04d}x{self.x0:04d}" if self.windowed else ""
        return f"{self.tile}{window}_{self.copy:03d}"

    def to_dict(self) -> dict:
        return asdict(self)


def window_starts(length: int, size: int) -> list[int]:
    """Start offsets of model-size windows covering ``length`` without overlap except the last, flush window."""
    if length < size:
        raise InvalidInputError(f"a tile side of {length} px is smaller than the model's image size {size} px")
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def plan_items(tiles: Sequence[tuple[str, tuple[int, int]]], *, size: int, per_tile: int,
               limit: int | None = None) -> list[Item]:
    """The ordered items of a job: for each tile (name, (H, W)) in order, each window, ``per_tile`` copies."""
    if per_tile < 1:
        raise InvalidInputError(f"--per-tile must be >= 1, got {per_tile}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {limit}")
    items: list[Item] = []
    for name, (h, w) in tiles:
        ys, xs = window_starts(h, size), window_starts(w, size)
        windowed = (h, w) != (size, size)
        for y0 in ys:
            for x0 in xs:
                for k in range(per_tile):
                    items.append(Item(len(items), name, y0, x0, size, k, windowed))
                    if limit is not None and len(items) >= limit:
                        return items
    return items


def item_seed(job_seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of job ``job_seed`` (independent streams via ``SeedSequence`` spawn keys)."""
    state = np.random.SeedSequence(entropy=job_seed, spawn_key=(index,)).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def item_generators(job_seed: int, index: int):
    """``(numpy Generator, torch Generator)`` for an item: label edit and sampler noise, from one seed."""
    import torch

    seed = item_seed(job_seed, index)
    np_rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(0,)))
    torch_gen = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy=seed, spawn_key=(1,))
                                                 .generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1)))
    return np_rng, torch_gen


def batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive slices of the plan."""
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {batch_size}")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def fingerprint(obj: object) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
