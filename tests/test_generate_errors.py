"""diffaug generate: bad input fails up front with a message that names the problem, and writes nothing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from diffaug.errors import ConfigError, DataFormatError, InvalidInputError, MissingExtraError, WeightsError
from diffaug.generate import GenerateOptions, builtin_weights, generate
from diffaug import hub as hub_module
from test_generate import FAST, TILES, fixture_model, small_data  # noqa: F401  (fixtures)


def opts(out: Path, data: Path, model: Path | str, **kw) -> GenerateOptions:
    return GenerateOptions(**{"out": out, "data": data, "weights": str(model), "device": "cpu", "progress": False,
                              "limit": 1, **FAST, **kw})


def test_data_folder_without_tiles(tmp_path: Path, fixture_model: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no tiles here")
    with pytest.raises(DataFormatError, match="no tiles found"):
        generate(opts(tmp_path / "out", empty, fixture_model))
    assert not (tmp_path / "out").exists()


def test_output_folder_holding_a_different_job(tmp_path: Path, small_data: Path, fixture_model: Path):
    out = tmp_path / "out"
    first = opts(out, small_data, fixture_model, num_inference_steps=2)
    generate(first)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"different generation job \(seed: 0 there, 1 now\)"):
        generate(GenerateOptions(**{**first.__dict__, "seed": 1}))
    other_data = tmp_path / "other_data"
    shutil.copytree(small_data, other_data)
    (other_data / f"{TILES[-1]}.png").unlink()
    (other_data / f"{TILES[-1]}.npz").unlink()
    with pytest.raises(ConfigError, match=r"data\.sha256: .* data\.tiles: 3 there, 2 now"):
        generate(GenerateOptions(**{**first.__dict__, "data": other_data}))
    other_weights = tmp_path / "other_weights"
    shutil.copytree(fixture_model, other_weights)
    from safetensors.torch import load_file, save_file

    state = load_file(other_weights / "model.safetensors")
    state["out.2.bias"] = state["out.2.bias"] + 1
    save_file(state, other_weights / "model.safetensors")
    with pytest.raises(ConfigError, match=r"weights\.sha256"):
        generate(GenerateOptions(**{**first.__dict__, "weights": str(other_weights)}))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched


def test_output_folder_with_foreign_files(tmp_path: Path, small_data: Path, fixture_model: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"important")
    with pytest.raises(ConfigError, match="not a `diffaug generate` output"):
        generate(opts(out, small_data, fixture_model))
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]


def test_unknown_weights(tmp_path: Path, small_data: Path):
    with pytest.raises(WeightsError, match="no such folder"):
        generate(opts(tmp_path / "out", small_data, "./no-such-model"))
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(WeightsError, match="not a diffaug model folder"):
        generate(opts(tmp_path / "out", small_data, not_a_model))
    assert not (tmp_path / "out").exists()


def test_builtin_weights_found_in_order_or_a_clear_error(tmp_path: Path, fixture_model: Path, monkeypatch):
    installed, checkout = tmp_path / "installed", tmp_path / "checkout"
    monkeypatch.setattr(hub_module, "_builtin_candidates", lambda: [installed, checkout])
    with pytest.raises(WeightsError, match=r"built-in checkpoint was not found .*installed.*checkout.*--weights"):
        builtin_weights()
    shutil.copytree(fixture_model, checkout)
    assert builtin_weights() == checkout
    shutil.copytree(fixture_model, installed)
    assert builtin_weights() == installed  # the installed package comes first


def test_builtin_candidates_look_in_the_package_then_the_checkout():
    import diffaug

    package = Path(diffaug.__file__).resolve().parent
    candidates = hub_module._builtin_candidates()
    # (an editable install maps the package diffaug.checkpoints onto the checkout's folder, so that one may come first)
    assert package.parent / "checkpoints" / "builtin" in candidates
    assert package / "checkpoints" / "builtin" in candidates


def test_ray_engine_without_the_extra(tmp_path: Path, small_data: Path, fixture_model: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, whether or not ray is installed
    with pytest.raises(MissingExtraError, match=r"pip install 'diffaug\[ray\]'"):
        generate(opts(tmp_path / "out", small_data, fixture_model, engine="ray"))
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda(tmp_path: Path, small_data: Path, fixture_model: Path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        generate(opts(tmp_path / "out", small_data, fixture_model, device="cuda"))
    assert not (tmp_path / "out").exists()


def test_tile_smaller_than_the_model(tmp_path: Path, small_data: Path, fixture_model: Path):
    from diffaug.data.tiles import read_image, read_label_npz, write_tile

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    arrays = read_label_npz(data / f"{TILES[1]}.npz")
    from diffaug.labels.instances import relabel_sequential

    write_tile(data, TILES[1], inst_map=relabel_sequential(arrays["inst_map"][:48]), type_map=arrays["type_map"][:48],
               image=read_image(data / f"{TILES[1]}.png")[:48])
    with pytest.raises(InvalidInputError, match=rf"tile '{TILES[1]}' is 48×96 px, smaller than the model's 64×64"):
        generate(opts(tmp_path / "out", data, fixture_model))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"per_tile": 0}, "--per-tile must be an integer >= 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "--batch-size must be an integer >= 1, got 2.5"),
    ({"limit": -3}, "--limit must be an integer >= 1, got -3"),
    ({"seed": -1}, "--seed must be an integer >= 0"),
    ({"strength": 1.5}, "--strength 1.5"),
    ({"policy": "mix"}, "--policy must be one of balance, enlarge, both"),
    ({"workers": 2}, "--ray-address and --workers apply to --engine ray only"),
    ({"balance": {"ratio": 2.0}}, "ratio must be in"),
    ({"balance": {"colour": 1}}, "balance options: .*colour"),
    ({"policy": "enlarge", "balance": {"ratio": 0.5}}, "balance options .* given, but --policy is enlarge"),
])
def test_bad_flags(tmp_path: Path, small_data: Path, fixture_model: Path, change: dict, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        generate(opts(tmp_path / "out", small_data, fixture_model, **change))
    assert not (tmp_path / "out").exists()


def test_instance_only_data_with_a_class_model(tmp_path: Path, monuseg_dir: Path, fixture_model: Path):
    with pytest.raises(ConfigError, match="instance-only tiles"):
        generate(opts(tmp_path / "out", monuseg_dir, fixture_model))


def test_data_in_another_class_scheme(tmp_path: Path, small_data: Path, fixture_model: Path):
    with pytest.raises(ConfigError, match="read in classes 'consep'.*--classes consep-hovernet"):
        generate(opts(tmp_path / "out", small_data, fixture_model, classes="raw"))


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, small_data: Path, fixture_model: Path, capsys):
    from diffaug.cli import main

    code = main(["generate", "--out", str(tmp_path / "out"), "--data", str(small_data), "--weights",
                 str(fixture_model), "--batch-size", "0"])
    assert code == 2
    assert "diffaug generate: error: --batch-size must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--out", str(tmp_path / "out"), "--shift-range", "one,two"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_bad_mpp_in_classes_json(tmp_path: Path, small_data: Path, fixture_model: Path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    classes = json.loads((data / "classes.json").read_text())
    classes["mpp"] = "0.25 um"
    (data / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(DataFormatError, match="'mpp' must be a positive number"):
        generate(opts(tmp_path / "out", data, fixture_model))
    assert not (tmp_path / "out").exists()


def test_temporaries_of_a_killed_run_are_not_foreign_files(tmp_path: Path, small_data: Path, fixture_model: Path):
    """Killed while writing job.json, a run leaves only a temporary file: the rerun starts the job. Temporaries a
    kill leaves inside a job's folders are removed by the next run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".job.json.k2j4x1.tmp").write_bytes(b'{"diffaug_gen')
    first = opts(out, small_data, fixture_model, num_inference_steps=2)
    result = generate(first)
    assert result.generated == 1 and not result.resumed
    (out / "tiles" / ".x_000.png.9a8b.tmp").write_bytes(b"\x89PNG")
    (out / "records" / ".x_000.json.77aa.tmp").write_bytes(b"{")
    assert generate(first).resumed
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
