"""The tile folder: ``NAME.png`` (RGB uint8) + ``NAME.npz`` (``inst_map``, optional ``type_map``, ``inst_type``),
with an optional ``classes.json`` naming the classes.

This is diffaug's native layout (the one of ``shared/data``): every reader of another format can be converted to it
and every job writes it. Tiles may have any size. A folder without ``classes.json`` and without ``type_map`` is
instance-only.

``classes.json`` may carry a ``hovernet_merge`` block (``{"map": {raw: merged}, "names": {merged: name}}``). Such a
folder loads in the merged classes by default and in raw classes with ``classes="raw"``. Folders written by diffaug
record ``"scheme"`` and carry no merge block, so reading them back never merges twice.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffaug._io import atomic_save_npz, atomic_write_json, atomic_write_png
from diffaug.data.schemes import SCHEMES, ClassMerge, ClassScheme, apply_merge, get_scheme
from diffaug.errors import DataFormatError, InvalidInputError

__all__ = ["Tile", "TileFolder", "read_image", "read_label_npz", "write_tile", "write_classes_json",
           "check_label_maps"]

ClassesMode = Literal["default", "raw"]


@dataclass
class Tile:
    """One annotated tile. ``type_map`` and ``inst_type`` are None for instance-only data."""

    name: str
    image: np.ndarray | None
    inst_map: np.ndarray
    type_map: np.ndarray | None = None
    inst_type: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.inst_map.shape  # type: ignore[return-value]


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
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{where}: {key} must hold integers (int32), got {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise InvalidInputError(f"{where}: {key} has negative values ({int(arr.min())})")
    if image_shape is not None and tuple(image_shape[:2]) != inst_map.shape:
        raise InvalidInputError(f"{where}: image is {tuple(image_shape[:2])} but inst_map is {inst_map.shape}")
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
                                f"classes 0..{num_classes - 1}")


def read_label_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a tile's ``.npz``; corrupt or key-less files raise :class:`DataFormatError` naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataFormatError(f"{path}: label file not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: corrupt or unreadable .npz ({exc}); regenerate or remove this tile") from None
    if "inst_map" not in arrays:
        raise DataFormatError(f"{path}: no 'inst_map' array (keys: {sorted(arrays)}); each tile .npz needs an int32 "
                              "instance map under 'inst_map'")
    return arrays


class TileFolder:
    """Read-only view of a tile folder; tiles are read lazily, one at a time.

    Args:
        root: the folder.
        classes: ``"default"`` loads in the folder's merged classes when ``classes.json`` has a merge block, else
            raw; ``"raw"`` never merges; or the name of a known scheme, which must be the folder's own or its merge
            target.
        require_images: when True, a tile without its PNG is an error.

    Example:
        >>> folder = TileFolder("shared/data/consep_train")  # doctest: +SKIP
        >>> folder.scheme.name, len(folder)  # doctest: +SKIP
        ('consep-hovernet', 432)
    """

    def __init__(self, root: str | os.PathLike[str], *, classes: ClassesMode | str = "default",
                 require_images: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(f"{self.root}: data folder not found; pass a folder of NAME.png + NAME.npz tiles")
        self.names = sorted(p.stem for p in self.root.glob("*.npz"))
        if not self.names:
            raise DataFormatError(f"{self.root}: no tiles found (expected NAME.png + NAME.npz pairs)")
        if require_images:
            missing = [n for n in self.names if not (self.root / f"{n}.png").is_file()]
            if missing:
                raise DataFormatError(f"{self.root}: {len(missing)} tiles have no PNG image, e.g. {missing[0]}.npz; "
                                      "add the images or remove the label files")
        self.raw_scheme, self.merge = _read_classes_json(self.root)
        self.scheme = self._select_scheme(classes)
        self.require_images = require_images

    def _select_scheme(self, classes: str) -> ClassScheme:
        if classes == "raw" or (classes == "default" and self.merge is None):
            return self.raw_scheme
        if classes == "default":
            return self.merge.target  # type: ignore[union-attr]
        scheme = get_scheme(classes)
        if scheme.name == self.raw_scheme.name:
            self.merge = None
            return scheme
        if self.merge is not None and self.merge.target.name == scheme.name:
            return scheme
        raise InvalidInputError(f"{self.root}: cannot load in scheme {classes!r}; this folder's classes are "
                                f"{self.raw_scheme.name!r}" + (f" (merge to {self.merge.target.name!r})"
                                                                 if self.merge else ""))

    @property
    def merged(self) -> bool:
        return self.scheme is not self.raw_scheme

    @property
    def has_classes(self) -> bool:
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
        if type_map is not None and not self.raw_scheme.has_classes:
            raise DataFormatError(f"{npz}: has a type_map but {self.root}/classes.json declares no classes")
        if type_map is None and self.raw_scheme.has_classes:
            raise DataFormatError(f"{npz}: no 'type_map', but the folder's classes.json declares classes")
        check_label_maps(inst_map, type_map, num_classes=None, where=str(npz))
        if type_map is not None:
            if self.merge is not None:
                type_map = apply_merge(type_map, self.merge, what=f"{npz} type_map")
                if inst_type is not None:
                    inst_type = apply_merge(np.asarray(inst_type).reshape(-1), self.merge, what=f"{npz} inst_type")
            check_label_maps(inst_map, type_map, num_classes=self.scheme.num_classes, where=str(npz))
            type_map = type_map.astype(np.int32, copy=False)
        if inst_type is not None:
            inst_type = np.asarray(inst_type, dtype=np.int32).reshape(-1)
        img = None
        png = self.root / f"{name}.png"
        if image and (self.require_images or png.is_file()):
            img = read_image(png)
            if img.shape[:2] != inst_map.shape:
                raise DataFormatError(f"{png}: image is {img.shape[:2]} but {npz} maps are {inst_map.shape}")
        return Tile(name=name, image=img, inst_map=inst_map.astype(np.int32, copy=False), type_map=type_map,
                    inst_type=inst_type, extra=arrays)


def _read_classes_json(root: Path) -> tuple[ClassScheme, ClassMerge | None]:
    path = root / "classes.json"
    if not path.is_file():
        return SCHEMES["instance-only"], None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object of class id -> name")
    names = {int(k): str(v) for k, v in meta.items() if k.isdigit() and int(k) > 0}
    scheme_name = meta.get("scheme")
    if scheme_name is not None:
        if scheme_name not in SCHEMES:
            raise DataFormatError(f"{path}: unknown class scheme {scheme_name!r}; known: {', '.join(sorted(SCHEMES))}."
                                  " Remove the 'scheme' key to use the class names given in the file")
        raw = SCHEMES[scheme_name]
        if names and names != dict(raw.names):
            raise DataFormatError(f"{path}: class names disagree with the {scheme_name!r} scheme")
    else:
        try:
            raw = ClassScheme(f"custom:{root.name}", names)
        except InvalidInputError as exc:
            raise DataFormatError(f"{path}: {exc}") from None
        for known in SCHEMES.values():  # recognise a known scheme by its class ids when the names match exactly
            if dict(known.names) == names:
                raw = known
    merge = None
    block = meta.get("hovernet_merge")
    if block is not None:
        if scheme_name is not None and "scheme" in meta and meta.get("merged", False):
            raise DataFormatError(f"{path}: has both a merged scheme and a merge block; remove 'hovernet_merge'")
        try:
            mapping = {int(k): int(v) for k, v in block["map"].items()}
            target_names = {int(k): str(v) for k, v in block["names"].items()}
            target = ClassScheme(block.get("scheme", f"{raw.name}-merged"), target_names)
        except (KeyError, TypeError, ValueError, AttributeError, InvalidInputError) as exc:
            raise DataFormatError(f"{path}: malformed 'hovernet_merge' block ({exc}); it needs 'map' and 'names'") \
                from None
        for known in SCHEMES.values():
            if dict(known.names) == target_names or (len(known.names) == len(target_names) and
                                                     _is_known_merge(mapping, known.name)):
                target = known
                break
        if set(mapping.values()) - set(target.names):
            raise DataFormatError(f"{path}: merge maps onto classes not named in 'names'")
        merge = ClassMerge(raw.name, target, mapping)
    return raw, merge


def _is_known_merge(mapping: dict[int, int], target: str) -> bool:
    from diffaug.data.schemes import MERGES

    return any(m.target.name == target and dict(m.mapping) == mapping for m in MERGES.values())


def write_classes_json(out_dir: str | os.PathLike[str], scheme: ClassScheme) -> Path:
    """Write ``classes.json`` for maps in ``scheme`` (no merge block: never merged twice on reading back)."""
    return atomic_write_json(Path(out_dir) / "classes.json", scheme.to_json())


def write_tile(out_dir: str | os.PathLike[str], name: str, *, inst_map: np.ndarray, type_map: np.ndarray | None = None,
               image: np.ndarray | None = None, inst_type: np.ndarray | None = None,
               **extra: np.ndarray) -> Path:
    """Write one tile (``NAME.npz`` and, with an image, ``NAME.png``) atomically. Returns the ``.npz`` path.

    ``inst_type`` is derived from the maps when not given. Arrays are stored int32; the ``.npz`` bytes depend only on
    the arrays, so equal inputs give byte-identical files.
    """
    from diffaug.labels.instances import instance_types

    check_label_maps(inst_map, type_map, where=f"tile {name}", image_shape=None if image is None else image.shape)
    out_dir = Path(out_dir)
    arrays: dict[str, np.ndarray] = {"inst_map": inst_map.astype(np.int32, copy=False)}
    if type_map is not None:
        arrays["type_map"] = type_map.astype(np.int32, copy=False)
        arrays["inst_type"] = (instance_types(inst_map, type_map) if inst_type is None
                               else np.asarray(inst_type, dtype=np.int32))
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    if image is not None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(f"tile {name}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        atomic_write_png(out_dir / f"{name}.png", image)
    return atomic_save_npz(out_dir / f"{name}.npz", **arrays)
