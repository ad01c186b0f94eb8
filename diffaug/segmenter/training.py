"""Training loop of the segmenter on a list of tiles (real, synthetic, or both).

Each step draws ``batch_size`` tiles uniformly at random (with replacement), crops a random ``patch_size`` window from
each, applies a random flip and 90° rotation, builds HoVer-Net's targets from the cropped maps
(:func:`~diffaug.segmenter.losses.hovernet_targets`, so horizontal/vertical maps are always those of the crop) and takes
one AdamW step on :func:`~diffaug.segmenter.losses.hovernet_loss`, with a cosine learning-rate decay to zero over
``steps``.

Determinism: the model is initialised from ``torch.Generator().manual_seed(seed)`` and every data draw comes from
``numpy.random.default_rng(seed)``; nothing touches global random state. On CPU the same seed gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffaug.data.tiles import Tile
from diffaug.errors import ConfigError, InvalidInputError
from diffaug.segmenter.losses import hovernet_loss, hovernet_targets
from diffaug.segmenter.model import Segmenter, SegmenterConfig

__all__ = ["TrainingSettings", "train_segmenter", "check_training_tiles", "augment_crop"]


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation budget of :func:`train_segmenter`.

    Args:
        steps: optimiser steps.
        batch_size: crops per step.
        patch_size: side of the square training crop; a multiple of the model's ``size_multiple`` and at most the
            smallest tile side.
        lr: peak AdamW learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        seed: seeds both the weight initialisation and the data draws.
    """

    steps: int = 1500
    batch_size: int = 8
    patch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TrainingSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"TrainingSettings.lr must be > 0, got {self.lr}")


def check_training_tiles(tiles: Sequence[Tile], config: SegmenterConfig, patch_size: int) -> None:
    """Validate tiles for training: images present, shapes, classes within the model's range, crop size fits."""
    if len(tiles) == 0:
        raise InvalidInputError("no training tiles given")
    if patch_size % config.size_multiple:
        raise ConfigError(f"patch_size {patch_size} must be a multiple of {config.size_multiple} for a segmenter with "
                          f"{len(config.channels)} levels")
    for tile in tiles:
        if tile.image is None:
            raise InvalidInputError(f"tile {tile.name}: training needs its image")
        if tile.image.shape[:2] != tile.inst_map.shape:
            raise InvalidInputError(f"tile {tile.name}: image {tile.image.shape[:2]} and inst_map "
                                    f"{tile.inst_map.shape} differ in shape")
        if min(tile.inst_map.shape) < patch_size:
            raise ConfigError(f"tile {tile.name} is {tile.inst_map.shape}, smaller than patch_size {patch_size}; "
                              "lower --patch-size")
        if config.has_types:
            if tile.type_map is None:
                raise InvalidInputError(f"tile {tile.name}: the segmenter has a type branch but the tile has no "
                                        "type_map")
            if tile.type_map.max(initial=0) >= config.num_classes:
                raise InvalidInputError(f"tile {tile.name}: class {int(tile.type_map.max())} is outside the "
                                        f"segmenter's classes 0..{config.num_classes - 1}")


def augment_crop(tile: Tile, patch_size: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random ``patch_size`` crop of ``tile`` with a random flip and 90° rotation (image, inst_map, type_map)."""
    h, w = tile.inst_map.shape
    y0 = int(rng.integers(0, h - patch_size + 1))
    x0 = int(rng.integers(0, w - patch_size + 1))
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    sl = (slice(y0, y0 + patch_size), slice(x0, x0 + patch_size))

    def geo(a: np.ndarray) -> np.ndarray:
        a = a[sl]
        if flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(np.rot90(a, k, axes=(0, 1)))

    assert tile.image is not None
    return geo(tile.image), geo(tile.inst_map), None if tile.type_map is None else geo(tile.type_map)


def _batch(tiles: Sequence[Tile], indices: np.ndarray, patch_size: int, rng: np.random.Generator,
           has_types: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, targets = [], []
    for i in indices:
        image, inst_map, type_map = augment_crop(tiles[int(i)], patch_size, rng)
        images.append(image)
        targets.append(hovernet_targets(inst_map, type_map if has_types else None))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    batch = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}
    return x, batch


def train_segmenter(tiles: Sequence[Tile], config: SegmenterConfig, settings: TrainingSettings = TrainingSettings(),
                    *, device: str | torch.device = "cpu", progress: bool = True,
                    on_step: Callable[[int, dict[str, float]], None] | None = None) -> Segmenter:
    """Train a new :class:`Segmenter` on ``tiles`` and return it in eval mode.

    Args:
        tiles: training tiles with images (a :class:`~diffaug.data.Tile` list; real and synthetic pairs mix freely).
        config: the architecture; ``config.num_classes`` 0 trains an instance-only model.
        settings: optimisation budget and seed.
        device: torch device.
        progress: show a progress bar with the running loss.
        on_step: called after every step with the step index and the loss parts (``"total"`` included), e.g. to log.

    Example:
        >>> from diffaug.data import TileFolder  # doctest: +SKIP
        >>> tiles = list(TileFolder("shared/data/consep_train"))  # doctest: +SKIP
        >>> model = train_segmenter(tiles, SegmenterConfig(num_classes=5), TrainingSettings(steps=500))  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    check_training_tiles(tiles, config, settings.patch_size)
    device = torch.device(device)
    model = Segmenter(config, generator=torch.Generator().manual_seed(settings.seed)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # Cosine decay from lr to 0 over the budget (λ(step) multiplies the base lr).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    rng = np.random.default_rng(settings.seed)
    model.train()
    bar = tqdm(range(settings.steps), desc="segmenter", disable=not progress, leave=False)
    running = None
    for step in bar:
        indices = rng.integers(0, len(tiles), size=settings.batch_size)
        x, targets = _batch(tiles, indices, settings.patch_size, rng, config.has_types)
        x = x.to(device)
        targets = {k: v.to(device) for k, v in targets.items()}
        loss, parts = hovernet_loss(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}")
        if on_step is not None:
            on_step(step, {"total": value, **parts})
    model.eval()
    return model
