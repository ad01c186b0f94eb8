"""Offline generation of synthetic datasets: plan, run (local or Ray), manifest, resume.

:func:`generate` is ``diffaug generate``: it edits the label maps of real tiles (balancing rare classes and/or
enlarging), re-renders each edited window with a semantic diffusion model, and writes a tile folder and/or HoVer-Net
patches with ``manifest.jsonl``, ``summary.json`` and pictures. It is deterministic (one seed per output, a fixed
plan of batches) and kill-safe (atomic files, records written last, a resumable ``job.json``).

Example:
    >>> from pathlib import Path
    >>> from diffaug.generate import GenerateOptions, generate
    >>> result = generate(GenerateOptions(out=Path("diffaug-demo"), num_inference_steps=20))  # doctest: +SKIP
    >>> result.outputs, result.pictures  # doctest: +SKIP
"""

from diffaug.generate.job import GenerateOptions, Layout
from diffaug.generate.plan import Item, batches, fingerprint, item_generators, item_seed, plan_items, tile_windows
from diffaug.generate.runner import GenerateResult, generate, read_data_mpp
from diffaug.generate.weights import BUILTIN, WeightsInfo, builtin_weights, resolve_weights

__all__ = ["BUILTIN", "GenerateOptions", "GenerateResult", "Item", "Layout", "WeightsInfo", "batches",
           "builtin_weights", "fingerprint", "generate", "item_generators", "item_seed", "plan_items",
           "read_data_mpp", "resolve_weights", "tile_windows"]
