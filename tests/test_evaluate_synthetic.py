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


def test_tiles_larger_than_the_model_render_in_model_size_windows(consep_dir, tiny_sdm):
    """A 128-px tile with a 64-px model: four windows, each what the pipeline gives for that window and its slice of
    the item's noise; the batch size changes nothing beyond float rounding."""
    import torch

    from diffaug.data import TileFolder
    from diffaug.evaluation.synthetic import SynthesisSettings, item_seed, render
    from diffaug.pipelines import SemanticSynthesisPipeline

    pipe = SemanticSynthesisPipeline.from_pretrained(tiny_sdm)
    seen = []

    class Recording:
        model = pipe.model

        def __call__(self, **kw):
            seen.extend(m.shape for m in kw["inst_map"])
            return pipe(**kw)

    tile = TileFolder(consep_dir).read("train_10_000")
    crop = (slice(64, 192), slice(64, 192))
    item = (np.ascontiguousarray(tile.image[crop]), np.ascontiguousarray(tile.inst_map[crop]),
            np.ascontiguousarray(tile.type_map[crop]))
    settings = SynthesisSettings(strength=0.5, num_inference_steps=4, batch_size=4)
    (image,) = render(Recording(), [item], seed=3, settings=settings)
    assert image.shape == (128, 128, 3) and seen == [(64, 64)] * 4
    noise = torch.randn((3, 128, 128), generator=torch.Generator().manual_seed(item_seed(3, 0)))
    window = (slice(64, 128), slice(0, 64))
    alone = pipe(image=np.ascontiguousarray(item[0][window]), inst_map=np.ascontiguousarray(item[1][window]),
                 type_map=np.ascontiguousarray(item[2][window]), strength=0.5, num_inference_steps=4,
                 guidance_scale=settings.guidance_scale, noise=noise[:, window[0], window[1]][None].contiguous())
    assert np.abs(alone.images[0].astype(int) - image[window].astype(int)).max() <= 1
    (one_by_one,) = render(pipe, [item], seed=3, settings=SynthesisSettings(strength=0.5, num_inference_steps=4,
                                                                            batch_size=1))
    assert np.abs(one_by_one.astype(int) - image.astype(int)).max() <= 1
