"""Tile folders on the shared data: class schemes merged once, raw on request, diffaug's own folders read back
without a second merge, instance-only MoNuSeg, odd sizes, byte-identical writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffaug.data import (MERGES, SCHEMES, Tile, TileFolder, apply_merge, get_merge, resolve_classes, write_tile,
                          write_tile_folder)
from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_types, relabel_sequential

SAMPLE = ["train_10_000", "train_1_005", "train_21_008", "train_5_008", "train_13_009"]


def _raw_npz(consep_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(consep_dir / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def test_schemes_match_spec():
    # SPEC §1: CoNSeP {3,4}->3 epithelial, {5,6,7}->4 spindle, 1 other, 2 inflammatory.
    consep = get_merge("consep")
    assert consep.target.name == "consep-hovernet"
    assert dict(consep.mapping) == {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
    assert dict(consep.target.names) == {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
    # GLySAC: {1,2,9,10}->1 other, {4,5,6,7}->2 lymphocyte, {3,8}->3 epithelial.
    glysac = get_merge("glysac")
    expected = {**dict.fromkeys([1, 2, 9, 10], 1), **dict.fromkeys([4, 5, 6, 7], 2), **dict.fromkeys([3, 8], 3)}
    assert dict(glysac.mapping) == expected
    assert dict(glysac.target.names) == {1: "other", 2: "lymphocyte", 3: "epithelial"}
    assert SCHEMES["glysac"].num_foreground == 10 and SCHEMES["consep"].num_foreground == 7
    assert [SCHEMES["lizard"].names[i] for i in range(1, 7)] == [
        "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"]
    # every merge is total on its source scheme and onto its target's classes
    for source, merge in MERGES.items():
        assert sorted(merge.mapping) == sorted(SCHEMES[source].names)
        assert set(merge.mapping.values()) == set(merge.target.names)


def test_resolve_classes_options():
    raw, merge = SCHEMES["consep"], MERGES["consep"]
    assert resolve_classes(raw, merge, "default", where="x") == (merge.target, merge)
    assert resolve_classes(raw, merge, "raw", where="x") == (raw, None)
    assert resolve_classes(raw, None, "default", where="x") == (raw, None)
    assert resolve_classes(raw, None, "consep-hovernet", where="x") == (merge.target, merge)  # known merge on request
    with pytest.raises(InvalidInputError, match="glysac-3.*choose classes from"):
        resolve_classes(raw, merge, "glysac-3", where="x")


def test_consep_loads_merged_by_default(consep_dir):
    folder = TileFolder(consep_dir)
    assert len(folder) == 432
    assert folder.raw_scheme.name == "consep"  # recognised from the merge block despite its longer class names
    assert folder.scheme.name == "consep-hovernet" and folder.merged
    lut = MERGES["consep"].lut()
    for name in SAMPLE:
        tile = folder.read(name)
        raw = _raw_npz(consep_dir, name)
        assert tile.scheme is folder.scheme
        assert tile.image.shape == (256, 256, 3) and tile.image.dtype == np.uint8
        np.testing.assert_array_equal(tile.inst_map, raw["inst_map"])
        np.testing.assert_array_equal(tile.type_map, lut[raw["type_map"]])
        np.testing.assert_array_equal(tile.inst_type, lut[raw["inst_type"]])
        np.testing.assert_array_equal(tile.extra["orig_inst_id"], raw["orig_inst_id"])
        assert tile.type_map.max() <= 4 and tile.inst_type.dtype == np.int32


def test_consep_raw_on_request(consep_dir):
    for classes in ("raw", "consep"):
        folder = TileFolder(consep_dir, classes=classes)
        assert folder.scheme.name == "consep" and not folder.merged
        tile = folder["train_10_000"]
        raw = _raw_npz(consep_dir, "train_10_000")
        np.testing.assert_array_equal(tile.type_map, raw["type_map"])
        np.testing.assert_array_equal(tile.inst_type, raw["inst_type"])
        assert tile.type_map.max() > 4  # raw classes 5..7 are present in this tile
    with pytest.raises(InvalidInputError, match="cannot load classes 'glysac-3'"):
        TileFolder(consep_dir, classes="glysac-3")


def test_written_folder_reads_back_without_second_merge(consep_dir, tmp_path):
    merged = TileFolder(consep_dir)
    tiles = [merged.read(n) for n in SAMPLE]
    assert any((t.type_map == 4).any() for t in tiles)  # spindle present: a second merge would turn it into 3
    out = write_tile_folder(tiles, tmp_path / "merged", "consep-hovernet")
    meta = json.loads((out / "classes.json").read_text())
    assert meta["scheme"] == "consep-hovernet" and "hovernet_merge" not in meta
    back = TileFolder(out)
    assert back.scheme.name == "consep-hovernet" and not back.merged
    assert back.names == sorted(SAMPLE)
    for tile in tiles:
        again = back.read(tile.name)
        for key in ("image", "inst_map", "type_map", "inst_type"):
            np.testing.assert_array_equal(getattr(again, key), getattr(tile, key))
        np.testing.assert_array_equal(again.extra["orig_inst_id"], tile.extra["orig_inst_id"])
    # asking for the raw scheme of merged maps is refused: the merge cannot be undone
    with pytest.raises(InvalidInputError):
        TileFolder(out, classes="consep")


def test_raw_folder_round_trip_merges_once_on_request(consep_dir, tmp_path):
    raw_tiles = [TileFolder(consep_dir, classes="raw").read(n) for n in SAMPLE[:2]]
    out = write_tile_folder(raw_tiles, tmp_path / "raw", "consep")
    assert TileFolder(out).scheme.name == "consep"  # as recorded: no merge block, so no merge by default
    merged_back = TileFolder(out, classes="consep-hovernet")
    reference = TileFolder(consep_dir)
    for name in SAMPLE[:2]:
        np.testing.assert_array_equal(merged_back.read(name).type_map, reference.read(name).type_map)


def test_writes_are_byte_identical(consep_dir, tmp_path):
    tiles = [TileFolder(consep_dir).read(n) for n in SAMPLE[:2]]
    a = write_tile_folder(tiles, tmp_path / "a", "consep-hovernet")
    b = write_tile_folder(tiles, tmp_path / "b", "consep-hovernet")
    for name in ["classes.json"] + [f"{n}.npz" for n in SAMPLE[:2]] + [f"{n}.png" for n in SAMPLE[:2]]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_custom_scheme_round_trip(consep_dir, tmp_path):
    src = tmp_path / "custom"
    src.mkdir()
    tile = TileFolder(consep_dir).read("train_1_005")
    for suffix in ("npz", "png"):
        (src / f"mine.{suffix}").write_bytes((consep_dir / f"train_1_005.{suffix}").read_bytes())
    names = {"0": "background", **{str(i): f"type {chr(96 + i)}" for i in range(1, 8)}}
    (src / "classes.json").write_text(json.dumps(names))
    folder = TileFolder(src)
    assert folder.scheme.name == "custom:custom" and folder.scheme.names[3] == "type c" and not folder.merged
    out = write_tile_folder(list(folder), tmp_path / "out", folder.scheme)
    back = TileFolder(out)
    assert back.scheme == folder.scheme
    np.testing.assert_array_equal(back.read("mine").inst_map, tile.inst_map)


def test_monuseg_instance_only(monuseg_dir):
    folder = TileFolder(monuseg_dir)
    assert len(folder) == 14 and not folder.has_classes and folder.scheme.name == "instance-only"
    tile = folder[0]
    assert tile.shape == (1000, 1000) and tile.image.shape == (1000, 1000, 3)
    assert tile.type_map is None and tile.inst_type is None
    assert tile.num_instances == 575 and tile.inst_map.dtype == np.int32


def test_odd_sized_tiles_round_trip(monuseg_dir, tmp_path):
    src = TileFolder(monuseg_dir)[1]
    tiles = []
    for k, (y0, x0, h, w) in enumerate([(0, 0, 333, 517), (101, 7, 1, 999), (500, 499, 257, 31)]):
        crop = (slice(y0, y0 + h), slice(x0, x0 + w))
        tiles.append(Tile(name=f"crop{k}", image=src.image[crop].copy(), inst_map=relabel_sequential(src.inst_map[crop])))
    out = write_tile_folder(tiles, tmp_path / "odd", "instance-only")
    assert json.loads((out / "classes.json").read_text())["scheme"] == "instance-only"
    back = TileFolder(out)
    assert not back.has_classes
    for tile in tiles:
        again = back.read(tile.name)
        assert again.shape == tile.shape
        np.testing.assert_array_equal(again.inst_map, tile.inst_map)
        np.testing.assert_array_equal(again.image, tile.image)


def test_labels_only_reading(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read("train_10_000", image=False)
    assert tile.image is None and tile.inst_type is not None
    write_tile(tmp_path, "labels", inst_map=tile.inst_map, type_map=tile.type_map)
    (tmp_path / "classes.json").write_text(json.dumps(SCHEMES["consep-hovernet"].to_json()))
    with pytest.raises(InvalidInputError, match="no PNG image"):
        TileFolder(tmp_path)
    back = TileFolder(tmp_path, require_images=False).read("labels")
    assert back.image is None
    np.testing.assert_array_equal(back.inst_type, instance_types(tile.inst_map, tile.type_map))


def test_merge_rejects_unknown_classes():
    with pytest.raises(InvalidInputError, match=r"classes \[8\]"):
        apply_merge(np.array([[1, 8]]), MERGES["consep"])
