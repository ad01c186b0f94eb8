"""Bad input to the data readers and writers: each case gets a clear error that names the file and says what to do,
and a failed conversion leaves no partial output."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from diffaug.data import (Tile, TileFolder, read_consep_mat, read_hovernet_npy, read_lizard_mat, read_monuseg_xml,
                          read_pannuke, write_tile, write_tile_folder)
from diffaug.data.schemes import SCHEMES
from diffaug.errors import DataFormatError, InvalidInputError

NAME = "train_10_000"


@pytest.fixture
def folder(consep_dir: Path, tmp_path: Path) -> Path:
    """A copy of two real CoNSeP tiles with the dataset's own classes.json (merge block included)."""
    out = tmp_path / "tiles"
    out.mkdir()
    for name in (NAME, "train_1_005"):
        for suffix in ("png", "npz"):
            shutil.copy(consep_dir / f"{name}.{suffix}", out / f"{name}.{suffix}")
    shutil.copy(consep_dir / "classes.json", out / "classes.json")
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rewrite(folder: Path, **changes: np.ndarray) -> Path:
    path = folder / f"{NAME}.npz"
    arrays = _arrays(path)
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def _paint_nucleus(folder: Path, inst_id: int, cls: int) -> tuple[Path, int]:
    """Give every pixel of nucleus ``inst_id`` class ``cls`` in the type map; returns the file and the pixel count."""
    arrays = _arrays(folder / f"{NAME}.npz")
    types = arrays["type_map"].copy()
    sel = arrays["inst_map"] == inst_id
    types[sel] = cls
    return _rewrite(folder, type_map=types), int(sel.sum())


def _read(folder: Path, **kwargs) -> None:
    TileFolder(folder, **kwargs).read(NAME)


def test_folder_with_no_tiles(tmp_path):
    with pytest.raises(DataFormatError, match=rf"{tmp_path}: no tiles found .*NAME.png \+ NAME.npz"):
        TileFolder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataFormatError, match="1 PNGs but no .npz label files"):
        TileFolder(tmp_path)
    with pytest.raises(DataFormatError, match="data folder not found"):
        TileFolder(tmp_path / "missing")


def test_corrupt_npz(folder):
    path = folder / f"{NAME}.npz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataFormatError, match=rf"{path}: corrupt or unreadable .npz.*regenerate or remove"):
        _read(folder)


def test_corrupt_png(folder):
    png = folder / f"{NAME}.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=rf"{png}: not a readable image.*re-export"):
        _read(folder)


def test_unknown_scheme_in_classes_json(folder):
    (folder / "classes.json").write_text(json.dumps({"0": "background", "1": "a", "scheme": "consep-v2"}))
    with pytest.raises(DataFormatError, match=r"classes.json: unknown class scheme 'consep-v2'; known: .*consep"):
        TileFolder(folder)


def test_malformed_classes_json(folder):
    (folder / "classes.json").write_text('{"0": "background", "1": ')
    with pytest.raises(DataFormatError, match="classes.json: not valid JSON"):
        TileFolder(folder)
    (folder / "classes.json").write_text(json.dumps({"1": "a", "2": "b", "hovernet_merge": {"map": {"1": 1}}}))
    with pytest.raises(DataFormatError, match="malformed 'hovernet_merge' block.*'names'"):
        TileFolder(folder)
    (folder / "classes.json").write_text(json.dumps({"1": "a", "3": "c"}))
    with pytest.raises(DataFormatError, match=r"class ids must be 1..K without gaps, got \[1, 3\]"):
        TileFolder(folder)


def test_classes_out_of_range(folder):
    path, _ = _paint_nucleus(folder, 1, 9)
    with pytest.raises(DataFormatError, match=rf"{path}: type_map has class 9, out of range .*'consep'.*1..7"):
        _read(folder, classes="raw")
    with pytest.raises(DataFormatError, match=str(path)):
        _read(folder)  # merged by default: the same file is named


def test_wrong_dtype(folder):
    arrays = _arrays(folder / f"{NAME}.npz")
    path = _rewrite(folder, inst_map=arrays["inst_map"].astype(np.float32))
    with pytest.raises(DataFormatError, match=rf"{path}: inst_map must hold integers \(int32\), got float32"):
        _read(folder)
    _rewrite(folder, inst_map=arrays["inst_map"][..., None])
    with pytest.raises(DataFormatError, match=r"inst_map must be 2-D \(H, W\), got shape \(256, 256, 1\)"):
        _read(folder)


def test_type_inst_foreground_mismatch(folder):
    path, n = _paint_nucleus(folder, 3, 0)
    with pytest.raises(DataFormatError, match=rf"{path}: type_map and inst_map foregrounds disagree on {n} pixels"):
        _read(folder)


def test_nucleus_with_two_classes_and_stale_inst_type(folder):
    arrays = _arrays(folder / f"{NAME}.npz")
    types = arrays["type_map"].copy()
    ys, xs = np.nonzero(arrays["inst_map"] == 5)
    types[ys[0], xs[0]] = 1 if types[ys[0], xs[0]] != 1 else 2
    _rewrite(folder, type_map=types)
    with pytest.raises(DataFormatError, match=r"1 nuclei hold pixels of more than one class \(ids \[5\]\)"):
        _read(folder)
    stale = arrays["inst_type"].copy()
    stale[4] = 1 if stale[4] != 1 else 2
    _rewrite(folder, type_map=arrays["type_map"], inst_type=stale)
    with pytest.raises(DataFormatError, match=r"inst_type disagrees with type_map for 1 nuclei \(id 5"):
        _read(folder)


def test_ids_with_gaps(folder):
    arrays = _arrays(folder / f"{NAME}.npz")
    inst = arrays["inst_map"].copy()
    inst[inst == 2] = 1
    path = _rewrite(folder, inst_map=inst)
    with pytest.raises(DataFormatError, match=rf"{path}: instance ids must be 1..N without gaps.*relabel_sequential"):
        _read(folder)


def test_image_map_size_mismatch(folder):
    from diffaug._io import atomic_write_png

    png = folder / f"{NAME}.png"
    atomic_write_png(png, np.zeros((256, 200, 3), np.uint8))
    with pytest.raises(DataFormatError, match=rf"{png}: image is \(256, 200\) but {NAME}.npz maps are \(256, 256\)"):
        _read(folder)


def test_missing_png_and_type_map_without_classes(folder):
    (folder / f"{NAME}.png").unlink()
    with pytest.raises(DataFormatError, match=rf"1 tiles have no PNG image, e.g. {NAME}.npz.*require_images=False"):
        TileFolder(folder)
    (folder / "classes.json").unlink()
    with pytest.raises(DataFormatError, match="has a type_map but the data declares no classes; add a classes.json"):
        TileFolder(folder, require_images=False).read(NAME)


def test_mat_missing_keys_and_bad_values(consep_dir, tmp_path):
    tile = TileFolder(consep_dir, classes="raw").read(NAME)
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"inst_map": tile.inst_map, "inst_type": tile.inst_type[:, None]})
    with pytest.raises(DataFormatError, match=rf"{path}: missing \['type_map'\].*needs keys"):
        read_consep_mat(path)
    scipy.io.savemat(path, {"inst_map": tile.inst_map + 0.5, "type_map": tile.type_map, "inst_type": tile.inst_type})
    with pytest.raises(DataFormatError, match="inst_map holds non-integer values"):
        read_consep_mat(path)
    scipy.io.savemat(path, {"inst_map": tile.inst_map, "type_map": tile.type_map, "inst_type": tile.inst_type[:-1]})
    with pytest.raises(DataFormatError, match=rf"inst_type has {tile.num_instances - 1} rows but there are"):
        read_consep_mat(path)
    path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    with pytest.raises(DataFormatError, match=rf"{path}: not a readable .mat file"):
        read_consep_mat(path)
    with pytest.raises(InvalidInputError, match="unknown class scheme 'consep7'"):
        read_consep_mat(path, scheme="consep7")


def test_lizard_unlisted_id(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read(NAME)
    path = tmp_path / "l.mat"
    ids = np.arange(2, tile.num_instances + 1)  # id 1 is in the map but not listed
    scipy.io.savemat(path, {"inst_map": tile.inst_map, "id": ids[:, None], "class": tile.inst_type[1:, None]})
    with pytest.raises(DataFormatError, match=rf"{path}: 1 ids in inst_map are not listed in 'id' \(e.g. \[1\]\)"):
        read_lizard_mat(path)
    scipy.io.savemat(path, {"inst_map": tile.inst_map, "id": ids[:, None]})
    with pytest.raises(DataFormatError, match=r"missing \['class'\]"):
        read_lizard_mat(path)


def test_pannuke_shape_mismatch_and_overlap(consep_dir, tmp_path):
    images, masks = tmp_path / "images.npy", tmp_path / "masks.npy"
    np.save(images, np.zeros((3, 256, 256, 3), np.float64))
    np.save(masks, np.zeros((2, 256, 256, 6), np.float64))
    with pytest.raises(DataFormatError, match=r"images.npy has shape \(3, 256, 256, 3\) but .*masks.npy has \(2, "):
        read_pannuke(images, masks)
    np.save(masks, np.zeros((3, 256, 256, 5), np.float64))
    with pytest.raises(DataFormatError, match=r"masks.npy: masks have shape \(3, 256, 256, 5\), expected \(N, H, W, 6\)"):
        read_pannuke(images, masks)
    m = np.zeros((3, 256, 256, 6), np.float64)
    m[1, 10:20, 10:20, 0] = 1
    m[1, 15:25, 15:25, 2] = 2
    np.save(masks, m)
    fold = read_pannuke(images, masks)
    assert fold[0].num_instances == 0
    with pytest.raises(DataFormatError, match=r"masks.npy\[1\]: 25 pixels belong to nuclei of two classes"):
        fold[1]
    masks.write_bytes(b"not an array")
    with pytest.raises(DataFormatError, match="not a readable .npy array"):
        read_pannuke(images, masks)


def test_bad_xml(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region><Vertices><Vertex X='1' Y='2'/></Vertices>")
    with pytest.raises(DataFormatError, match=rf"{bad}: not well-formed XML"):
        read_monuseg_xml(bad, (10, 10))
    bad.write_text("<html><body/></html>")
    with pytest.raises(DataFormatError, match="root element is <html>, expected an Aperio <Annotations>"):
        read_monuseg_xml(bad, (10, 10))
    bad.write_text("<Annotations><Regions><Region Id='7'><Vertices><Vertex X='1' Y='two'/></Vertices></Region>"
                   "</Regions></Annotations>")
    with pytest.raises(DataFormatError, match=r"region 1 \(Id 7\) has a vertex without numeric X and Y"):
        read_monuseg_xml(bad, (10, 10))
    gz = tmp_path / "bad.xml.gz"
    gz.write_bytes(gzip.compress(b"<Annotations>")[:-6])
    with pytest.raises(DataFormatError, match=rf"{gz}: corrupt gzip file"):
        read_monuseg_xml(gz, (10, 10))


def test_hovernet_patch_errors(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, np.zeros((64, 64, 5), np.int32))
    with pytest.raises(InvalidInputError, match=rf"{path}: the patch has a type channel; pass scheme="):
        read_hovernet_npy(path)
    np.save(path, np.zeros((64, 64, 3), np.int32))
    with pytest.raises(DataFormatError, match=r"patch has shape \(64, 64, 3\), expected \(H, W, 5\)"):
        read_hovernet_npy(path)
    patch = np.zeros((64, 64, 5), np.int32)
    patch[..., 0] = 300
    np.save(path, patch)
    with pytest.raises(DataFormatError, match="RGB channels reach 300"):
        read_hovernet_npy(path, scheme="consep-hovernet")


def test_write_refuses_nonempty_folder_and_leaves_nothing_on_failure(consep_dir, tmp_path):
    folder = TileFolder(consep_dir)
    tiles = [folder.read(NAME), folder.read("train_1_005")]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match=rf"{taken}: output folder exists and is not empty"):
        write_tile_folder(tiles, taken, "consep-hovernet")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    bad = Tile(name="broken", image=tiles[0].image, inst_map=tiles[0].inst_map, type_map=tiles[0].type_map + 0)
    bad.type_map[bad.inst_map == 1] = 5  # class 5 does not exist in consep-hovernet
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"tile 'broken': type_map has class 5, but the scheme has only"):
        write_tile_folder(iter([tiles[0], tiles[1], bad]), out, "consep-hovernet")
    assert list(tmp_path.iterdir()) == [taken]  # neither out/ nor a hidden partial folder is left
    with pytest.raises(InvalidInputError, match=r"is in class scheme 'consep-hovernet', not 'consep'"):
        write_tile_folder(tiles, out, "consep")
    with pytest.raises(InvalidInputError, match="appears twice"):
        write_tile_folder([tiles[0], tiles[0]], out, "consep-hovernet")
    assert not out.exists()


def test_write_tile_checks_maps(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read(NAME)
    with pytest.raises(InvalidInputError, match=r"tile x: image is \(256, 128\) but inst_map is \(256, 256\)"):
        write_tile(tmp_path, "x", inst_map=tile.inst_map, type_map=tile.type_map, image=tile.image[:, :128])
    with pytest.raises(InvalidInputError, match="inst_type disagrees"):
        write_tile(tmp_path, "x", inst_map=tile.inst_map, type_map=tile.type_map, inst_type=tile.inst_type[::-1])
    assert not any(tmp_path.iterdir())
    assert SCHEMES["consep-hovernet"].num_classes == 5
