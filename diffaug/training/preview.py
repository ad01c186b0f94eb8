"""Preview grids written during training: one row per held-out crop, real | label overlay | EMA sample.

Samples are drawn with a few deterministic DDIM steps (η = 0) from pure noise. The noise is the same at every
preview, so grids of successive steps show the model's progress on identical inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffaug._io import atomic_write_png
from diffaug.diffusion import GaussianDiffusion, classifier_free_guidance
from diffaug.training.data import tensor_to_image

__all__ = ["CLASS_COLOURS", "label_overlay", "ddim_sample", "preview_grid", "write_preview"]

#: RGB colour of each class id in overlays (id 0, background, is never painted); cycles beyond its length.
CLASS_COLOURS = np.array([[0, 0, 0], [255, 255, 0], [255, 0, 0], [0, 200, 0], [0, 90, 255], [255, 0, 255],
                          [0, 255, 255], [255, 128, 0], [128, 0, 255], [128, 255, 0], [255, 255, 255]], dtype=np.uint8)


def label_overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None, *,
                  alpha: float = 0.45) -> np.ndarray:
    """The image with each nucleus tinted by its class colour (instance-only maps: class 1) and its edges drawn.

    Args:
        image: uint8 (H, W, 3).
        inst_map: int (H, W), 0 background.
        type_map: int (H, W) classes, or None.
        alpha: opacity of the tint.

    Returns:
        uint8 (H, W, 3).
    """
    from diffaug.labels.condition import instance_edges

    classes = (inst_map > 0).astype(np.int64) if type_map is None else type_map.astype(np.int64)
    colours = CLASS_COLOURS[1:][(classes - 1) % (len(CLASS_COLOURS) - 1)]
    out = image.astype(np.float32)
    fg = classes > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    edges = instance_edges(inst_map) & fg
    out[edges] = colours[edges]
    return out.round().astype(np.uint8)


@torch.no_grad()
def ddim_sample(model: nn.Module, diffusion: GaussianDiffusion, y: torch.Tensor, noise: torch.Tensor, *,
                num_inference_steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from pure noise: x_T = ``noise``, then ``num_inference_steps`` steps.

    Args:
        model: ``model(x, timesteps, y) -> (B, 2C, H, W)`` taking original timestep indices.
        diffusion: the training (unrespaced) diffusion; it is respaced to ``num_inference_steps`` here.
        y: condition (B, label_nc, H, W).
        noise: x_T, (B, C, H, W) on the model's device.
        num_inference_steps: N of "ddimN".
        guidance_scale: w of ε̂ = ε_u + w·(ε_c − ε_u); both branches run in one batch of 2B. w = 1 skips the
            unconditional pass (it has no effect then).

    Returns:
        x_0 in [−1, 1], (B, C, H, W).
    """
    sampler = diffusion.respace(num_inference_steps)
    x = noise
    channels = noise.shape[1]
    for i in reversed(range(sampler.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        model_t = sampler.model_timesteps(t)
        if guidance_scale == 1.0:
            out = model(x, model_t, y)
        else:
            both = model(torch.cat([x, x]), torch.cat([model_t, model_t]), torch.cat([y, torch.zeros_like(y)]))
            cond, uncond = both.chunk(2)
            out = classifier_free_guidance(cond, uncond, guidance_scale, channels)
        x = sampler.ddim_step(out[:, :channels].float(), x, t).prev_sample
    return x


def preview_grid(rows: Sequence[Sequence[np.ndarray]], *, cell: int = 128, gutter: int = 2) -> np.ndarray:
    """Tile uint8 images into a grid, each scaled by an integer factor (nearest) to about ``cell`` pixels."""
    height, width = rows[0][0].shape[:2]
    scale = max(1, cell // max(height, width))
    h, w = height * scale, width * scale
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    grid = np.full((n_rows * (h + gutter) + gutter, n_cols * (w + gutter) + gutter, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
            top, left = gutter + r * (h + gutter), gutter + c * (w + gutter)
            grid[top:top + h, left:left + w] = big
    return grid


def write_preview(path: str | os.PathLike[str], model: nn.Module, diffusion: GaussianDiffusion,
                  items: Sequence[dict[str, Any]], *, seed: int, num_inference_steps: int,
                  guidance_scale: float, device: torch.device) -> Path:
    """Sample one image per item (see :func:`diffaug.training.data.fixed_crops`) and write the grid as PNG.

    The noise is drawn on the CPU from a generator seeded with ``seed``, so it is the same on every call and every
    device.
    """
    y = torch.from_numpy(np.stack([item["y"] for item in items])).to(device)
    size = y.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(items), 3, size, size), generator=generator).to(device)
    samples = ddim_sample(model, diffusion, y, noise, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale)
    rows = [[item["image"], label_overlay(item["image"], item["inst_map"], item["type_map"]),
             tensor_to_image(sample)] for item, sample in zip(items, samples)]
    return atomic_write_png(path, preview_grid(rows))
