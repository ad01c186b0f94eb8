"""Weights from the Hub, offline: ``diffaug download`` and ``DiffMixTransform(model="diffmix-consep")`` on a Hugging
Face cache the test builds, holding the SDM fixture's original-format ``state_dict.pt`` under DiffMix's repo and file
name (with the fixture's flags standing in for the registered ones)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import albumentations as A
import pytest

from diffaug import hub
from diffaug.cli import main
from diffaug.data.tiles import TileFolder
from diffaug.errors import WeightsError
from diffaug.models.convert import load_sdm_flags
from diffaug.transforms import DiffMixTransform
from test_hub import COMMIT, make_hub_cache

PINNED = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path: Path, sdm_fixture_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline mode, a hub cache with DiffMix's consep checkpoint (the fixture) at two commits, and diffaug's own
    cache in tmp. Only the default cache is used, as a user's would be."""
    from huggingface_hub import constants

    entry = hub.REGISTRY["diffmix-consep"]
    monkeypatch.setitem(hub.REGISTRY, "diffmix-consep",
                        dataclasses.replace(entry, flags=load_sdm_flags(sdm_fixture_dir / "config.json")))
    cache = tmp_path / "hf"
    make_hub_cache(cache, entry.repo_id, {entry.filename: sdm_fixture_dir / "state_dict.pt"}, commit=PINNED)
    make_hub_cache(cache, entry.repo_id, {entry.filename: sdm_fixture_dir / "state_dict.pt"}, commit=COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("DIFFAUG_CACHE", str(tmp_path / "diffaug"))
    return cache


def test_download_converts_once_and_records_the_commit(hub_cache: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["download", "diffmix-consep"]) == 0
    printed = capsys.readouterr().out
    converted = tmp_path / "diffaug" / "converted" / "diffmix-consep" / COMMIT
    assert f"ready at {converted}" in printed and f"--revision {COMMIT}" in printed
    source = json.loads((converted / "source.json").read_text())
    assert source["commit_sha"] == COMMIT and source["revision"] == "main"
    assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()

    # Converted once: later loads use the cached safetensors.
    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    import diffaug.models.convert as convert

    original = convert.convert_sdm_checkpoint
    monkeypatch.setattr(convert, "convert_sdm_checkpoint", no_conversion)
    assert main(["download", "diffmix-consep", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(converted) and result["commit_sha"] == COMMIT

    # A pinned commit is its own conversion, recorded as such.
    monkeypatch.setattr(convert, "convert_sdm_checkpoint", original)
    assert main(["download", "diffmix-consep", "--revision", PINNED, "--json"]) == 0
    pinned = json.loads(capsys.readouterr().out)
    assert pinned["commit_sha"] == PINNED and pinned["path"].endswith(f"diffmix-consep/{PINNED}")


def test_transform_loads_the_registered_model_offline(hub_cache: Path, consep_dir: Path) -> None:
    tile = TileFolder(consep_dir).read("train_19_007")
    transform = DiffMixTransform(model="diffmix-consep", policy="enlarge", p=1.0, num_inference_steps=10,
                                 strength=0.1, guidance_scale=1.0, device="cpu")
    out = A.Compose([transform], seed=0)(image=tile.image, masks=[tile.inst_map, tile.type_map])
    assert out["is_synthetic"] is True and out["image"].shape == tile.image.shape
    from diffaug.transforms._core import load_pipeline

    pipe = load_pipeline("diffmix-consep", None, "cpu")
    assert pipe.model.config.class_scheme == "consep-hovernet" and pipe.num_classes == 5


def test_offline_and_not_cached(hub_cache: Path, capsys: pytest.CaptureFixture[str], consep_dir: Path) -> None:
    assert main(["download", "diffmix-glysac"]) == 2
    err = capsys.readouterr().err
    assert "Hyun-Jic/DiffMix (file glysac-ema_0.9999_010000.pt, revision main) is not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err and "diffaug download" in err
    assert main(["download", "diffmix-consep", "--revision", "v9"]) == 2
    assert "revision v9) is not in the Hugging Face cache" in capsys.readouterr().err
    tile = TileFolder(consep_dir).read("train_19_007")
    with pytest.raises(WeightsError, match=r"glysac-ema.*not in the Hugging Face cache"):
        DiffMixTransform(model="diffmix-glysac", policy="enlarge", p=1.0)(image=tile.image,
                                                                          masks=[tile.inst_map, tile.type_map])


def test_download_names_and_list(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "diffmix-consep" in listing and "Hyun-Jic/DiffMix/consep-ema_0.9999_010000.pt @ main" in listing
    assert "diffmix-glysac" in listing and "glysac-ema_0.9999_010000.pt" in listing
    assert main(["download", "consep"]) == 2
    assert "neither a registered name (diffmix-consep, diffmix-glysac) nor a Hub repo id" in capsys.readouterr().err
    assert main(["download", str(tmp_path)]) == 2
    assert "is a local folder, nothing to download" in capsys.readouterr().err
    assert main(["download"]) == 2
    assert "give a registered name or a Hub repo id" in capsys.readouterr().err


@pytest.mark.parametrize("name, num_classes", [("diffmix-consep", 5), ("diffmix-glysac", 4)])
def test_registered_flags_are_diffmix_sampling_flags(name: str, num_classes: int) -> None:
    """Issue 5's flags, from DiffMix's sampling scripts."""
    entry = hub.REGISTRY[name]
    expected = {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "num_head_channels": 64,
                "attention_resolutions": "32,16,8", "resblock_updown": True, "use_scale_shift_norm": True,
                "learn_sigma": True, "class_cond": True, "no_instance": False, "diffusion_steps": 1000,
                "noise_schedule": "linear", "num_classes": num_classes}
    assert {k: entry.flags[k] for k in expected} == expected
    assert (entry.repo_id, entry.filename, entry.revision) == (
        "Hyun-Jic/DiffMix", f"{name.split('-')[1]}-ema_0.9999_010000.pt", "main")
    assert "MIT" in entry.license
