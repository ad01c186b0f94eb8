"""The training loop: exact resume, the loss going down on the shipped tiny config, condition dropout, EMA,
checkpoints, the CLI's errors, and DDP with 2 CPU processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffaug.cli import main
from diffaug.errors import ConfigError, WeightsError
from diffaug.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffaug.training.config import load_config
from diffaug.training.ema import EMA
from diffaug.training.loop import train

REPO = Path(__file__).resolve().parents[1]

# A smaller model than the tiny config, for the tests that only need a few real steps.
SMALL = ["model.image_size=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]", "optim.batch_size=2",
         "eval.every=0", "preview.num_images=0", "log_every=1"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Train on one thread. These models are tiny; on cores shared with other jobs, OpenMP's spinning threads made
    the tiny config take 15 min instead of 70-90 s (measured on a 2-core machine at load 12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(consep_dir: Path, out: Path, *extra: str):
    return load_config("tiny", [f"data.root={consep_dir}", f"output_dir={out}", *SMALL, *extra])


def _state(path: Path) -> dict:
    return load_checkpoint(path)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bit_exact(consep_dir: Path, tmp_path: Path) -> None:
    """6 steps straight equal 3 steps, a stop, and 3 resumed steps, bit for bit: weights, EMA, optimizer, RNG.

    The run crosses from the train stage into the fine-tune stage (condition dropout) after the resume, and has
    dropout on, so every random stream (data order, crops, t, noise, drop mask, dropout) must be restored.
    """
    extra = ["train.max_steps=4", "finetune.max_steps=2", "finetune.drop_rate=0.5", "model.dropout=0.1",
             "checkpoint.every=100", "train.warmup_steps=2", "ema.warmup=true", "ema.decay=0.999"]
    straight = train(_small(consep_dir, tmp_path / "straight", *extra), progress=False)
    assert straight.finished and straight.step == 6

    first = train(_small(consep_dir, tmp_path / "resumed", *extra), stop_after=3, progress=False)
    assert not first.finished and first.step == 3 and first.model_dir is None
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [3]
    second = train(_small(consep_dir, tmp_path / "resumed", *extra), progress=False)
    assert second.finished and second.step == 6
    assert second.resumed_from == tmp_path / "resumed" / "checkpoints" / "step_0000003.pt"

    a = _state(latest_checkpoint(tmp_path / "straight"))
    b = _state(latest_checkpoint(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 6 and a["samples_seen"] == b["samples_seen"] == 12
    for key in ("model", "ema", "optimizer", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    ema_a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    ema_b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    _assert_same_tensors(ema_a, ema_b, "final EMA model")
    # the run really trained: the weights moved away from the initialisation
    assert not torch.equal(a["model"]["out.2.weight"], torch.zeros_like(a["model"]["out.2.weight"]))
    # metrics of the two runs agree line for line (the resumed file was continued, not duplicated)
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [r["step"] for r in lines("resumed")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines("resumed")] == [r["loss"] for r in lines("straight")]
    stages = [r["stage"] for r in lines("straight")]
    assert stages == ["train"] * 4 + ["finetune"] * 2


def test_resume_after_a_crash_between_checkpoints(consep_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A run that dies at step 6 resumes from its step-4 checkpoint, drops the metrics logged after it, and ends
    bit-identical to a run that never died."""
    from diffaug.training import loop

    extra = ["train.max_steps=7", "finetune.max_steps=0", "checkpoint.every=2", "checkpoint.keep=1"]
    train(_small(consep_dir, tmp_path / "straight", *extra), progress=False)

    real_step = loop._Trainer.train_step

    def dies_at_step_6(self, batch):
        if self.step == 5:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(loop._Trainer, "train_step", dies_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_small(consep_dir, tmp_path / "crashed", *extra), progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "crashed")] == [4]
    monkeypatch.setattr(loop._Trainer, "train_step", real_step)
    train(_small(consep_dir, tmp_path / "crashed", *extra), progress=False)

    a = _state(latest_checkpoint(tmp_path / "straight"))
    b = _state(latest_checkpoint(tmp_path / "crashed"))
    for key in ("model", "ema", "optimizer", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    steps = [json.loads(x)["step"] for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_rerunning_a_finished_run_does_nothing(consep_dir: Path, tmp_path: Path) -> None:
    cfg = _small(consep_dir, tmp_path / "run", "train.max_steps=2", "finetune.max_steps=0")
    train(cfg, progress=False)
    before = (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    again = train(cfg, progress=False)
    assert again.finished and again.step == 2
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == before
    # a larger budget continues the same run
    longer = train(_small(consep_dir, tmp_path / "run", "train.max_steps=3", "finetune.max_steps=0"), progress=False)
    assert longer.finished and longer.step == 3


def test_resume_refuses_a_different_run(consep_dir: Path, tmp_path: Path) -> None:
    train(_small(consep_dir, tmp_path / "run", "train.max_steps=3", "finetune.max_steps=0"), stop_after=1,
          progress=False)
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(optim.batch_size, train.lr "
                                          r"differ\)"):
        train(_small(consep_dir, tmp_path / "run", "train.max_steps=3", "finetune.max_steps=0",
                     "optim.batch_size=3", "train.lr=1e-4"), progress=False)


def test_resume_refuses_changed_data(consep_dir: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "tiles"
    data.mkdir()
    names = ["train_1_000", "train_1_001", "train_1_002"]
    for name in [*names, "train_1_003"]:
        for ext in (".png", ".npz"):
            shutil.copy(consep_dir / f"{name}{ext}", (data if name in names else tmp_path) / f"{name}{ext}")
    shutil.copy(consep_dir / "classes.json", data / "classes.json")
    train(_small(data, tmp_path / "run", "train.max_steps=3", "finetune.max_steps=0"), stop_after=1, progress=False)
    for ext in (".png", ".npz"):  # a tile appears in the data folder
        shutil.copy(tmp_path / f"train_1_003{ext}", data / f"train_1_003{ext}")
    with pytest.raises(ConfigError, match="the run trained on 3 tiles of .* which now has 4"):
        train(_small(data, tmp_path / "run", "train.max_steps=3", "finetune.max_steps=0"), progress=False)


def test_output_dir_with_foreign_files(consep_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no diffaug training run"):
        train(_small(consep_dir, tmp_path / "run"), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(consep_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="step_0000002.pt: corrupt or unreadable training checkpoint"):
        train(_small(consep_dir, tmp_path / "run"), progress=False)
    torch.save({"not": "ours"}, ckpt)
    with pytest.raises(WeightsError, match="not a diffaug training checkpoint"):
        load_checkpoint(ckpt)


def test_condition_dropout_zeroes_whole_samples(consep_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """In the fine-tune stage about drop_rate of the samples get y = 0 everywhere; the others keep their y."""
    from diffaug.diffusion import GaussianDiffusion

    seen: list[torch.Tensor] = []
    original = GaussianDiffusion.training_losses

    def spy(self, model_fn, x_start, t, noise, y=None):
        seen.append(y.detach().clone())
        return original(self, model_fn, x_start, t, noise, y)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    cfg = _small(consep_dir, tmp_path / "run", "train.max_steps=2", "finetune.max_steps=8", "finetune.drop_rate=0.5",
                 "optim.batch_size=4")
    train(cfg, progress=False)
    train_stage, finetune_stage = torch.cat(seen[:2]), torch.cat(seen[2:])
    per_sample = lambda y: y.flatten(1).abs().sum(1)  # noqa: E731
    assert (per_sample(train_stage) > 0).all()  # drop_rate 0 in stage 1
    dropped = per_sample(finetune_stage) == 0
    assert 0 < int(dropped.sum()) < len(dropped)  # 32 samples at p=0.5: some dropped, some kept
    kept = finetune_stage[~dropped]
    assert torch.equal(kept[:, :5].sum(1), torch.ones_like(kept[:, 0]))  # kept samples: intact one-hot


def test_ema_update_rule() -> None:
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.75)
    start = ema.shadow.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow.weight, 0.75 * start + 0.25 * net.weight)
    assert not ema.shadow.weight.requires_grad
    with pytest.raises(ValueError, match="decay must lie in"):
        EMA(net, decay=1.0)


def test_ema_warmup_forgets_the_initial_weights() -> None:
    """With warm-up, the share of the initial weights left after n steps is prod_s (1+s)/(10+s) = 1 / C(n+9, 9)."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.999, warmup=True)
    assert [round(ema.decay_at(s), 4) for s in (0, 10, 90, 10_000)] == [0.1, 0.55, 0.91, 0.999]
    with torch.no_grad():
        net.weight.zero_()
    start = ema.shadow.weight.detach().clone()
    for step in range(200):
        ema.update(net, step=step)
    plain = EMA(torch.nn.Linear(3, 2), decay=0.999)
    left = math.prod(ema.decay_at(s) for s in range(200))
    assert left == pytest.approx(1 / math.comb(209, 9)) and left < 1e-10  # a fixed 0.999 leaves 0.999**200 = 82 %
    assert torch.allclose(ema.shadow.weight, start * left, atol=1e-12)
    assert plain.decay_at(5) == 0.999


@pytest.fixture(scope="module")
def tiny_run(consep_dir: Path, tmp_path_factory) -> Path:
    """One run of the shipped tiny config, as CI trains it (40 steps)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    code = main(["train", "--config", "tiny", f"data.root={consep_dir}", f"output_dir={out}", "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_tiny_config_loss_goes_down(tiny_run: Path) -> None:
    """The validation loss on a fixed held-out batch (fixed crops, t and noise) falls well below its start."""
    records = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    first, last = evals[0]["eval_mse"], evals[-1]["eval_mse"]
    assert 0.8 < first < 1.2  # an untrained ε-predictor (zero-initialised output) scores about E[ε²] = 1
    assert last < 0.5 * first, [r["eval_mse"] for r in evals]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(train_losses[-3:]) < 0.6 * np.mean(train_losses[:3])


@pytest.mark.slow
def test_tiny_run_outputs(tiny_run: Path) -> None:
    from diffaug.models import SemanticUNet

    model = SemanticUNet.from_pretrained(tiny_run / "model")
    assert model.config.class_scheme == "consep-hovernet" and model.config.num_classes == 5
    assert model.config.class_names[0] == "background" and model.config.image_size == 32
    state = json.loads((tiny_run / "train_state.json").read_text())
    assert state["step"] == 40 and state["world_size"] == 1
    ckpt = load_checkpoint(latest_checkpoint(tiny_run))
    ema = {k: v for k, v in ckpt["ema"].items()}
    for name, tensor in model.state_dict().items():  # the saved model is the EMA, not the raw weights
        assert torch.equal(tensor, ema[name]), name
    assert [s for s, _ in list_checkpoints(tiny_run)] == [30, 40]  # keep: 2 of 25, 30 (stage end), 40
    previews = sorted((tiny_run / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step_0000040.png"]
    from diffaug.data import read_image

    grid = read_image(previews[0])
    assert grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32  # 2 rows x 3 columns
    assert (tiny_run / "config.yaml").is_file()


def test_cli_errors(consep_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--config", "tiny", "data.root=/nonexistent/tiles", f"output_dir={tmp_path / 'a'}"]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", f"data.root={consep_dir}", "train.maxsteps=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.maxsteps'" in err and "did you mean train.max_steps?" in err
    assert main(["train", "--config", "tiny", f"data.root={consep_dir}", "train.max_steps"]) == 2
    assert "bad override 'train.max_steps'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml' not found" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", f"data.root={consep_dir}", "model.image_size=33",
                 f"output_dir={tmp_path / 'b'}"]) == 2
    assert "cannot be divided by the depth" in capsys.readouterr().err


def test_cli_print_config(consep_dir: Path, capsys) -> None:
    import yaml

    assert main(["train", "--config", "tiny", f"data.root={consep_dir}", "train.max_steps=9", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 9 and printed["data"]["root"] == str(consep_dir)


@pytest.mark.slow
def test_ddp_two_cpu_processes(consep_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes on gloo: the run finishes, the ranks end with identical weights, rank 0 writes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffaug", "train", "--config", "tiny", f"data.root={consep_dir}", f"output_dir={out}",
           *SMALL, "train.max_steps=3", "finetune.max_steps=2", "checkpoint.every=2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 5
    digests = state["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt["samples_seen"] == 5 * 2 * 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])  # ranks draw different noise
    assert (out / "model" / "model.safetensors").is_file()
    assert proc.stdout.count("trained 5 steps") == 1  # only rank 0 reports
