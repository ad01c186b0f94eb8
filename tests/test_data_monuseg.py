"""MoNuSeg Aperio XML: the 14 test annotations reproduce the shared instance maps exactly."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from diffaug.data import read_monuseg, read_monuseg_polygons, read_monuseg_xml
from diffaug.errors import InvalidInputError


def test_all_14_xml_reproduce_the_instance_maps_exactly(monuseg_dir):
    xmls = sorted((monuseg_dir / "orig").glob("*.xml.gz"))
    assert len(xmls) == 14
    for xml in xmls:
        stem = xml.name.removesuffix(".xml.gz")
        with np.load(monuseg_dir / f"{stem}.npz") as z:
            expected = z["inst_map"]
        got = read_monuseg_xml(xml, expected.shape)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected, err_msg=stem)


def test_plain_xml_and_tile(monuseg_dir, tmp_path):
    gz = monuseg_dir / "orig" / "TCGA-HT-8564-01Z-00-DX1.xml.gz"
    plain = tmp_path / "TCGA-HT-8564-01Z-00-DX1.xml"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    polygons = read_monuseg_polygons(plain)
    assert len(polygons) == 249 and polygons[0].shape[1] == 2
    assert all(np.array_equal(a, b) for a, b in zip(polygons, read_monuseg_polygons(gz)))
    tile = read_monuseg(plain, image_path=monuseg_dir / "TCGA-HT-8564-01Z-00-DX1.png")
    assert tile.name == "TCGA-HT-8564-01Z-00-DX1" and tile.scheme.name == "instance-only" and tile.type_map is None
    with np.load(monuseg_dir / "TCGA-HT-8564-01Z-00-DX1.npz") as z:
        np.testing.assert_array_equal(tile.inst_map, z["inst_map"])
    with pytest.raises(InvalidInputError, match="pass image_path= or shape="):
        read_monuseg(plain)
    with pytest.raises(InvalidInputError, match=r"image is \(1000, 1000\) but shape=\(999, 1000\)"):
        read_monuseg(plain, image_path=monuseg_dir / "TCGA-HT-8564-01Z-00-DX1.png", shape=(999, 1000))


def test_later_polygon_wins_and_empty_regions_leave_no_gap(tmp_path):
    xml = tmp_path / "toy.xml"
    xml.write_text(
        '<Annotations><Annotation><Regions>'
        '<Region Id="1"><Vertices><Vertex X="1" Y="1"/><Vertex X="8" Y="1"/><Vertex X="8" Y="8"/>'
        '<Vertex X="1" Y="8"/></Vertices></Region>'
        '<Region Id="2"><Vertices><Vertex X="50" Y="50"/><Vertex X="60" Y="50"/><Vertex X="60" Y="60"/>'
        '</Vertices></Region>'
        '<Region Id="3"><Vertices><Vertex X="5" Y="5"/><Vertex X="12.5" Y="5"/><Vertex X="12.5" Y="12.5"/>'
        '<Vertex X="5" Y="12.5"/></Vertices></Region>'
        '</Regions></Annotation></Annotations>')
    got = read_monuseg_xml(xml, (16, 16))  # region 2 lies outside the image
    assert got.max() == 2
    assert got[6, 6] == 2 and got[2, 2] == 1 and got[12, 12] == 2 and got[13, 13] == 0
