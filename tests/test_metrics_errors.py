"""Bad input to diffaug.metrics fails loudly with a message that names the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffaug import metrics
from diffaug.data import TileFolder
from diffaug.errors import DataFormatError, InvalidInputError

GOOD = np.array([[0, 1, 1], [0, 2, 0]], dtype=np.int32)
INSTANCE_FUNCTIONS = [metrics.dice, metrics.aji, metrics.aji_plus, metrics.panoptic_quality, metrics.instance_stats,
                      metrics.overlap_table]


def _points(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(2 * n, dtype=np.float64).reshape(n, 2), np.ones(n, dtype=np.int32)


@pytest.mark.parametrize("fn", INSTANCE_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("true", "pred", "message"),
    [
        (GOOD, np.zeros((2, 4), dtype=np.int32), r"true_inst has shape \(2, 3\) but pred_inst has shape \(2, 4\)"),
        (GOOD, GOOD.astype(np.float32), r"pred_inst has dtype float32.*must be integer.*astype\(np.int32\)"),
        (GOOD > 0, GOOD, r"true_inst has dtype bool.*boolean mask is not an instance map"),
        (GOOD, GOOD - 1, r"pred_inst has negative ids \(min -1\)"),
        (GOOD[None], GOOD[None], r"true_inst must be a 2-D instance map .* got shape \(1, 2, 3\)"),
        (GOOD, [[0.5, 1, 1], [0, 2, 0]], r"pred_inst has dtype float64"),
    ],
    ids=["shape-mismatch", "float-map", "bool-map", "negative-ids", "3d-map", "float-list"],
)
def test_bad_instance_maps(fn, true, pred, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        fn(true, pred)


@pytest.mark.parametrize("match_iou", [-0.1, 1.0, 1.5])
def test_match_iou_out_of_range(match_iou: float) -> None:
    with pytest.raises(InvalidInputError, match="match_iou must be in"):
        metrics.panoptic_quality(GOOD, GOOD, match_iou=match_iou)


@pytest.mark.parametrize(
    ("true", "pred", "classes", "radius", "message"),
    [
        ([_points(3), _points(2)], [_points(3)], [1], 12, "true has 2 images but pred has 1"),
        ([], [], [1], 12, "true and pred are empty"),
        ([_points(3)], _points(3), [1], 12, r"pred looks like one \(centroids, types\) pair; pass a list"),
        ([(np.zeros((3, 3)), np.ones(3, dtype=int))], [_points(3)], [1], 12,
         r"true\[0\]: centroids must be a real \(N, 2\) array .* got shape \(3, 3\)"),
        ([_points(2)], [(np.zeros(0), np.zeros(0, dtype=int))], [1], 12,
         r"pred\[0\]: centroids must be .* got shape \(0,\).*np.zeros\(\(0, 2\)\)"),
        ([(np.zeros((3, 2)), np.ones(2, dtype=int))], [_points(3)], [1], 12, r"true\[0\]: 3 centroids but 2 types"),
        ([(np.zeros((3, 2)), np.ones((3, 1), dtype=int))], [_points(3)], [1], 12,
         r"types must be a 1-D integer array.*\.ravel\(\)"),
        ([(np.zeros((3, 2)), np.ones(3))], [_points(3)], [1], 12, r"types must be a 1-D integer array .* float64"),
        ([(np.zeros((3, 2)), -np.ones(3, dtype=int))], [_points(3)], [1], 12, "negative classes"),
        ([(np.full((1, 2), np.nan), np.ones(1, dtype=int))], [_points(1)], [1], 12, "nan or inf"),
        ([np.zeros((3, 2))], [_points(3)], [1], 12, r"true\[0\] must be a \(centroids, types\) pair"),
        ([_points(3)], [_points(3)], [0, 1], 12, r"foreground ids > 0 \(0 is background\), got 0"),
        ([_points(3)], [_points(3)], [1.0, 2], 12, "integer class ids, got 1.0"),
        ([_points(3)], [_points(3)], ["1"], 12, "integer class ids, got '1'"),
        ([_points(3)], [_points(3)], [True], 12, "integer class ids, got True"),
        ([_points(3)], [_points(3)], [], 12, "classes is empty"),
        ([_points(3)], [_points(3)], [1, 1], 12, "lists a class twice"),
        ([_points(3)], [_points(3)], 1, 12, "classes must be a list"),
        ([_points(3)], [_points(3)], [1], 0, "radius must be a positive number"),
        ([_points(3)], [_points(3)], [1], float("nan"), "radius must be a positive number"),
        (np.zeros((1, 3, 2)), [_points(3)], [1], 12, "true and pred must be lists"),
    ],
    ids=["list-lengths", "no-images", "pred-not-a-list", "centroids-3-columns", "centroids-1d", "types-length",
         "types-column", "types-float", "types-negative", "centroids-nan", "item-not-a-pair", "class-0",
         "class-float", "class-str", "class-bool", "classes-empty", "classes-duplicate", "classes-scalar",
         "radius-0", "radius-nan", "true-an-array"],
)
def test_bad_type_stats_input(true, pred, classes, radius, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        metrics.type_stats(true, pred, classes=classes, radius=radius)


def test_instance_points_rejects_mismatched_maps() -> None:
    with pytest.raises(InvalidInputError, match=r"inst_map has shape \(2, 3\) but type_map has shape \(3, 2\)"):
        metrics.instance_points(GOOD, GOOD.T)
    with pytest.raises(InvalidInputError, match="type_map has dtype float64"):
        metrics.instance_points(GOOD, GOOD.astype(float))


def test_per_class_metric_on_a_folder_without_classes(monuseg_dir: Path, consep_dir: Path) -> None:
    with pytest.raises(DataFormatError, match=r"monuseg_test: per-class F1 needs class labels.*instance-only"):
        metrics.require_class_labels(TileFolder(monuseg_dir, require_images=False))
    metrics.require_class_labels(TileFolder(consep_dir, require_images=False))  # has classes: no error
