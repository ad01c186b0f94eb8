"""Conversion of original SDM / DiffMix checkpoints into diffaug's format.

An original checkpoint is a ``state_dict`` of guided-diffusion's ``UNetModel`` as modified by SDM, saved with
``torch.save`` (DiffMix's EMA files) or as ``.safetensors``, plus the argparse flags the model was built with (the
names of ``model_and_diffusion_defaults``, as in ``shared/fixtures/sdm_reference/config.json``). The key names of
:class:`~diffaug.models.SemanticUNet` are the original ones, so conversion is a strict load with no renaming: this
module maps the flags onto a :class:`~diffaug.models.SemanticUNetConfig`, checks every key and shape, and writes
``config.json`` + ``model.safetensors``.

Flags that do not describe the network (``_what``, ``derived``, ``y_channel_layout``, sampling and training flags
such as ``timestep_respacing``, ``batch_size``, ``use_fp16``) are ignored. Flags that describe a network this
implementation does not build (``use_new_attention_order=True``, ``learn_sigma=False``, ...) are errors, never
approximated.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffaug.errors import ConfigError, DataFormatError, WeightsError
from diffaug.models.sdm_unet import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SemanticUNet,
    SemanticUNetConfig,
    check_state_dict,
    load_safetensors,
    read_json,
)

__all__ = ["convert_sdm_checkpoint", "config_from_sdm_flags", "load_sdm_flags", "load_original_state_dict",
           "REQUIRED_SDM_FLAGS", "OPTIONAL_SDM_FLAGS"]

#: Original flags that must be present: each changes the weights' shapes or the outputs, and a silent default would
#: hide a typo.
REQUIRED_SDM_FLAGS = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
                      "num_heads", "num_head_channels", "class_cond", "num_classes", "no_instance", "learn_sigma",
                      "use_scale_shift_norm", "resblock_updown")

#: Original flags that may be absent, with the original defaults.
OPTIONAL_SDM_FLAGS: dict[str, Any] = {
    "num_heads_upsample": -1,
    "dropout": 0.0,
    "use_new_attention_order": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "predict_xstart": False,
    "rescale_timesteps": False,
}

#: Flags that must have this value: the only variant of the original network (or output) implemented here.
_SUPPORTED_ONLY = {
    "class_cond": (True, "an unconditional SDM has no SPADE condition; diffaug only runs semantic models"),
    "learn_sigma": (True, "the model must output ε and the variance interpolation (6 channels)"),
    "use_scale_shift_norm": (True, "the time embedding must be applied as scale and shift (FiLM)"),
    "resblock_updown": (True, "resampling must happen inside ResBlocks, as in SDM and DiffMix"),
    "use_new_attention_order": (False, "only the legacy QKV order of SDM/DiffMix is implemented"),
    "predict_xstart": (False, "the model must predict ε"),
}

#: The original's ``channel_mult`` for ``channel_mult=""``, by image size (guided-diffusion ``create_model``).
_DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _as_bool(value: Any, name: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}:
        return value.lower() in {"true", "yes", "1", "t", "y"}  # argparse str2bool spellings
    raise ConfigError(f"{source}: flag {name} must be true or false, got {value!r}")


def _as_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{source}: flag {name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ConfigError(f"{source}: flag {name} must be an integer, got {value!r}")


def _as_int_list(value: Any, name: str, source: str) -> tuple[int, ...]:
    """``"32,16,8"`` (the argparse form) or ``[32, 16, 8]``."""
    items: list[Any]
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{source}: flag {name} must be a comma-separated string or a list, got {value!r}")
    try:
        return tuple(_as_int(v.strip() if isinstance(v, str) else v, name, source) for v in items)
    except ConfigError:
        raise ConfigError(f"{source}: flag {name} must list integers, got {value!r}") from None


def load_sdm_flags(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an original flags JSON file (a JSON object)."""
    flags = read_json(path, "flags file", DataFormatError)
    if not isinstance(flags, dict):
        raise ConfigError(f"{path}: expected a JSON object of original SDM flags, got {type(flags).__name__}")
    return flags


def config_from_sdm_flags(flags: Mapping[str, Any], *, class_scheme: str | None = None,
                          class_names: tuple[str, ...] | None = None, source: str = "SDM flags") -> SemanticUNetConfig:
    """Map original SDM/DiffMix argparse flags onto a :class:`SemanticUNetConfig`.

    Args:
        flags: The flags (``model_and_diffusion_defaults`` names). Unknown keys are ignored.
        class_scheme: Optional class scheme name to record in the config.
        class_names: Optional class names (background first) to record in the config.
        source: Name of the flags' origin, for error messages.

    Raises:
        ConfigError: A required flag is missing, a value has the wrong type, or a flag asks for a network variant
            that is not implemented.
    """
    if not isinstance(flags, Mapping):
        raise ConfigError(f"{source}: expected a mapping of original SDM flags, got {type(flags).__name__}")
    missing = [name for name in REQUIRED_SDM_FLAGS if name not in flags]
    if missing:
        raise ConfigError(f"{source}: missing original SDM flag(s) {missing}; give every architecture flag the model "
                          f"was trained with (the names of script_util.model_and_diffusion_defaults)")
    f = {**OPTIONAL_SDM_FLAGS, **{k: v for k, v in flags.items() if k in REQUIRED_SDM_FLAGS or k in OPTIONAL_SDM_FLAGS}}

    for name, (wanted, why) in _SUPPORTED_ONLY.items():
        if _as_bool(f[name], name, source) != wanted:
            raise ConfigError(f"{source}: {name}={f[name]!r} is not supported: {why}")

    image_size = _as_int(f["image_size"], "image_size", source)
    channel_mult = _as_int_list(f["channel_mult"], "channel_mult", source)
    if not channel_mult:
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ConfigError(f"{source}: channel_mult is empty and the original has no integer default for "
                              f"image_size {image_size}; give channel_mult explicitly")
        channel_mult = _DEFAULT_CHANNEL_MULT[image_size]

    diffusion_steps = _as_int(f["diffusion_steps"], "diffusion_steps", source)
    if _as_bool(f["rescale_timesteps"], "rescale_timesteps", source) and diffusion_steps != 1000:
        raise ConfigError(f"{source}: rescale_timesteps=True with diffusion_steps={diffusion_steps} feeds the model "
                          f"rescaled timesteps, which is not supported")
    schedule = f["noise_schedule"]
    if not isinstance(schedule, str):
        raise ConfigError(f"{source}: flag noise_schedule must be a string, got {schedule!r}")
    dropout = f["dropout"]
    if isinstance(dropout, str):
        try:
            dropout = float(dropout)
        except ValueError:
            raise ConfigError(f"{source}: flag dropout must be a number, got {dropout!r}") from None

    try:
        return SemanticUNetConfig(
            image_size=image_size,
            model_channels=_as_int(f["num_channels"], "num_channels", source),
            channel_mult=channel_mult,
            num_classes=_as_int(f["num_classes"], "num_classes", source),
            num_res_blocks=_as_int(f["num_res_blocks"], "num_res_blocks", source),
            attention_resolutions=_as_int_list(f["attention_resolutions"], "attention_resolutions", source),
            num_head_channels=_as_int(f["num_head_channels"], "num_head_channels", source),
            num_heads=_as_int(f["num_heads"], "num_heads", source),
            num_heads_upsample=_as_int(f["num_heads_upsample"], "num_heads_upsample", source),
            instance_edges=not _as_bool(f["no_instance"], "no_instance", source),
            dropout=float(dropout),
            class_scheme=class_scheme,
            class_names=class_names,
            diffusion={"num_train_timesteps": diffusion_steps, "beta_schedule": schedule},
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: the flags describe an invalid model: {exc}") from exc


def load_original_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an original checkpoint: ``.safetensors``, or a ``torch.save`` pickle loaded with ``weights_only=True``.

    Raises:
        WeightsError: The file is missing, unreadable, or not a flat mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}). It may be "
                           f"truncated or corrupt (download it again), or not a weights-only state dict.") from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                           f"{type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries {bad[:5]} are not tensors; this is not a bare state dict (a training "
                           f"checkpoint holding a state dict must be unpacked first)")
    return dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_sdm_checkpoint(ckpt: str | os.PathLike[str], flags: Mapping[str, Any] | str | os.PathLike[str],
                           out_dir: str | os.PathLike[str], *, class_scheme: str | None = None,
                           class_names: tuple[str, ...] | None = None, overwrite: bool = False) -> Path:
    """Convert an original SDM/DiffMix checkpoint into a diffaug model folder.

    Args:
        ckpt: The original checkpoint (``.pt``/``.pth`` pickle or ``.safetensors``) with the original key names.
        flags: The original argparse flags, as a mapping or the path of a JSON file.
        out_dir: Folder to write ``config.json`` + ``model.safetensors`` into (created if needed).
        class_scheme: Optional class scheme name to record (e.g. ``"consep-hovernet"``).
        class_names: Optional class names to record, background first.
        overwrite: Replace an existing model in ``out_dir``.

    Returns:
        ``out_dir``, loadable by :meth:`SemanticUNet.from_pretrained` as it is.

    Raises:
        ConfigError: The flags are invalid or unsupported.
        WeightsError: The checkpoint is unreadable or does not match the flags.
    """
    ckpt = Path(ckpt)
    source = "SDM flags"
    if not isinstance(flags, Mapping):
        source = str(flags)
        flags = load_sdm_flags(flags)
    config = config_from_sdm_flags(flags, class_scheme=class_scheme, class_names=class_names, source=source)
    out = Path(out_dir)
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise DataFormatError(f"{out} already holds {existing}; choose another output folder or pass overwrite=True "
                              f"(--overwrite)")
    state = load_original_state_dict(ckpt)

    with torch.device("meta"):
        reference = SemanticUNet(config)
    label_key = "middle_block.0.in_norm.mlp_shared.0.weight"
    if label_key in state and state[label_key].ndim == 4 and state[label_key].shape[1] != config.label_nc:
        found = state[label_key].shape[1]
        raise WeightsError(f"{ckpt}: the checkpoint's condition has label_nc={found} channels, but the flags give "
                           f"num_classes={config.num_classes} (background included) + "
                           f"{int(config.instance_edges)} edge channel = {config.label_nc}; fix num_classes or "
                           f"no_instance in {source}")
    check_state_dict(reference, state, source=str(ckpt),
                     hint=f"The flags in {source} do not describe this checkpoint; check num_channels, channel_mult, "
                          f"num_res_blocks and attention_resolutions.")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = SemanticUNet.from_state_dict(config, state, source=str(ckpt))
    model.save_pretrained(out, metadata={"converted_from": ckpt.name, "source_sha256": _sha256(ckpt),
                                         "source_format": "sdm"})
    return out
