"""The per-instance reference of benchmarks/metrics.py reproduces the golden fixtures, and diffaug agrees with it
where the fixtures say nothing (PQ below IoU 0.5, the benchmark's own predictions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import metrics as bench
from diffaug import metrics

# Small CoNSeP cases (256x256) of all kinds (case = 8 * tile + kind); the reference is slow on the 1000x1000 ones.
PQ_CASES = (3, 7, 42, 47, 92, 95)  # merge, shift3, dilate2, shift3, split, shift3
SMALL = sorted(set(range(0, 96, 5)) | set(PQ_CASES))


@pytest.fixture(scope="module")
def fixture_data(hovernet_fixture_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    expected = json.loads((hovernet_fixture_dir / "expected.json").read_text())
    with np.load(hovernet_fixture_dir / "cases.npz") as data:
        cases = {f"c{i}_{side}": data[f"c{i}_{side}"] for i in SMALL for side in ("true", "pred")}
    return expected, cases


@pytest.mark.parametrize("index", SMALL)
def test_reference_reproduces_hovernet(index: int, fixture_data) -> None:
    expected, cases = fixture_data
    case = expected["cases"][index]
    true = bench.reference_remap(cases[f"c{index}_true"])
    pred = bench.reference_remap(cases[f"c{index}_pred"])
    got = {"dice": bench.reference_dice(true, pred), "aji": bench.reference_aji(true, pred),
           "aji_plus": bench.reference_aji_plus(true, pred)}
    got.update(zip(("dq", "sq", "pq"), bench.reference_pq(true, pred)))
    for key, value in got.items():
        assert abs(value - case[key]) <= 1e-6, (case["name"], key)


@pytest.mark.parametrize("match_iou", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("index", PQ_CASES)
def test_pq_below_half_iou_matches_the_reference(index: int, match_iou: float, fixture_data) -> None:
    _, cases = fixture_data
    true, pred = cases[f"c{index}_true"], cases[f"c{index}_pred"]
    want = bench.reference_pq(bench.reference_remap(true), bench.reference_remap(pred), match_iou)
    assert metrics.panoptic_quality(true, pred, match_iou) == pytest.approx(want, abs=1e-12)


def test_benchmark_builders_and_type_stats_reference(consep_dir: Path, rng: np.random.Generator) -> None:
    with np.load(consep_dir / "train_18_011.npz") as data:
        true = data["inst_map"]
    merged = bench.merge_close(true, rng)
    n_true, n_merged = np.unique(true).size - 1, np.unique(merged).size - 1
    assert n_true - n_merged == max(1, int(0.2 * n_true))  # 172 nuclei, 34 disjoint close pairs merged
    for pred in (bench.erode1(true), merged):
        want = {"dice": bench.reference_dice(true, pred)}
        got = metrics.instance_stats(true, pred)
        assert got["dice"] == pytest.approx(want["dice"], abs=1e-12)
        assert got["aji"] == pytest.approx(bench.reference_aji(bench.reference_remap(true),
                                                                bench.reference_remap(pred)), abs=1e-12)
    t_pts, p_pts = bench.point_sets(true, rng)
    want = bench.reference_type_stats([t_pts], [p_pts], [1, 2, 3, 4])
    got = metrics.type_stats([t_pts], [p_pts], [1, 2, 3, 4])
    assert got["f1_detection"] == pytest.approx(want["f1_detection"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    for cls, value in want["f1_per_class"].items():
        assert math.isclose(got["f1_per_class"][cls], value, abs_tol=1e-12)
