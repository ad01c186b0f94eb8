"""balance_label_map and DonorBank: DiffMix's procedure step by step, the no-overwrite rule, and real tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffaug.data import TileFolder
from diffaug.errors import InvalidInputError
from diffaug.labels import (
    DonorBank,
    balance_label_map,
    default_border_margin,
    instance_centroids,
    instance_piece_counts,
    rare_classes_of,
    validate_label_map,
)


def _blob(inst, typ, nid, cls, rows, cols):
    inst[rows, cols] = nid
    typ[rows, cols] = cls


def _canvas(size=96):
    return np.zeros((size, size), np.int32), np.zeros((size, size), np.int32)


@pytest.fixture(scope="module")
def real_tiles(consep_dir):
    folder = TileFolder(consep_dir)
    return [folder.read(name, image=False) for name in folder.names[::11]]  # 40 tiles from 24 source images


@pytest.fixture(scope="module")
def real_bank(real_tiles):
    return DonorBank.from_maps(real_tiles, num_classes=5)


def test_replaces_a_major_by_the_donor_shape_centred_on_it():
    inst, typ = _canvas()
    _blob(inst, typ, 1, 3, slice(40, 50), slice(44, 52))           # major, 80 px, centroid (47.5, 44.5)
    _blob(inst, typ, 2, 1, slice(5, 9), slice(5, 10))              # donor, 20 px
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0)
    assert edit.inst_type.tolist() == [1, 1]
    replaced = edit.record["replaced"]
    assert len(replaced) == 1 and replaced[0]["id"] == 1 and replaced[0]["from_class"] == 3
    assert replaced[0]["donor"] == {"tile": None, "id": 2, "same_tile": True}
    assert (edit.inst_map == 1).sum() == 20 and (edit.type_map[edit.inst_map == 1] == 1).all()
    assert np.abs(edit.centroids[0] - (47.5, 44.5)).max() <= 0.5  # donor centroid lands on the major's
    assert np.array_equal(edit.inst_map == 2, inst == 2)           # the donor itself stays
    assert replaced[0]["dilated_area"] == 14 * 12 and replaced[0]["area_after"] * 2.3 <= 14 * 12
    validate_label_map(edit.inst_map, edit.type_map, reference=inst, source_ids=edit.source_ids)
    json.loads(edit.record_json())


def test_border_margin_and_size_ratio():
    inst, typ = _canvas(100)
    _blob(inst, typ, 1, 3, slice(26, 33), slice(46, 53))   # centroid y = 29: within 30 px of the top: kept
    _blob(inst, typ, 2, 3, slice(27, 34), slice(66, 73))   # centroid y = 30: eligible
    _blob(inst, typ, 3, 4, slice(60, 64), slice(60, 64))   # 16 px, dilated 8x8 = 64 px: the donor is too big
    _blob(inst, typ, 4, 1, slice(80, 85), slice(10, 16))   # donor, 30 px: 69 <= 121 (major 2) but > 64 (3)
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0, border_margin=30)
    assert edit.record["n_eligible"] == 2 and edit.record["n_picked"] == 2
    assert [r["id"] for r in edit.record["replaced"]] == [2]
    assert edit.record["skipped"] == [{"id": 3, "source_id": 3, "from_class": 4,
                                       "reason": "no unused donor small enough"}]
    assert edit.inst_type.tolist() == [3, 1, 4, 1]
    assert balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0,
                             border_margin=29).record["n_eligible"] == 3


def test_default_border_margin_scales_below_256_px():
    # DiffMix's 30 px would leave nothing eligible on a small model window: the default scales it by min(H, W) / 256.
    inst, typ = _canvas(100)
    _blob(inst, typ, 1, 3, slice(10, 17), slice(46, 53))   # centroid y = 13: >= 100 * 30 / 256 = 11.7, eligible
    _blob(inst, typ, 2, 3, slice(8, 15), slice(66, 73))    # centroid y = 11: kept
    _blob(inst, typ, 3, 1, slice(80, 84), slice(10, 14))   # donor
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0)
    assert edit.record["params"]["border_margin"] == pytest.approx(30 * 100 / 256)
    assert edit.record["n_eligible"] == 1 and [r["id"] for r in edit.record["replaced"]] == [1]
    big = np.zeros((300, 1000), np.int32)
    assert default_border_margin(big.shape) == 30.0 and default_border_margin((64, 64)) == 7.5


def test_a_paste_never_covers_another_nucleus():
    inst, typ = _canvas()
    _blob(inst, typ, 1, 3, slice(40, 52), slice(47, 49))   # thin vertical major: 24 px, dilated 6x16 = 96
    _blob(inst, typ, 2, 2, slice(40, 52), slice(44, 47))   # neighbours touching it left and right
    _blob(inst, typ, 3, 2, slice(40, 52), slice(49, 52))
    _blob(inst, typ, 4, 1, slice(5, 6), slice(5, 15))      # a wide donor (10 px) that would cover them
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0,
                             border_margin=0)
    assert edit.record["replaced"] == []
    assert edit.record["skipped"][0]["reason"].startswith("no donor fits without covering another nucleus")
    assert np.array_equal(edit.inst_map, inst) and np.array_equal(edit.type_map, typ)
    _blob(inst, typ, 5, 1, slice(80, 84), slice(80, 82))    # a slim donor (8 px) fits in the major's place
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0,
                             border_margin=0)
    assert [r["donor"]["id"] for r in edit.record["replaced"]] == [5]
    for nid in (2, 3):
        assert np.array_equal(edit.inst_map == nid, inst == nid)


def test_smallest_major_first_and_a_donor_once_per_tile_but_many_tiles():
    inst, typ = _canvas()
    _blob(inst, typ, 1, 3, slice(35, 45), slice(35, 45))   # 100 px
    _blob(inst, typ, 2, 4, slice(55, 62), slice(55, 62))   # 49 px: processed first
    donor_inst, donor_typ = _canvas(32)
    _blob(donor_inst, donor_typ, 1, 1, slice(10, 14), slice(10, 14))
    bank = DonorBank.from_maps([(donor_inst, donor_typ)], names=["donor_tile"], num_classes=5)
    assert len(bank) == 1 and bank.rare_classes == (1,)
    for seed in range(3):  # the same bank donor serves every tile
        edit = balance_label_map(inst, typ, rng=np.random.default_rng(seed), bank=bank, ratio=1.0)
        assert [r["id"] for r in edit.record["replaced"]] == [2]
        assert edit.record["replaced"][0]["donor"] == {"tile": "donor_tile", "id": 1, "same_tile": False}
        assert edit.record["skipped"][0]["id"] == 1  # the only donor was used once already in this tile


def test_same_tile_donors_first_then_the_bank(real_tiles, real_bank):
    tile = next(t for t in real_tiles if (t.inst_type == 1).sum() >= 3)
    rng = np.random.default_rng(0)
    edit = balance_label_map(tile.inst_map, tile.type_map, rng=rng, bank=real_bank, tile_name=tile.name)
    sources = [r["donor"]["same_tile"] for r in edit.record["replaced"]]
    assert sources[0] and not sources[-1]
    # local donors come first in order, so no bank donor is used while an unused local one would have fitted;
    # a local donor is one of the tile's own "other" nuclei, recorded under the tile's name
    local_ids = {r["donor"]["id"] for r in edit.record["replaced"] if r["donor"]["same_tile"]}
    assert local_ids <= set((np.flatnonzero(tile.inst_type == 1) + 1).tolist())
    assert all(r["donor"]["tile"] == tile.name for r in edit.record["replaced"] if r["donor"]["same_tile"])
    assert all(r["donor"]["tile"] != tile.name for r in edit.record["replaced"] if not r["donor"]["same_tile"])
    only_bank = balance_label_map(tile.inst_map, tile.type_map, rng=np.random.default_rng(0), bank=real_bank,
                                  tile_name=tile.name, donor_source="dataset")
    assert not any(r["donor"]["same_tile"] for r in only_bank.record["replaced"])
    only_local = balance_label_map(tile.inst_map, tile.type_map, rng=np.random.default_rng(0), bank=real_bank,
                                   tile_name=tile.name, donor_source="same-tile")
    assert all(r["donor"]["same_tile"] for r in only_local.record["replaced"])
    assert 0 < len(only_local.record["replaced"]) <= (tile.inst_type == 1).sum()


def test_real_tiles_valid_reproducible_and_rarer_class_raised(real_tiles, real_bank):
    before = after = 0
    for i, tile in enumerate(real_tiles):
        edit = balance_label_map(tile.inst_map, tile.type_map, rng=np.random.default_rng(i), bank=real_bank,
                                 tile_name=tile.name)
        validate_label_map(edit.inst_map, edit.type_map, reference=tile.inst_map, source_ids=edit.source_ids,
                           num_classes=5)
        assert edit.record["n_eligible"] == sum(1 for c in instance_centroids(tile.inst_map)
                                                if min(c[0], c[1], 255 - c[0], 255 - c[1]) >= 30)
        assert edit.num_nuclei == tile.inst_map.max()  # 1:1 replacement, ids kept
        assert np.array_equal(edit.centroids, instance_centroids(edit.inst_map))
        for r in edit.record["replaced"]:
            assert r["to_class"] == 1 and r["from_class"] != 1
            assert r["area_after"] * 2.3 <= r["dilated_area"]
        eligible_majors = edit.record["n_eligible"] - sum(
            1 for c in instance_centroids(tile.inst_map)[tile.inst_type == 1]
            if min(c[0], c[1], 255 - c[0], 255 - c[1]) >= 30)
        assert edit.record["n_picked"] == int(np.floor(0.8 * eligible_majors + 0.5))
        before += (tile.inst_type == 1).sum()
        after += (edit.inst_type == 1).sum()
    assert after >= 5 * before
    again = balance_label_map(real_tiles[3].inst_map, real_tiles[3].type_map, rng=np.random.default_rng(3),
                              bank=real_bank, tile_name=real_tiles[3].name)
    first = balance_label_map(real_tiles[3].inst_map, real_tiles[3].type_map, rng=np.random.default_rng(3),
                              bank=real_bank, tile_name=real_tiles[3].name)
    assert np.array_equal(again.inst_map, first.inst_map) and again.record == first.record


def test_ratio_picks_that_share_of_eligible_majors():
    inst, typ = _canvas(128)
    nid = 0
    for y in range(34, 94, 12):
        for x in range(34, 94, 12):
            nid += 1
            _blob(inst, typ, nid, 3, slice(y, y + 6), slice(x, x + 6))  # 25 eligible majors
    for picked, ratio in ((20, 0.8), (10, 0.4), (25, 1.0), (0, 0.0)):
        edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=ratio)
        assert edit.record["n_eligible"] == 25 and edit.record["n_picked"] == picked


def test_target_distribution(real_tiles):
    bank = DonorBank.from_maps(real_tiles, num_classes=5, donor_classes="all")
    target = {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}
    before = np.zeros(5, int)
    after = np.zeros(5, int)
    for i, tile in enumerate(real_tiles):
        edit = balance_label_map(tile.inst_map, tile.type_map, rng=np.random.default_rng(i), bank=bank,
                                 tile_name=tile.name, target_distribution=target)
        validate_label_map(edit.inst_map, edit.type_map, reference=tile.inst_map, source_ids=edit.source_ids)
        n = tile.inst_type.size
        counts_before = np.bincount(tile.inst_type, minlength=5)
        counts_after = np.bincount(edit.inst_type, minlength=5)
        for k in range(1, 5):  # a class over its target never drops below it; one under it never drops
            if counts_before[k] > 0.25 * n:
                assert counts_after[k] >= 0.25 * n - 1e-9
            else:
                assert counts_after[k] >= counts_before[k]
        before += counts_before
        after += counts_after
    share_before = before[1:] / before[1:].sum()
    share_after = after[1:] / after[1:].sum()
    assert np.abs(share_after - 0.25).sum() < 0.6 * np.abs(share_before - 0.25).sum()
    assert share_after[0] > 4 * share_before[0]


def test_rare_classes_of():
    assert rare_classes_of([0, 432, 4507, 6609, 6668]) == (1,)
    assert rare_classes_of([0, 371, 3941, 1117, 4420, 4765, 901, 40]) == (1, 6, 7)  # CoNSeP, raw 7 classes
    assert rare_classes_of([0, 30, 35, 35]) == (1,)  # nothing under half its fair share: the rarest
    assert rare_classes_of([0, 0, 5, 100]) == (2,)   # a class with no nuclei cannot donate
    with pytest.raises(InvalidInputError, match="no nuclei"):
        rare_classes_of([0, 0, 0])


def test_bank_keeps_only_whole_nuclei(consep_dir):
    folder = TileFolder(consep_dir)
    tile = folder.read("train_10_007", image=False)  # nuclei 2 and 3 are in two pieces
    bank = DonorBank.from_maps([tile], num_classes=5, donor_classes="all")
    pieces = instance_piece_counts(tile.inst_map)
    donor_ids = {d.id for d in bank.donors}
    assert 2 not in donor_ids and 3 not in donor_ids
    h, w = tile.inst_map.shape
    for nid in range(1, tile.inst_map.max() + 1):
        ys, xs = np.nonzero(tile.inst_map == nid)
        whole = pieces[nid] == 1 and ys.min() > 0 and xs.min() > 0 and ys.max() < h - 1 and xs.max() < w - 1
        assert (nid in donor_ids) == whole
    for d in bank.donors:
        assert d.area == d.mask.sum() and d.cls == tile.inst_type[d.id - 1]
    assert bank.summary()["class_counts"] == {str(k): int((tile.inst_type == k).sum()) for k in range(1, 5)}


def test_instance_only_input_is_refused(monuseg_dir):
    inst = np.load(monuseg_dir / "TCGA-2Z-A9J9-01A-01-TS1.npz")["inst_map"]
    with pytest.raises(InvalidInputError, match="balancing needs classes"):
        balance_label_map(inst, None, rng=np.random.default_rng(0), rare_classes=[1])
    with pytest.raises(InvalidInputError, match="balancing needs classes"):
        DonorBank.from_folder(monuseg_dir)
    with pytest.raises(InvalidInputError, match="balancing needs classes"):
        DonorBank.from_maps([(inst, None)])


def test_gappy_ids_are_renumbered_with_their_sources():
    inst, typ = _canvas()
    _blob(inst, typ, 17, 3, slice(40, 50), slice(44, 52))
    _blob(inst, typ, 90, 1, slice(5, 9), slice(5, 10))
    edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1], ratio=1.0)
    assert edit.inst_map.max() == 2 and edit.source_ids.tolist() == [17, 90]
    assert edit.record["replaced"][0]["source_id"] == 17 and edit.record["replaced"][0]["donor"]["id"] == 90
    validate_label_map(edit.inst_map, edit.type_map, reference=inst, source_ids=edit.source_ids)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, "ratio must be in"),
    ({"size_ratio": 0}, "size_ratio must be > 0"),
    ({"dilation_iterations": -1}, "dilation_iterations"),
    ({"border_margin": -3}, "border_margin"),
    ({"donor_source": "anywhere"}, "donor_source must be one of"),
    ({"max_donor_tries": 0}, "max_donor_tries"),
    ({"rare_classes": None}, "pass rare_classes, or a DonorBank"),
    ({"rare_classes": [0]}, "distinct classes in 1.."),
    ({"donor_source": "dataset"}, "needs a DonorBank"),
    ({"rare_classes": None, "target_distribution": {1: 0.5, 2: 0.2}}, "sum to 1"),
    ({"rare_classes": None, "target_distribution": {1: 0.5, 2: 0.5}}, "no share for classes"),
    ({"target_distribution": {1: 1.0}}, "not both"),
    ({"rng": np.random}, "numpy.random.Generator"),
])
def test_bad_parameters(kwargs, message):
    inst, typ = _canvas()
    _blob(inst, typ, 1, 3, slice(40, 50), slice(44, 52))
    _blob(inst, typ, 2, 4, slice(60, 70), slice(44, 52))
    kwargs = {"rng": np.random.default_rng(0), "rare_classes": [1], **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        balance_label_map(inst, typ, **kwargs)


def test_maps_outside_the_bank_classes(real_bank):
    inst, typ = _canvas()
    _blob(inst, typ, 1, 7, slice(40, 50), slice(44, 52))
    with pytest.raises(InvalidInputError, match="donor bank's classes are 0..4"):
        balance_label_map(inst, typ, rng=np.random.default_rng(0), bank=real_bank)
