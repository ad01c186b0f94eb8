"""CoNSeP/GLySAC and Lizard ``.mat``, PanNuke ``.npy`` folds and HoVer-Net patches, written from the real shared
tiles in each format's own layout (scipy.io.savemat, numpy) and read back exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from diffaug.data import (MERGES, PanNukeFold, Tile, TileFolder, read_consep_mat, read_hovernet_npy, read_lizard_mat,
                          read_pannuke, write_consep_mat, write_hovernet_npy, write_tile_folder)
from diffaug.labels.instances import instance_centroids, relabel_sequential

SOURCE = "train_10.png"


@pytest.fixture(scope="module")
def consep_raw(consep_dir: Path) -> TileFolder:
    return TileFolder(consep_dir, classes="raw")


@pytest.fixture(scope="module")
def source_image(consep_dir: Path, consep_raw: TileFolder) -> dict[str, np.ndarray]:
    """The 1000x1000 CoNSeP image train_10 in raw classes and original ids, stitched from its 16 tiles."""
    with open(consep_dir / "tiles.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source_image"] == SOURCE]
    image = np.zeros((1000, 1000, 3), np.uint8)
    inst = np.zeros((1000, 1000), np.int32)
    types = np.zeros((1000, 1000), np.int32)
    for row in rows:
        tile = consep_raw.read(row["tile"])
        win = (slice(int(row["y0"]), int(row["y0"]) + 256), slice(int(row["x0"]), int(row["x0"]) + 256))
        image[win] = tile.image
        inst[win] = np.concatenate([[0], tile.extra["orig_inst_id"]])[tile.inst_map]
        types[win] = tile.type_map
    assert inst.max() == np.unique(inst).size - 1  # original CoNSeP ids are 1..N
    return {"image": image, "inst_map": inst, "type_map": types}


def _inst_type(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Class of ids 1..N, computed independently of the library (first pixel of each id)."""
    n = int(inst.max())
    out = np.zeros(n, np.int32)
    flat_i, flat_t = inst.ravel(), types.ravel()
    out[flat_i[flat_i > 0] - 1] = flat_t[flat_i > 0]
    return out


def test_consep_mat_in_release_layout(source_image, tmp_path):
    inst, types = source_image["inst_map"], source_image["type_map"]
    n = int(inst.max())
    ys, xs = np.nonzero(inst == 7)
    # The released CoNSeP files store everything as float64, inst_type N×1, centroids N×2 in (x, y).
    scipy.io.savemat(tmp_path / "train_10.mat", {
        "inst_map": inst.astype(np.float64), "type_map": types.astype(np.float64),
        "inst_type": _inst_type(inst, types).astype(np.float64)[:, None],
        "inst_centroid": instance_centroids(inst)})
    scipy.io.savemat(tmp_path / "raw.mat", {"inst_map": inst, "type_map": types, "inst_type": _inst_type(inst, types)})
    from diffaug._io import atomic_write_png
    atomic_write_png(tmp_path / "train_10.png", source_image["image"])

    raw = read_consep_mat(tmp_path / "train_10.mat", image_path=tmp_path / "train_10.png", classes="raw")
    assert raw.name == "train_10" and raw.scheme.name == "consep" and raw.num_instances == n == 997
    np.testing.assert_array_equal(raw.inst_map, inst)
    np.testing.assert_array_equal(raw.type_map, types)
    np.testing.assert_array_equal(raw.image, source_image["image"])
    merged = read_consep_mat(tmp_path / "train_10.mat")
    assert merged.scheme.name == "consep-hovernet"
    np.testing.assert_array_equal(merged.type_map, MERGES["consep"].lut()[types])
    np.testing.assert_array_equal(merged.inst_type, MERGES["consep"].lut()[_inst_type(inst, types)])
    np.testing.assert_array_equal(read_consep_mat(tmp_path / "raw.mat", classes="raw").inst_map, inst)

    # writing: release layout, centroid of id 7 in (x, y), exact round trip
    out = write_consep_mat(tmp_path / "written.mat", raw)
    stored = scipy.io.loadmat(out)
    assert stored["inst_type"].shape == (n, 1) and stored["inst_centroid"].shape == (n, 2)
    np.testing.assert_allclose(stored["inst_centroid"][6], [xs.mean(), ys.mean()])
    again = read_consep_mat(out, classes="raw")
    np.testing.assert_array_equal(again.inst_map, inst)
    np.testing.assert_array_equal(again.type_map, types)


def test_glysac_mat_merges_to_three_classes(consep_raw, tmp_path):
    tile = consep_raw.read("train_10_000")
    # Relabel CoNSeP's 7 raw classes onto GLySAC raw ids to get a real-shaped GLySAC file with 7 of its 10 classes.
    to_glysac = np.array([0, 1, 4, 3, 8, 9, 10, 2])
    types = to_glysac[tile.type_map]
    scipy.io.savemat(tmp_path / "g.mat", {"inst_map": tile.inst_map, "type_map": types,
                                          "inst_type": to_glysac[tile.inst_type][:, None]})
    glysac = read_consep_mat(tmp_path / "g.mat", scheme="glysac")
    assert glysac.scheme.name == "glysac-3"
    expected = np.array([0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1])[types]  # SPEC §1's GLySAC merge, written out
    np.testing.assert_array_equal(glysac.type_map, expected)
    assert set(np.unique(glysac.type_map)) == {0, 1, 2, 3}
    raw = read_consep_mat(tmp_path / "g.mat", scheme="glysac", classes="raw")
    np.testing.assert_array_equal(raw.type_map, types)


def test_lizard_mat_renumbers_and_keeps_ids(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read("train_10_005")  # 4 merged classes, used as Lizard classes 1..4
    orig = tile.extra["orig_inst_id"]
    lizard_map = np.concatenate([[0], orig])[tile.inst_map]  # ids of the source image: not contiguous here
    assert lizard_map.max() > np.unique(lizard_map).size - 1
    ids = np.concatenate([orig, [orig.max() + 50]])  # a listed id with no pixels is allowed
    cls = np.concatenate([tile.inst_type, [6]])
    scipy.io.savemat(tmp_path / "l.mat", {"inst_map": lizard_map.astype(np.int32), "id": ids[:, None],
                                          "class": cls[:, None], "bbox": np.zeros((ids.size, 4)),
                                          "centroid": np.zeros((ids.size, 2))})
    got = read_lizard_mat(tmp_path / "l.mat")
    assert got.scheme.name == "lizard"
    np.testing.assert_array_equal(got.inst_map, relabel_sequential(lizard_map))
    np.testing.assert_array_equal(np.concatenate([[0], got.extra["orig_inst_id"]])[got.inst_map], lizard_map)
    np.testing.assert_array_equal(got.type_map, tile.type_map)
    np.testing.assert_array_equal(got.inst_type, tile.inst_type)


def _to_pannuke(tiles: list[Tile], *, ids_per_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([t.image for t in tiles]).astype(np.float64)  # PanNuke ships float64 arrays
    masks = np.zeros(images.shape[:3] + (6,), np.float64)
    for i, t in enumerate(tiles):
        for c in range(5):
            sel = t.type_map == c + 1
            ids = t.inst_map * sel
            masks[i, ..., c] = relabel_sequential(ids) if ids_per_channel else ids
        masks[i, ..., 5] = t.inst_map == 0
    return images, masks


def test_pannuke_round_trip(consep_dir, tmp_path):
    folder = TileFolder(consep_dir)
    tiles = [folder.read(n) for n in ("train_10_000", "train_1_005", "train_21_008", "train_13_009")]
    images, masks = _to_pannuke(tiles)
    fold_dir = tmp_path / "fold1"
    fold_dir.mkdir()
    np.save(fold_dir / "images.npy", images)
    np.save(fold_dir / "masks.npy", masks)
    fold = read_pannuke(fold_dir / "images.npy", fold_dir / "masks.npy")
    assert isinstance(fold, PanNukeFold) and len(fold) == 4 and fold.scheme.name == "pannuke"
    for tile, got in zip(tiles, fold):
        assert got.scheme.name == "pannuke" and got.image.dtype == np.uint8
        np.testing.assert_array_equal(got.image, tile.image)
        np.testing.assert_array_equal(got.inst_map, tile.inst_map)
        np.testing.assert_array_equal(got.type_map, tile.type_map)  # class k <-> channel k-1
    assert fold[-1].name == "fold1_00003" and [t.name for t in fold[1:3]] == ["fold1_00001", "fold1_00002"]
    out = write_tile_folder(fold, tmp_path / "tiles", "pannuke")
    np.testing.assert_array_equal(TileFolder(out).read("fold1_00002").inst_map, tiles[2].inst_map)


def test_pannuke_same_id_in_two_channels_is_two_nuclei(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read("train_10_000")
    images, masks = _to_pannuke([tile], ids_per_channel=True)  # ids restart at 1 in every class channel
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    got = read_pannuke(tmp_path / "images.npy", tmp_path / "masks.npy")[0]
    assert got.num_instances == tile.num_instances
    pairs = np.unique(np.stack([got.inst_map.ravel(), tile.inst_map.ravel()]), axis=1)
    assert pairs.shape[1] == tile.num_instances + 1  # a one-to-one relabelling of the nuclei (plus background)
    np.testing.assert_array_equal(got.type_map, tile.type_map)


def test_hovernet_patch_round_trip(consep_dir, monuseg_dir, tmp_path):
    tile = TileFolder(consep_dir).read("train_1_005")
    path = write_hovernet_npy(tmp_path / "p.npy", tile)
    stored = np.load(path)
    assert stored.shape == (256, 256, 5) and stored.dtype == np.int32
    np.testing.assert_array_equal(stored[..., :3], tile.image)
    np.testing.assert_array_equal(stored[..., 3], tile.inst_map)
    np.testing.assert_array_equal(stored[..., 4], tile.type_map)
    back = read_hovernet_npy(path, scheme="consep-hovernet")
    assert back.scheme.name == "consep-hovernet"
    for key in ("image", "inst_map", "type_map", "inst_type"):
        np.testing.assert_array_equal(getattr(back, key), getattr(tile, key))
    np.testing.assert_array_equal(back.extra["orig_inst_id"], np.arange(1, tile.num_instances + 1))

    # HoVer-Net's own extractor keeps the source image's ids and may store float64: renumbered, ids kept
    mono = TileFolder(monuseg_dir)[2]
    crop = (slice(123, 123 + 270), slice(301, 301 + 199))
    patch = np.concatenate([mono.image[crop], mono.inst_map[crop][..., None]], axis=-1).astype(np.float64)
    np.save(tmp_path / "m.npy", patch)
    got = read_hovernet_npy(tmp_path / "m.npy")
    assert got.shape == (270, 199) and got.type_map is None and got.scheme.name == "instance-only"
    np.testing.assert_array_equal(got.inst_map, relabel_sequential(mono.inst_map[crop]))
    np.testing.assert_array_equal(np.concatenate([[0], got.extra["orig_inst_id"]])[got.inst_map],
                                  mono.inst_map[crop])
    np.testing.assert_array_equal(np.load(write_hovernet_npy(tmp_path / "m2.npy", got))[..., :3], mono.image[crop])
