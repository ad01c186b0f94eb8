"""HoVer-Net's training targets and losses (Graham et al. 2019, Sec. 3.3.1).

Targets per sample, from the label maps after augmentation:

- NP: ``inst_map > 0`` (class index 0/1);
- HV: :func:`diffaug.labels.hv_maps` of the instance map, (2, H, W) = (horizontal, vertical) in [-1, 1];
- TP: the type map (class index 0..K).

Loss, with the paper's weights (λ_b = 2, all others 1):

    L = L_a + 2·L_b + L_c + L_d + L_e + L_f

- L_a: mean squared error of the HV maps over all pixels;
- L_b: mean squared error of their gradients (∂h/∂x and ∂v/∂y, 3×3 Sobel here; the paper uses a larger one),
  over nucleus pixels only;
- L_c, L_d: cross-entropy and soft Dice of the NP branch;
- L_e, L_f: cross-entropy and soft Dice (summed over classes) of the TP branch, when the model has one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from diffaug.segmenter.model import SegmenterOutput

__all__ = ["hovernet_targets", "hovernet_loss"]


def hovernet_targets(inst_map: np.ndarray, type_map: np.ndarray | None) -> dict[str, np.ndarray]:
    """NP, HV and TP targets of one sample (numpy). ``tp`` is absent without a type map."""
    from diffaug.labels import hv_maps

    targets = {"np": (inst_map > 0).astype(np.int64), "hv": np.asarray(hv_maps(inst_map), dtype=np.float32)}
    if type_map is not None:
        targets["tp"] = type_map.astype(np.int64)
    return targets


def _soft_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int, *, skip_background: bool) -> torch.Tensor:
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(prob.dtype)
    if skip_background:
        prob, onehot = prob[:, 1:], onehot[:, 1:]
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + 1e-3) / (denom + 1e-3)).sum()


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _sobel_grads(hv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂h/∂x of channel 0 and ∂v/∂y of channel 1 (B, 1, H, W) each, in map units per pixel."""
    kx = _SOBEL_X.to(hv)[None, None]
    ky = kx.transpose(-1, -2)
    return F.conv2d(hv[:, :1], kx, padding=1), F.conv2d(hv[:, 1:], ky, padding=1)


def hovernet_loss(out: SegmenterOutput, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging). ``targets``: batched tensors from :func:`hovernet_targets`."""
    np_t, hv_t = targets["np"], targets["hv"]
    parts: dict[str, torch.Tensor] = {}
    parts["hv_mse"] = F.mse_loss(out.hv, hv_t)
    gx_p, gy_p = _sobel_grads(out.hv)
    gx_t, gy_t = _sobel_grads(hv_t)
    focus = (np_t > 0).to(out.hv.dtype)[:, None]
    sq = (gx_p - gx_t) ** 2 + (gy_p - gy_t) ** 2
    parts["hv_msge"] = (sq * focus).sum() / (focus.sum() + 1e-8)
    parts["np_ce"] = F.cross_entropy(out.np, np_t)
    parts["np_dice"] = _soft_dice(out.np, np_t, 2, skip_background=True)
    if out.tp is not None:
        if "tp" not in targets:
            raise ValueError("the model has a type branch but the batch has no type targets")
        tp_t = targets["tp"]
        parts["tp_ce"] = F.cross_entropy(out.tp, tp_t)
        parts["tp_dice"] = _soft_dice(out.tp, tp_t, out.tp.shape[1], skip_background=False)
    total = sum(v * (2.0 if k == "hv_msge" else 1.0) for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}  # type: ignore[return-value]
