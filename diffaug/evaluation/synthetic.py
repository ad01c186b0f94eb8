"""Synthetic training pairs for the evaluation arms: DiffMix (label edit + diffusion re-rendering) and GradMix.

- **DiffMix** (:func:`diffmix_pairs`): every tile's label maps are edited with the arm's policy —
  ``balance`` (:func:`diffaug.labels.balance_label_map` with the training set's donor bank), ``enlarge``
  (:func:`diffaug.labels.enlarge_label_map`) or ``both`` (balance, then enlarge the balanced map) — and the image is
  re-rendered under the edited maps by :class:`~diffaug.pipelines.SemanticSynthesisPipeline` with DiffMix's partial
  noise from the real image. Every tile gets a new image, even when its edit changed nothing.
- **GradMix** (:func:`gradmix_pairs`): the balancing edit with the image blended by
  :func:`diffaug.transforms.gradmix.gradmix`. A tile the edit leaves unchanged gives no pair (it would only repeat
  the real tile).

Item ``i`` of a run draws its label edit from ``numpy.random.default_rng([seed, i])`` and its start noise from
``torch.Generator().manual_seed(item_seed(seed, i))``, so any subset, order or batch size gives the same pairs.
Tiles larger than the model are rendered in model-size windows (see :func:`render`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from diffaug.data.tiles import Tile
from diffaug.errors import ConfigError
from diffaug.labels import DonorBank, LabelEdit, balance_label_map, enlarge_label_map

__all__ = ["SynthesisSettings", "item_seed", "edit_labels", "render", "diffmix_pairs", "gradmix_pairs"]

Policy = Literal["balance", "enlarge", "both"]


@dataclass(frozen=True)
class SynthesisSettings:
    """Sampler settings of the DiffMix arms (DiffMix's published values by default)."""

    strength: float = 0.55
    num_inference_steps: int = 100
    guidance_scale: float = 1.5
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength must be in (0, 1], got {self.strength}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"--num-inference-steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--synthesis-batch-size must be >= 1, got {self.batch_size}")


def item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a job seeded with ``seed`` (independent streams per item)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def edit_labels(tile: Tile, policy: Policy, rng: np.random.Generator, bank: DonorBank | None) -> LabelEdit:
    """The DiffMix label edit of one tile under ``policy`` (see the module docstring)."""
    if policy in ("balance", "both"):
        edit = balance_label_map(tile.inst_map, tile.type_map, rng=rng, bank=bank, tile_name=tile.name)
        if policy == "balance":
            return edit
        moved = enlarge_label_map(edit.inst_map, edit.type_map, rng=rng)
        moved.record = {"policy": "both", "balance": edit.record, "enlarge": moved.record}
        return moved
    if policy == "enlarge":
        return enlarge_label_map(tile.inst_map, tile.type_map, rng=rng)
    raise ConfigError(f"unknown DiffMix policy {policy!r}; use balance, enlarge or both")


def render(pipe: Any, items: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray | None]], *, seed: int,
           settings: SynthesisSettings = SynthesisSettings(),
           progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Render one image per ``(image, inst_map, type_map)`` item with ``pipe``.

    Item ``i`` starts from the noise ``torch.Generator().manual_seed(item_seed(seed, i))`` of its full size, drawn
    on the CPU, so a seed gives the same images on every device and batch size. ``image`` is the start of partial
    noise (unused at ``strength=1.0``). An item larger than the model's ``image_size`` is rendered in model-size
    windows (:func:`diffaug.generate.plan.tile_windows`: non-overlapping, the last row and column flush) that are
    pasted back, as ``diffaug generate`` renders tiles: the model then always sees the size it was trained at, and
    its attention layers do not grow with the tile. Windows of all items are batched together.
    """
    import torch

    from diffaug.generate.plan import tile_windows

    size = getattr(getattr(getattr(pipe, "model", None), "config", None), "image_size", None)
    noises = [torch.randn((3, *inst_map.shape), generator=torch.Generator().manual_seed(item_seed(seed, i)))
              for i, (_, inst_map, _) in enumerate(items)]
    # (item, y0, x0, h, w) per model call: whole items when the model takes any size or the item fits
    windows: list[tuple[int, int, int, int, int]] = []
    for i, (_, inst_map, _) in enumerate(items):
        h, w = inst_map.shape
        if size is None or (h <= size and w <= size):
            windows.append((i, 0, 0, h, w))
        else:
            windows += [(i, y, x, size, size) for y, x in tile_windows((h, w), size, tile=f"item {i}")]
    images = [np.zeros((*inst_map.shape, 3), np.uint8) for _, inst_map, _ in items]
    left = Counter(i for i, *_ in windows)  # windows still to render, per item
    by_shape: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for win in windows:
        by_shape.setdefault(win[3:], []).append(win)
    typed = items[0][2] is not None if items else False
    for group in by_shape.values():
        for start in range(0, len(group), settings.batch_size):
            chunk = [(i, (slice(y, y + h), slice(x, x + w)))
                     for i, y, x, h, w in group[start:start + settings.batch_size]]

            def crops(k: int) -> list[np.ndarray]:
                return [np.ascontiguousarray(items[i][k][win]) for i, win in chunk]

            noise = torch.stack([noises[i][(slice(None), *win)] for i, win in chunk])
            result = pipe(image=None if settings.strength == 1.0 else crops(0), inst_map=crops(1),
                          type_map=crops(2) if typed else None, strength=settings.strength,
                          num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                          noise=noise.contiguous())
            finished = 0
            for (i, win), image in zip(chunk, result.images):
                images[i][win] = image
                left[i] -= 1
                finished += left[i] == 0
            if progress is not None and finished:
                progress(finished)
    return images


def diffmix_pairs(tiles: Sequence[Tile], policy: Policy, pipe: Any, *, seed: int, bank: DonorBank | None,
                  settings: SynthesisSettings = SynthesisSettings(),
                  progress: Callable[[int], None] | None = None) -> list[Tile]:
    """One DiffMix pair per tile: edited maps and the image rendered for them by ``pipe`` from the real image.

    Args:
        tiles: real tiles with images.
        policy: ``"balance"``, ``"enlarge"`` or ``"both"``.
        pipe: a :class:`~diffaug.pipelines.SemanticSynthesisPipeline`.
        seed: the job seed (see the module docstring).
        bank: the training set's donor bank (balancing needs it; ``None`` for ``"enlarge"``).
        settings: sampler settings.
        progress: called with the number of pairs finished after each batch.
    """
    edits = [edit_labels(t, policy, np.random.default_rng([seed, i]), bank) for i, t in enumerate(tiles)]
    images = render(pipe, [(t.image, e.inst_map, e.type_map) for t, e in zip(tiles, edits)], seed=seed,
                    settings=settings, progress=progress)
    return [Tile(name=f"{t.name}_diffmix-{policy}", image=image, inst_map=e.inst_map, type_map=e.type_map,
                 inst_type=e.inst_type) for t, e, image in zip(tiles, edits, images)]


def gradmix_pairs(tiles: Sequence[Tile], *, seed: int, bank: DonorBank,
                  donor_tile: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> list[Tile]:
    """GradMix pairs of the tiles whose balancing edit replaced at least one nucleus."""
    from diffaug.transforms.gradmix import gradmix

    pairs = []
    for i, tile in enumerate(tiles):
        assert tile.image is not None and tile.type_map is not None
        image, edit = gradmix(tile.image, tile.inst_map, tile.type_map, rng=np.random.default_rng([seed, i]),
                              bank=bank, donor_tile=donor_tile, tile_name=tile.name)
        if edit.record["n_replaced"]:
            pairs.append(Tile(name=f"{tile.name}_gradmix", image=image, inst_map=edit.inst_map,
                              type_map=edit.type_map, inst_type=edit.inst_type))
    return pairs
