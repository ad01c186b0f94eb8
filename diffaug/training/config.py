"""The training configuration: a YAML file of nested sections, dotted ``key=value`` overrides, strict validation.

A config is a tree of dataclasses (:class:`TrainConfig` at the root). Every key is checked up front: an unknown key is
a :class:`~diffaug.errors.ConfigError` that names it, suggests the nearest valid key and lists the valid ones, and a
value of the wrong type is an error, never coerced, with one exception: YAML 1.1 reads ``1e-4`` as a string, so a
string that spells a number is accepted for a float field.

The ``model`` section holds the fields of :class:`diffaug.models.SemanticUNetConfig` except the class metadata
(``num_classes`` and the scheme), which always come from the data folder's class scheme. It is checked against that
dataclass when the model is built (:func:`diffaug.training.loop.build_model`), so this module imports no model.

Example:
    >>> cfg = load_config("tiny", ["data.root=../shared/data/consep_train", "train.max_steps=50"])  # doctest: +SKIP
    >>> cfg.train.max_steps  # doctest: +SKIP
    50
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffaug.errors import ConfigError

__all__ = ["DataConfig", "DiffusionConfig", "OptimConfig", "StageConfig", "EMAConfig", "CheckpointConfig",
           "PreviewConfig", "EvalConfig", "TrainConfig", "load_config", "parse_overrides", "apply_overrides",
           "config_from_dict", "config_to_dict", "diff_configs", "load_yaml", "shipped_configs", "resolve_config_path",
           "RESUMABLE_CHANGES", "RESERVED_MODEL_KEYS", "unknown_key_message"]


@dataclass
class DataConfig:
    """Where the tiles come from and how they are prepared.

    Attributes:
        root: tile folder (``NAME.png`` + ``NAME.npz``, see :class:`diffaug.data.TileFolder`). Required.
        classes: ``"default"`` (the folder's merged classes when its ``classes.json`` has a merge block), ``"raw"``,
            or a scheme name; passed to :class:`~diffaug.data.TileFolder`.
        holdout: tile-name patterns (``fnmatch``, e.g. ``"train_1_*"``) kept out of training. Preview grids and the
            evaluation loss use them; without a holdout they use the first training tiles. Hold out whole source
            images, never single tiles, when tiles overlap.
        stain_target: an RGB image (PNG) to normalise every tile's stain to, or null for none. Needs the
            ``diffaug[stain]`` extra.
        stain_method: the stain normaliser used with ``stain_target``.
        num_workers: DataLoader worker processes (0 loads in the training process). Workers only read and crop
            tiles; the data order does not depend on their number.
        cache: keep decoded (and stain-normalised) tiles in memory, per process. Stain normalisation is slow, so
            with ``stain_target`` this is worth it.
    """

    root: str | None = None
    classes: str = "default"
    holdout: list[str] = field(default_factory=list)
    stain_target: str | None = None
    stain_method: Literal["vahadane", "macenko"] = "vahadane"
    num_workers: int = 0
    cache: bool = False


@dataclass
class DiffusionConfig:
    """The forward process the model is trained for (SPEC §3): linear β from 1e-4 to 0.02 scaled by 1000/T.

    The keys are those of :class:`diffaug.diffusion.DiffusionConfig`; they are written into the saved model's config.
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear"] = "linear"


@dataclass
class OptimConfig:
    """AdamW and batch settings shared by both stages.

    Attributes:
        batch_size: samples per step *per process*; with ``torchrun --nproc_per_node N`` a step sees N times as many.
        weight_decay: AdamW's decoupled weight decay (SPEC: 0).
        betas: AdamW's (β1, β2).
        eps: AdamW's ε.
        grad_clip: clip the global gradient norm to this value; null for no clipping (the reference clips none).
        precision: ``"bf16"`` runs the forward pass under bfloat16 autocast (weights and optimizer stay float32).
    """

    batch_size: int = 8
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class StageConfig:
    """One training stage: a step budget, its learning rate schedule and its condition drop rate.

    Attributes:
        max_steps: optimizer steps in this stage (0 skips it).
        lr: peak learning rate.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first steps of the stage.
        lr_schedule: ``"constant"`` after warm-up (the reference), or ``"cosine"`` decay to 0 at the stage's end.
        drop_rate: probability that the *whole* condition ``y`` of a sample is replaced by zeros, the null condition
            of classifier-free guidance (SPEC §2).
    """

    max_steps: int = 0
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    drop_rate: float = 0.0


@dataclass
class EMAConfig:
    """Exponential moving average of the weights: ``ema ← decay·ema + (1 − decay)·θ`` after every step.

    The reference code uses 0.9999 (its paper says 0.999). The EMA carries on from the first stage into the second.

    ``warmup`` (off in the reference) uses ``min(decay, (1 + step) / (10 + step))`` at global step ``step``, so a short
    run's EMA does not keep a large share of the random initial weights: with a fixed 0.999, 0.999^1800 = 16 % of
    the initialisation is still in the average after 1800 steps (its samples are noise); with warm-up the average
    covers roughly the last ``step / 10`` steps until ``decay`` takes over.
    """

    decay: float = 0.9999
    warmup: bool = False


@dataclass
class CheckpointConfig:
    """Training checkpoints (model, EMA, optimizer, random states, data position, step) under ``checkpoints/``.

    Attributes:
        every: write one every this many steps (and always at the end of each stage).
        keep: how many of the newest checkpoints to keep (older ones are deleted after a new one is written).
    """

    every: int = 1000
    keep: int = 2


@dataclass
class PreviewConfig:
    """Periodic sample grids (``previews/step_NNNNNN.png``): real | label overlay | EMA sample, one row per tile.

    Attributes:
        every: steps between grids (0: none, except the final one when ``num_images`` > 0).
        num_images: rows in the grid, taken from the held-out tiles (centre crops).
        num_inference_steps: DDIM steps from pure noise; keep it small, this runs inside training.
        guidance_scale: w in ε̂ = ε_u + w·(ε_c − ε_u); 1 means the conditional model alone.
    """

    every: int = 1000
    num_images: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 1.0


@dataclass
class EvalConfig:
    """A validation loss on a fixed held-out batch with fixed timesteps and noise, so curves are comparable.

    Attributes:
        every: steps between evaluations (0: never). The value at step 0 is the untrained model's.
        batch_size: crops in the fixed batch (centre crops of the held-out tiles, cycled when there are fewer).
    """

    every: int = 100
    batch_size: int = 8


@dataclass
class TrainConfig:
    """The whole training run. Sections: ``data``, ``model``, ``diffusion``, ``optim``, ``train`` (stage 1),
    ``finetune`` (stage 2), ``ema``, ``checkpoint``, ``preview``, ``eval``.

    Attributes:
        seed: root of every random stream (data order, crops, timesteps, noise, condition drop).
        output_dir: run folder: resolved ``config.yaml``, ``checkpoints/``, ``previews/``, ``metrics.jsonl`` and,
            at the end, the EMA model in ``model/``. Re-running with the same folder resumes.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        log_every: steps between lines in ``metrics.jsonl``.
    """

    seed: int = 0
    output_dir: str = "runs/diffaug-train"
    device: str = "auto"
    log_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StageConfig = field(default_factory=lambda: StageConfig(max_steps=10000, lr=1e-4, drop_rate=0.0))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(max_steps=0, lr=2e-5, drop_rate=0.2))
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def total_steps(self) -> int:
        return self.train.max_steps + self.finetune.max_steps

    def stage_at(self, step: int) -> tuple[str, StageConfig, int]:
        """(name, settings, step within the stage) of the optimizer step with 0-based global index ``step``."""
        if step < self.train.max_steps:
            return "train", self.train, step
        return "finetune", self.finetune, step - self.train.max_steps

    def validate(self) -> None:
        """Check value ranges; raises :class:`ConfigError` naming the key."""
        _check(self.output_dir != "", "output_dir", "must not be empty")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.data.root is None:
            raise ConfigError("data.root is required: the tile folder to train on; pass data.root=DIR")
        _check(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.diffusion.num_train_timesteps > 20, "diffusion.num_train_timesteps",
               "must be > 20 (the linear schedule's last β, 0.02·1000/T, must stay below 1)")
        _check(self.optim.batch_size >= 1, "optim.batch_size", "must be >= 1")
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.optim.betas), "optim.betas", "must lie in [0, 1)")
        _check(self.optim.eps > 0, "optim.eps", "must be > 0")
        _check(self.optim.grad_clip is None or self.optim.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")
        for name in ("train", "finetune"):
            stage: StageConfig = getattr(self, name)
            _check(stage.max_steps >= 0, f"{name}.max_steps", "must be >= 0")
            _check(stage.lr > 0, f"{name}.lr", "must be > 0")
            _check(stage.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
            _check(0.0 <= stage.drop_rate <= 1.0, f"{name}.drop_rate", "must lie in [0, 1]")
        _check(self.total_steps > 0, "train.max_steps", "train.max_steps + finetune.max_steps must be > 0")
        _check(0.0 <= self.ema.decay < 1.0, "ema.decay", "must lie in [0, 1)")
        _check(self.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
        _check(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.preview.every >= 0, "preview.every", "must be >= 0 (0 turns periodic grids off)")
        _check(self.preview.num_images >= 0, "preview.num_images", "must be >= 0")
        _check(self.preview.num_inference_steps >= 1, "preview.num_inference_steps", "must be >= 1")
        _check(self.preview.num_inference_steps <= self.diffusion.num_train_timesteps, "preview.num_inference_steps",
               f"must be <= diffusion.num_train_timesteps ({self.diffusion.num_train_timesteps})")
        _check(self.eval.every >= 0, "eval.every", "must be >= 0 (0 turns evaluation off)")
        _check(self.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
        reserved = [key for key in RESERVED_MODEL_KEYS if key in self.model]
        if reserved:
            raise ConfigError(f"model.{reserved[0]} cannot be set: the classes come from the data folder's class "
                              "scheme (data.root, data.classes) and the diffusion settings from the diffusion section")


#: Fields of the model config that training fills in from the data folder and the ``diffusion`` section.
RESERVED_MODEL_KEYS: tuple[str, ...] = ("num_classes", "class_scheme", "class_names", "diffusion")

#: Keys that may differ between a run and its resumption: budgets and reporting, not what a step computes.
RESUMABLE_CHANGES: frozenset[str] = frozenset({
    "train.max_steps", "finetune.max_steps", "checkpoint.every", "checkpoint.keep", "preview.every",
    "preview.num_images", "preview.num_inference_steps", "preview.guidance_scale", "eval.every", "log_every",
    "data.num_workers", "data.cache", "device", "output_dir",
})


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} {what}")


# ---------------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested mappings. ``source`` names the origin in errors."""
    cfg = _build(TrainConfig, data, prefix="", source=source)
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples), suitable for YAML/JSON and :func:`config_from_dict`."""
    return _plain(dataclasses.asdict(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(source, prefix, str(key), list(fields)))
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, prefix=f"{prefix}{key}.", source=source)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}", source)
    return cls(**kwargs)


def unknown_key_message(source: str, prefix: str, key: str, valid: Sequence[str]) -> str:
    """"unknown config key 'PREFIXKEY' (did you mean ...?); valid keys in section ...: ..." for errors."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    section = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    return (f"{source}: unknown config key '{prefix}{key}'{hint}; valid keys in {section}: "
            f"{', '.join(sorted(valid))}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples built from lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key} must be {_describe(tp)}, got "
                          f"{value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # pragma: no cover - programming error


def _describe(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


# ---------------------------------------------------------------------------------------------------------------------
# files and overrides


def shipped_configs() -> dict[str, Path]:
    """Training configs that ship with diffaug, by name (``tiny``, ``builtin``)."""
    root = importlib.resources.files("diffaug.configs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(config: str | os.PathLike[str]) -> Path:
    """A config file path, or the name of a shipped config (see :func:`shipped_configs`)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(config) in shipped:
        return shipped[str(config)]
    raise ConfigError(f"config {str(config)!r} not found: pass a YAML file or the name of a shipped config "
                      f"({', '.join(sorted(shipped))})")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (``50``, ``1e-4``, ``null``, ``[1, 2]``, ``text``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.isidentifier() for p in parts):
            raise ConfigError(f"bad override {item!r}: expected KEY=VALUE with a dotted key, for example "
                              "train.max_steps=50 or data.root=/path/to/tiles")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"bad override {item!r}: the value is not valid YAML ({exc})") from None
        parsed.append((parts, value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``data`` with dotted overrides applied (checked later by the schema)."""
    import copy

    out = copy.deepcopy(data)
    for parts, value in parse_overrides(overrides):
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is a value, not a "
                                  "section")
            node = child
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or non-mapping file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def load_config(config: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (a path, or the name of a shipped config), apply overrides, validate.

    A relative ``data.root`` or ``data.stain_target`` written in the file is taken relative to the current
    directory, like paths given on the command line.
    """
    path = resolve_config_path(config)
    data = apply_overrides(load_yaml(path), overrides)
    return config_from_dict(data, source=str(path))


def diff_configs(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    return _diff(config_to_dict(old), config_to_dict(new), "")


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
