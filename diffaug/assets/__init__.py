"""Files shipped inside the package: a few CoNSeP sample tiles for the offline demo (see sample_tiles/README.md)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["sample_tiles_dir"]


def sample_tiles_dir() -> Path:
    """Folder of the four CoNSeP sample tiles (Apache-2.0) that ship with diffaug, in the tile-folder layout."""
    return Path(__file__).resolve().parent / "sample_tiles"
