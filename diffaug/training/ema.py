"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Keeps ``shadow ← decay·shadow + (1 − decay)·θ`` for every floating-point parameter; buffers are copied.

    The shadow is a full copy of the model (eval mode, no gradients), so it can be saved or sampled from directly.

    Args:
        model: the model being trained (its unwrapped module, not a DDP wrapper).
        decay: the EMA decay in [0, 1).
        warmup: use ``min(decay, (1 + step) / (10 + step))`` at update ``step`` (see :meth:`decay_at`).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> ema = EMA(net, decay=0.9)
        >>> ema.update(net)
        >>> torch.equal(ema.shadow.weight, net.weight)
        True
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        """The decay used at update ``step`` (0-based): ``decay``, or with warm-up ``min(decay, (1+step)/(10+step))``.

        >>> EMA(nn.Linear(1, 1), 0.999, warmup=True).decay_at(0), EMA(nn.Linear(1, 1), 0.999).decay_at(0)
        (0.1, 0.999)
        """
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Move the shadow towards ``model``'s current weights by one step (``step``: the update's index, for
        warm-up; it is the training step, so a resumed run continues the same schedule)."""
        decay = self.decay_at(step)
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.named_parameters():
            # lerp: shadow + (1 − decay)·(θ − shadow) = decay·shadow + (1 − decay)·θ
            shadow.lerp_(params[name].detach(), 1.0 - decay)
        buffers = dict(model.named_buffers())
        for name, shadow in self.shadow.named_buffers():
            shadow.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state, strict=True)
