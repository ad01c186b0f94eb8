"""Training config: YAML + dotted overrides, strict validation with clear errors, shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from diffaug.errors import ConfigError
from diffaug.training.config import (StageConfig, config_from_dict, config_to_dict, diff_configs, load_config,
                                     parse_overrides, shipped_configs)
from diffaug.training.loop import build_model_config, derive_seed, learning_rate


def test_shipped_configs_load_with_overrides(tmp_path: Path) -> None:
    assert {"tiny", "builtin"} <= set(shipped_configs())
    cfg = load_config("tiny", ["data.root=/some/tiles", "train.max_steps=7", "train.lr=3e-4", "optim.betas=[0.8, 0.9]",
                               "data.holdout=[train_1_*]", "finetune.max_steps=0"])
    assert cfg.train.max_steps == 7 and cfg.total_steps == 7
    assert cfg.train.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; a float field accepts it
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.holdout == ["train_1_*"]
    # round trip through a plain dict gives the same config
    assert diff_configs(config_from_dict(config_to_dict(cfg)), cfg) == []


def test_defaults_follow_the_spec() -> None:
    cfg = config_from_dict({"data": {"root": "x"}})
    assert (cfg.train.lr, cfg.optim.weight_decay, cfg.train.drop_rate) == (1e-4, 0.0, 0.0)
    assert (cfg.finetune.lr, cfg.finetune.drop_rate) == (2e-5, 0.2)
    assert cfg.ema.decay == 0.9999
    assert (cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_schedule) == (1000, "linear")


@pytest.mark.parametrize("override, fragment", [
    ("train.max_step=5", "unknown config key 'train.max_step' (did you mean train.max_steps?); valid keys in "
                         "section 'train': drop_rate, lr, lr_schedule, max_steps, warmup_steps"),
    ("learning_rate=1", "unknown config key 'learning_rate'"),
    ("data.rot=x", "valid keys in section 'data': cache, classes, holdout, num_workers, root, stain_method"),
])
def test_unknown_key_is_named_with_the_valid_ones(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["data.root=/x", override])
    assert fragment in str(err.value)


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  root: /x\nema:\n  decay: 0.99\n  warm_up: 10\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'ema\.warm_up' \(did you mean ema\.warmup\?\); "
                                          r"valid keys in section 'ema': decay, warmup"):
        load_config(path)
    path.write_text("data:\n  root: /x\nema:\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: ema\.warmup must be true or false, got 10"):
        load_config(path)


@pytest.mark.parametrize("override", ["train.max_steps", "=5", "train..lr=1", "train.max-steps=3", "1x=2"])
def test_bad_override_syntax(override: str) -> None:
    with pytest.raises(ConfigError, match="bad override .*expected KEY=VALUE with a dotted key"):
        parse_overrides([override])


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config("tiny", ["data.root=/x", "seed.value=3"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=ten", "train.max_steps must be an integer, got 'ten'"),
    ("train.max_steps=2.5", "train.max_steps must be an integer"),
    ("optim.precision=fp16", "optim.precision must be one of 'fp32', 'bf16'"),
    ("data.cache=yes please", "data.cache must be true or false"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
    ("train=3", "train must be a mapping"),
    ("train.drop_rate=1.5", "train.drop_rate must lie in [0, 1]"),
    ("ema.decay=1", "ema.decay must lie in [0, 1)"),
    ("train.max_steps=-1", "train.max_steps must be >= 0"),
    ("optim.batch_size=0", "optim.batch_size must be >= 1"),
    ("model.num_classes=5", "model.num_classes cannot be set: the classes come from the data folder"),
    ("diffusion.num_train_timesteps=10", "diffusion.num_train_timesteps must be > 20"),
])
def test_invalid_values_are_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["data.root=/x", override])
    assert message in str(err.value)


def test_zero_step_budget_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.max_steps \\+ finetune.max_steps must be > 0"):
        load_config("tiny", ["data.root=/x", "train.max_steps=0", "finetune.max_steps=0"])


def test_missing_data_root_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="data.root is required.*data.root=DIR"):
        load_config("tiny")


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found: pass a YAML file or the name of a shipped config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping of sections"):
        load_config(listing)


def test_model_section_is_checked_against_the_model_config() -> None:
    from diffaug.data.schemes import SCHEMES

    scheme = SCHEMES["consep-hovernet"]
    cfg = load_config("tiny", ["data.root=/x"])
    model_cfg = build_model_config(cfg, scheme)
    assert model_cfg.num_classes == 5 and model_cfg.label_nc == 6
    assert model_cfg.class_scheme == "consep-hovernet"
    assert model_cfg.class_names == ("background", "other", "inflammatory", "epithelial", "spindle-shaped")
    assert dict(model_cfg.diffusion) == {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.channels_mult' \(did you mean "
                                          r"model\.channel_mult\?\); valid keys in section 'model': "):
        build_model_config(load_config("tiny", ["data.root=/x", "model.channels_mult=[1]"]), scheme)
    bad_depth = load_config("tiny", ["data.root=/x", "model.image_size=33"])
    with pytest.raises(ConfigError, match="image_size 33 cannot be divided by the depth"):
        build_model_config(bad_depth, scheme)
    with pytest.raises(ConfigError, match="model.image_size is required"):
        build_model_config(config_from_dict({"data": {"root": "x"}, "model": {"model_channels": 32,
                                                                               "channel_mult": [1]}}), scheme)


def test_builtin_config_fits_the_size_budget() -> None:
    """The built-in checkpoint must stay under 25 MB of float32 safetensors."""
    import torch

    from diffaug.data.schemes import SCHEMES
    from diffaug.models import SemanticUNet

    cfg = load_config("builtin", ["data.root=/x"])
    model_cfg = build_model_config(cfg, SCHEMES["consep-hovernet"])
    with torch.device("meta"):
        n = sum(p.numel() for p in SemanticUNet(model_cfg).parameters())
    assert 4 * n < 25e6, f"{n} parameters = {4 * n / 1e6:.1f} MB"
    assert model_cfg.image_size in (64, 128) and 32 <= model_cfg.model_channels <= 64


def test_learning_rate_schedule() -> None:
    warm = StageConfig(max_steps=100, lr=1e-3, warmup_steps=10)
    assert [learning_rate(warm, s) for s in (0, 4, 9, 10, 99)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    cosine = StageConfig(max_steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx(0.5e-3)
    assert learning_rate(cosine, 110) == pytest.approx(0.0, abs=1e-12)
    assert all(learning_rate(cosine, s) >= learning_rate(cosine, s + 1) for s in range(10, 110))


def test_derived_seeds_are_stable_and_distinct() -> None:
    seeds = {derive_seed(0, tag, rank) for tag in range(4) for rank in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, 1) == derive_seed(3, 1) != derive_seed(4, 1)
    assert not math.isnan(float(derive_seed(0)))
