"""Parity of diffaug.metrics with the original HoVer-Net evaluation code (golden fixtures), and its behaviour."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffaug import metrics
from diffaug.metrics import detection, instance

N_CASES = 103
INSTANCE_KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
TOL = 1e-6


@pytest.fixture(scope="module")
def expected(hovernet_fixture_dir: Path) -> dict:
    return json.loads((hovernet_fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def cases(hovernet_fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(hovernet_fixture_dir / "cases.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def point_sets(hovernet_fixture_dir: Path, expected: dict) -> list[tuple[list, list]]:
    out = []
    with np.load(hovernet_fixture_dir / "type_stat_inputs.npz") as data:
        for entry in expected["type_stats"]:
            s = entry["set"]
            n = int(data[f"s{s}_n_images"])
            true = [(data[f"s{s}_i{j}_true_centroid"], data[f"s{s}_i{j}_true_type"]) for j in range(n)]
            pred = [(data[f"s{s}_i{j}_pred_centroid"], data[f"s{s}_i{j}_pred_type"]) for j in range(n)]
            out.append((true, pred))
    return out


def _expected_instance(case: dict) -> dict[str, float]:
    """The values this library documents for a case: the original's, and its chosen values where the original
    raised (see diffaug.metrics.instance's docstring)."""
    values = {key: case[key] for key in INSTANCE_KEYS}
    errors = case["errors"]
    if "aji" in errors:
        assert errors["aji"] == "ValueError"
        values["aji"] = 0.0 if case["n_true"] > 0 else math.nan  # empty prediction: 0.0; both empty: nan
    if "pq" in errors:
        assert errors["pq"] == "ZeroDivisionError" and case["n_true"] == case["n_pred"] == 0
        values.update(dq=math.nan, sq=math.nan, pq=math.nan)
    for key, value in values.items():
        if value is None:  # the original returned nan (no exception)
            values[key] = math.nan
    return values


def _assert_close(got: float, want: float, what: str) -> None:
    if math.isnan(want):
        assert math.isnan(got), f"{what}: expected nan, got {got}"
    else:
        assert abs(got - want) <= TOL, f"{what}: expected {want!r}, got {got!r}"


def test_fixture_case_count(expected: dict, cases: dict) -> None:
    assert len(expected["cases"]) == N_CASES
    assert len([k for k in cases if k.endswith("_true")]) == N_CASES


@pytest.mark.parametrize("index", range(N_CASES))
def test_instance_metrics_match_hovernet(index: int, expected: dict, cases: dict) -> None:
    case = expected["cases"][index]
    true, pred = cases[f"c{index}_true"], cases[f"c{index}_pred"]
    want = _expected_instance(case)
    name = f"case {index} {case['name']}"
    dq, sq, pq = metrics.panoptic_quality(true, pred, match_iou=0.5)
    singles = {"dice": metrics.dice(true, pred), "aji": metrics.aji(true, pred),
               "aji_plus": metrics.aji_plus(true, pred), "dq": dq, "sq": sq, "pq": pq}
    together = metrics.instance_stats(true, pred)
    assert set(together) == set(INSTANCE_KEYS)
    for key in INSTANCE_KEYS:
        _assert_close(singles[key], want[key], f"{name} {key}")
        _assert_close(together[key], want[key], f"{name} instance_stats[{key}]")
        assert isinstance(singles[key], float) and isinstance(together[key], float)


def test_documented_choices_where_the_original_raised(expected: dict, cases: dict) -> None:
    by_kind = {case["kind"]: i for i, case in enumerate(expected["cases"])}
    empty_pred, both_empty = by_kind["empty_pred"], by_kind["both_empty"]
    true, pred = cases[f"c{empty_pred}_true"], cases[f"c{empty_pred}_pred"]
    assert true.max() > 0 and pred.max() == 0
    assert metrics.aji(true, pred) == 0.0
    true, pred = cases[f"c{both_empty}_true"], cases[f"c{both_empty}_pred"]
    assert true.max() == 0 and pred.max() == 0
    assert math.isnan(metrics.aji(true, pred))
    assert all(math.isnan(v) for v in metrics.panoptic_quality(true, pred))


def test_perfect_sq_keeps_hovernets_epsilon(expected: dict, cases: dict) -> None:
    # 2 nuclei: SQ = 2 / (2 + 1e-6), which differs from 1 by 5e-7; a library that drops the epsilon fails at 1e-9.
    index = next(i for i, c in enumerate(expected["cases"]) if c["name"] == "train_11_006:perfect")
    _, sq, _ = metrics.panoptic_quality(cases[f"c{index}_true"], cases[f"c{index}_pred"])
    assert abs(sq - 2 / (2 + 1e-6)) < 1e-12 and abs(sq - 1.0) > 4e-7


@pytest.mark.parametrize("which", [0, 1, 2])
def test_type_stats_match_hovernet(which: int, expected: dict, point_sets: list) -> None:
    entry = expected["type_stats"][which]
    true, pred = point_sets[which]
    got = metrics.type_stats(true, pred, classes=[1, 2, 3, 4], radius=entry["radius"])
    assert set(got) == {"f1_detection", "accuracy", "f1_per_class"}
    _assert_close(got["f1_detection"], entry["f1_detection"], f"set {which} f1_detection")
    _assert_close(got["accuracy"], entry["accuracy"], f"set {which} accuracy")
    assert list(got["f1_per_class"]) == [1, 2, 3, 4]
    for cls, value in entry["f1_per_class"].items():
        _assert_close(got["f1_per_class"][int(cls)], math.nan if value is None else value, f"set {which} F1_{cls}")
    # The original's output with its default class list, for the foreground classes in it.
    classes = [c for c in entry["original_default_type_uid_list"] if c != 0]
    default = metrics.type_stats(true, pred, classes=classes)
    want = dict(zip(entry["original_default_type_uid_list"], entry["original_default_output"][2:]))
    for cls in classes:
        _assert_close(default["f1_per_class"][cls], want[cls], f"set {which} default-list F1_{cls}")


@pytest.mark.parametrize(("which", "without_dummies"), [(1, 0.7482014388489209), (2, 0.8894117647058823)])
def test_type_stats_dummy_points_for_empty_images(which: int, without_dummies: float, expected: dict,
                                                  point_sets: list) -> None:
    true, pred = point_sets[which]
    assert any(len(t[1]) == 0 for t in true) or any(len(p[1]) == 0 for p in pred)
    with_dummies = metrics.type_stats(true, pred, classes=[1, 2, 3, 4])
    plain = metrics.type_stats(true, pred, classes=[1, 2, 3, 4], empty_image_dummy=False)
    _assert_close(with_dummies["f1_detection"], expected["type_stats"][which]["f1_detection"], "with dummies")
    _assert_close(plain["f1_detection"], without_dummies, "without dummies")  # values from the fixture README
    assert plain["f1_per_class"] == pytest.approx(with_dummies["f1_per_class"])


def test_type_stats_dummy_pairs_with_a_point_near_the_origin() -> None:
    # An image without predictions gets a dummy prediction at (0, 0) of class 0, which pairs with a true point
    # within the radius of the origin: TP_d 1 instead of FN_d 1 + FP_d 1, and the pair's classes differ.
    true = [(np.array([[3.0, 4.0]]), np.array([2]))]
    pred = [(np.zeros((0, 2)), np.zeros(0, dtype=np.int32))]
    stats = metrics.type_stats(true, pred, classes=[2])
    assert stats["f1_detection"] == 1.0 and stats["accuracy"] == 0.0
    assert stats["f1_per_class"][2] == 0.0  # FN_c = 1 (true 2, pred 0)
    plain = metrics.type_stats(true, pred, classes=[2], empty_image_dummy=False)
    assert plain["f1_detection"] == 0.0 and math.isnan(plain["accuracy"])


def test_pair_coordinates_uses_the_full_assignment_then_the_radius() -> None:
    # The minimum-total-distance assignment pairs t0-p0 (d=11) and t1-p1 (d=13 > 12), although t1-p0 is at 3 px:
    # HoVer-Net keeps t0-p0 only.
    true_xy = np.array([[0.0, 0.0], [14.0, 0.0]])
    pred_xy = np.array([[11.0, 0.0], [27.0, 0.0]])
    paired, lone_true, lone_pred = metrics.pair_coordinates(true_xy, pred_xy, radius=12)
    assert paired.tolist() == [[0, 0]] and lone_true.tolist() == [1] and lone_pred.tolist() == [1]
    paired, _, _ = metrics.pair_coordinates(true_xy, pred_xy, radius=13)  # inclusive
    assert paired.tolist() == [[0, 0], [1, 1]]


def test_ids_need_not_be_contiguous_and_any_integer_dtype(expected: dict, cases: dict) -> None:
    index = next(i for i, c in enumerate(expected["cases"]) if c["name"] == "train_6_003:drop_fp")
    true, pred = cases[f"c{index}_true"], cases[f"c{index}_pred"]
    base = metrics.instance_stats(true, pred)
    # Huge ids take the np.unique renumbering path instead of the look-up table; the order of ids is kept.
    huge = metrics.instance_stats(true.astype(np.int64) * (1 << 40), pred.astype(np.uint64) * np.uint64(3 << 33))
    small = metrics.instance_stats(true.astype(np.uint16), pred.astype(np.int16))
    for key in INSTANCE_KEYS:
        assert huge[key] == base[key] and small[key] == base[key], key


def test_sparse_pair_counting_equals_the_dense_one(expected: dict, cases: dict, monkeypatch) -> None:
    index = next(i for i, c in enumerate(expected["cases"]) if c["name"] == "train_18_011:shift3")
    true, pred = cases[f"c{index}_true"], cases[f"c{index}_pred"]
    dense = metrics.overlap_table(true, pred)
    monkeypatch.setattr(instance, "_DENSE_PAIR_BINS", 0)
    sparse = metrics.overlap_table(true, pred)
    for field in ("true_areas", "pred_areas", "true_ids", "pred_ids", "inter"):
        np.testing.assert_array_equal(getattr(dense, field), getattr(sparse, field))
    assert dense.inter.size > 0


def test_overlap_table_on_a_tiny_map() -> None:
    true = np.array([[0, 5, 5], [9, 9, 0]])
    pred = np.array([[2, 2, 0], [2, 0, 0]])
    table = metrics.overlap_table(true, pred)
    assert table.true_areas.tolist() == [0, 2, 2] and table.pred_areas.tolist() == [0, 3]
    assert table.true_ids.tolist() == [1, 2] and table.pred_ids.tolist() == [1, 1]
    assert table.inter.tolist() == [1.0, 1.0] and table.union.tolist() == [4.0, 4.0]


def test_aji_tie_goes_to_the_lower_pred_id() -> None:
    # True 1 (pixels 0-3) overlaps preds a (0, 1, 6) and b (2, 3, 5) with the same inter 2 and union 5; true 2
    # (pixel 5) overlaps b only. Choosing a: pairs (1,a) 2/5 + (2,b) 1/3 -> 3/8. Choosing b: (1,b) + (2,b) and a
    # unpaired -> 3/(8 + 3). HoVer-Net's argmax takes the lower id.
    true = np.array([[1, 1, 1, 1, 0, 2, 0]])
    assert metrics.aji(true, np.array([[3, 3, 8, 8, 0, 8, 3]])) == 3 / 8
    assert metrics.aji(true, np.array([[8, 8, 3, 3, 0, 3, 8]])) == 3 / 11


def test_aji_plus_maximises_summed_iou_not_intersection() -> None:
    # True 1 (9 px) holds pred 2 (3 px inside: IoU 3/9) and 6 px of pred 1 (18 px: IoU 6/21). Maximising IoU pairs
    # (1, 2): 3 / (9 + 18 unpaired) = 1/9; maximising the intersection would pair (1, 1): 6 / (21 + 3) = 1/4.
    true = np.array([[1] * 9 + [0] * 12])
    pred = np.array([[2] * 3 + [1] * 18])
    assert metrics.aji_plus(true, pred) == pytest.approx(3 / 27, abs=1e-15)


def test_panoptic_quality_below_half_iou_uses_an_assignment() -> None:
    # Areas: true 1 = 4 px, true 2 = 2 px, pred 1 = 3 px, pred 2 = 3 px. IoUs: (1,1) 3/4, (1,2) 1/6, (2,2) 1/4.
    true = np.array([[1, 1, 1, 1, 2, 2, 0]])
    pred = np.array([[1, 1, 1, 2, 0, 2, 2]])
    # At 0.1 all three pairs pass the threshold, but the one-to-one assignment keeps (1,1) and (2,2): TP 2, not 3.
    dq, sq, pq = metrics.panoptic_quality(true, pred, match_iou=0.1)
    assert dq == 1.0 and sq == pytest.approx((3 / 4 + 1 / 4) / (2 + 1e-6), abs=1e-15) and pq == sq
    # At 0.3 only (1,1) remains: TP 1, FP 1, FN 1.
    dq, sq, pq = metrics.panoptic_quality(true, pred, match_iou=0.3)
    assert dq == 0.5 and sq == pytest.approx(0.75 / (1 + 1e-6), abs=1e-15) and pq == pytest.approx(0.5 * sq)
    # At 0.5 the same, without an assignment (IoU > 0.5 pairs are unique).
    assert metrics.panoptic_quality(true, pred) == pytest.approx((dq, sq, pq), abs=1e-15)


def test_instance_points_from_a_consep_tile(consep_dir: Path) -> None:
    with np.load(consep_dir / "train_13_014.npz") as data:
        inst_map, type_map, inst_type = data["inst_map"], data["type_map"], data["inst_type"]
    centroids, types = metrics.instance_points(inst_map, type_map)
    assert centroids.shape == (inst_type.size, 2) and types.tolist() == inst_type.tolist()
    ys, xs = np.nonzero(inst_map == 1)
    assert centroids[0] == pytest.approx([xs.mean(), ys.mean()])


def test_docstring_examples() -> None:
    for module in (instance, detection):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
