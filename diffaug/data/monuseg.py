"""MoNuSeg annotations: Aperio ImageScope XML polygons (``.xml`` or gzipped ``.xml.gz``), instance-only.

Rasterisation convention (the one the published MoNuSeg instance maps of ``shared/data/monuseg_test`` follow):
every ``Region`` of every ``Annotation``, in file order, is one nucleus; its polygon is filled with
``skimage.draw.polygon(rows=Y, cols=X, shape)`` on the float vertex coordinates, without rounding; where polygons
overlap the later one wins. Ids follow file order and are renumbered 1..N at the end, so a region that ends up with
no pixels (degenerate, outside the image, or painted over) leaves no gap. OpenCV's ``fillPoly`` on rounded vertices
differs from this by about 1 % of the foreground; do not mix the two.
"""

from __future__ import annotations

import gzip
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from diffaug.data.schemes import INSTANCE_ONLY
from diffaug.data.tiles import Tile, assemble_tile, read_image
from diffaug.errors import DataFormatError, InvalidInputError

__all__ = ["read_monuseg_polygons", "rasterize_polygons", "read_monuseg_xml", "read_monuseg"]

_GZIP_MAGIC = b"\x1f\x8b"


def read_monuseg_polygons(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The nucleus polygons of an Aperio XML file, in file order, each a float64 (K, 2) array of (x, y) vertices."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: annotation file not found")
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{path}: corrupt gzip file ({exc}); re-download the annotation") from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataFormatError(f"{path}: not well-formed XML ({exc}); re-download or re-export the annotation") \
            from None
    if root.tag != "Annotations":
        raise DataFormatError(f"{path}: root element is <{root.tag}>, expected an Aperio <Annotations> file")
    polygons = []
    for k, region in enumerate(root.iter("Region")):
        vertices = []
        for vertex in region.iter("Vertex"):
            try:
                vertices.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
            except (KeyError, ValueError):
                raise DataFormatError(f"{path}: region {k + 1} (Id {region.get('Id')}) has a vertex without numeric "
                                      f"X and Y attributes: {vertex.attrib}") from None
        arr = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(arr).all():
            raise DataFormatError(f"{path}: region {k + 1} (Id {region.get('Id')}) has non-finite vertices")
        polygons.append(arr)
    return polygons


def rasterize_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Paint polygons ((x, y) vertices) into an int32 instance map, later over earlier, ids 1..N in order.

    The convention is the module docstring's; ids of polygons that end with no pixels are closed up.
    """
    from skimage.draw import polygon

    if len(shape) != 2 or min(shape) < 1:
        raise InvalidInputError(f"shape must be (H, W) with H, W >= 1, got {shape}")
    inst_map = np.zeros(shape, dtype=np.int32)
    for k, vertices in enumerate(polygons, start=1):
        rr, cc = polygon(vertices[:, 1], vertices[:, 0], shape=shape)
        inst_map[rr, cc] = k
    # Close the gaps of vanished polygons: ids are at most len(polygons), so a look-up table does it in O(H·W).
    present = np.bincount(inst_map.ravel(), minlength=len(polygons) + 1) > 0
    present[0] = True
    lut = (np.cumsum(present) - 1).astype(np.int32)
    return lut[inst_map]


def read_monuseg_xml(path: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """The int32 instance map of shape (H, W) of one MoNuSeg XML (``.xml`` or ``.xml.gz``)."""
    return rasterize_polygons(read_monuseg_polygons(path), shape)


def read_monuseg(xml_path: str | os.PathLike[str], *, image_path: str | os.PathLike[str] | None = None,
                 shape: tuple[int, int] | None = None, name: str | None = None) -> Tile:
    """Read a MoNuSeg annotation (and its image) as an instance-only :class:`Tile`.

    Args:
        xml_path: the Aperio XML (``.xml`` or ``.xml.gz``).
        image_path: the image (MoNuSeg ships ``.tif``; any RGB image OpenCV reads). Gives the map's size.
        shape: (H, W) of the map when no image is given; must match the image when both are.
        name: tile name; defaults to the file name without ``.xml``/``.xml.gz``.
    """
    xml_path = Path(xml_path)
    image = None if image_path is None else read_image(image_path)
    if image is not None:
        if shape is not None and tuple(shape) != image.shape[:2]:
            raise InvalidInputError(f"{image_path}: image is {image.shape[:2]} but shape={tuple(shape)} was given")
        shape = image.shape[:2]
    if shape is None:
        raise InvalidInputError(f"{xml_path}: the XML does not give the image size; pass image_path= or shape=(H, W)")
    stem = xml_path.name.removesuffix(".gz").removesuffix(".xml")
    inst_map = read_monuseg_xml(xml_path, (int(shape[0]), int(shape[1])))
    return assemble_tile(name or stem, inst_map=inst_map, type_map=None, image=image, raw_scheme=INSTANCE_ONLY,
                         merge=None, where=str(xml_path))
