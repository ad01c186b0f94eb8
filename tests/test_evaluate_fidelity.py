"""Label fidelity scoring: a real-trained segmenter on images vs the label maps that should be in them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffaug.data import TileFolder
from diffaug.evaluation.fidelity import fidelity_markdown, run_fidelity
from diffaug.segmenter import Segmenter, SegmenterConfig


@pytest.fixture(scope="module")
def tiles(consep_dir):
    folder = TileFolder(consep_dir)
    return [folder.read(n) for n in ("train_7_000", "train_10_000", "train_24_009")]


@pytest.fixture(scope="module")
def segmenter():
    # An untrained network still segments deterministically; what is tested here is the protocol, not the model.
    return Segmenter(SegmenterConfig(num_classes=5, channels=(8, 16)), generator=torch.Generator().manual_seed(0))


def test_images_that_match_their_maps_score_as_the_real_tiles(tiles, segmenter, tmp_path):
    report = run_fidelity(segmenter, tiles, [t.image for t in tiles], classes=[1, 2, 3, 4], out_dir=tmp_path,
                          extra={"class_names": {"1": "other"}})
    assert report["real"] == report["synthetic"]
    assert all(v == pytest.approx(1.0) or np.isnan(v) for v in report["ratio"].values())
    saved = json.loads((tmp_path / "fidelity.json").read_text())
    assert saved["tiles"] == [t.name for t in tiles] and sorted(p.name for p in (tmp_path / "synthetic").iterdir()) \
        == sorted(f"{t.name}.png" for t in tiles)
    md = (tmp_path / "fidelity.md").read_text()
    assert "| real tiles |" in md and "| synthetic (same label maps) |" in md and "F1 other" in md


def test_images_of_other_maps_score_lower(tiles, monkeypatch):
    # A perfect "segmenter" stand-in reports the true maps of whichever tile an image is, so the protocol alone is
    # tested: images that do not show their maps must score low.
    import diffaug.evaluation.fidelity as fidelity_module
    from diffaug.segmenter import Segmentation

    lookup = {t.image.tobytes(): t for t in tiles}

    def oracle_segment(model, images, **_):
        return [Segmentation(lookup[im.tobytes()].inst_map, lookup[im.tobytes()].type_map, None) for im in images]

    monkeypatch.setattr(fidelity_module, "segment", oracle_segment)
    shuffled = [tiles[1].image, tiles[2].image, tiles[0].image]
    report = run_fidelity(None, tiles, shuffled, classes=[1, 2, 3, 4])  # type: ignore[arg-type]
    assert report["real"]["pq"] == pytest.approx(1.0, abs=1e-5) and report["real"]["f1_detection"] == 1.0
    assert report["synthetic"]["pq"] < 0.2 and report["synthetic"]["f1_detection"] < 0.5
    assert report["ratio"]["pq"] < 0.2
    assert "synthetic" in fidelity_markdown(report)


def test_cli_needs_weights_and_a_real_inception_file(consep_dir, tmp_path, capsys):
    from diffaug.cli import main

    base = ["evaluate", "fidelity", "--smoke", "--data", str(consep_dir), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(base) == 2
    assert "pass --weights" in capsys.readouterr().err
    assert main([*base, "--weights", "unused", "--inception", str(tmp_path / "inception-2015-12-05.pt")]) == 2
    assert "Inception weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
