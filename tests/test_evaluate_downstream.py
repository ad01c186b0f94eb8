"""`diffaug evaluate downstream`: arms, seeds, outputs, resume, and its bad-input errors (CLI, real tiles)."""

from __future__ import annotations

import json
import shutil

import pytest

from diffaug.cli import main
from diffaug.errors import ConfigError
from diffaug.evaluation.downstream import parse_arms, summarise


def _run(*args: str) -> int:
    return main(["evaluate", "downstream", *args, "--no-progress"])


def test_parse_arms():
    assert parse_arms("real, gradmix") == ["real", "gradmix"]
    with pytest.raises(ConfigError, match="unknown arm\\(s\\) diffmix-bogus .* known arms: real, gradmix"):
        parse_arms("real,diffmix-bogus")
    with pytest.raises(ConfigError, match="twice"):
        parse_arms("real,real")
    with pytest.raises(ConfigError, match="empty"):
        parse_arms(" , ")


def test_summarise_mean_and_sample_std():
    runs = [{"dice": 0.5, "pq": 0.2, "f1_per_class": {"1": 0.1}}, {"dice": 0.7, "pq": 0.4, "f1_per_class": {"1": 0.3}}]
    out = summarise(runs)
    assert out["mean"]["dice"] == pytest.approx(0.6) and out["std"]["dice"] == pytest.approx(0.1414213562)
    assert out["mean"]["f1_class_1"] == pytest.approx(0.2)
    assert summarise(runs[:1])["std"]["pq"] == 0.0


def test_smoke_real_and_gradmix_end_to_end(consep_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["--smoke", "--data", str(consep_dir), "--val-images", "2", "--arms", "real,gradmix",
            "--max-train-tiles", "4", "--out", str(out)]
    assert _run(*args) == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["arms"]) == ["real", "gradmix"]
    for arm in ("real", "gradmix"):
        res = report["arms"][arm]
        assert len(res["runs"]) == 2 and {r["seed"] for r in res["runs"]} == {0, 1}
        assert {"dice", "aji", "pq", "f1_detection", "f1_class_1"} <= set(res["mean"])
    assert report["arms"]["real"]["n_synthetic"] == 0 and report["arms"]["gradmix"]["n_synthetic"] >= 1
    table = (out / "results.md").read_text()
    assert "| gradmix | 4 + " in table and "F1 other" in table and " ± " in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Train and test tiles come from different source images.
    job = report["job"]
    assert not {t.rsplit("_", 1)[0] for t in job["train_tiles"]} & {t.rsplit("_", 1)[0] for t in job["test_tiles"]}
    # Rerunning resumes (nothing is retrained) ...
    before = (out / "runs" / "real-seed0.json").stat().st_mtime_ns
    assert _run(*args) == 0
    assert (out / "runs" / "real-seed0.json").stat().st_mtime_ns == before
    assert "resuming" in capsys.readouterr().out
    # ... and a different job in the same folder is refused.
    assert _run(*args[:-2], "--seed", "5", "--out", str(out)) == 2
    assert "holds a different downstream job" in capsys.readouterr().err


def test_separate_test_folder(consep_dir, tmp_path):
    test = tmp_path / "test"
    test.mkdir()
    shutil.copy(consep_dir / "classes.json", test)
    for name in ("train_1_005", "train_2_006"):
        for ext in ("png", "npz"):
            shutil.copy(consep_dir / f"{name}.{ext}", test)
    out = tmp_path / "ds"
    assert _run("--smoke", "--data", str(consep_dir), "--test-data", str(test), "--arms", "real", "--seeds", "1",
                "--out", str(out)) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["job"]["test_tiles"] == ["train_1_005", "train_2_006"] and len(report["arms"]["real"]["runs"]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--arms", "real,bogus"], "unknown arm(s) bogus"),
    (["--arms", "real", "--val-images", "27"], "--val-images 27 is too large"),
    (["--arms", "real,diffmix-enlarge"], "pass --weights"),
    (["--arms", "real", "--seeds", "0"], "--seeds must be >= 1"),
    (["--arms", "real", "--channels", "8,x"], "--channels must be comma-separated integers"),
])
def test_bad_arguments(consep_dir, tmp_path, capsys, extra, message):
    args = ["--smoke", "--data", str(consep_dir), "--out", str(tmp_path / "o")]
    assert _run(*args, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_test_folder_without_classes_is_refused_for_per_class_f1(consep_dir, monuseg_dir, tmp_path, capsys):
    assert _run("--smoke", "--data", str(consep_dir), "--test-data", str(monuseg_dir), "--arms", "real",
                "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "per-class F1 needs class labels" in err and "instance-only" in err


def test_instance_only_data_cannot_balance(monuseg_dir, tmp_path, capsys):
    assert _run("--smoke", "--data", str(monuseg_dir), "--val-images", "2", "--arms", "real,gradmix",
                "--out", str(tmp_path / "o")) == 2
    assert "has no classes" in capsys.readouterr().err
