"""Patch extraction on shared tiles: exact window positions, the tissue filter, per-patch renumbering."""

from __future__ import annotations

import numpy as np
import pytest

from diffaug.data import (TileFolder, extract_patches, extract_tile_patches, patch_grid, tissue_mask, window_starts,
                          write_tile_folder)
from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_types


def test_window_starts_last_window_flush():
    assert window_starts(1000, 128, 64) == [0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 872]
    assert window_starts(256, 128, 64) == [0, 64, 128]  # already flush: no extra window
    assert window_starts(128, 128, 64) == [0]
    assert window_starts(300, 128, 128) == [0, 128, 172]
    assert patch_grid((256, 300), 128, 0.0) == [(0, 0), (0, 128), (0, 172), (128, 0), (128, 128), (128, 172)]
    assert len(patch_grid((1000, 1000))) == 15 * 15


def test_nasdm_patches_on_monuseg_image(monuseg_dir):
    tile = TileFolder(monuseg_dir).read("TCGA-AC-A2FO-01A-01-TS1")  # 97 % tissue: every window is kept
    patches = extract_patches(tile.image, tile.inst_map)
    assert [(p.y0, p.x0) for p in patches] == patch_grid((1000, 1000), 128, 0.5)
    starts = window_starts(1000, 128, 64)
    assert patches[-1].y0 == patches[-1].x0 == 872 == starts[-1]
    for p in patches[::17] + patches[-1:]:
        win = (slice(p.y0, p.y0 + 128), slice(p.x0, p.x0 + 128))
        crop = tile.inst_map[win]
        np.testing.assert_array_equal(p.image, tile.image[win])
        assert p.inst_map.shape == (128, 128) and p.inst_map.dtype == np.int32
        n = int(p.inst_map.max())
        assert np.array_equal(np.unique(p.inst_map), np.arange(n + 1))  # 1..N per patch
        np.testing.assert_array_equal(np.concatenate([[0], p.orig_inst_id])[p.inst_map], crop)
        assert p.type_map is None and p.inst_type is None and p.tissue_fraction >= 0.5


def test_tissue_filter_drops_background_windows(monuseg_dir):
    tile = TileFolder(monuseg_dir).read("TCGA-AC-A2FO-01A-01-TS1")
    image = tile.image.copy()
    image[:, 500:] = 245  # glass: the right half has no tissue
    mask = tissue_mask(image)
    assert mask[:, 500:].sum() == 0 and mask[:, :500].mean() > 0.95
    kept = {(p.y0, p.x0) for p in extract_patches(image, tile.inst_map)}
    xs = {x for _, x in kept}
    # x0 = 384 covers 116 tissue columns of 128 (> 50 %), x0 = 448 only 52 (< 50 %)
    assert xs == {0, 64, 128, 192, 256, 320, 384}
    assert kept == {(y, x) for y in window_starts(1000, 128, 64) for x in xs}
    assert len(extract_patches(image, tile.inst_map, min_tissue=0.0)) == 225
    assert len(extract_patches(image, tile.inst_map, min_tissue=1.0)) < len(kept)


def test_tissue_rules_on_pale_stroma(consep_dir):
    image = TileFolder(consep_dir).read("train_21_008").image  # pale pink stroma, all tissue
    assert tissue_mask(image).mean() > 0.9
    assert tissue_mask(image, method="luminosity").mean() < 0.3  # staintools' rule calls most of it background
    with pytest.raises(InvalidInputError, match="unknown tissue method"):
        tissue_mask(image, method="otsu")  # type: ignore[arg-type]


def test_class_patches_and_tile_folder(consep_dir, tmp_path):
    tile = TileFolder(consep_dir).read("train_10_000")
    patches = extract_tile_patches(tile, min_tissue=0.0)
    assert [t.name for t in patches[:2]] == ["train_10_000_y00000_x00000", "train_10_000_y00000_x00064"]
    assert len(patches) == 9
    for p in patches:
        y0, x0 = int(p.name[-12:-7]), int(p.name[-5:])
        np.testing.assert_array_equal(p.type_map, tile.type_map[y0:y0 + 128, x0:x0 + 128])
        np.testing.assert_array_equal(p.inst_type, instance_types(p.inst_map, p.type_map))
        assert p.scheme is tile.scheme
    out = write_tile_folder(patches, tmp_path / "patches", tile.scheme)
    back = TileFolder(out)
    assert len(back) == 9 and back.scheme.name == "consep-hovernet"
    np.testing.assert_array_equal(back.read(patches[4].name).inst_map, patches[4].inst_map)


def test_patch_arguments_are_checked(consep_dir):
    tile = TileFolder(consep_dir).read("train_10_000")
    with pytest.raises(InvalidInputError, match="smaller than the 512-px window"):
        extract_patches(tile.image, tile.inst_map, window=512)
    with pytest.raises(InvalidInputError, match="overlap must be in"):
        extract_patches(tile.image, tile.inst_map, overlap=1.0)
    with pytest.raises(InvalidInputError, match="min_tissue"):
        extract_patches(tile.image, tile.inst_map, min_tissue=50)
    with pytest.raises(InvalidInputError, match=r"image is \(256, 255\)"):
        extract_patches(tile.image[:, :255], tile.inst_map)
