"""DiffMixd, the MONAI dictionary transform, in MONAI's channel-first layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug.data.tiles import TileFolder
from diffaug.errors import InvalidInputError
from diffaug.labels.validate import validate_label_map
from test_transforms import fixture_model  # noqa: F401  (the converted SDM fixture, a pytest fixture)

FAST = {"num_inference_steps": 10, "strength": 0.1, "guidance_scale": 1.0, "device": "cpu"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(consep_dir: Path) -> dict:
    """A real 96² crop as LoadImaged + EnsureChannelFirstd give it: float32 MetaTensor image, (1, H, W) maps."""
    from monai.data import MetaTensor

    tile = TileFolder(consep_dir).read("train_19_007")
    win = (slice(80, 176), slice(80, 176))
    image = MetaTensor(torch.from_numpy(tile.image[win].transpose(2, 0, 1).astype(np.float32)),
                       meta={"filename_or_obj": "train_19_007.png"})
    return {"image": image, "inst_map": tile.inst_map[win][None].copy(), "type_map": tile.type_map[win][None].copy()}


def test_channel_first_in_and_out_reproducible(fixture_model: str, sample: dict) -> None:
    from diffaug.transforms import DiffMixd

    transform = DiffMixd(model=fixture_model, policy="both", rare_classes=[1], prob=1.0,
                         balance_kwargs={"border_margin": 8}, **FAST)
    out = transform.set_random_state(seed=5)(sample)
    image, inst, types = out["image"], out["inst_map"], out["type_map"]
    assert type(image) is type(sample["image"]) and image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert image.meta["filename_or_obj"] == "train_19_007.png"  # MetaTensor metadata kept
    assert isinstance(inst, np.ndarray) and inst.dtype == sample["inst_map"].dtype and inst.shape == (1, 96, 96)
    assert out["is_synthetic"] is True
    assert torch.equal(image, image.round()) and 0 <= float(image.min()) and float(image.max()) <= 255
    validate_label_map(inst[0], types[0], reference=sample["inst_map"][0], num_classes=5)
    assert not torch.equal(image.as_tensor(), sample["image"].as_tensor())
    again = transform.set_random_state(seed=5)(sample)
    assert torch.equal(again["image"], image) and np.array_equal(again["inst_map"], inst)
    other = transform.set_random_state(seed=6)(sample)
    assert not torch.equal(other["image"], image)


def test_prob_zero_passes_the_sample_through(sample: dict) -> None:
    from diffaug.transforms import DiffMixd

    out = DiffMixd(model="not-loaded", policy="enlarge", prob=0.0)(sample)
    assert out["is_synthetic"] is False and out["image"] is sample["image"]


def test_instance_only_keys(fixture_model: str, sample: dict) -> None:
    from diffaug.transforms import DiffMixd

    data = {"img": sample["image"].as_tensor().to(torch.uint8), "label": torch.from_numpy(sample["inst_map"])}
    out = DiffMixd(keys=("img", "label"), model=fixture_model, policy="enlarge", prob=1.0,
                   synthetic_key="synthetic", **FAST)(data)
    assert out["img"].dtype == torch.uint8 and out["label"].shape == (1, 96, 96) and out["synthetic"] is True


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "image": d["image"] / 255.0}, r"not raw 0..255 pixel values.*before ScaleIntensityd"),
    (lambda d: {**d, "image": d["image"].permute(1, 2, 0)}, r"channel-first RGB \(3, H, W\).*EnsureChannelFirstd"),
    (lambda d: {**d, "inst_map": d["inst_map"][0]}, r"'inst_map' must be a channel-first map \(1, H, W\)"),
    (lambda d: {**d, "inst_map": d["inst_map"] + 0.5}, r"non-integer values.*mode='nearest'"),
    (lambda d: {k: v for k, v in d.items() if k != "type_map"}, r"key 'type_map' is missing"),
])
def test_bad_samples(fixture_model: str, sample: dict, change, message: str) -> None:
    from diffaug.transforms import DiffMixd

    with pytest.raises(InvalidInputError, match=message):
        DiffMixd(model=fixture_model, policy="enlarge", prob=1.0, **FAST)(change(sample))


def test_bad_arguments() -> None:
    from diffaug.transforms import DiffMixd

    with pytest.raises(InvalidInputError, match=r"prob must be a probability"):
        DiffMixd(model="m", policy="enlarge", prob=2.0)
    with pytest.raises(InvalidInputError, match=r"keys must be \(image, inst_map\[, type_map\]\)"):
        DiffMixd(keys=("image",), model="m", policy="enlarge")
    with pytest.raises(InvalidInputError, match=r"unknown policy"):
        DiffMixd(model="m", policy="swap")


def test_importing_diffaug_transforms_stays_cheap() -> None:
    """MONAI, albumentations and torch are imported only when a transform is first used."""
    code = ("import sys, diffaug, diffaug.transforms\n"
            "print(sorted(m for m in ('monai', 'albumentations', 'torch') if m in sys.modules))\n"
            "diffaug.transforms.DiffMixd\n"
            "print('monai' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_pool_pairs_in_channel_first_layout(tmp_path: Path, sample: dict) -> None:
    from diffaug.transforms import DiffMixd, SynthesisPool

    inst, types = sample["inst_map"][0], sample["type_map"][0]
    pair_image = np.full((96, 96, 3), 7, np.uint8)
    with SynthesisPool.create(capacity=1, tile_shape=(96, 96), reuse=1, directory=tmp_path) as pool:
        pool.put(pair_image, inst, types)
        transform = DiffMixd(model="unused-with-a-pool", policy="enlarge", pool=pool, prob=1.0)
        out = transform(sample)
        assert out["is_synthetic"] is True and out["image"].shape == (3, 96, 96)
        assert torch.equal(out["image"].as_tensor(), torch.full((3, 96, 96), 7.0))
        assert out["image"].meta["filename_or_obj"] == "train_19_007.png"
        again = transform(sample)  # the pair was used once (reuse=1): the pool is empty, the real sample stays
        assert again["is_synthetic"] is False and again["image"] is sample["image"]
