"""SemanticUNet: parity with the original SDM/DiffMix code, fast-path hooks, persistence, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug.errors import ConfigError, InvalidInputError, WeightsError
from diffaug.models import SemanticCondition, SemanticUNet, SemanticUNetConfig, convert_sdm_checkpoint

TINY = dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_classes=3, num_res_blocks=1,
            attention_resolutions=(16,), num_head_channels=32, spade_hidden=16)


@pytest.fixture(scope="module")
def fixture_model_dir(sdm_fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", sdm_fixture_dir / "config.json",
                                  tmp_path_factory.mktemp("sdm") / "model")


@pytest.fixture(scope="module")
def fixture_model(fixture_model_dir: Path) -> SemanticUNet:
    return SemanticUNet.from_pretrained(fixture_model_dir)


@pytest.fixture(scope="module")
def cases(sdm_fixture_dir: Path) -> dict[str, torch.Tensor]:
    z = np.load(sdm_fixture_dir / "model_cases.npz")
    return {k: torch.from_numpy(z[k]) for k in ("x", "timesteps", "y", "out")}


@pytest.fixture(scope="module")
def small(cases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Three cases cropped to 32 px (the model takes any size its depth divides): quick checks of equalities."""
    crop = (slice(0, 3), slice(None), slice(16, 48), slice(16, 48))
    return {"x": cases["x"][crop], "timesteps": cases["timesteps"][:3], "y": cases["y"][crop]}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- parity ------------------------------------------------------------------------------------------------------------


def test_parity_with_original_model_cases(fixture_model: SemanticUNet, cases: dict[str, torch.Tensor]) -> None:
    """Every case of model_cases.npz within 1e-4 x max|out| (float32, CPU), case by case."""
    expected = cases["out"]
    tolerance = 1e-4 * float(expected.abs().max())
    with torch.no_grad():
        out = fixture_model(cases["x"], cases["timesteps"], cases["y"])
    assert out.shape == expected.shape == (7, 6, 64, 64)
    per_case = (out - expected).abs().amax(dim=(1, 2, 3))
    assert (per_case <= tolerance).all(), per_case
    # The conditional and null outputs of the same x and t differ a lot, so the condition really is used.
    assert float((out[3] - out[4]).abs().max()) > 1.0


def test_names_and_count_equal_the_original_state_dict(fixture_model: SemanticUNet, sdm_fixture_dir: Path) -> None:
    original = torch.load(sdm_fixture_dir / "state_dict.pt", weights_only=True)
    ours = fixture_model.state_dict()
    assert list(ours) == list(original)  # same names, same order: a rename-free strict load
    assert all(ours[k].shape == v.shape for k, v in original.items())
    assert fixture_model.num_parameters() == 2_549_414


def test_a_small_weight_change_breaks_parity(fixture_model_dir: Path, cases: dict[str, torch.Tensor]) -> None:
    """The parity tolerance is tight enough to see a 0.1 % change of one SPADE γ conv (the fixture's own check)."""
    model = SemanticUNet.from_pretrained(fixture_model_dir)
    with torch.no_grad():
        model.output_blocks[1][0].in_norm.mlp_gamma.weight.mul_(1.001)
        out = model(cases["x"], cases["timesteps"], cases["y"])
    assert float((out - cases["out"]).abs().max()) > 1e-4 * float(cases["out"].abs().max())


# -- fast-path hooks -------------------------------------------------------------------------------------------------


def test_precomputed_condition_equals_plain_forward(fixture_model: SemanticUNet,
                                                    small: dict[str, torch.Tensor]) -> None:
    x, t, y = small["x"], small["timesteps"], small["y"]
    with torch.no_grad():
        plain = fixture_model(x, t, y)
        cond = fixture_model.precompute_condition(y)
        cached = fixture_model(x, t, cond=cond)
        h, skips, emb = fixture_model.encode(x, t)
        split = fixture_model.decode(h, skips, emb, cond)
    assert _rel_err(cached, plain) <= 1e-5
    assert _rel_err(split, plain) <= 1e-5
    assert cond.batch_size == 3 and cond.size == (32, 32)
    assert cond.nbytes == 3 * 4 * fixture_model.condition_numel(32, 32)


def test_shared_encoder_guidance_batch_equals_two_plain_passes(fixture_model: SemanticUNet,
                                                               small: dict[str, torch.Tensor]) -> None:
    """Classifier-free guidance: one encoder pass, one decoder pass of batch 2B = conditional + null forwards."""
    x, t, y = small["x"][:3], small["timesteps"][:3], small["y"][:3]
    null_y = torch.zeros_like(y)
    with torch.no_grad():
        plain_cond = fixture_model(x, t, y)
        plain_null = fixture_model(x, t, null_y)
        cond = fixture_model.precompute_condition(y)
        null = fixture_model.precompute_condition(null_y[:1]).expand(3)
        h, skips, emb = fixture_model.encode(x, t)
        both = fixture_model.decode(torch.cat([h, h]), [torch.cat([s, s]) for s in skips], torch.cat([emb, emb]),
                                    SemanticCondition.cat([cond, null]))
    assert _rel_err(both[:3], plain_cond) <= 1e-5
    assert _rel_err(both[3:], plain_null) <= 1e-5


def test_null_condition_modulation_is_not_zero(fixture_model: SemanticUNet) -> None:
    null = fixture_model.precompute_condition(torch.zeros(1, 6, 64, 64))
    gamma, beta = null.modulation["middle_block.0.in_norm"]
    assert gamma.shape == beta.shape == (1, 32, 32, 32)  # 32 channels at 32 px: the fixture model's middle block
    assert float(gamma.detach().abs().max()) > 0 and float(beta.detach().abs().max()) > 0


def test_condition_helpers_validate(fixture_model: SemanticUNet, small: dict[str, torch.Tensor]) -> None:
    cond = fixture_model.precompute_condition(small["y"][:2])
    with pytest.raises(InvalidInputError, match="batch size 1"):
        cond.expand(4)
    with pytest.raises(InvalidInputError, match="cond was computed for 2"):
        fixture_model(small["x"][:3], small["timesteps"][:3], cond=cond)
    with pytest.raises(InvalidInputError, match="exactly one"):
        fixture_model(small["x"][:2], small["timesteps"][:2], small["y"][:2], cond=cond)
    with pytest.raises(InvalidInputError, match="exactly one"):
        fixture_model(small["x"][:2], small["timesteps"][:2])
    assert cond.to(torch.float64).modulation["middle_block.0.in_norm"][0].dtype == torch.float64


# -- numerics and training -------------------------------------------------------------------------------------------


def test_channels_last_and_bfloat16(fixture_model_dir: Path, small: dict[str, torch.Tensor]) -> None:
    x, t, y = small["x"][:2], small["timesteps"][:2], small["y"][:2]
    model = SemanticUNet.from_pretrained(fixture_model_dir)
    with torch.no_grad():
        reference = model(x, t, y)
        model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last), t, y)
        bf16 = SemanticUNet.from_pretrained(fixture_model_dir, dtype=torch.bfloat16)(x, t, y)
    assert _rel_err(cl, reference) <= 1e-5
    assert bf16.dtype == torch.bfloat16
    assert float((bf16.float() - reference).abs().mean()) < 0.05  # bf16 keeps ~3 significant digits


def test_every_parameter_gets_a_gradient(fixture_model_dir: Path, small: dict[str, torch.Tensor]) -> None:
    model = SemanticUNet.from_pretrained(fixture_model_dir).train()
    out = model(small["x"][:1], small["timesteps"][:1], small["y"][:1])
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_fresh_model_zero_initialises_last_convs() -> None:
    model = SemanticUNet(SemanticUNetConfig(**TINY))
    zeroed = [n for n, p in model.named_parameters() if not p.abs().sum() > 0]
    assert "out.2.weight" in zeroed and "middle_block.1.proj_out.weight" in zeroed
    assert "output_blocks.0.0.out_layers.2.weight" in zeroed and "input_blocks.1.0.out_layers.3.weight" in zeroed
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]), torch.zeros(2, 4, 32, 32))
    assert out.shape == (2, 6, 32, 32) and float(out.abs().max()) == 0.0


# -- persistence -----------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="glysac-3.*4 classes"):
        SemanticUNetConfig(**TINY, class_scheme="glysac-3")  # TINY has num_classes=3
    config = SemanticUNetConfig(**{**TINY, "num_classes": 4}, class_scheme="glysac-3",
                                class_names=("background", "other", "lymphocyte", "epithelial"))
    with pytest.raises(ConfigError, match="class_names must list 4 names"):
        replace(config, class_names=("background", "other"))
    model = SemanticUNet(config)
    torch.nn.init.normal_(model.out[2].weight)  # a non-zero output, so the comparison means something
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == "SemanticUNet" and "_diffaug_version" in saved
    assert saved["diffusion"] == {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    assert saved["class_scheme"] == "glysac-3" and saved["channel_mult"] == [1, 2]
    loaded = SemanticUNet.from_pretrained(tmp_path / "m")
    assert loaded.config == config and not loaded.training
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.zeros(1, 5, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))


# -- bad input -------------------------------------------------------------------------------------------------------


def test_timesteps_out_of_range_or_float(fixture_model: SemanticUNet, small: dict[str, torch.Tensor]) -> None:
    x, y = small["x"][:2], small["y"][:2]
    for bad in ([0, 1000], [-1, 5]):
        with pytest.raises(InvalidInputError, match=r"0\.\.999"):
            fixture_model(x, torch.tensor(bad), y)
    with pytest.raises(InvalidInputError, match="integer"):
        fixture_model(x, torch.tensor([1.0, 2.0]), y)
    with pytest.raises(InvalidInputError, match=r"shape \(2,\)"):
        fixture_model(x, torch.tensor(5), y)


def test_y_with_wrong_channels_or_size(fixture_model: SemanticUNet, small: dict[str, torch.Tensor]) -> None:
    x, t = small["x"][:2], small["timesteps"][:2]
    with pytest.raises(InvalidInputError, match=r"5 channels.*label_nc=6 \(5 one-hot classes \+ 1 instance edge"):
        fixture_model(x, t, torch.zeros(2, 5, 32, 32))
    with pytest.raises(InvalidInputError, match="same size"):
        fixture_model(x, t, torch.zeros(2, 6, 16, 16))
    with pytest.raises(InvalidInputError, match="label_nc=6"):
        fixture_model.precompute_condition(torch.zeros(2, 7, 64, 64))


def test_x_with_wrong_channels_or_size(fixture_model: SemanticUNet) -> None:
    t = torch.tensor([1])
    with pytest.raises(InvalidInputError, match=r"\(B, 3, H, W\)"):
        fixture_model(torch.zeros(1, 4, 64, 64), t, torch.zeros(1, 6, 64, 64))
    with pytest.raises(InvalidInputError, match="multiples of 2"):
        fixture_model(torch.zeros(1, 3, 63, 64), t, torch.zeros(1, 6, 63, 64))
    with pytest.raises(InvalidInputError, match="floating-point"):
        fixture_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), t, torch.zeros(1, 6, 64, 64))


def test_config_errors_at_construction() -> None:
    with pytest.raises(ConfigError, match="image_size 100 cannot be divided by the depth.*multiple of 8"):
        SemanticUNetConfig(**{**TINY, "image_size": 100, "channel_mult": (1, 1, 2, 2)})
    with pytest.raises(ConfigError, match="divisible by 32"):
        SemanticUNetConfig(**{**TINY, "model_channels": 48})
    with pytest.raises(ConfigError, match=r"attention_resolutions \[4\] are not feature sizes"):
        SemanticUNetConfig(**{**TINY, "attention_resolutions": (16, 4)})
    with pytest.raises(ConfigError, match="num_head_channels"):
        SemanticUNetConfig(**{**TINY, "num_head_channels": 24})
    with pytest.raises(ConfigError, match="num_classes must be an integer"):
        SemanticUNetConfig(**{**TINY, "num_classes": True})


def test_config_json_is_strict(tmp_path: Path) -> None:
    model = SemanticUNet(SemanticUNetConfig(**TINY))
    folder = model.save_pretrained(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "use_fp16": True}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['use_fp16'\]"):
        SemanticUNet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "model_channels"}))
    with pytest.raises(ConfigError, match="missing required key.*model_channels"):
        SemanticUNet.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SemanticUNet.from_pretrained(folder)


def test_weights_that_disagree_with_config(tmp_path: Path) -> None:
    folder = SemanticUNet(SemanticUNetConfig(**TINY)).save_pretrained(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "num_classes": 4}))  # label_nc 5 vs weights' 4
    with pytest.raises(WeightsError, match=r"shape mismatch.*mlp_shared\.0\.weight"):
        SemanticUNet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**data, "num_res_blocks": 2}))
    with pytest.raises(WeightsError, match="missing key"):
        SemanticUNet.from_pretrained(folder)


def test_corrupt_or_missing_weights(tmp_path: Path) -> None:
    folder = SemanticUNet(SemanticUNetConfig(**TINY)).save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        SemanticUNet.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        SemanticUNet.from_pretrained(folder)
    with pytest.raises(WeightsError, match="no such folder"):
        SemanticUNet.from_pretrained(tmp_path / "does-not-exist")
