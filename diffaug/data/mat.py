"""MATLAB ``.mat`` label files: CoNSeP and GLySAC (read and write), and Lizard (read).

- **CoNSeP / GLySAC** (HoVer-Net's layout): ``inst_map`` (H, W), ``type_map`` (H, W), ``inst_type`` (N, 1) where row
  ``i`` is the class of id ``i + 1``, and ``inst_centroid`` (N, 2) in **(x, y)** order. Images are separate PNGs.
  The maps are stored in the raw classes (CoNSeP 7, GLySAC 10); by default they load in the standard merge
  (:data:`~diffaug.data.schemes.MERGES`), applied exactly once here.
- **Lizard**: ``inst_map`` (H, W) with ids that need not be contiguous, ``id`` (N, 1) listing them, ``class`` (N, 1)
  the class of each listed id (1..6, the ``"lizard"`` scheme), ``centroid`` (N, 2). Lizard has no type map: it is
  painted from ``id`` and ``class``; ids are renumbered 1..N in increasing order and the original ids are kept in
  ``Tile.extra["orig_inst_id"]``. Listed ids absent from the map are ignored (they hold no pixels); an id in the map
  but not in the list is an error.

Centroids in the files are derived data: they are not trusted on reading (diffaug recomputes them when needed) and
are written fresh by :func:`write_consep_mat`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from diffaug.data.schemes import MERGES, get_scheme, resolve_classes
from diffaug.data.tiles import Tile, as_label_array, assemble_tile, check_tile_maps, read_image
from diffaug.errors import DataFormatError, InvalidInputError
from diffaug.labels.instances import instance_centroids, relabel_sequential

__all__ = ["read_consep_mat", "write_consep_mat", "read_lizard_mat"]


def _load_mat(path: Path, keys: tuple[str, ...], fmt: str) -> dict[str, Any]:
    import scipy.io

    if not path.is_file():
        raise DataFormatError(f"{path}: label file not found")
    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError:
        raise DataFormatError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it with "
                              "save(..., '-v7') or scipy.io.savemat") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... on corrupt files
        raise DataFormatError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        found = sorted(k for k in data if not k.startswith("__"))
        raise DataFormatError(f"{path}: missing {missing} (found {found}); a {fmt} .mat needs keys {list(keys)}")
    return data


def _vector(arr: Any, *, key: str, where: str, n: int | None = None) -> np.ndarray:
    """An (N,) or (N, 1) integer column as int32 (N,)."""
    arr = np.asarray(arr)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.size == 0:
        arr = arr.reshape(0)
    if arr.ndim != 1:
        raise DataFormatError(f"{where}: {key} must be an (N, 1) column, got shape {arr.shape}")
    out = as_label_array(arr, key=key, where=where)
    if n is not None and out.size != n:
        raise DataFormatError(f"{where}: {key} has {out.size} rows but there are {n} nuclei")
    return out


def _image(image_path: str | os.PathLike[str] | None) -> np.ndarray | None:
    return None if image_path is None else read_image(image_path)


def read_consep_mat(path: str | os.PathLike[str], *, image_path: str | os.PathLike[str] | None = None,
                    scheme: str = "consep", classes: str = "default", name: str | None = None) -> Tile:
    """Read a CoNSeP or GLySAC label ``.mat`` (and optionally its image) into a :class:`Tile`.

    Args:
        path: the ``.mat`` file.
        image_path: the matching RGB image, or None for labels only.
        scheme: the raw class scheme of the file: ``"consep"`` (7 classes) or ``"glysac"`` (10 classes), or any
            known scheme for a file already in merged classes (``"consep-hovernet"``).
        classes: ``"default"`` applies the standard merge of ``scheme`` (CoNSeP 7 -> 4, GLySAC -> 3) once;
            ``"raw"`` keeps the stored classes; or a scheme name (see :func:`~diffaug.data.schemes.resolve_classes`).
        name: tile name; defaults to the file stem.

    Returns:
        The tile, its ``scheme`` set; ``inst_type`` must agree with ``type_map`` (it is checked, not trusted).
    """
    path = Path(path)
    where = str(path) if image_path is None else f"{path} (image {image_path})"
    raw = get_scheme(scheme)
    _, merge = resolve_classes(raw, MERGES.get(raw.name), classes, where=where)
    data = _load_mat(path, ("inst_map", "type_map", "inst_type"), "CoNSeP/GLySAC")
    inst_map = as_label_array(data["inst_map"], key="inst_map", where=where)
    type_map = as_label_array(data["type_map"], key="type_map", where=where)
    n = int(inst_map.max(initial=0))
    inst_type = _vector(data["inst_type"], key="inst_type", where=where, n=n)
    if "inst_centroid" in data:
        cent = np.asarray(data["inst_centroid"])
        if cent.size and cent.shape != (n, 2):
            raise DataFormatError(f"{where}: inst_centroid has shape {cent.shape}, expected ({n}, 2) in (x, y)")
    return assemble_tile(name or path.stem, inst_map=inst_map, type_map=type_map, image=_image(image_path),
                         raw_scheme=raw, merge=merge, where=where, inst_type=inst_type)


def write_consep_mat(path: str | os.PathLike[str], tile: Tile) -> Path:
    """Write ``tile``'s labels as a CoNSeP/GLySAC ``.mat`` (``inst_map``, ``type_map`` int32; ``inst_type`` (N, 1)
    and ``inst_centroid`` (N, 2, x then y) float64, as in the released datasets). The image is not written.

    The classes are written as they are in ``tile.type_map``: write raw maps (read with ``classes="raw"``) to
    produce a file in the dataset's original scheme.
    """
    import scipy.io

    from diffaug._io import atomic_write_with

    where = f"tile {tile.name!r}"
    if tile.type_map is None:
        raise InvalidInputError(f"{where}: a CoNSeP/GLySAC .mat needs a type_map; this tile is instance-only")
    inst_type = check_tile_maps(tile.inst_map, tile.type_map, inst_type=tile.inst_type, where=where)
    n = tile.num_instances
    mdict = {
        "inst_map": tile.inst_map.astype(np.int32, copy=False),
        "type_map": tile.type_map.astype(np.int32, copy=False),
        "inst_type": inst_type.astype(np.float64).reshape(n, 1),  # type: ignore[union-attr]
        "inst_centroid": instance_centroids(tile.inst_map).reshape(n, 2),
    }
    return atomic_write_with(path, lambda f: scipy.io.savemat(f, mdict, do_compression=True))


def read_lizard_mat(path: str | os.PathLike[str], *, image_path: str | os.PathLike[str] | None = None,
                    classes: str = "default", name: str | None = None) -> Tile:
    """Read a Lizard label ``.mat`` (and optionally its image) into a :class:`Tile` in the ``"lizard"`` scheme.

    Ids are renumbered 1..N in increasing order; ``extra["orig_inst_id"]`` holds the original id of each new id.
    """
    path = Path(path)
    where = str(path) if image_path is None else f"{path} (image {image_path})"
    raw = get_scheme("lizard")
    _, merge = resolve_classes(raw, None, classes, where=where)
    data = _load_mat(path, ("inst_map", "id", "class"), "Lizard")
    inst_map = as_label_array(data["inst_map"], key="inst_map", where=where)
    ids = _vector(data["id"], key="id", where=where)
    cls = _vector(data["class"], key="class", where=where, n=ids.size)
    if np.unique(ids).size != ids.size:
        raise DataFormatError(f"{where}: 'id' lists some ids twice; each nucleus needs one row")
    if (ids == 0).any():
        raise DataFormatError(f"{where}: 'id' lists id 0, which is background")
    present = np.unique(inst_map)
    present = present[present > 0]
    unlisted = np.setdiff1d(present, ids)
    if unlisted.size:
        raise DataFormatError(f"{where}: {unlisted.size} ids in inst_map are not listed in 'id' (e.g. "
                              f"{unlisted[:5].tolist()}), so their class is unknown")
    if cls.size and (cls.min() < 1 or cls.max() > raw.num_foreground):
        raise DataFormatError(f"{where}: 'class' holds {sorted(set(cls.tolist()) - set(raw.names))}, out of range "
                              f"for Lizard's classes 1..{raw.num_foreground}")
    lut = np.zeros(int(inst_map.max(initial=0)) + 1, dtype=np.int32)
    listed = ids <= inst_map.max(initial=0)
    lut[ids[listed]] = cls[listed]
    type_map = lut[inst_map]
    new_map = relabel_sequential(inst_map)
    return assemble_tile(name or path.stem, inst_map=new_map, type_map=type_map, image=_image(image_path),
                         raw_scheme=raw, merge=merge, where=where, extra={"orig_inst_id": present.astype(np.int32)})
