"""diffaug: diffusion-generated image/label pairs for nuclei segmentation and classification.

Importing diffaug is cheap and side-effect free: submodules (models, pipelines, transforms) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SemanticUNet": "diffaug.models",
    "SemanticUNetConfig": "diffaug.models",
    "SemanticSynthesisPipeline": "diffaug.pipelines",
    "DiffMixTransform": "diffaug.transforms",
    "DiffMixd": "diffaug.transforms",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffaug' has no attribute {name!r}")
