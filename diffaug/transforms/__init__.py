"""DiffMix in data loaders: the Albumentations transform, the MONAI dictionary transform, and the online pool.

Everything here is imported on first use, so ``import diffaug.transforms`` pulls in neither albumentations, MONAI nor
torch:

- :class:`DiffMixTransform` (:mod:`diffaug.transforms.diffmix`): an albumentations 2.0.8 ``DualTransform``;
- :class:`DiffMixd` (:mod:`diffaug.transforms.monai`): a MONAI ``MapTransform`` + ``RandomizableTransform``;
- :class:`SynthesisPool`, :class:`PoolFiller` (:mod:`diffaug.transforms.pool`) and :class:`DiffMixSynthesizer`:
  the bounded pool of pre-rendered pairs shared by DataLoader workers, and its generator;
- :class:`GradMixTransform` (:mod:`diffaug.transforms.gradmix`), the copy-paste baseline.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DiffMixTransform": "diffaug.transforms.diffmix",
    "DiffMixSynthesizer": "diffaug.transforms._core",
    "DiffMixd": "diffaug.transforms.monai",
    "SynthesisPool": "diffaug.transforms.pool",
    "PoolFiller": "diffaug.transforms.pool",
    "PoolStats": "diffaug.transforms.pool",
    "PoolPair": "diffaug.transforms.pool",
    "GradMixTransform": "diffaug.transforms.gradmix",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if exc.name == _LAZY[name]:
                raise AttributeError(f"module 'diffaug.transforms' has no attribute {name!r} in this version") \
                    from None
            raise
        return getattr(module, name)
    raise AttributeError(f"module 'diffaug.transforms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
