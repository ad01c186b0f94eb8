"""Split a tile folder by *source image*, never by tile.

Neighbouring tiles of one source image overlap (CoNSeP's last row and column overlap by 24 px) and share tissue, so a
tile-level split leaks. The source image of a tile is, in order of preference:

1. the ``source_image`` column of the folder's ``tiles.csv`` (its ``tile`` column names the tile), when the file has
   both columns — every tile of the folder must then be listed;
2. otherwise the tile name up to its last ``_NNN`` suffix (``train_10_003`` → ``train_10``), the naming diffaug's
   patching writes;
3. a tile name without such a suffix is its own source image.
"""

from __future__ import annotations

import csv
import re

import numpy as np

from diffaug.data.tiles import TileFolder
from diffaug.errors import ConfigError, DataFormatError

__all__ = ["source_images", "split_by_source"]

_SUFFIX = re.compile(r"^(?P<source>.+)_\d+$")


def source_images(folder: TileFolder) -> dict[str, str]:
    """Map every tile name of ``folder`` to its source image (see the module docstring for the rule)."""
    csv_path = folder.root / "tiles.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "tile" in fields and "source_image" in fields:
                table = {row["tile"]: row["source_image"] for row in reader}
                missing = [n for n in folder.names if n not in table]
                if missing:
                    raise DataFormatError(f"{csv_path}: {len(missing)} tiles of the folder are not listed, e.g. "
                                          f"{missing[0]}; add them or remove tiles.csv")
                return {n: table[n] for n in folder.names}
    out = {}
    for name in folder.names:
        match = _SUFFIX.match(name)
        out[name] = match.group("source") if match else name
    return out


def split_by_source(folder: TileFolder, val_images: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out ``val_images`` source images at random; returns ``(train_tile_names, val_tile_names)``.

    The choice depends only on the sorted source names and ``seed``. At least one source image must stay for
    training.
    """
    sources = source_images(folder)
    unique = sorted(set(sources.values()))
    if val_images < 1:
        raise ConfigError(f"--val-images must be >= 1, got {val_images}")
    if val_images >= len(unique):
        raise ConfigError(f"--val-images {val_images} is too large: {folder.root} has only {len(unique)} source "
                          f"images, and at least one must stay for training; use at most {len(unique) - 1} or pass "
                          "a separate --test-data folder")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=val_images, replace=False).tolist())
    train = [n for n in folder.names if sources[n] not in held]
    val = [n for n in folder.names if sources[n] in held]
    return train, val
