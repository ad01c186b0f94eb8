"""Scoring lists of label maps with HoVer-Net's metrics, and its bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffaug.data import TileFolder
from diffaug.errors import InvalidInputError
from diffaug.evaluation.scoring import LabelMaps, score_maps
from diffaug.metrics import instance_stats


@pytest.fixture(scope="module")
def tiles(consep_dir):
    folder = TileFolder(consep_dir)
    return [folder.read(n, image=False) for n in ("train_26_015", "train_17_012", "train_15_005")]  # last: no nuclei


def _maps(tiles):
    return [LabelMaps(t.inst_map, t.type_map) for t in tiles]


def test_perfect_prediction_scores_one(tiles):
    out = score_maps(_maps(tiles), _maps(tiles), classes=[1, 2, 3, 4])
    assert out["n_images"] == 3 and out["n_images_scored"] == 2  # the empty tile has nothing to score
    assert out["dice"] == 1.0 and out["aji"] == 1.0 and out["pq"] == pytest.approx(1.0, abs=1e-6)
    assert out["f1_detection"] == 1.0 and out["accuracy"] == 1.0
    present = {int(c) for t in tiles for c in np.unique(t.type_map) if c}
    assert all(out["f1_per_class"][c] == 1.0 for c in present)
    assert all(math.isnan(out["f1_per_class"][c]) for c in {1, 2, 3, 4} - present)


def test_means_are_per_image_and_types_pooled(tiles):
    rng = np.random.default_rng(0)
    pred = []
    for t in tiles:
        inst = t.inst_map.copy()
        ids = np.unique(inst)[1:]
        inst[np.isin(inst, rng.choice(ids, size=len(ids) // 3, replace=False) if len(ids) else [])] = 0
        typ = np.where(inst > 0, t.type_map, 0)
        typ[typ == 4] = 3  # every spindle nucleus called epithelial
        pred.append(LabelMaps(inst, typ))
    out = score_maps(_maps(tiles), pred, classes=[1, 2, 3, 4])
    per_image = [instance_stats(t.inst_map, p.inst_map) for t, p in zip(tiles[:2], pred[:2])]
    assert out["pq"] == pytest.approx(np.mean([s["pq"] for s in per_image]))
    assert out["dice"] == pytest.approx(np.mean([s["dice"] for s in per_image]))
    assert out["f1_per_class"][4] == 0.0 and out["f1_detection"] < 1.0
    assert "f1_detection" not in score_maps(_maps(tiles), pred)


def test_empty_prediction_on_nuclei_scores_zero(tiles):
    empty = [LabelMaps(np.zeros_like(t.inst_map), np.zeros_like(t.type_map)) for t in tiles]
    out = score_maps(_maps(tiles), empty, classes=[1, 2, 3, 4])
    assert out["dice"] == 0.0 and out["aji"] == 0.0 and out["pq"] == 0.0 and out["n_images_scored"] == 2


def test_bad_input(tiles):
    good = _maps(tiles)
    t = tiles[0]
    with pytest.raises(InvalidInputError, match="3 true maps but 2 predictions"):
        score_maps(good, good[:2])
    with pytest.raises(InvalidInputError, match="image 0: .*shape"):
        score_maps(good[:1], [LabelMaps(t.inst_map[:100])])
    with pytest.raises(InvalidInputError, match="image 0: .*integer"):
        score_maps(good[:1], [LabelMaps(t.inst_map.astype(np.float32))])
    with pytest.raises(InvalidInputError, match="image 0: .*negative"):
        score_maps(good[:1], [LabelMaps(-t.inst_map)])
    with pytest.raises(InvalidInputError, match="per-class metrics need classes"):
        score_maps(good[:1], [LabelMaps(t.inst_map)], classes=[1, 2, 3, 4])
    with pytest.raises(InvalidInputError, match="classes"):
        score_maps(good[:1], good[:1], classes=[0, 1])
