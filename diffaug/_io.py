"""Atomic file writes: a file either appears complete or not at all.

Long jobs (label editing, generation, training checkpoints) write through these helpers so that a process killed at
any moment leaves no partial file behind: data goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_npz", "atomic_write_png",
           "atomic_write_with"]


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save_npz(path: str | os.PathLike[str], *, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write arrays as ``.npz``. Deterministic bytes for equal arrays (zip timestamps are fixed by numpy)."""
    save = np.savez_compressed if compressed else np.savez
    return atomic_write_with(path, lambda f: save(f, **arrays))


def atomic_write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 image as PNG."""
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"PNG images must be uint8, got {image.dtype}")
    if image.ndim == 3:
        if image.shape[2] == 3:
            image = image[..., ::-1]  # RGB -> BGR for OpenCV
        elif image.shape[2] == 4:
            image = image[..., [2, 1, 0, 3]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    return atomic_write_bytes(path, buf.tobytes())
