"""GradMixTransform: balancing label swap + inpainting / Poisson image blend, on real CoNSeP tiles."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from diffaug.assets import sample_tiles_dir
from diffaug.data import TileFolder
from diffaug.errors import InvalidInputError
from diffaug.labels import DonorBank, validate_label_map
from diffaug.transforms import GradMixTransform
from diffaug.transforms.gradmix import Paste, blend_nuclei, gradmix


@pytest.fixture(scope="module")
def folder():
    return TileFolder(sample_tiles_dir())  # 4 real CoNSeP tiles in HoVer-Net's 4 classes


@pytest.fixture(scope="module")
def bank(folder):
    return DonorBank.from_folder(folder)


def _reader(folder):
    return lambda name: (lambda t: (t.image, t.inst_map))(folder.read(name))


def test_poisson_paste_lands_where_the_label_says():
    rng = np.random.default_rng(0)
    target = np.full((64, 64, 3), 200, np.uint8) + rng.integers(0, 5, (64, 64, 3), dtype=np.uint8)
    donor = np.full((64, 64, 3), 150, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    donor_mask = (yy - 20) ** 2 + (xx - 15) ** 2 <= 25
    donor[donor_mask] = 40  # a dark nucleus on lighter tissue
    target_mask = np.roll(donor_mask, (18, 25), axis=(0, 1))
    out = blend_nuclei(target, removed=np.zeros((64, 64), bool), protected=np.zeros((64, 64), bool),
                       pastes=[Paste(donor, donor_mask, target_mask)])
    far = out[:10, :10].astype(int) - target[:10, :10]
    # The donor's contrast (110 grey levels) comes in at the labelled place; the rest of the image is untouched.
    assert out[target_mask].mean() < target[target_mask].mean() - 80
    assert np.abs(far).max() == 0


def test_gradmix_edits_labels_and_only_the_edited_pixels(folder, bank):
    tile = folder.read("train_10_000")
    image, edit = gradmix(tile.image, tile.inst_map, tile.type_map, rng=np.random.default_rng(0), bank=bank,
                          donor_tile=_reader(folder), tile_name=tile.name)
    assert edit.record["n_replaced"] > 5
    validate_label_map(edit.inst_map, edit.type_map, reference=tile.inst_map, source_ids=edit.source_ids)
    rare = list(bank.rare_classes)
    assert np.isin(edit.inst_type, rare).sum() == np.isin(tile.inst_type, rare).sum() + edit.record["n_replaced"]
    changed = np.any(image != tile.image, axis=2)
    replaced_src = [r["source_id"] for r in edit.record["replaced"]]
    near_edit = np.isin(tile.inst_map, replaced_src) | np.isin(edit.inst_map, replaced_src)
    from scipy import ndimage as ndi

    near_edit = ndi.binary_dilation(near_edit, iterations=4)
    assert changed.any() and not (changed & ~near_edit).any()
    # Nuclei that stay are never repainted.
    kept = (edit.inst_map > 0) & (tile.inst_map > 0) & ~np.isin(tile.inst_map, replaced_src)
    assert not (changed & kept).any()


def test_transform_in_compose_reproducible_and_serialisable(folder):
    tile = folder.read("train_19_008")
    make = lambda: A.Compose([GradMixTransform(donors=str(sample_tiles_dir()), p=1.0),  # noqa: E731
                              A.HorizontalFlip(p=1.0)], seed=7)
    a = make()(image=tile.image, masks=[tile.inst_map, tile.type_map])
    b = make()(image=tile.image, masks=[tile.inst_map, tile.type_map])
    assert np.array_equal(a["image"], b["image"]) and all(np.array_equal(x, y) for x, y in zip(a["masks"], b["masks"]))
    inst, typ = a["masks"]
    assert inst.dtype == np.int32 and typ.dtype == np.int32 and isinstance(a["masks"], list)
    validate_label_map(inst[:, ::-1], typ[:, ::-1])
    assert not np.array_equal(a["image"], tile.image[:, ::-1])
    restored = A.from_dict(A.to_dict(make()))
    gm = restored.transforms[0]
    assert isinstance(gm, GradMixTransform) and gm.donors == str(sample_tiles_dir()) and gm.ratio == 0.8


def test_transform_same_tile_donors_only(folder):
    tile = folder.read("train_10_000")
    aug = A.Compose([GradMixTransform(rare_classes=[2], donor_source="same-tile", p=1.0)], seed=0)
    out = aug(image=tile.image, masks=[tile.inst_map, tile.type_map])
    record = aug.transforms[0].params["gradmix_record"]
    assert record["n_replaced"] > 0 and all(r["donor"]["same_tile"] for r in record["replaced"])
    validate_label_map(out["masks"][0], out["masks"][1])


def test_bad_input(folder):
    tile = folder.read("train_10_000")
    with pytest.raises(InvalidInputError, match="donors=FOLDER"):
        GradMixTransform()
    aug = A.Compose([GradMixTransform(rare_classes=[1], p=1.0)])
    with pytest.raises(InvalidInputError, match="masks=\\[inst_map, type_map\\]"):
        aug(image=tile.image, masks=[tile.inst_map])
    with pytest.raises(InvalidInputError, match="RGB uint8"):
        gradmix(tile.image.astype(np.float32), tile.inst_map, tile.type_map, rng=np.random.default_rng(0),
                rare_classes=[1])
    with pytest.raises(InvalidInputError, match="instance-only|no type_map"):
        gradmix(tile.image, tile.inst_map, None, rng=np.random.default_rng(0), rare_classes=[1])
    with pytest.raises(InvalidInputError, match="differ in shape"):
        gradmix(tile.image[:100], tile.inst_map, tile.type_map, rng=np.random.default_rng(0), rare_classes=[1])
    with pytest.raises(ValueError):
        GradMixTransform(rare_classes=[1], ratio=1.5)
