"""hv_maps: HoVer-Net's horizontal/vertical maps against a per-nucleus loop written from the paper's definition."""

from __future__ import annotations

import numpy as np
import pytest

from diffaug.errors import InvalidInputError
from diffaug.labels import hv_maps


def _per_nucleus_loop(inst_map: np.ndarray) -> np.ndarray:
    """HoVer-Net §3.2, literally: offsets from each nucleus's centre of mass, each side scaled to reach +-1."""
    out = np.zeros((2,) + inst_map.shape, dtype=np.float64)
    for nid in np.unique(inst_map[inst_map > 0]):
        ys, xs = np.nonzero(inst_map == nid)
        for axis, offset in ((0, xs - xs.mean()), (1, ys - ys.mean())):
            scaled = np.zeros_like(offset)
            if (offset < 0).any():
                scaled[offset < 0] = offset[offset < 0] / -offset[offset < 0].min()
            if (offset > 0).any():
                scaled[offset > 0] = offset[offset > 0] / offset[offset > 0].max()
            out[axis, ys, xs] = scaled
    return out


def test_hand_computed_values():
    inst = np.zeros((4, 6), dtype=np.int32)
    inst[1, 1:4] = 5          # a horizontal bar: centre at x=2
    inst[0:4, 5] = 2          # a vertical bar of 4: centre at y=1.5
    hv = hv_maps(inst)
    assert hv.shape == (2, 4, 6) and hv.dtype == np.float32
    assert hv[0, 1, 1:4].tolist() == [-1.0, 0.0, 1.0]   # left of the centre is negative (HoVer-Net's sign)
    assert hv[1, 1, 1:4].tolist() == [0.0, 0.0, 0.0]
    assert hv[1, :, 5].tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])
    assert hv[0, :, 5].tolist() == [0.0] * 4
    assert not hv[:, inst == 0].any()


def test_sides_are_normalised_separately():
    inst = np.zeros((1, 8), dtype=np.int32)
    inst[0, 0:4] = 1  # centre 1.5: offsets -1.5, -0.5, 0.5, 1.5 -> symmetric
    inst[0, 5:8] = 1  # now the centroid of id 1 (7 px) is at (0+1+2+3+5+6+7)/7 = 24/7
    hv = hv_maps(inst)[0, 0]
    assert hv.min() == -1.0 and hv.max() == 1.0
    offsets = np.array([0, 1, 2, 3, 5, 6, 7]) - 24 / 7
    expected = np.where(offsets < 0, offsets / -offsets.min(), offsets / offsets.max())
    assert hv[inst[0] > 0] == pytest.approx(expected, abs=1e-6)


def test_equals_the_per_nucleus_loop_on_real_tiles(consep_dir, monuseg_dir):
    monuseg_crop = np.load(monuseg_dir / "TCGA-2Z-A9J9-01A-01-TS1.npz")["inst_map"][:300, 200:500]
    for inst in (np.load(consep_dir / "train_19_009.npz")["inst_map"], monuseg_crop):
        hv = hv_maps(inst)
        np.testing.assert_allclose(hv, _per_nucleus_loop(inst), atol=1e-6)
        assert hv.min() >= -1 and hv.max() <= 1


def test_ids_need_not_be_contiguous():
    inst = np.zeros((5, 5), dtype=np.int32)
    inst[1:4, 1:4] = 70
    np.testing.assert_array_equal(hv_maps(inst), hv_maps((inst > 0).astype(np.int32)))


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 3), np.int32), np.zeros((3, 3), np.float32), [[0, 1]],
                                 -np.ones((2, 2), np.int32)])
def test_bad_input(bad):
    with pytest.raises(InvalidInputError, match="hv_maps"):
        hv_maps(bad)
