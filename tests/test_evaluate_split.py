"""Splitting tile folders by source image, never by tile."""

from __future__ import annotations

import shutil

import pytest

from diffaug.data import TileFolder
from diffaug.errors import ConfigError, DataFormatError
from diffaug.evaluation.split import source_images, split_by_source


def test_consep_sources_come_from_tiles_csv(consep_dir):
    folder = TileFolder(consep_dir)
    sources = source_images(folder)
    assert len(sources) == 432 and len(set(sources.values())) == 27
    assert sources["train_10_003"] == "train_10.png"  # the csv's value, not the name prefix


def test_split_holds_out_whole_source_images_reproducibly(consep_dir):
    folder = TileFolder(consep_dir)
    sources = source_images(folder)
    train, val = split_by_source(folder, 5, seed=0)
    assert len(train) + len(val) == 432 and len(val) == 5 * 16
    assert not {sources[n] for n in train} & {sources[n] for n in val}
    assert split_by_source(folder, 5, seed=0) == (train, val)
    assert split_by_source(folder, 5, seed=1)[1] != val
    with pytest.raises(ConfigError, match="too large: .* only 27 source images"):
        split_by_source(folder, 27)
    with pytest.raises(ConfigError, match=">= 1"):
        split_by_source(folder, 0)


def _copy(src, dst, pairs):
    dst.mkdir()
    shutil.copy(src / "classes.json", dst / "classes.json")
    for old, new in pairs:
        for ext in ("png", "npz"):
            shutil.copy(src / f"{old}.{ext}", dst / f"{new}.{ext}")


def test_name_prefix_rule_without_tiles_csv(consep_dir, tmp_path):
    _copy(consep_dir, tmp_path / "f", [("train_10_000", "slideA_000"), ("train_10_001", "slideA_001"),
                                       ("train_11_000", "slide_B_12"), ("train_12_000", "loose")])
    folder = TileFolder(tmp_path / "f")
    assert source_images(folder) == {"loose": "loose", "slideA_000": "slideA", "slideA_001": "slideA",
                                     "slide_B_12": "slide_B"}
    train, val = split_by_source(folder, 2, seed=0)
    assert len(train) + len(val) == 4 and ({"slideA_000", "slideA_001"} <= set(train) or
                                           not {"slideA_000", "slideA_001"} & set(train))


def test_tiles_csv_missing_a_tile_is_an_error(consep_dir, tmp_path):
    _copy(consep_dir, tmp_path / "f", [("train_10_000", "train_10_000"), ("train_10_001", "extra_001")])
    (tmp_path / "f" / "tiles.csv").write_text("tile,source_image\ntrain_10_000,train_10.png\n")
    with pytest.raises(DataFormatError, match="not listed, e.g. extra_001"):
        source_images(TileFolder(tmp_path / "f"))
