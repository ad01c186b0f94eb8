"""DiffMixTransform (albumentations 2.0.8) on real CoNSeP / MoNuSeg tiles with the converted SDM fixture model.

The fixture model renders 64x64 windows; one model step per call (``strength=0.1`` of 10 steps) keeps the tests fast
while still running the real sampler.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from diffaug.data.tiles import TileFolder
from diffaug.errors import InvalidInputError, WeightsError
from diffaug.labels.validate import validate_label_map
from diffaug.transforms import DiffMixTransform
from diffaug.transforms._core import edit_window, resolve_device

# One model step per call, conditional only (batch 1); the first test runs DiffMix's guidance (w = 1.5) too.
FAST = {"num_inference_steps": 10, "strength": 0.1, "guidance_scale": 1.0, "device": "cpu"}
SIZE = 64  # the fixture model's image_size


@pytest.fixture(scope="session")
def fixture_model(tmp_path_factory: pytest.TempPathFactory, sdm_fixture_dir: Path) -> str:
    """The SDM reference fixture, converted once per session with the project's converter."""
    from diffaug.models.convert import convert_sdm_checkpoint

    out = tmp_path_factory.mktemp("models") / "sdm_fixture"
    convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", sdm_fixture_dir / "config.json", out)
    return str(out)


@pytest.fixture(scope="session")
def consep(consep_dir: Path) -> TileFolder:
    return TileFolder(consep_dir)  # HoVer-Net's 4 classes + background, as the fixture model


def crop(tile, y0: int = 0, x0: int = 0, size: int = SIZE):
    win = (slice(y0, y0 + size), slice(x0, x0 + size))
    return (np.ascontiguousarray(tile.image[win]), np.ascontiguousarray(tile.inst_map[win]),
            np.ascontiguousarray(tile.type_map[win]))


def test_compose_returns_valid_synthetic_sample(fixture_model: str, consep: TileFolder) -> None:
    tile = consep.read("train_19_000")  # 9 "other", 38 epithelial, 17 spindle nuclei
    aug = A.Compose([DiffMixTransform(model=fixture_model, policy="both", rare_classes=[1], p=1.0,
                                      balance_kwargs={"border_margin": 8, "ratio": 1.0},
                                      **{**FAST, "guidance_scale": 1.5})], seed=8)
    out = aug(image=tile.image, masks=[tile.inst_map, tile.type_map])
    assert out["is_synthetic"] is True
    image, (inst, types) = out["image"], out["masks"]
    assert image.dtype == np.uint8 and image.shape == tile.image.shape
    assert inst.dtype == np.int32 and types.dtype == np.int32
    validate_label_map(inst, types, reference=tile.inst_map, num_classes=5)
    assert inst.max() == tile.inst_map.max()  # nuclei are moved or swapped, never lost
    record = aug.transforms[0].params["diffmix"].record
    y0, x0, size = record["window"]
    assert size == SIZE
    win = np.zeros(tile.inst_map.shape, bool)
    win[y0:y0 + size, x0:x0 + size] = True
    # Outside the window the sample is untouched; inside, the image is re-rendered and the labels were edited.
    assert np.array_equal(image[~win], tile.image[~win])
    assert np.array_equal(inst[~win], tile.inst_map[~win]) and np.array_equal(types[~win], tile.type_map[~win])
    assert (image[win] != tile.image[win]).any(axis=-1).mean() > 0.5
    balance, enlarge = record["edits"]
    assert balance["policy"] == "balance" and enlarge["policy"] == "enlarge"
    assert balance["n_replaced"] > 0 and enlarge["n_moved"] > 0
    assert ((types == 1) & (tile.type_map != 1) & win).any()  # common nuclei became "other" shapes
    assert not (inst[win] == tile.inst_map[win]).all()


def test_inline_synthesis_even_when_the_edit_changes_nothing(fixture_model: str, consep: TileFolder) -> None:
    image, inst, types = crop(consep.read("train_15_005"), 96, 96)  # a tile without nuclei, at the model's size
    assert inst.max() == 0
    transform = DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)
    out = A.Compose([transform], seed=0)(image=image, masks=[inst, types])
    assert out["is_synthetic"] is True
    assert transform.params["diffmix"].window == (0, 0, SIZE)  # a model-size input is used whole
    assert (out["image"] != image).any(axis=-1).mean() > 0.5
    assert not out["masks"][0].any() and not out["masks"][1].any()


@pytest.mark.parametrize("shape", [(540, 540), (1000, 1000)])
def test_inputs_larger_than_the_model(fixture_model: str, monuseg_dir: Path, shape: tuple[int, int]) -> None:
    """HoVer-Net's 540² patches and whole 1000² images; MoNuSeg is instance-only: masks=[inst_map]."""
    tile = TileFolder(monuseg_dir)[0]
    image = np.ascontiguousarray(tile.image[:shape[0], :shape[1]])
    inst = np.ascontiguousarray(tile.inst_map[:shape[0], :shape[1]])
    transform = DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0,
                                 enlarge_kwargs={"fraction": 1.0}, **FAST)
    out = A.Compose([transform, A.HorizontalFlip(p=1.0)], seed=2)(image=image, masks=[inst])
    assert len(out["masks"]) == 1 and out["image"].shape == image.shape
    new_inst = out["masks"][0][:, ::-1]  # undo the flip that follows
    from diffaug.labels.instances import relabel_sequential

    validate_label_map(new_inst, reference=relabel_sequential(inst))
    record = transform.params["diffmix"].record
    assert record["frozen"] > 0  # nuclei cross the window border ...
    y0, x0, size = record["window"]
    win = np.zeros(shape, bool)
    win[y0:y0 + size, x0:x0 + size] = True
    cut = (set(np.unique(inst[win])) & set(np.unique(inst[~win]))) - {0}
    relabelled = relabel_sequential(inst)
    for nid in cut:  # ... and every one of them keeps all its pixels, inside the window and out
        ref = relabelled[inst == nid][0]
        assert np.array_equal(new_inst == ref, relabelled == ref)


def test_smaller_than_the_model_is_an_error(fixture_model: str, consep: TileFolder) -> None:
    image, inst, types = crop(consep.read("train_19_000"), size=48)
    with pytest.raises(InvalidInputError, match=r"48x48 but the model renders 64x64"):
        DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)(image=image, masks=[inst, types])


def test_same_seed_same_draws(fixture_model: str, consep: TileFolder) -> None:
    tile = consep.read("train_19_004")

    def run(seed: int) -> dict:
        return A.Compose([DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)],
                         seed=seed)(image=tile.image, masks=[tile.inst_map, tile.type_map])

    first, again, other = run(7), run(7), run(8)
    assert np.array_equal(first["image"], again["image"])
    assert all(np.array_equal(a, b) for a, b in zip(first["masks"], again["masks"]))
    assert not np.array_equal(first["image"], other["image"])


def test_serialisation_round_trip(tmp_path: Path, fixture_model: str) -> None:
    """Every argument survives A.to_dict/from_dict and A.save/load (an argument missing from InitSchema would be
    silently reset to its default)."""
    init = inspect.signature(DiffMixTransform.__init__).parameters
    assert set(init) - {"self"} <= set(DiffMixTransform.InitSchema.model_fields)
    args = {"model": fixture_model, "policy": "both", "strength": 0.3, "num_inference_steps": 20,
            "guidance_scale": 2.0, "eta": 0.5, "revision": None, "device": "cpu", "donors": str(tmp_path),
            "rare_classes": None, "balance_kwargs": {"target_distribution": {1: 0.4, 2: 0.2, 3: 0.2, 4: 0.2}},
            "enlarge_kwargs": {"fraction": 0.25, "shift_range": [1, 2]}, "pool": None, "pool_ratio": 1.0, "p": 0.3}
    assert set(args) == set(init) - {"self"}
    aug = A.Compose([DiffMixTransform(**args), A.HorizontalFlip()], seed=0)
    stored = A.to_dict(aug)["transform"]["transforms"][0]
    assert {k: stored[k] for k in args} == args
    args["rare_classes"] = [1, 2]  # the other mode: rare classes with a ratio
    args["balance_kwargs"] = {"ratio": 0.5, "border_margin": 10}
    assert A.from_dict(A.to_dict(A.Compose([DiffMixTransform(**args)]))).transforms[0].rare_classes == (1, 2)
    restored = A.from_dict(A.to_dict(aug))
    assert A.to_dict(restored) == A.to_dict(aug)
    A.save(aug, str(tmp_path / "aug.json"))
    loaded = A.load(str(tmp_path / "aug.json"))
    assert A.to_dict(loaded) == A.to_dict(aug)
    stored = json.loads((tmp_path / "aug.json").read_text())["transform"]["transforms"][0]
    assert stored["balance_kwargs"]["target_distribution"] == {"1": 0.4, "2": 0.2, "3": 0.2, "4": 0.2}
    assert loaded.transforms[0].balance_kwargs["target_distribution"][1] == 0.4  # ids are ints again


class _Tiles(torch.utils.data.Dataset):
    """The same real 64² crop at every index, so that differences between items come from the draws alone."""

    def __init__(self, image: np.ndarray, inst: np.ndarray, types: np.ndarray, transform: A.Compose) -> None:
        self.sample, self.transform = (image, inst, types), transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        image, inst, types = self.sample
        out = self.transform(image=image, masks=[inst, types])
        info = torch.utils.data.get_worker_info()
        return {"image": out["image"], "inst": out["masks"][0], "is_synthetic": out["is_synthetic"],
                "worker": -1 if info is None else info.id}


def _forbid_cuda(worker_id: int) -> None:
    """A worker that touched CUDA (even only to ask whether it is there) fails the test."""

    def fail(*args: object, **kwargs: object) -> bool:
        raise AssertionError("CUDA queried inside a DataLoader worker")

    torch.cuda.is_available = fail  # type: ignore[assignment]
    torch.cuda.init = fail  # type: ignore[assignment]


@pytest.mark.slow
def test_dataloader_workers_draw_differently_and_reproducibly(fixture_model: str, consep: TileFolder) -> None:
    image, inst, types = crop(consep.read("train_19_000"), 96, 96)
    transform = A.Compose([DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, guidance_scale=1.0,
                                            enlarge_kwargs={"fraction": 1.0}, num_inference_steps=10, strength=0.1,
                                            device="auto")], seed=3)
    dataset = _Tiles(image, inst, types, transform)

    def run() -> list[dict]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=_forbid_cuda,
                                             generator=torch.Generator().manual_seed(11))
        return list(loader)

    first, again = run(), run()
    assert [int(b["worker"]) for b in first] == [0, 1, 0, 1]
    assert all(bool(b["is_synthetic"]) for b in first)
    # Worker 0 and worker 1 got the same input at the same position in their streams, and drew differently.
    assert not torch.equal(first[0]["image"], first[1]["image"])
    assert not torch.equal(first[0]["inst"], first[1]["inst"])
    # A rerun with the same seeds draws the same.
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["inst"], b["inst"])


# ------------------------------------------------------------------------------------------- the window edit itself
@pytest.mark.parametrize("policy", ["balance", "enlarge", "both"])
def test_window_edits_never_split_a_nucleus(consep: TileFolder, policy: str) -> None:
    """Pure label work, no model: many random windows on real tiles; nuclei cut by the window are frozen."""
    rng = np.random.default_rng(0)
    reverted = 0
    for name in ["train_19_000", "train_19_004", "train_19_007", "train_17_010", "train_1_004"]:
        tile = consep.read(name, image=False)
        for _ in range(4):
            size = int(rng.integers(48, 129))
            y0, x0 = (int(v) for v in rng.integers(0, 256 - size + 1, size=2))
            inst, types, record = edit_window(
                tile.inst_map, tile.type_map, (y0, x0, size), policy, rng, rare_classes=(1,),
                balance_kwargs={"border_margin": 0, "ratio": 1.0}, enlarge_kwargs={"fraction": 1.0})
            validate_label_map(inst, types, reference=tile.inst_map, num_classes=5, where=f"{name} {policy}")
            outside = np.ones(inst.shape, bool)
            outside[y0:y0 + size, x0:x0 + size] = False
            assert np.array_equal(inst[outside], tile.inst_map[outside])
            assert np.array_equal(types[outside], tile.type_map[outside])
            reverted += len(record["reverted"])
    assert reverted > 0  # the freezing did have work to do


def test_a_picked_nucleus_across_the_window_border_is_reverted() -> None:
    inst = np.zeros((40, 40), np.int32)
    inst[10:20, 16:24] = 1  # crosses the window's right border at x = 20
    inst[5:9, 5:9] = 2
    inst[28:32, 6:10] = 3
    inst, _, record = edit_window(inst, None, (0, 0, 20), "enlarge", np.random.default_rng(0),
                                  enlarge_kwargs={"fraction": 1.0, "shift_range": (1, 2)})
    assert record["frozen"] == 1 and record["reverted"] == [1]
    assert np.array_equal(inst == 1, np.pad(np.ones((10, 8), bool), ((10, 20), (16, 16))))
    assert record["edits"][0]["n_moved"] >= 1  # the others did move


# ------------------------------------------------------------------------------------------------------- bad input
def _sample(consep: TileFolder, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return crop(consep.read("train_19_000"), 96, 96, size)


def test_float_image_after_normalize(fixture_model: str, consep: TileFolder) -> None:
    image, inst, types = _sample(consep)
    aug = A.Compose([A.Normalize(), DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)])
    with pytest.raises(InvalidInputError, match=r"float32.*put DiffMixTransform before ToFloat/Normalize"):
        aug(image=image, masks=[inst, types])


def test_unknown_model_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, consep: TileFolder) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    image, inst, types = _sample(consep)
    with pytest.raises(WeightsError, match=r"no-such/model .*not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        DiffMixTransform(model="no-such/model", policy="enlarge", p=1.0, **FAST)(image=image, masks=[inst, types])
    with pytest.raises(WeightsError, match=r"no such folder, and it is neither a registered name"):
        DiffMixTransform(model="./not/here", policy="enlarge", p=1.0, **FAST)(image=image, masks=[inst, types])


def test_classes_the_model_does_not_know(fixture_model: str, consep_dir: Path) -> None:
    raw = TileFolder(consep_dir, classes="raw").read("train_19_000")  # CoNSeP's 7 raw classes; the model knows 4
    with pytest.raises(InvalidInputError, match=r"class [5-7], but the model knows classes 0..4.*merge"):
        DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)(
            image=raw.image, masks=[raw.inst_map, raw.type_map])


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "mix"}, r"unknown policy 'mix'; choose one of balance, enlarge, both"),
    ({"p": 1.5}, r"p must be a probability in \[0, 1\]"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"strength": 1.2}, r"strength must be in \(0, 1\]"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be an integer in 1..1000"),
    ({"strength": 0.01, "num_inference_steps": 10}, r"rounds to 0 denoising steps"),
    ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number"),
    ({"eta": -1.0}, r"eta must be a finite number >= 0"),
    ({"pool": "/tmp/x", "pool_ratio": 0.0}, r"pool_ratio must be in \(0, 1\]"),
    ({"pool": "/tmp/x", "pool_ratio": 1.5}, r"pool_ratio must be in \(0, 1\]"),
    ({"pool_ratio": 0.5}, r"pool_ratio only applies with a pool"),
    ({"policy": "balance", "rare_classes": None}, r"balancing needs the rare classes: pass donors="),
    ({"rare_classes": [0]}, r"rare_classes must be distinct class ids >= 1"),
    ({"donors": "/no/such/folder"}, r"donors='/no/such/folder' is not a folder"),
    ({"balance_kwargs": {"ratio": 2.0}}, r"ratio must be in \[0, 1\]"),
    ({"balance_kwargs": {"radius": 3}}, r"unknown balance_kwargs \['radius'\]"),
    ({"policy": "enlarge", "enlarge_kwargs": {"shift_range": (3, 1)}}, r"shift_range must be whole pixels"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"model": "some/model", "policy": "balance", "rare_classes": [1], **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        DiffMixTransform(**args)


@pytest.mark.parametrize("masks, message", [
    (None, r"no label maps: call it as transform\(image=img, masks=\[inst_map, type_map\]\)"),
    ("three", r"masks must be \[inst_map, type_map\] \(or \[inst_map\]\), got 3 maps"),
])
def test_masks_missing_or_of_wrong_count(fixture_model: str, consep: TileFolder, masks: object,
                                         message: str) -> None:
    image, inst, types = _sample(consep)
    transform = DiffMixTransform(model=fixture_model, policy="enlarge", p=1.0, **FAST)
    data = {"image": image} if masks is None else {"image": image, "masks": [inst, types, types]}
    with pytest.raises(InvalidInputError, match=message):
        transform(**data)


def test_other_bad_samples(fixture_model: str, consep: TileFolder) -> None:
    image, inst, types = _sample(consep)
    transform = DiffMixTransform(model=fixture_model, policy="balance", rare_classes=[1], p=1.0, **FAST)
    with pytest.raises(InvalidInputError, match=r"cannot edit the targets \['mask'\]"):
        transform(image=image, masks=[inst, types], mask=inst)
    with pytest.raises(InvalidInputError, match=r"image is \(64, 64\) but inst_map is \(80, 80\)"):
        transform(image=image, masks=[np.pad(inst, 8), np.pad(types, 8)])
    with pytest.raises(InvalidInputError, match=r"inst_map must hold integer ids.*never be interpolated"):
        transform(image=image, masks=[inst.astype(np.float32), types])
    with pytest.raises(InvalidInputError, match=r"foregrounds disagree"):
        transform(image=image, masks=[inst, np.zeros_like(types)])
    with pytest.raises(InvalidInputError, match=r"policy 'balance' needs a type map"):
        transform(image=image, masks=[inst])
    with pytest.raises(InvalidInputError, match=r"must be uint8 RGB, got uint16"):
        transform(image=image.astype(np.uint16), masks=[inst, types])


def test_no_cuda_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a DataLoader worker, 'auto' means CPU without asking torch about CUDA, and CUDA is refused."""
    import torch.utils.data as tud

    monkeypatch.setattr(tud, "get_worker_info", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("CUDA queried in a worker"))
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(InvalidInputError, match=r"workers must not initialise CUDA"):
        resolve_device("cuda:0")


def test_donor_bank_from_a_data_folder(tmp_path: Path, fixture_model: str, consep_dir: Path,
                                       consep: TileFolder) -> None:
    """donors=DIR builds the dataset's donor bank (and its rare classes) once; balancing draws donors from it."""
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "classes.json").symlink_to(consep_dir / "classes.json")
    bank_tiles = ["train_19_000", "train_19_004", "train_19_007", "train_17_010", "train_19_008"]
    for name in bank_tiles:
        for ext in (".png", ".npz"):
            (folder / f"{name}{ext}").symlink_to(consep_dir / f"{name}{ext}")
    image, inst, types = crop(consep.read("train_1_004"), 96, 96)  # a tile that is not in the bank
    transform = DiffMixTransform(model=fixture_model, policy="balance", donors=folder, p=1.0,
                                 balance_kwargs={"border_margin": 8, "ratio": 1.0, "donor_source": "dataset"}, **FAST)
    out = A.Compose([transform], seed=0)(image=image, masks=[inst, types])
    record = transform.params["diffmix"].record["edits"][0]
    # In these five tiles spindle nuclei (class 4) are 9 % of all and "other" 19 %: the bank's rare class is 4.
    assert record["receiving_classes"] == [4]
    assert record["n_replaced"] > 0
    assert {r["donor"]["tile"] for r in record["replaced"]} <= set(bank_tiles)
    validate_label_map(out["masks"][0], out["masks"][1], reference=inst, num_classes=5)
