"""HoVer-Net training patches: one ``.npy`` per patch, (H, W, 5) = [R, G, B, inst, type], or (H, W, 4) =
[R, G, B, inst] for instance-only data.

HoVer-Net's patch extractor crops large annotated images without renumbering, so a patch's ids need not be
contiguous. Reading renumbers them 1..N in increasing order and keeps the stored id of each nucleus in
``Tile.extra["orig_inst_id"]``. The type channel is stored in whatever classes the extractor was given (HoVer-Net
merges CoNSeP to 4 classes *before* extracting), so the reader is told that scheme; it is never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffaug._io import atomic_write_with
from diffaug.data.schemes import INSTANCE_ONLY, MERGES, ClassScheme, get_scheme, resolve_classes
from diffaug.data.tiles import Tile, as_label_array, assemble_tile, check_tile_maps
from diffaug.errors import DataFormatError, InvalidInputError
from diffaug.labels.instances import instance_ids, relabel_sequential

__all__ = ["read_hovernet_npy", "write_hovernet_npy"]


def read_hovernet_npy(path: str | os.PathLike[str], *, scheme: str | ClassScheme | None = None,
                      classes: str = "default", name: str | None = None) -> Tile:
    """Read one HoVer-Net training patch.

    Args:
        path: the ``.npy`` file.
        scheme: the scheme of the type channel (``"consep-hovernet"`` for HoVer-Net's CoNSeP patches); required for
            5-channel patches, must be None or ``"instance-only"`` for 4-channel ones.
        classes: ``"default"`` (the standard merge of ``scheme``, if it has one), ``"raw"``, or a scheme name.
        name: tile name; defaults to the file stem.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: patch file not found")
    try:
        patch = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: not a readable .npy array ({exc}); re-extract the patch") from None
    if patch.ndim != 3 or patch.shape[2] not in (4, 5):
        raise DataFormatError(f"{path}: patch has shape {patch.shape}, expected (H, W, 5) [R, G, B, inst, type] or "
                              "(H, W, 4) [R, G, B, inst]")
    has_type = patch.shape[2] == 5
    raw = get_scheme(scheme) if isinstance(scheme, str) else (scheme or INSTANCE_ONLY)
    if has_type and not raw.has_classes:
        raise InvalidInputError(f"{path}: the patch has a type channel; pass scheme= to name its classes (e.g. "
                                "'consep-hovernet' for HoVer-Net's CoNSeP patches)")
    if not has_type and raw.has_classes:
        raise DataFormatError(f"{path}: the patch has no type channel (4 channels) but scheme {raw.name!r} has "
                              "classes; read it with scheme=None")
    _, merge = resolve_classes(raw, MERGES.get(raw.name), classes, where=where)
    rgb = as_label_array(patch[..., :3], key="RGB channels", where=where)
    if rgb.size and rgb.max() > 255:
        raise DataFormatError(f"{path}: RGB channels reach {rgb.max()}; expected 8-bit values 0..255")
    inst = as_label_array(patch[..., 3], key="inst channel", where=where)
    type_map = as_label_array(patch[..., 4], key="type channel", where=where) if has_type else None
    return assemble_tile(name or path.stem, inst_map=relabel_sequential(inst), type_map=type_map,
                         image=rgb.astype(np.uint8), raw_scheme=raw, merge=merge, where=where,
                         extra={"orig_inst_id": instance_ids(inst).astype(np.int32)})


def write_hovernet_npy(path: str | os.PathLike[str], tile: Tile) -> Path:
    """Write ``tile`` as a HoVer-Net training patch (int32, 5 channels, or 4 for an instance-only tile)."""
    where = f"tile {tile.name!r}"
    if tile.image is None:
        raise InvalidInputError(f"{where}: a HoVer-Net patch needs the image; read the tile with its image")
    check_tile_maps(tile.inst_map, tile.type_map, image=tile.image, where=where)
    planes = [tile.image.astype(np.int32), tile.inst_map[..., None].astype(np.int32)]
    if tile.type_map is not None:
        planes.append(tile.type_map[..., None].astype(np.int32))
    patch = np.concatenate(planes, axis=-1)
    return atomic_write_with(path, lambda f: np.save(f, patch))
