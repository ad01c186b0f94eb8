"""``diffaug labels``: the issue's numbers on the shared data, reproducibility, outputs, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffaug.cli import main
from diffaug.data import TileFolder
from diffaug.labels import instance_centroids, instance_types, validate_label_map


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["labels", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def _job(data: Path, out: Path, policy: str, *extra: str) -> Path:
    code, stdout, stderr = _run("--data", data, "--policy", policy, "--out", out, *extra)
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def consep_balance(consep_dir, tmp_path_factory):
    return _job(consep_dir, tmp_path_factory.mktemp("balance") / "out", "balance", "--seed", "0")


@pytest.fixture(scope="module")
def consep_enlarge(consep_dir, tmp_path_factory):
    return _job(consep_dir, tmp_path_factory.mktemp("enlarge") / "out", "enlarge", "--seed", "0")


@pytest.fixture
def small_folder(consep_dir, tmp_path):
    """Six CoNSeP tiles (with 'other' nuclei among them) and the folder's classes.json."""
    folder = tmp_path / "small"
    folder.mkdir()
    for name in ["train_7_007", "train_24_008", "train_10_000", "train_19_008", "train_1_004", "train_8_009"]:
        for ext in ("png", "npz"):
            shutil.copy(consep_dir / f"{name}.{ext}", folder / f"{name}.{ext}")
    shutil.copy(consep_dir / "classes.json", folder / "classes.json")
    return folder


def _pairs(source: Path, out: Path, policy: str):
    """(source tile, output npz arrays) for every source tile, checking the output folder's layout on the way."""
    src, dst = TileFolder(source), TileFolder(out)
    assert dst.names == [f"{name}_{policy}" for name in src.names]
    assert dst.scheme.name == src.scheme.name and not dst.merged  # classes recorded, never merged twice
    first = dst.read(dst.names[0])  # the output is itself a readable tile folder, images included
    assert first.image.shape[:2] == first.inst_map.shape
    for name in src.names:
        assert (out / f"{name}_{policy}.png").read_bytes() == (source / f"{name}.png").read_bytes()
        with np.load(out / f"{name}_{policy}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        yield src.read(name, image=False), arrays


def _check_outputs(source: Path, out: Path, policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate every output against its source; return class counts before/after and nuclei moved."""
    before, after, moved = np.zeros(8, int), np.zeros(8, int), 0
    for src, arrays in _pairs(source, out, policy):
        inst, typ = arrays["inst_map"], arrays.get("type_map")
        num_classes = None if src.type_map is None else 5
        validate_label_map(inst, typ, reference=src.inst_map, source_ids=arrays["source_inst_id"],
                           num_classes=num_classes, where=f"{src.name}_{policy}")
        assert inst.shape == src.inst_map.shape and inst.dtype == np.int32
        centroids = instance_centroids(inst)
        np.testing.assert_array_equal(arrays["inst_centroid"], centroids)
        if src.type_map is not None:
            np.testing.assert_array_equal(arrays["inst_type"], instance_types(inst, typ))
            before += np.bincount(src.inst_type, minlength=8)
            after += np.bincount(arrays["inst_type"], minlength=8)
        shift = centroids - instance_centroids(src.inst_map)[arrays["source_inst_id"] - 1]
        moved += int((np.abs(shift) > 1e-9).any(axis=1).sum())
    return before, after, moved


@pytest.mark.slow
def test_balance_defaults_raise_other_from_under_5_to_at_least_20_percent(consep_dir, consep_balance):
    before, after, _ = _check_outputs(consep_dir, consep_balance, "balance")
    share_before = before[1] / before[1:].sum()
    share_after = after[1] / after[1:].sum()
    assert share_before < 0.05 and share_after >= 0.20, (share_before, share_after)
    assert before.sum() == after.sum()  # one nucleus for one nucleus
    summary = json.loads((consep_balance / "summary.json").read_text())
    assert summary["classes"][0]["before"] == before[1] and summary["classes"][0]["after"] == after[1]
    assert summary["rare_classes"] == [1] and summary["scheme"] == "consep-hovernet"
    records = [json.loads(line) for line in (consep_balance / "records.jsonl").read_text().splitlines()]
    assert len(records) == 432 and all("does not match the edited labels" in r["image"] for r in records)
    assert sum(r["n_replaced"] for r in records) == after[1] - before[1]


@pytest.mark.slow
def test_enlarge_moves_at_least_30_percent_of_the_nuclei(consep_dir, consep_enlarge):
    before, after, moved = _check_outputs(consep_dir, consep_enlarge, "enlarge")
    assert np.array_equal(before, after)
    assert moved / before[1:].sum() >= 0.30
    records = [json.loads(line) for line in (consep_enlarge / "records.jsonl").read_text().splitlines()]
    assert sum(r["n_moved"] for r in records) == moved


@pytest.mark.slow
def test_enlarge_works_on_the_instance_only_monuseg_folder(monuseg_dir, tmp_path):
    out = _job(monuseg_dir, tmp_path / "out", "enlarge", "--seed", "1")
    assert not TileFolder(out).has_classes
    _, _, moved = _check_outputs(monuseg_dir, out, "enlarge")
    assert len(list(out.glob("*.npz"))) == 14 and moved > 0.3 * 6697


def test_same_seed_same_bytes_other_seed_other_maps(small_folder, tmp_path):
    for policy in ("balance", "enlarge"):
        a = _job(small_folder, tmp_path / f"a_{policy}", policy, "--seed", "3", "--preview")
        b = _job(small_folder, tmp_path / f"b_{policy}", policy, "--seed", "3", "--preview")
        c = _job(small_folder, tmp_path / f"c_{policy}", policy, "--seed", "4")
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert len(files) == 6 * 3 + 3 + 1  # npz + png + preview per tile, classes/records/summary, chart
        for rel in files:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in files if rel.suffix == ".npz")
        _check_outputs(small_folder, a, policy)


def test_preview_and_printed_summary(small_folder, tmp_path):
    code, stdout, _ = _run("--data", small_folder, "--policy", "balance", "--out", tmp_path / "o", "--preview",
                           "--rare-classes", "1", "--ratio", "0.5")
    assert code == 0
    assert "1 other" in stdout and "nuclei replaced" in stdout and str((tmp_path / "o").resolve()) in stdout
    image = np.asarray(__import__("cv2").imread(str(tmp_path / "o" / "preview" / "train_7_007_balance.png")))
    assert image.shape == (256, 2 * 256 + 4, 3)
    assert (image[:, :256] != image[:, 260:]).any()  # the edit shows
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["options"] == {"ratio": 0.5, "rare_classes": [1]}


def test_default_data_is_the_shipped_sample_tiles(tmp_path):
    code, stdout, _ = _run("--policy", "enlarge", "--out", tmp_path / "demo")
    assert code == 0 and "sample tiles" in stdout
    assert len(list((tmp_path / "demo").glob("*_enlarge.npz"))) == 4


# ---- bad input: each a clear error naming the file or flag, and nothing left behind ------------------------------

def _fails(tmp_path: Path, *argv: str, match: str | tuple[str, ...]) -> str:
    """Run, expect exit 2 with every ``match`` text in the message, and no change under ``tmp_path``."""
    before = sorted(tmp_path.rglob("*"))
    code, _, stderr = _run(*argv)
    assert code == 2, stderr
    for text in (match,) if isinstance(match, str) else match:
        assert text in stderr, stderr
    assert sorted(tmp_path.rglob("*")) == before  # no output, no staging folder, no created parents
    return stderr


def test_output_folder_not_empty(small_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _fails(tmp_path, "--data", small_folder, "--policy", "enlarge", "--out", tmp_path / "out",
           match="exists and is not an empty folder")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, "--data", tmp_path / "empty", "--policy", "enlarge", "--out", tmp_path / "new" / "out",
           match="no tiles found")


@pytest.mark.parametrize("policy", ["balance", "enlarge"])
def test_corrupt_npz_late_in_the_folder(small_folder, tmp_path, policy):
    (small_folder / "zz_last.npz").write_bytes(b"not a zip file")
    shutil.copy(small_folder / "train_7_007.png", small_folder / "zz_last.png")
    stderr = _fails(tmp_path, "--data", small_folder, "--policy", policy, "--out", tmp_path / "a" / "b" / "out",
                    match="zz_last.npz: corrupt or unreadable")
    assert "regenerate or remove" in stderr


def test_corrupt_png(small_folder, tmp_path):
    (small_folder / "train_8_009.png").write_bytes(b"\x89PNG broken")
    _fails(tmp_path, "--data", small_folder, "--policy", "enlarge", "--out", tmp_path / "out",
           match="train_8_009.png: not a readable image")


def _set_type(arrays, value):
    arrays["type_map"][arrays["inst_map"] == 5] = value


def _float_inst(arrays):
    arrays["inst_map"] = arrays["inst_map"].astype(np.float32)


@pytest.mark.parametrize("tile, corrupt, policy, match", [
    ("train_1_004", lambda a: _set_type(a, 0), "balance",
     "train_1_004.npz: type_map and inst_map foregrounds disagree"),
    ("train_1_004", lambda a: _set_type(a, 9), "enlarge", ("train_1_004.npz", "type_map has class 9")),
    ("train_24_008", _float_inst, "enlarge", "train_24_008.npz: inst_map must hold integers"),
], ids=["type-instance-mismatch", "class-out-of-range", "wrong-dtype"])
def test_bad_maps_in_a_tile(small_folder, tmp_path, tile, corrupt, policy, match):
    with np.load(small_folder / f"{tile}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    corrupt(arrays)
    np.savez(small_folder / f"{tile}.npz", **arrays)
    _fails(tmp_path, "--data", small_folder, "--policy", policy, "--out", tmp_path / "out", match=match)


def test_balance_on_an_instance_only_folder(monuseg_dir, tmp_path):
    _fails(tmp_path, "--data", monuseg_dir, "--policy", "balance", "--out", tmp_path / "out",
           match="instance-only folder (no classes.json / type maps); balancing needs classes. Use --policy enlarge")


@pytest.mark.parametrize("argv, match", [
    (["--target-distribution", "1=0.5,2=0.2,3=0.2,4=0.2"], "shares must be >= 0 and sum to 1"),
    (["--target-distribution", "1=0.5,2=0.5"], "no share for classes [3, 4]"),
    (["--target-distribution", "one half"], "--target-distribution: expected CLASS=SHARE"),
    (["--rare-classes", "9"], "rare_classes must be distinct classes in 1..4"),
    (["--ratio", "2"], "ratio must be in [0, 1]"),
    (["--fraction", "0.3"], "--fraction: not options of --policy balance"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--classes", "pannuke"], ("small", "'pannuke'")),
])
def test_bad_flags(small_folder, tmp_path, argv, match):
    _fails(tmp_path, "--data", small_folder, "--policy", "balance", "--out", tmp_path / "out", *argv, match=match)


def test_bad_enlarge_flags(small_folder, tmp_path):
    _fails(tmp_path, "--data", small_folder, "--policy", "enlarge", "--out", tmp_path / "out", "--shift-range", "3",
           match="--shift-range: expected MIN,MAX")
    _fails(tmp_path, "--data", small_folder, "--policy", "enlarge", "--out", tmp_path / "out", "--shift-range",
           "0,0", match="shift_range must be whole pixels")


def test_subcommand_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["labels", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--policy {balance,enlarge}" in out and "--target-distribution" in out and "--shift-range" in out
