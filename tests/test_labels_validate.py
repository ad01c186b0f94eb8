"""validate_label_map / label_map_problems: the rules, on real tiles and on hand-made faults."""

from __future__ import annotations

import numpy as np
import pytest

from diffaug.errors import InvalidInputError
from diffaug.labels import label_map_problems, validate_label_map


@pytest.fixture(scope="module")
def tile(consep_dir):
    """A real tile whose nuclei 2 and 3 are each annotated in two pieces."""
    with np.load(consep_dir / "train_10_007.npz") as z:
        return z["inst_map"], z["type_map"]


def test_real_tiles_are_valid_including_multi_piece_nuclei(tile):
    inst, typ = tile
    validate_label_map(inst, typ, reference=inst, num_classes=8)
    assert label_map_problems(inst, typ, reference=inst) == []


def test_splitting_a_nucleus_is_caught_but_keeping_two_pieces_is_not(tile):
    inst, typ = tile
    edited = inst.copy()
    ys, xs = np.nonzero(inst == 5)  # nucleus 5 is one piece: cut a background line through it
    cut = (xs == int(np.median(xs)))
    edited[ys[cut], xs[cut]] = 0
    typ_edited = np.where(edited > 0, typ, 0)
    with pytest.raises(InvalidInputError, match=r"nucleus 5: more disconnected pieces than before"):
        validate_label_map(edited, typ_edited, reference=inst)
    validate_label_map(edited, typ_edited)  # without a reference, pieces are not judged


def test_source_ids_match_renumbered_nuclei(tile):
    inst, _ = tile
    # swap ids 1 and 2 (nucleus 2 has two pieces): matched by id, new nucleus 1 would be "split"
    swapped = inst.copy()
    swapped[inst == 1], swapped[inst == 2] = 2, 1
    with pytest.raises(InvalidInputError, match="more disconnected pieces"):
        validate_label_map(swapped, reference=inst)
    source = np.arange(1, inst.max() + 1)
    source[:2] = [2, 1]
    validate_label_map(swapped, reference=inst, source_ids=source)
    with pytest.raises(InvalidInputError, match="source_ids must be"):
        validate_label_map(swapped, reference=inst, source_ids=source[:-1])


def test_every_problem_is_reported(tile):
    inst, typ = tile
    bad_inst = inst.copy()
    bad_inst[bad_inst == 4] = 0                       # id 4 missing: not contiguous
    bad_type = np.where(bad_inst > 0, typ, 0)
    bad_type[inst == 4] = 1                           # class on background
    ys, xs = np.nonzero(inst == 6)
    bad_type[ys[0], xs[0]] = 1 if bad_type[ys[0], xs[0]] != 1 else 2   # nucleus 6 gets two classes
    problems = label_map_problems(bad_inst, bad_type, num_classes=2)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "not contiguous 1.." in text and "missing 4" in text
    assert "foregrounds disagree" in text
    assert "nucleus 6: pixels of more than one class" in text
    assert "outside 0..1" in text
    with pytest.raises(InvalidInputError) as err:
        validate_label_map(bad_inst, bad_type, num_classes=2, where="tile X")
    assert str(err.value).count("tile X") == 4


@pytest.mark.parametrize("inst, typ, message", [
    (np.zeros((2, 2, 1), np.int32), None, "must be 2-D"),
    (np.zeros((2, 2), np.float64), None, "must hold integers"),
    (np.zeros((2, 2), np.int32), np.zeros((2, 3), np.int32), "has shape"),
    ([[0, 1]], None, "must be a numpy array"),
])
def test_malformed_arrays_raise_at_once(inst, typ, message):
    with pytest.raises(InvalidInputError, match=message):
        label_map_problems(inst, typ)
