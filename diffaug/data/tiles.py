"""The tile folder: ``NAME.png`` (RGB uint8) + ``NAME.npz`` (``inst_map``, optional ``type_map``, ``inst_type``),
with an optional ``classes.json`` naming the classes.

This is diffaug's native layout (the one of ``shared/data``): every reader of another format converts to it
(:func:`write_tile_folder`) and every job writes it. Tiles may have any size. A folder without ``classes.json`` and
without ``type_map`` is instance-only.

Invariants of a tile (checked on every read and write, never corrected): ``inst_map`` is an integer (H, W) map with
ids 1..N and no gaps; ``type_map``, where present, has the same shape and foreground, one class per nucleus, and
classes inside the scheme; ``inst_type[i]`` is the class of id ``i + 1``; the image is RGB uint8 of the same size.

``classes.json`` may carry a ``hovernet_merge`` block (``{"map": {raw: merged}, "names": {merged: name}}``). Such a
folder loads in the merged classes by default and in raw classes with ``classes="raw"``. Folders written by diffaug
record ``"scheme"`` and carry no merge block, so reading them back never merges twice.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffaug._io import atomic_save_npz, atomic_write_json, atomic_write_png
from diffaug.data.schemes import (CUSTOM_PREFIX, INSTANCE_ONLY, MERGES, SCHEMES, ClassMerge, ClassScheme, apply_merge,
                                  get_scheme, resolve_classes)
from diffaug.errors import DataFormatError, InvalidInputError

__all__ = ["Tile", "TileFolder", "read_image", "read_label_npz", "write_tile", "write_classes_json",
           "check_label_maps", "check_tile_maps", "write_tile_folder", "assemble_tile", "as_label_array"]

ClassesMode = Literal["default", "raw"]
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass
class Tile:
    """One annotated tile.

    Attributes:
        name: file stem, unique within a folder.
        image: RGB uint8 (H, W, 3), or None when only labels were read.
        inst_map: int32 (H, W), 0 background, nuclei 1..N.
        type_map: int32 (H, W) classes in ``scheme`` (0 background), or None for instance-only data.
        inst_type: int32 (N,), the class of id ``i + 1`` at index ``i``; None for instance-only data.
        extra: other per-tile arrays carried along (CoNSeP's ``orig_inst_id``, say).
        scheme: the class scheme of ``type_map``; readers always set it. None only for hand-made tiles.
    """

    name: str
    image: np.ndarray | None
    inst_map: np.ndarray
    type_map: np.ndarray | None = None
    inst_type: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    scheme: ClassScheme | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the maps."""
        return self.inst_map.shape  # type: ignore[return-value]

    @property
    def num_instances(self) -> int:
        """N, the number of nuclei (ids are 1..N)."""
        return int(self.inst_map.max(initial=0))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an RGB uint8 image (H, W, 3). Grey, 16-bit or translucent images are errors, not converted."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: image file not found")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataFormatError(f"{path}: not a readable image (corrupt or not PNG/JPEG/TIFF); re-export the tile")
    if image.dtype != np.uint8:
        raise DataFormatError(f"{path}: image is {image.dtype}, expected 8-bit RGB; convert it to 8-bit first")
    if image.ndim == 3 and image.shape[2] == 4:
        if not (image[..., 3] == 255).all():
            raise DataFormatError(f"{path}: image has a non-opaque alpha channel; flatten it to RGB first")
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataFormatError(f"{path}: image has shape {image.shape}, expected an RGB image (H, W, 3)")
    return np.ascontiguousarray(image[..., ::-1])


def as_label_array(arr: Any, *, key: str, where: str) -> np.ndarray:
    """Convert a stored label map (``inst_map``, ``type_map``...) to int32 without changing a single value.

    Formats written by MATLAB or numpy often store labels as float64; those are accepted when every value is a
    whole number. Booleans, negative values, fractions, NaN and ids beyond int32 are errors.
    """
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataFormatError(f"{where}: {key} has dtype {arr.dtype}; expected integer labels (int32)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.floor(arr)).any():
            raise DataFormatError(f"{where}: {key} holds non-integer values; labels must be whole numbers (was the "
                                  "map resized with interpolation? use nearest-neighbour)")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise DataFormatError(f"{where}: {key} has values outside 0..{_INT32_MAX} (min {arr.min()}, max {arr.max()})")
    return arr.astype(np.int32)


def check_label_maps(inst_map: Any, type_map: Any = None, *, num_classes: int | None = None,
                     where: str = "label maps", image_shape: tuple[int, ...] | None = None) -> None:
    """Check dtype, shape and foreground agreement of an instance map and an optional type map.

    ``num_classes`` counts background: type values must lie in ``0..num_classes-1``. Raises
    :class:`~diffaug.errors.InvalidInputError` naming ``where`` on the first problem.
    """
    for key, arr in (("inst_map", inst_map), ("type_map", type_map)):
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray):
            raise InvalidInputError(f"{where}: {key} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim != 2:
            raise InvalidInputError(f"{where}: {key} must be 2-D (H, W), got shape {arr.shape}")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{where}: {key} must hold integers (int32), got {arr.dtype}; convert it with "
                                    "nearest-neighbour resampling only")
        if arr.size and arr.min() < 0:
            raise InvalidInputError(f"{where}: {key} has negative values ({int(arr.min())})")
        if arr.size and int(arr.max()) > _INT32_MAX:
            raise InvalidInputError(f"{where}: {key} has values beyond int32 ({int(arr.max())}); renumber the ids")
    if image_shape is not None and tuple(image_shape[:2]) != inst_map.shape:
        raise InvalidInputError(f"{where}: image is {tuple(image_shape[:2])} but inst_map is {inst_map.shape}; "
                                "image and maps must cover the same pixels")
    if type_map is None:
        return
    if type_map.shape != inst_map.shape:
        raise InvalidInputError(f"{where}: type_map {type_map.shape} and inst_map {inst_map.shape} differ in shape")
    mismatch = (type_map > 0) != (inst_map > 0)
    if mismatch.any():
        n = int(mismatch.sum())
        raise InvalidInputError(f"{where}: type_map and inst_map foregrounds disagree on {n} pixels; every nucleus "
                                "pixel needs a class > 0 and every background pixel class 0")
    if num_classes is not None and type_map.size and type_map.max() >= num_classes:
        raise InvalidInputError(f"{where}: type_map has class {int(type_map.max())}, but the scheme has only "
                                f"classes 0..{num_classes - 1}; load it in the right class scheme")


def _check_contiguous(inst_map: np.ndarray, where: str) -> int:
    """Number of nuclei N; raises unless the ids are exactly 1..N."""
    n = int(inst_map.max(initial=0))
    if n > inst_map.size:
        present = np.unique(inst_map).size - 1
    else:
        present = int(np.count_nonzero(np.bincount(inst_map.ravel(), minlength=n + 1)[1:]))
    if present != n:
        raise InvalidInputError(f"{where}: instance ids must be 1..N without gaps, but {n - present} of the ids "
                                f"1..{n} are missing; renumber with diffaug.labels.instances.relabel_sequential")
    return n


def _instance_classes(inst_map: np.ndarray, type_map: np.ndarray, n: int, where: str) -> np.ndarray:
    """Class of ids 1..N; raises when a nucleus holds pixels of two classes."""
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    k = int(type_map.max(initial=0)) + 1
    fg = inst_map > 0
    counts = np.bincount(inst_map[fg].astype(np.int64) * k + type_map[fg], minlength=(n + 1) * k).reshape(n + 1, k)
    counts = counts[1:, 1:]
    mixed = np.flatnonzero((counts > 0).sum(axis=1) > 1)
    if mixed.size:
        ids = (mixed[:5] + 1).tolist()
        raise InvalidInputError(f"{where}: {mixed.size} nuclei hold pixels of more than one class (ids {ids}"
                                f"{'...' if mixed.size > 5 else ''}); give each nucleus a single class")
    return (counts.argmax(axis=1) + 1).astype(np.int32)


def _check_inst_type(inst_type: Any, derived: np.ndarray, where: str) -> None:
    arr = np.asarray(inst_type)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != derived.shape:
        raise InvalidInputError(f"{where}: inst_type has shape {np.asarray(inst_type).shape} but the map has "
                                f"{derived.size} nuclei; it needs one class per id 1..N")
    bad = np.flatnonzero(arr != derived)
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(f"{where}: inst_type disagrees with type_map for {bad.size} nuclei (id {i + 1}: "
                                f"inst_type {arr[i]}, type_map {derived[i]}); fix or drop inst_type")


def check_tile_maps(inst_map: Any, type_map: Any, *, image: Any = None, inst_type: Any = None,
                    scheme: ClassScheme | None = None, where: str) -> np.ndarray | None:
    """Check the tile invariants (module docstring) and return the per-nucleus classes (None without a type map).

    ``inst_type`` (N or N×1), when given, must agree with the classes read off the type map; with ``scheme``, the
    classes must lie in it.
    """
    check_label_maps(inst_map, type_map, where=where, image_shape=None if image is None else np.shape(image))
    if scheme is not None and type_map is not None and type_map.size and type_map.max() > scheme.num_foreground:
        raise InvalidInputError(f"{where}: type_map has class {int(type_map.max())}, out of range for the "
                                f"{scheme.name!r} scheme (classes 1..{scheme.num_foreground}); load it in the scheme "
                                "it was annotated in")
    if image is not None and (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3):
        raise InvalidInputError(f"{where}: image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    n = _check_contiguous(inst_map, where)
    if type_map is None:
        if inst_type is not None and np.asarray(inst_type).size:
            raise InvalidInputError(f"{where}: has inst_type but no type_map; drop inst_type or add the type map")
        return None
    types = _instance_classes(inst_map, type_map, n, where)
    if inst_type is not None:
        _check_inst_type(inst_type, types, where)
    return types


def assemble_tile(name: str, *, inst_map: np.ndarray, type_map: np.ndarray | None, image: np.ndarray | None,
                  raw_scheme: ClassScheme, merge: ClassMerge | None, where: str, inst_type: Any = None,
                  extra: Mapping[str, np.ndarray] | None = None) -> Tile:
    """Validate maps read from the file ``where`` in ``raw_scheme``, apply ``merge`` once, and return the tile.

    Every reader funnels through here, so all formats obey the same invariants (module docstring). The given
    ``inst_type`` (raw classes) must agree with the type map; the tile's ``inst_type`` is recomputed, never trusted.

    Raises:
        DataFormatError: naming ``where`` and saying what to fix.
    """
    try:
        if type_map is not None and not raw_scheme.has_classes:
            raise InvalidInputError(f"{where}: has a type_map but the data declares no classes; add a classes.json "
                                    "that names the classes (or load it in a class scheme), or drop type_map")
        if type_map is None and raw_scheme.has_classes:
            raise InvalidInputError(f"{where}: no type_map, but the data is declared to have classes "
                                    f"({raw_scheme.name!r}); add the type map or load it as instance-only")
        types = check_tile_maps(inst_map, type_map, image=image, inst_type=inst_type, scheme=raw_scheme, where=where)
        scheme = raw_scheme
        if type_map is not None and merge is not None:
            type_map = apply_merge(type_map, merge, what=f"{where}: type_map")
            types = apply_merge(types, merge, what=f"{where}: inst_type")  # type: ignore[arg-type]
            scheme = merge.target
    except DataFormatError:
        raise
    except InvalidInputError as exc:  # the file on disk is at fault: report it as a data format error
        raise DataFormatError(str(exc)) from None
    return Tile(name=name, image=image, inst_map=inst_map.astype(np.int32, copy=False),
                type_map=None if type_map is None else type_map.astype(np.int32, copy=False), inst_type=types,
                extra=dict(extra or {}), scheme=scheme)


def read_label_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a tile's ``.npz``; corrupt or key-less files raise :class:`DataFormatError` naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataFormatError(f"{path}: label file not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataFormatError(f"{path}: corrupt or unreadable .npz ({exc}); regenerate or remove this tile") from None
    if "inst_map" not in arrays:
        raise DataFormatError(f"{path}: no 'inst_map' array (keys: {sorted(arrays)}); each tile .npz needs an int32 "
                              "instance map under 'inst_map'")
    return arrays


class TileFolder:
    """Read-only view of a tile folder; tiles are read lazily, one at a time, in name order.

    Args:
        root: the folder.
        classes: ``"default"`` loads in the folder's merged classes when ``classes.json`` has a merge block, else
            as stored; ``"raw"`` never merges; or a scheme name: the folder's own, its merge target, or the target
            of a known merge (:data:`~diffaug.data.schemes.MERGES`) from the folder's scheme.
        require_images: when True, a tile without its PNG is an error.

    Example:
        >>> folder = TileFolder("shared/data/consep_train")  # doctest: +SKIP
        >>> folder.scheme.name, folder.raw_scheme.name, len(folder)  # doctest: +SKIP
        ('consep-hovernet', 'consep', 432)
    """

    def __init__(self, root: str | os.PathLike[str], *, classes: ClassesMode | str = "default",
                 require_images: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(f"{self.root}: data folder not found; pass a folder of NAME.png + NAME.npz tiles")
        self.names = sorted(p.stem for p in self.root.glob("*.npz") if not p.name.startswith("."))
        if not self.names:
            pngs = len(list(self.root.glob("*.png")))
            raise DataFormatError(f"{self.root}: no tiles found (expected NAME.png + NAME.npz pairs"
                                  + (f"; there are {pngs} PNGs but no .npz label files" if pngs else "")
                                  + "); point at a tile folder, or convert your data with diffaug.data readers")
        if require_images:
            missing = [n for n in self.names if not (self.root / f"{n}.png").is_file()]
            if missing:
                raise DataFormatError(f"{self.root}: {len(missing)} tiles have no PNG image, e.g. {missing[0]}.npz; "
                                      "add the images, remove the label files, or pass require_images=False")
        self.raw_scheme, self.folder_merge = _read_classes_json(self.root)
        self.scheme, self.merge = resolve_classes(self.raw_scheme, self.folder_merge, classes, where=str(self.root))
        self.require_images = require_images

    @property
    def merged(self) -> bool:
        """True when tiles are read through a class merge."""
        return self.merge is not None

    @property
    def has_classes(self) -> bool:
        """False for an instance-only folder."""
        return self.scheme.has_classes

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Tile]:
        for name in self.names:
            yield self.read(name)

    def __getitem__(self, index: int | str) -> Tile:
        return self.read(self.names[index] if isinstance(index, int) else index)

    def read(self, name: str, *, image: bool = True) -> Tile:
        """Read one tile in the folder's selected scheme. ``image=False`` skips the PNG (label work only)."""
        npz = self.root / f"{name}.npz"
        arrays = read_label_npz(npz)
        inst_map = arrays.pop("inst_map")
        type_map = arrays.pop("type_map", None)
        inst_type = arrays.pop("inst_type", None)
        img = None
        png = self.root / f"{name}.png"
        if image and (self.require_images or png.is_file()):
            img = read_image(png)
            if isinstance(inst_map, np.ndarray) and inst_map.ndim == 2 and img.shape[:2] != inst_map.shape:
                raise DataFormatError(f"{png}: image is {img.shape[:2]} but {npz.name} maps are {inst_map.shape}; "
                                      "image and labels must have the same size")
        return assemble_tile(name, inst_map=inst_map, type_map=type_map, image=img, raw_scheme=self.raw_scheme,
                             merge=self.merge, where=str(npz), inst_type=inst_type, extra=arrays)


def _recognise_scheme(names: dict[int, str], mapping: dict[int, int] | None) -> ClassScheme | None:
    """A known scheme with exactly these names, or the source of a known merge with exactly this mapping."""
    for known in SCHEMES.values():
        if known.has_classes and dict(known.names) == names:
            return known
    if mapping is not None:
        for merge in MERGES.values():
            source = SCHEMES[merge.source]
            if dict(merge.mapping) == mapping and sorted(source.names) == sorted(names):
                return source
    return None


def _read_classes_json(root: Path) -> tuple[ClassScheme, ClassMerge | None]:
    """The scheme a folder's maps are stored in, and its merge block (if any)."""
    path = root / "classes.json"
    if not path.is_file():
        return INSTANCE_ONLY, None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc}); fix or remove the file") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object of class id -> name")
    names = {int(k): str(v) for k, v in meta.items() if k.isdigit() and int(k) > 0}
    block = meta.get("hovernet_merge")
    mapping: dict[int, int] | None = None
    if block is not None:
        try:
            mapping = {int(k): int(v) for k, v in block["map"].items()}
            target_names = {int(k): str(v) for k, v in block["names"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataFormatError(f"{path}: malformed 'hovernet_merge' block ({exc!r}); it needs 'map' (raw class -> "
                                  "merged class) and 'names' (merged class -> name)") from None
    scheme_name = meta.get("scheme")
    if scheme_name is not None:
        if not isinstance(scheme_name, str) or not (scheme_name in SCHEMES or scheme_name.startswith(CUSTOM_PREFIX)):
            raise DataFormatError(f"{path}: unknown class scheme {scheme_name!r}; known: {', '.join(sorted(SCHEMES))}."
                                  " Fix the 'scheme' key, or remove it to use the class names given in the file")
        if scheme_name in SCHEMES:
            raw = SCHEMES[scheme_name]
            if names and names != dict(raw.names):
                raise DataFormatError(f"{path}: class names {names} disagree with the {scheme_name!r} scheme "
                                      f"{dict(raw.names)}; fix the names or the 'scheme' key")
        else:
            raw = _custom_scheme(scheme_name, names, path)
    else:
        raw = _recognise_scheme(names, mapping) or _custom_scheme(f"{CUSTOM_PREFIX}{root.name}", names, path)
    if block is None:
        return raw, None
    assert mapping is not None
    if not raw.has_classes:
        raise DataFormatError(f"{path}: has a 'hovernet_merge' block but names no classes; add the raw class names")
    if sorted(mapping) != sorted(raw.names):
        raise DataFormatError(f"{path}: 'hovernet_merge' maps classes {sorted(mapping)} but the folder's classes are "
                              f"{sorted(raw.names)}; the merge must map every class")
    known = MERGES.get(raw.name)
    if known is not None and dict(known.mapping) == mapping and len(known.target.names) == len(target_names):
        target = known.target
    else:
        target = (_recognise_scheme(target_names, None)
                  or _custom_scheme(str(block.get("scheme", f"{raw.name}-merged")), target_names, path))
    if set(mapping.values()) - set(target.names):
        raise DataFormatError(f"{path}: 'hovernet_merge' maps onto classes {sorted(set(mapping.values()))} but "
                              f"names only {sorted(target.names)}")
    return raw, ClassMerge(raw.name, target, mapping)


def _custom_scheme(name: str, names: dict[int, str], path: Path) -> ClassScheme:
    if not name.startswith(CUSTOM_PREFIX):
        name = CUSTOM_PREFIX + name
    try:
        return ClassScheme(name, names)
    except InvalidInputError as exc:
        raise DataFormatError(f"{path}: {exc}") from None


def write_classes_json(out_dir: str | os.PathLike[str], scheme: ClassScheme) -> Path:
    """Write ``classes.json`` for maps in ``scheme`` (no merge block: never merged twice on reading back)."""
    return atomic_write_json(Path(out_dir) / "classes.json", scheme.to_json())


def write_tile(out_dir: str | os.PathLike[str], name: str, *, inst_map: np.ndarray, type_map: np.ndarray | None = None,
               image: np.ndarray | None = None, inst_type: np.ndarray | None = None,
               **extra: np.ndarray) -> Path:
    """Write one tile (``NAME.npz`` and, with an image, ``NAME.png``) atomically. Returns the ``.npz`` path.

    The maps must satisfy the tile invariants (contiguous ids, one class per nucleus). ``inst_type`` is derived
    from the maps; a given one must agree. Arrays are stored int32; the ``.npz`` bytes depend only on the arrays,
    so equal inputs give byte-identical files.
    """
    types = check_tile_maps(inst_map, type_map, image=image, inst_type=inst_type, where=f"tile {name}")
    out_dir = Path(out_dir)
    arrays: dict[str, np.ndarray] = {"inst_map": inst_map.astype(np.int32, copy=False)}
    if type_map is not None:
        arrays["type_map"] = type_map.astype(np.int32, copy=False)
        arrays["inst_type"] = types  # type: ignore[assignment]
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    if image is not None:
        atomic_write_png(out_dir / f"{name}.png", image)
    return atomic_save_npz(out_dir / f"{name}.npz", **arrays)


def write_tile_folder(tiles: Iterable[Tile], out_dir: str | os.PathLike[str], scheme: ClassScheme | str) -> Path:
    """Write ``tiles`` as a new tile folder whose ``classes.json`` records ``scheme``; the converter of every reader.

    The folder appears complete or not at all: tiles are written to a hidden sibling folder that is renamed onto
    ``out_dir`` at the end, and removed if any tile fails validation.

    Args:
        tiles: tiles in ``scheme`` (a tile whose ``scheme`` is set must name the same scheme).
        out_dir: a folder that does not exist yet, or is empty.
        scheme: the class scheme of the tiles' type maps (``"instance-only"`` for maps without classes).

    Returns:
        ``out_dir``.

    Example:
        >>> from diffaug.data import read_consep_mat, write_tile_folder  # doctest: +SKIP
        >>> tiles = [read_consep_mat(p, image_path=img) for p, img in pairs]  # doctest: +SKIP
        >>> write_tile_folder(tiles, "consep_tiles", "consep-hovernet")  # doctest: +SKIP
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInputError(f"{out_dir}: output folder exists and is not empty; choose a new folder or empty it")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        seen: set[str] = set()
        for tile in tiles:
            where = f"tile {tile.name!r}"
            if not tile.name or tile.name.startswith(".") or "/" in tile.name or os.sep in tile.name:
                raise InvalidInputError(f"{where}: a tile name must be a plain file stem (no '/', not starting '.')")
            if tile.name in seen:
                raise InvalidInputError(f"{where}: appears twice; tile names must be unique within a folder")
            seen.add(tile.name)
            if tile.scheme is not None and tile.scheme.name != scheme.name:
                raise InvalidInputError(f"{where}: is in class scheme {tile.scheme.name!r}, not {scheme.name!r}; read "
                                        f"it with classes={scheme.name!r} or write it in its own scheme")
            if scheme.has_classes != (tile.type_map is not None):
                raise InvalidInputError(f"{where}: " + ("has no type_map but scheme " if scheme.has_classes else
                                                        "has a type_map but scheme ") + f"{scheme.name!r} " +
                                        ("has classes" if scheme.has_classes else "is instance-only"))
            check_label_maps(tile.inst_map, tile.type_map, num_classes=scheme.num_classes, where=where)
            write_tile(tmp, tile.name, inst_map=tile.inst_map, type_map=tile.type_map, image=tile.image,
                       inst_type=tile.inst_type, **tile.extra)
        if not seen:
            raise InvalidInputError(f"{out_dir}: no tiles to write")
        write_classes_json(tmp, scheme)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
