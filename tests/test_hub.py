"""Loading weights from folders, the Hugging Face cache (offline) and the registry of published weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug import hub
from diffaug.errors import WeightsError
from diffaug.models import SemanticUNet, SemanticUNetConfig
from diffaug.models.convert import config_from_sdm_flags, load_sdm_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_classes=3, num_res_blocks=1,
            attention_resolutions=(16,), num_head_channels=32, spade_hidden=16)


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Lay files out as huggingface_hub's cache does: ``models--org--name/{blobs, snapshots/<sha>, refs/main}``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub reads the variable once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    model = SemanticUNet(SemanticUNetConfig(**TINY))
    torch.nn.init.normal_(model.out[2].weight)
    return model.save_pretrained(tmp_path / "tiny")


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_folder: Path) -> Path:
    return make_hub_cache(tmp_path / "hf", "diffaug-test/tiny",
                          {n: tiny_folder / n for n in ("config.json", "model.safetensors")})


def test_hub_repo_loads_offline_from_the_cache(offline: None, hub_cache: Path, tiny_folder: Path) -> None:
    info = hub.resolve_pretrained_info("diffaug-test/tiny", cache_dir=hub_cache)
    assert info.kind == "hub" and info.commit_sha == COMMIT and info.path.name == COMMIT
    model = SemanticUNet.from_pretrained("diffaug-test/tiny", cache_dir=hub_cache)
    reference = SemanticUNet.from_pretrained(tiny_folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    pinned = SemanticUNet.from_pretrained("diffaug-test/tiny", revision=COMMIT, cache_dir=hub_cache)
    assert pinned.config == reference.config


def test_offline_and_not_cached_is_a_clear_error(offline: None, hub_cache: Path) -> None:
    with pytest.raises(WeightsError, match=r"diffaug-test/absent .*not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        SemanticUNet.from_pretrained("diffaug-test/absent", cache_dir=hub_cache)
    with pytest.raises(WeightsError, match=r"revision v2\).*not in the Hugging Face cache"):
        SemanticUNet.from_pretrained("diffaug-test/tiny", revision="v2", cache_dir=hub_cache)


def test_neither_folder_nor_id(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(WeightsError, match="no such folder, and it is neither a registered name"):
        hub.resolve_pretrained("./models/missing")
    with pytest.raises(WeightsError, match="no such folder"):
        hub.resolve_pretrained(tmp_path / "missing")  # a Path is never taken for a repo id
    with pytest.raises(WeightsError, match="is a file"):
        hub.resolve_pretrained(tiny_folder / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a diffaug model folder.*diffaug convert"):
        hub.resolve_pretrained(tmp_path / "empty")
    with pytest.raises(WeightsError, match="only applies to Hub repos"):
        hub.resolve_pretrained(tiny_folder, revision="main")


def test_registered_original_checkpoint_is_converted_once(offline: None, tmp_path: Path, sdm_fixture_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue-5 path: a registered original-format .pt on the Hub, with the fixture standing in for the 2.6 GB
    DiffMix checkpoint under the same repo and file name."""
    entry = hub.REGISTRY["diffmix-consep"]
    fixture_flags = load_sdm_flags(sdm_fixture_dir / "config.json")
    monkeypatch.setitem(hub.REGISTRY, "diffmix-consep", dataclasses.replace(entry, flags=fixture_flags))
    monkeypatch.setenv("DIFFAUG_CACHE", str(tmp_path / "diffaug-cache"))
    cache = make_hub_cache(tmp_path / "hf", entry.repo_id, {entry.filename: sdm_fixture_dir / "state_dict.pt"})

    info = hub.resolve_pretrained_info("diffmix-consep", cache_dir=cache)
    assert info.kind == "registry" and info.commit_sha == COMMIT
    assert info.path == tmp_path / "diffaug-cache" / "converted" / "diffmix-consep" / COMMIT
    source = json.loads((info.path / "source.json").read_text())
    assert source["commit_sha"] == COMMIT and source["filename"] == "consep-ema_0.9999_010000.pt"

    model = SemanticUNet.from_pretrained("diffmix-consep", cache_dir=cache)
    assert model.config.class_scheme == "consep-hovernet" and model.config.class_names[4] == "spindle-shaped"
    cases = np.load(sdm_fixture_dir / "model_cases.npz")
    with torch.no_grad():
        out = model(*(torch.from_numpy(cases[k][:1]) for k in ("x", "timesteps", "y")))
    assert float((out - torch.from_numpy(cases["out"][:1])).abs().max()) <= 1e-4 * float(np.abs(cases["out"]).max())

    # Cached: a second load does not convert again.
    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr("diffaug.models.convert.convert_sdm_checkpoint", no_conversion)
    assert hub.resolve_pretrained("diffmix-consep", cache_dir=cache) == info.path
    with pytest.raises(WeightsError, match="Hyun-Jic/DiffMix .*glysac-ema.*not in the Hugging Face cache"):
        hub.resolve_pretrained("diffmix-glysac", cache_dir=cache)


@pytest.mark.parametrize("name, num_classes", [("diffmix-consep", 5), ("diffmix-glysac", 4)])
def test_registered_flags_build_diffmix_architecture(name: str, num_classes: int) -> None:
    entry = hub.REGISTRY[name]
    assert entry.repo_id == "Hyun-Jic/DiffMix" and entry.revision == "main"
    config = config_from_sdm_flags(entry.flags, class_scheme=entry.class_scheme, class_names=entry.class_names)
    assert config == SemanticUNetConfig.diffmix_256(num_classes, class_scheme=entry.class_scheme,
                                                    class_names=entry.class_names)
    with torch.device("meta"):
        model = SemanticUNet(config)
    consep = model.num_parameters() + (5 - num_classes) * 50 * 128 * 9  # GLySAC: one label channel less in 50 SPADEs
    assert round(consep / 1e6) == 652  # SPEC §2: 652 M parameters


@pytest.mark.slow
def test_offline_environment_variables_in_a_fresh_process(hub_cache: Path, tiny_folder: Path, tmp_path: Path) -> None:
    """The real thing: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before huggingface_hub is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(REPO_ROOT)}
    code = ("from diffaug.models import SemanticUNet\n"
            "m = SemanticUNet.from_pretrained('diffaug-test/tiny')\n"
            "print(m.num_parameters())\n"
            "try:\n"
            "    SemanticUNet.from_pretrained('diffaug-test/absent')\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert int(lines[0]) == SemanticUNet.from_pretrained(tiny_folder).num_parameters()
    assert lines[1].startswith("WeightsError") and "HF_HUB_OFFLINE=1" in lines[1]


def test_builtin_name_resolves_to_the_shipped_checkpoint(tmp_path: Path, tiny_folder: Path, monkeypatch) -> None:
    """``model="builtin"`` (transforms, pipelines) finds the same folder as ``diffaug generate --weights builtin``."""
    monkeypatch.setattr(hub, "_builtin_candidates", lambda: [tmp_path / "missing", tiny_folder])
    info = hub.resolve_pretrained_info("builtin")
    assert info.path == tiny_folder and info.kind == "builtin" and info.commit_sha is None
    (tmp_path / "builtin").mkdir()
    monkeypatch.chdir(tmp_path)  # the reserved name wins over a folder called "builtin"; a Path names the folder
    assert hub.resolve_pretrained("builtin") == tiny_folder
    with pytest.raises(WeightsError, match="not a diffaug model folder"):
        hub.resolve_pretrained(Path("builtin"))
    with pytest.raises(WeightsError, match="revision"):
        hub.resolve_pretrained("builtin", revision="main")
    monkeypatch.setattr(hub, "_builtin_candidates", lambda: [tmp_path / "missing"])
    with pytest.raises(WeightsError, match="built-in checkpoint was not found"):
        hub.resolve_pretrained("builtin")


def test_pipeline_reports_the_commit_it_loaded(offline: None, hub_cache: Path, tiny_folder: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Records pin weights by the resolved Hub commit: the pipeline keeps where its weights came from."""
    from huggingface_hub import constants

    from diffaug.pipelines import SemanticSynthesisPipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    pipe = SemanticSynthesisPipeline.from_pretrained("diffaug-test/tiny")
    assert pipe.source == {"id": "diffaug-test/tiny", "kind": "hub", "repo_id": "diffaug-test/tiny",
                           "revision": "main", "commit_sha": COMMIT}
    local = SemanticSynthesisPipeline.from_pretrained(tiny_folder)
    assert local.source["kind"] == "folder" and local.source["commit_sha"] is None
