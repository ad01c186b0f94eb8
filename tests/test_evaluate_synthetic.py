"""The DiffMix arms and the fidelity command with a real (tiny, untrained) diffusion model end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffaug.cli import main


@pytest.fixture(scope="module")
def tiny_sdm(tmp_path_factory):
    """A 64-px SPADE UNet with random weights, saved as a model folder (its images are noise: wiring only)."""
    from diffaug.models import SemanticUNet, SemanticUNetConfig

    folder = tmp_path_factory.mktemp("sdm")
    config = SemanticUNetConfig(image_size=64, model_channels=32, channel_mult=(1, 2), num_classes=5,
                                num_res_blocks=1, attention_resolutions=(), num_head_channels=32, spade_hidden=32)
    SemanticUNet(config).save_pretrained(folder)
    return folder


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_diffmix_arms_smoke(consep_dir, tiny_sdm, tmp_path):
    out, again = tmp_path / "ds", tmp_path / "again"
    args = ["evaluate", "downstream", "--smoke", "--data", str(consep_dir), "--val-images", "2", "--seeds", "1",
            "--arms", "real,diffmix-balance,diffmix-enlarge,diffmix-both", "--weights", str(tiny_sdm), "--no-progress", "--out"]
    assert main([*args, str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    info = report["job"]["weights_info"]  # the weights are pinned by content, and by commit when from the Hub
    assert info["sha256"] == _sha256(tiny_sdm / "model.safetensors") and info["kind"] == "folder"
    assert "commit_sha" in info and "path" not in info
    for arm in ("diffmix-balance", "diffmix-enlarge", "diffmix-both"):
        assert report["arms"][arm]["n_synthetic"] == 2  # one rendered pair per real tile, changed or not
        names = sorted(p.stem for p in (out / "synthetic" / arm).glob("*.png"))
        assert names == sorted(f"{t}_{arm}" for t in report["job"]["train_tiles"])
    # The same seed renders the same pairs: a second job folder holds identical synthetic tiles.
    assert main([*args, str(again)]) == 0
    for png in (out / "synthetic" / "diffmix-enlarge").glob("*.npz"):
        a, b = np.load(png), np.load(again / "synthetic" / "diffmix-enlarge" / png.name)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_fidelity_smoke(consep_dir, tiny_sdm, tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["evaluate", "fidelity", "--smoke", "--data", str(consep_dir), "--val-images", "2",
                 "--weights", str(tiny_sdm), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert report["n_tiles"] == 2 and {"real", "synthetic", "ratio"} <= set(report)
    assert report["weights_info"]["sha256"] == _sha256(tiny_sdm / "model.safetensors")
    assert (out / "segmenter" / "config.json").is_file() and len(list((out / "synthetic").glob("*.png"))) == 2
    assert "| synthetic (same label maps) |" in capsys.readouterr().out
    # A given segmenter is used as is, and every tile of --data is then evaluated unless --val-images is given.
    again = tmp_path / "fid2"
    assert main(["evaluate", "fidelity", "--smoke", "--data", str(consep_dir), "--segmenter", str(out / "segmenter"),
                 "--max-test-tiles", "3", "--weights", str(tiny_sdm), "--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "fidelity.json").read_text())["n_tiles"] == 3
