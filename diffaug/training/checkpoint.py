"""Training checkpoints: one file per checkpoint, written atomically, read with ``weights_only=True``.

A checkpoint ``checkpoints/step_NNNNNNN.pt`` holds everything a run needs to continue bit for bit: the model, the EMA,
the optimizer, every process's random states, the data position (samples consumed), the step and the resolved config.
It is a single ``torch.save`` file written through :func:`diffaug._io.atomic_write_with`, so a process killed while
writing leaves either the complete file or none.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from diffaug._io import atomic_write_with
from diffaug.errors import WeightsError

__all__ = ["FORMAT", "FORMAT_VERSION", "checkpoint_path", "save_checkpoint", "load_checkpoint", "list_checkpoints",
           "latest_checkpoint", "prune_checkpoints"]

FORMAT = "diffaug-train-state"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``run_dir/checkpoints/step_NNNNNNN.pt`` for the state after ``step`` optimizer steps."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically, tagged with the format version."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    return atomic_write_with(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint onto the CPU. A corrupt, foreign or newer-format file is a :class:`WeightsError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: checkpoint not found") from None
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise WeightsError(f"{path}: corrupt or unreadable training checkpoint ({exc}); delete it to resume from the "
                           "previous one") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a diffaug training checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{path}: written by a newer diffaug (checkpoint format {state['format_version']}); "
                           "upgrade diffaug to resume it")
    return state


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else [p for _, p in found]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
