"""Converter from original SDM/DiffMix checkpoints (`diffaug convert --from-sdm`) and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffaug.cli import main
from diffaug.errors import ConfigError, DataFormatError, WeightsError
from diffaug.models import SemanticUNet, convert_sdm_checkpoint
from diffaug.models.convert import config_from_sdm_flags, load_sdm_flags


@pytest.fixture(scope="module")
def flags(sdm_fixture_dir: Path) -> dict:
    return load_sdm_flags(sdm_fixture_dir / "config.json")


@pytest.fixture(scope="module")
def original_state(sdm_fixture_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(sdm_fixture_dir / "state_dict.pt", weights_only=True)


def test_cli_converts_safetensors_and_the_result_has_parity(sdm_fixture_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    rc = main(["convert", "--from-sdm", str(sdm_fixture_dir / "state_dict.safetensors"),
               "--config", str(sdm_fixture_dir / "config.json"), "--out", str(out), "--class-scheme",
               "consep-hovernet"])
    assert rc == 0
    assert "2,549,414 parameters" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
    assert config["diffusion"] == {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["converted_from"] == "state_dict.safetensors"

    # The converted model holds the original tensors bit for bit (parity of its outputs: tests/test_model.py).
    model = SemanticUNet.from_pretrained(out)
    original = torch.load(sdm_fixture_dir / "state_dict.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    cases = np.load(sdm_fixture_dir / "model_cases.npz")
    expected = torch.from_numpy(cases["out"][:1])
    with torch.no_grad():
        got = model(*(torch.from_numpy(cases[k][:1]) for k in ("x", "timesteps", "y")))
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())

    # A second conversion into the same folder is refused unless asked for.
    rc = main(["convert", "--from-sdm", str(sdm_fixture_dir / "state_dict.pt"), "--config",
               str(sdm_fixture_dir / "config.json"), "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--from-sdm", str(sdm_fixture_dir / "state_dict.pt"), "--config",
                 str(sdm_fixture_dir / "config.json"), "--out", str(out), "--overwrite"]) == 0


def test_pt_and_safetensors_convert_to_identical_weights(sdm_fixture_dir: Path, flags: dict, tmp_path: Path) -> None:
    a = convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", flags, tmp_path / "a")
    b = convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.safetensors", flags, tmp_path / "b")
    sa, sb = SemanticUNet.from_pretrained(a).state_dict(), SemanticUNet.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_flags_mapping(flags: dict) -> None:
    config = config_from_sdm_flags(flags)
    assert (config.image_size, config.model_channels, config.channel_mult, config.num_res_blocks) == (64, 32, (2, 1), 1)
    assert config.attention_resolutions == (32,) and config.num_head_channels == 16 and config.label_nc == 6
    # argparse-style strings are read like the original's str2bool / int parsing; an empty channel_mult takes the
    # original default of the image size.
    stringly = {**flags, "learn_sigma": "True", "num_channels": "32", "attention_resolutions": "32,"}
    assert config_from_sdm_flags(stringly) == config
    assert config_from_sdm_flags({**flags, "image_size": 256, "channel_mult": ""}).channel_mult == (1, 1, 2, 2, 4, 4)


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("use_new_attention_order", True, "only the legacy QKV order"),
    ("learn_sigma", False, "6 channels"),
    ("resblock_updown", False, "resampling"),
    ("class_cond", False, "unconditional"),
    ("predict_xstart", True, "predict ε"),
    ("num_res_blocks", "two", "must be an integer"),
])
def test_unsupported_or_invalid_flags(flags: dict, flag: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_sdm_flags({**flags, flag: value})


def test_missing_flag_and_invalid_architecture(flags: dict) -> None:
    with pytest.raises(ConfigError, match=r"missing original SDM flag\(s\) \['num_head_channels'\]"):
        config_from_sdm_flags({k: v for k, v in flags.items() if k != "num_head_channels"})
    with pytest.raises(ConfigError, match="image_size 66 cannot be divided"):
        config_from_sdm_flags({**flags, "image_size": 66, "channel_mult": "2,1,1", "attention_resolutions": "33"})


def test_wrong_label_nc(sdm_fixture_dir: Path, flags: dict, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"label_nc=6 channels, but the flags give num_classes=4"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", {**flags, "num_classes": 4}, tmp_path / "o")
    with pytest.raises(WeightsError, match=r"label_nc=6.*= 5; fix num_classes or no_instance"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", {**flags, "no_instance": True}, tmp_path / "o")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_flags_that_disagree_with_the_weights(sdm_fixture_dir: Path, flags: dict, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"missing key.*unexpected key.*do not describe this checkpoint"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", {**flags, "num_res_blocks": 2}, tmp_path / "o")
    with pytest.raises(WeightsError, match=r"shape mismatch.*time_embed\.0\.weight: weights \(128, 32\) vs config "
                                           r"\(256, 64\)"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", {**flags, "num_channels": 64}, tmp_path / "o")


def test_extra_or_missing_keys(original_state: dict, flags: dict, tmp_path: Path) -> None:
    extra = {**original_state, "label_emb.weight": torch.zeros(5, 128)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\): label_emb\.weight"):
        convert_sdm_checkpoint(tmp_path / "extra.pt", flags, tmp_path / "o")
    torch.save({k: v for k, v in original_state.items() if k != "out.2.bias"}, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): out\.2\.bias"):
        convert_sdm_checkpoint(tmp_path / "missing.pt", flags, tmp_path / "o")


def test_corrupt_checkpoints(sdm_fixture_dir: Path, flags: dict, tmp_path: Path) -> None:
    data = (sdm_fixture_dir / "state_dict.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not safetensors" * 10)
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
            convert_sdm_checkpoint(tmp_path / name, flags, tmp_path / "o")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        convert_sdm_checkpoint(tmp_path / "garbage.safetensors", flags, tmp_path / "o")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "training.pt")
    with pytest.raises(WeightsError, match="not a bare state dict"):
        convert_sdm_checkpoint(tmp_path / "training.pt", flags, tmp_path / "o")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="expected a state dict"):
        convert_sdm_checkpoint(tmp_path / "list.pt", flags, tmp_path / "o")
    with pytest.raises(WeightsError, match="checkpoint not found"):
        convert_sdm_checkpoint(tmp_path / "absent.pt", flags, tmp_path / "o")


def test_bad_flags_file(sdm_fixture_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "flags.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", tmp_path / "flags.json", tmp_path / "o")
    with pytest.raises(DataFormatError, match="flags file not found"):
        convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", tmp_path / "nope.json", tmp_path / "o")
    rc = main(["convert", "--from-sdm", str(sdm_fixture_dir / "state_dict.pt"), "--config",
               str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "flags file not found" in capsys.readouterr().err
