"""enlarge_label_map: shifts keep shapes and classes, never overlap or leave the tile, and are reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffaug.errors import InvalidInputError
from diffaug.labels import enlarge_label_map, instance_centroids, instance_types, validate_label_map
from diffaug.labels.enlarge import draw_shifts


@pytest.fixture(scope="module")
def tile(consep_dir):
    with np.load(consep_dir / "train_1_004.npz") as z:  # 2-piece nucleus 13 included
        return z["inst_map"], z["type_map"]


def _check_moves(source_inst, source_type, edit):
    """Every nucleus is its source nucleus, shifted by the recorded shift (or not at all), with its class."""
    shifts = {m["id"]: m["shift"] for m in edit.record["moved"]}
    assert len(shifts) == edit.record["n_moved"]
    for nid in range(1, edit.num_nuclei + 1):
        src = int(edit.source_ids[nid - 1])
        sy, sx = np.nonzero(source_inst == src)
        dx, dy = shifts.get(nid, (0, 0))
        ey, ex = np.nonzero(edit.inst_map == nid)
        assert np.array_equal(np.sort(sy * 10_000 + sx), np.sort((ey - dy) * 10_000 + (ex - dx))), nid
        if source_type is not None:
            assert set(edit.type_map[ey, ex].tolist()) == set(source_type[sy, sx].tolist())


def test_moves_whole_nuclei_within_the_range(tile):
    inst, typ = tile
    edit = enlarge_label_map(inst, typ, rng=np.random.default_rng(3))
    _check_moves(inst, typ, edit)
    assert edit.record["n_picked"] == round(0.5 * inst.max())
    assert edit.record["n_moved"] >= 0.3 * inst.max()
    for move in edit.record["moved"]:
        assert max(abs(v) for v in move["shift"]) <= 3 and move["shift"] != [0, 0]
    validate_label_map(edit.inst_map, edit.type_map, reference=inst, source_ids=edit.source_ids, num_classes=8)
    assert np.array_equal(edit.inst_type, instance_types(inst, typ))  # classes kept, ids kept
    expected = instance_centroids(inst)
    for move in edit.record["moved"]:
        expected[move["id"] - 1] += move["shift"]  # (x, y) order, like the shift
    np.testing.assert_allclose(edit.centroids, expected, atol=1e-9)
    json.loads(edit.record_json())


def test_same_generator_state_same_result_and_seeds_differ(tile):
    inst, typ = tile
    a = enlarge_label_map(inst, typ, rng=np.random.default_rng(7))
    b = enlarge_label_map(inst, typ, rng=np.random.default_rng(7))
    c = enlarge_label_map(inst, typ, rng=np.random.default_rng(8))
    assert np.array_equal(a.inst_map, b.inst_map) and a.record == b.record
    assert not np.array_equal(a.inst_map, c.inst_map)


def test_rejects_collisions_and_leaving_the_tile():
    # two nuclei filling a 1x4 strip: any vertical shift leaves the tile, any horizontal one hits the other nucleus
    inst = np.array([[1, 1, 2, 2]], dtype=np.int32)
    edit = enlarge_label_map(inst, rng=np.random.default_rng(0), fraction=1.0, max_tries=5)
    assert edit.record["n_moved"] == 0 and np.array_equal(edit.inst_map, inst)
    reasons = {r["reason"] for r in edit.record["rejected"]}
    assert reasons <= {"would leave the tile", "would overlap another nucleus"} and len(edit.record["rejected"]) == 2
    # with room to the right, nucleus 2 can move but never onto nucleus 1
    roomy = np.zeros((1, 12), dtype=np.int32)
    roomy[0, :2], roomy[0, 2:4] = 1, 2
    for seed in range(20):
        out = enlarge_label_map(roomy, rng=np.random.default_rng(seed), fraction=1.0).inst_map
        assert (out == 1).sum() == 2 and (out == 2).sum() == 2


def test_instance_only_odd_sized_maps_and_gappy_ids(monuseg_dir):
    inst = np.load(monuseg_dir / "TCGA-2Z-A9J9-01A-01-TS1.npz")["inst_map"][:333, :517]
    gappy = np.where(inst > 0, inst * 3 + 10, 0).astype(np.int32)
    edit = enlarge_label_map(gappy, rng=np.random.default_rng(0), fraction=0.8)
    assert edit.type_map is None and edit.inst_type is None and edit.inst_map.shape == (333, 517)
    assert edit.inst_map.max() == edit.num_nuclei == np.unique(inst[inst > 0]).size
    assert np.array_equal(np.sort(edit.source_ids), np.unique(gappy[gappy > 0]))
    _check_moves(gappy, None, edit)
    validate_label_map(edit.inst_map, reference=gappy, source_ids=edit.source_ids)


def test_fraction_zero_changes_nothing(tile):
    inst, typ = tile
    edit = enlarge_label_map(inst, typ, rng=np.random.default_rng(0), fraction=0.0)
    assert np.array_equal(edit.inst_map, inst) and np.array_equal(edit.type_map, typ)


def test_shift_draws_are_never_zero_and_cover_the_range():
    shifts = draw_shifts(np.random.default_rng(0), (4000, 1), (0, 3))[:, 0]
    assert not (shifts == 0).all(axis=1).any()
    assert set(np.unique(shifts).tolist()) == set(range(-3, 4))
    assert set(np.abs(draw_shifts(np.random.default_rng(0), (500, 2), (2, 3))).ravel().tolist()) == {2, 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 1.5}, "fraction must be in"),
    ({"shift_range": (0, 0)}, "shift_range must be"),
    ({"shift_range": (3, 1)}, "shift_range must be"),
    ({"shift_range": (0.5, 2)}, "shift_range must be"),
    ({"max_tries": 0}, "max_tries"),
    ({"rng": 0}, "numpy.random.Generator"),
])
def test_bad_parameters(tile, kwargs, message):
    inst, typ = tile
    kwargs = {"rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        enlarge_label_map(inst, typ, **kwargs)


def test_bad_maps(tile):
    inst, typ = tile
    with pytest.raises(InvalidInputError, match="foregrounds disagree"):
        enlarge_label_map(inst, np.where(inst == 3, 0, typ), rng=np.random.default_rng(0))
    mixed = typ.copy()
    mixed[np.nonzero(inst == 3)[0][0], np.nonzero(inst == 3)[1][0]] = 9
    with pytest.raises(InvalidInputError, match="nucleus 3: pixels of more than one class"):
        enlarge_label_map(inst, mixed, rng=np.random.default_rng(0))
    with pytest.raises(InvalidInputError, match="must hold integers"):
        enlarge_label_map(inst.astype(np.float32), rng=np.random.default_rng(0))
