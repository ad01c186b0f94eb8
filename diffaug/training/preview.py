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
from diffaug.viz import contact_sheet, overlay_labels

__all__ = ["ddim_sample", "write_preview"]


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
    rows = [[item["image"], overlay_labels(item["image"], item["inst_map"], item["type_map"]),
             tensor_to_image(sample)] for item, sample in zip(items, samples)]
    side = size * max(1, 128 // size)  # integer nearest-neighbour upscaling keeps pixels crisp
    return atomic_write_png(path, contact_sheet(rows, header=["real", "labels", "sample"], max_side=side))
