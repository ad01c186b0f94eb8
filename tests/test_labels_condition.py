"""sdm_condition / instance_edges: parity with the original SDM code's fixtures, conventions, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from diffaug.errors import InvalidInputError
from diffaug.labels import instance_edges, sdm_condition


@pytest.fixture(scope="module")
def cases(sdm_fixture_dir):
    with np.load(sdm_fixture_dir / "condition_cases.npz") as z:
        return {k: z[k] for k in z.files}


def test_matches_every_reference_case_exactly(cases):
    names = list(cases["names"])
    assert len(names) == 8
    for i, name in enumerate(names):
        y = sdm_condition(cases[f"c{i}_type_map"], cases[f"c{i}_inst_map"], int(cases[f"c{i}_num_classes"]))
        expected = cases[f"c{i}_y"]
        assert y.dtype == np.float32 and y.shape == expected.shape, name
        assert np.array_equal(y, expected), f"case {i} ({name}) differs on {int((y != expected).sum())} values"


def test_batched_input_equals_per_map_results(cases):
    types = np.stack([cases["c0_type_map"], cases["c1_type_map"]])
    insts = np.stack([cases["c0_inst_map"], cases["c1_inst_map"]])
    y = sdm_condition(types, insts, 5)
    assert y.shape == (2, 6, 64, 64)
    assert np.array_equal(y[0], cases["c0_y"]) and np.array_equal(y[1], cases["c1_y"])


def test_edge_convention_on_a_hand_made_map():
    inst = np.array([[7, 7, 0, 0],
                     [7, 7, 0, 3],
                     [0, 0, 3, 0]], dtype=np.int32)  # 3 at (1,3) and (2,2) touch only diagonally
    edges = instance_edges(inst)
    expected = np.array([[0, 1, 1, 1],
                         [1, 1, 1, 1],
                         [1, 1, 1, 1]], dtype=bool)
    assert np.array_equal(edges, expected)
    # diagonal neighbours are not compared: (1, 1) touches id 1 only at a corner, so it is no edge
    inst2 = np.array([[1, 2], [2, 2]], dtype=np.int32)
    assert instance_edges(inst2).tolist() == [[True, True], [True, False]]
    # the image border is not an edge: a map of one id everywhere has no edges at all
    assert not instance_edges(np.full((5, 6), 4, dtype=np.int32)).any()


def test_ids_need_not_be_contiguous_and_relabelling_keeps_the_condition():
    inst = np.array([[0, 40, 40], [9, 9, 0]], dtype=np.int32)
    typ = np.array([[0, 2, 2], [1, 1, 0]], dtype=np.int32)
    relabelled = np.array([[0, 2, 2], [1, 1, 0]], dtype=np.int32)
    assert np.array_equal(sdm_condition(typ, inst, 3), sdm_condition(typ, relabelled, 3))


def test_instance_only_maps_become_class_one():
    inst = np.array([[0, 1], [2, 2]], dtype=np.int32)
    y = sdm_condition(None, inst, 2)
    assert np.array_equal(y[1], (inst > 0).astype(np.float32))
    assert np.array_equal(y[0], (inst == 0).astype(np.float32))


@pytest.mark.parametrize("make, message", [
    (lambda i, t: (t + 4 * (t > 0), i, 5), "class 8"),                      # classes out of range
    (lambda i, t: (t, i.astype(np.float32), 5), "must hold integers"),      # wrong dtype
    (lambda i, t: (t[:, :-1], i, 5), "differ in shape"),                    # shape mismatch
    (lambda i, t: (np.where(i > 0, 0, t), i, 5), "foregrounds disagree"),   # type/instance mismatch
    (lambda i, t: (t, i[None, None], 5), "(H, W) or batched"),              # wrong rank
    (lambda i, t: (t, i, 1), "num_classes must be an int >= 2"),            # bad num_classes
    (lambda i, t: (t, -i, 5), "negative"),                                  # negative ids
])
def test_bad_input_is_a_clear_error(cases, make, message):
    inst, typ = cases["c0_inst_map"], cases["c0_type_map"]
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sdm_condition(*make(inst, typ))
