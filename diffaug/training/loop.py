"""The training loop: two stages (train, then fine-tune with condition dropout), EMA, warm-up, step budgets,
checkpoints with exact resume, previews, and DDP under ``torchrun``.

**What a step does** (SPEC §3). Draw timesteps t ~ U{0..T−1}, noise ε ~ N(0, I), and a keep mask that zeroes the
whole condition y of a sample with probability ``drop_rate``; compute the hybrid loss
L = mean((ε − ε_θ)²) + L_vb (:meth:`diffaug.diffusion.GaussianDiffusion.training_losses`); take an AdamW step at the
stage's scheduled learning rate; update the EMA.

**Randomness.** Every draw comes from a stream seeded from the config seed:

* data order and augmentation: pure functions of (seed, sample index) (:mod:`diffaug.training.data`);
* t, ε and the drop mask: a ``torch.Generator`` per process, seeded from (seed, rank), on the CPU (so the same on
  every device);
* model initialisation and dropout: PyTorch's modules draw from its *global* generator, which no API lets us replace.
  The run therefore executes inside :func:`torch.random.fork_rng`, seeds the global generator from (seed, rank) there,
  and saves and restores its state in checkpoints. The caller's global random state is untouched afterwards.

**Resume.** A checkpoint holds the model, EMA, optimizer, each process's generator states, the number of samples
consumed and the step. Re-running the same command on the same ``output_dir`` resumes from the newest checkpoint and
gives, on the CPU, bit-identical weights to a run that was never interrupted. Budgets and reporting keys may change
between the runs (:data:`~diffaug.training.config.RESUMABLE_CHANGES`); anything else is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from diffaug._io import atomic_write_json, atomic_write_text
from diffaug.data.schemes import ClassScheme
from diffaug.errors import ConfigError, InvalidInputError
from diffaug.training.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                         save_checkpoint)
from diffaug.training.config import (RESERVED_MODEL_KEYS, RESUMABLE_CHANGES, StageConfig, TrainConfig,
                                     config_from_dict, config_to_dict, diff_configs, unknown_key_message)
from diffaug.training.data import ShardedBatchSampler, fixed_crops, image_to_tensor, open_training_data
from diffaug.training.ema import EMA

__all__ = ["TrainResult", "train", "build_model_config", "learning_rate", "derive_seed", "weights_digest"]

# Seed stream tags (see derive_seed).
_INIT, _STEP, _GLOBAL, _EVAL, _PREVIEW, _LOADER = range(6)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        run_dir: the run folder.
        step: optimizer steps done so far (over all calls).
        finished: whether the step budget is reached; then ``model_dir`` holds the EMA model.
        model_dir: ``run_dir/model`` (``config.json`` + ``model.safetensors``), loadable by
            :meth:`diffaug.models.SemanticUNet.from_pretrained`; None until finished.
        resumed_from: the checkpoint this call started from, if any.
    """

    run_dir: Path
    step: int
    finished: bool
    model_dir: Path | None
    resumed_from: Path | None


def derive_seed(seed: int, *tags: int) -> int:
    """A 63-bit seed for the stream named by ``tags``, derived from the run seed (numpy's SeedSequence hashing)."""
    high, low = (int(v) for v in np.random.SeedSequence((seed, *tags)).generate_state(2, np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


def learning_rate(stage: StageConfig, step_in_stage: int) -> float:
    """The stage's learning rate at its 0-based step: linear warm-up to ``lr``, then constant or cosine to 0."""
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    if stage.lr_schedule == "constant":
        return stage.lr
    decay_steps = max(1, stage.max_steps - stage.warmup_steps)
    progress = min(1.0, (step_in_stage - stage.warmup_steps) / decay_steps)
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes and bytes), to compare replicas or runs."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_model_config(cfg: TrainConfig, scheme: ClassScheme, *, source: str = "config") -> Any:
    """The :class:`~diffaug.models.SemanticUNetConfig` of the run: the ``model`` section plus the classes of the data
    and the ``diffusion`` section.

    Raises:
        ConfigError: an unknown, reserved, missing or invalid model key.
    """
    from diffaug.models import SemanticUNetConfig

    fields = {f.name: f for f in dataclasses.fields(SemanticUNetConfig)}
    allowed = sorted(set(fields) - set(RESERVED_MODEL_KEYS))
    cfg.validate()  # rejects the reserved keys
    for key in cfg.model:
        if key not in fields:
            raise ConfigError(unknown_key_message(source, "model.", key, allowed))
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and name not in RESERVED_MODEL_KEYS]
    missing = [name for name in required if name not in cfg.model]
    if missing:
        raise ConfigError(f"{source}: config key model.{missing[0]} is required (the model section needs "
                          f"{', '.join(required)})")
    names = ("background", *(scheme.names[i] for i in range(1, scheme.num_classes)))
    data = {**cfg.model, "num_classes": scheme.num_classes, "class_scheme": scheme.name, "class_names": names,
            "diffusion": dataclasses.asdict(cfg.diffusion)}
    return SemanticUNetConfig.from_dict(data, source=f"{source} (model section)")


# ---------------------------------------------------------------------------------------------------------------------
# distributed context


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group ``torchrun`` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_name, local_rank)
    if world_size <= 1 and not dist.is_initialized():
        return _Dist(0, 1, device, owns_group=False)
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)


# ---------------------------------------------------------------------------------------------------------------------
# run folder


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, ctx: _Dist) -> dict[str, Any] | None:
    """Check that ``run_dir`` is empty or holds this run; return its newest checkpoint (loaded) or None."""
    ckpt_path = latest_checkpoint(run_dir)
    saved_config = run_dir / "config.yaml"
    if ckpt_path is None:
        if saved_config.is_file():
            _check_compatible(_read_saved_config(saved_config), cfg, run_dir)
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(f"output_dir {run_dir} is not empty and holds no diffaug training run; choose an empty "
                              "or new folder")
        return None
    state = load_checkpoint(ckpt_path)
    state["path"] = ckpt_path
    _check_compatible(config_from_dict(state["config"], source=str(ckpt_path)), cfg, run_dir)
    if state["world_size"] != ctx.world_size:
        raise ConfigError(f"{ckpt_path} was written by {state['world_size']} processes; resume it with the same "
                          f"number (torchrun --nproc_per_node {state['world_size']}), not {ctx.world_size}")
    return state


def _read_saved_config(path: Path) -> TrainConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the saved config of this run ({exc})") from None
    return config_from_dict(data, source=str(path))


def _check_compatible(old: TrainConfig, new: TrainConfig, run_dir: Path) -> None:
    changed = [key for key in diff_configs(old, new) if key not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"output_dir {run_dir} holds a run with a different config ({', '.join(changed)} differ); "
                          "resume with the same settings, or choose a new output_dir. Only budgets and reporting "
                          f"may change on resume: {', '.join(sorted(RESUMABLE_CHANGES))}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that died after its last checkpoint), and torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with PyTorch's global generator(s) seeded, restoring the caller's state afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    return {"generator": generator.get_state(), "global": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["global"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class _Trainer:
    """One run of :func:`train` in one process (all state of the loop lives here)."""

    def __init__(self, cfg: TrainConfig, ctx: _Dist, *, progress: bool) -> None:
        from diffaug.diffusion import GaussianDiffusion
        from diffaug.models import SemanticUNet

        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.run_dir = Path(cfg.output_dir)
        size = cfg.model.get("image_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError("config key model.image_size is required: a positive integer, the crop size")
        self.dataset, holdout = open_training_data(
            cfg.data.root,  # type: ignore[arg-type]  # validate() guarantees it
            classes=cfg.data.classes, holdout=cfg.data.holdout, size=size, seed=cfg.seed,
            stain_target=cfg.data.stain_target, stain_method=cfg.data.stain_method, cache=cfg.data.cache)
        self.holdout = holdout or self.dataset.names
        self.model_config = build_model_config(cfg, self.dataset.scheme)
        self.diffusion = GaussianDiffusion.from_config(dataclasses.asdict(cfg.diffusion))
        self.resume = _prepare_run_dir(cfg, self.run_dir, ctx)
        ctx.barrier()  # every rank has read the run folder before rank 0 writes to it

        with _seeded_global_rng(derive_seed(cfg.seed, _INIT), ctx.device):
            self.model = SemanticUNet(self.model_config)  # same initial weights on every rank
        self.model.to(ctx.device).train()
        self.ema = EMA(self.model, cfg.ema.decay, warmup=cfg.ema.warmup)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, _STEP, ctx.rank))
        self.step = 0
        self.samples_seen = 0
        self.global_rng_state: dict[str, Any] | None = None
        if self.resume is not None:
            self._load(self.resume)
        self.network: torch.nn.Module = self.model
        if ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            self.network = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    # -- state ---------------------------------------------------------------------------------------------------

    def _load(self, state: dict[str, Any]) -> None:
        saved_scheme = state["class_scheme"]
        if saved_scheme != {"name": self.dataset.scheme.name, "names": dict(self.dataset.scheme.names)}:
            raise ConfigError(f"{state['path']}: the run was trained on classes {saved_scheme}, but "
                              f"{self.cfg.data.root} now loads as {self.dataset.scheme.name!r}; resume on the same data")
        if state["num_tiles"] != len(self.dataset):
            raise ConfigError(f"{state['path']}: the run trained on {state['num_tiles']} tiles of "
                              f"{self.cfg.data.root}, which now has {len(self.dataset)} (after data.holdout); the data "
                              "order would change. "
                              "Resume on the same tiles, or start a new output_dir")
        self.model.load_state_dict(state["model"], strict=True)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        rng = state["rng"][self.ctx.rank]
        self.generator.set_state(rng["generator"])
        self.global_rng_state = rng

    def _save(self) -> Path:
        rng = self.ctx.gather(_rng_state(self.generator, self.ctx.device))
        path = checkpoint_path(self.run_dir, self.step)
        if self.ctx.main:
            save_checkpoint(path, {
                # data position: global sample samples_seen is next, in epoch samples_seen // num_tiles
                "step": self.step, "samples_seen": self.samples_seen, "num_tiles": len(self.dataset),
                "world_size": self.ctx.world_size,
                "config": config_to_dict(self.cfg),
                "class_scheme": {"name": self.dataset.scheme.name, "names": dict(self.dataset.scheme.names)},
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng,
            })
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep)
        self.ctx.barrier()
        return path

    # -- pieces of a step ------------------------------------------------------------------------------------------

    def _model_fn(self, network: torch.nn.Module) -> Any:
        if self.cfg.optim.precision == "fp32":
            return network

        def bf16(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16):
                return network(x, t, y).float()

        return bf16

    def _draw(self, batch: int, shape: tuple[int, ...], drop_rate: float) -> tuple[torch.Tensor, ...]:
        """t ~ U{0..T−1}, ε ~ N(0, I) and the keep mask (1 − Bernoulli(drop_rate)), all from the step generator."""
        g = self.generator
        t = torch.randint(0, self.diffusion.num_timesteps, (batch,), generator=g)
        noise = torch.randn(shape, generator=g)
        keep = (torch.rand(batch, generator=g) >= drop_rate).float()
        device = self.ctx.device
        return t.to(device), noise.to(device), keep.to(device)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        stage_name, stage, in_stage = self.cfg.stage_at(self.step)
        lr = learning_rate(stage, in_stage)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_start = batch["image"].to(self.ctx.device, non_blocking=True)
        y = batch["y"].to(self.ctx.device, non_blocking=True)
        t, noise, keep = self._draw(x_start.shape[0], tuple(x_start.shape), stage.drop_rate)
        y = y * keep[:, None, None, None]  # the whole y of a dropped sample becomes the null condition
        losses = self.diffusion.training_losses(self._model_fn(self.network), x_start, t, noise, y)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower the learning rate "
                                     f"({stage_name}.lr) or set optim.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, step=self.step)
        self.step += 1
        self.samples_seen += x_start.shape[0] * self.ctx.world_size
        return {"loss": loss.item(), "mse": losses["mse"].mean().item(), "vb": losses["vb"].mean().item(), "lr": lr,
                "dropped": float((keep == 0).sum().item())}

    # -- evaluation and previews (rank 0 only) ------------------------------------------------------------------

    def _eval_batch(self) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg.eval
        items = fixed_crops(self.dataset, self.holdout, cfg.batch_size)
        x = torch.stack([image_to_tensor(it["image"]) for it in items])
        y = torch.from_numpy(np.stack([it["y"] for it in items]))
        # timesteps evenly spread over [0, T) and fixed noise: the same inputs at every evaluation
        t = ((torch.arange(len(items), dtype=torch.float64) + 0.5) * self.diffusion.num_timesteps / len(items)).long()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, _EVAL)))
        return tuple(v.to(self.ctx.device) for v in (x, y, t, noise))

    @torch.no_grad()
    def evaluate(self, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        x, y, t, noise = batch
        self.model.eval()
        try:
            losses = self.diffusion.training_losses(self._model_fn(self.model), x, t, noise, y)
        finally:
            self.model.train()
        return {f"eval_{k}": v.mean().item() for k, v in losses.items()}

    def preview(self, items: list[dict[str, Any]]) -> Path:
        from diffaug.training.preview import write_preview

        p = self.cfg.preview
        return write_preview(self.run_dir / "previews" / f"step_{self.step:07d}.png", self._model_fn(self.ema.shadow),
                             self.diffusion, items, seed=derive_seed(self.cfg.seed, _PREVIEW),
                             num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                             device=self.ctx.device)

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        total = cfg.total_steps
        end = total if stop_after is None else min(total, self.step + stop_after)
        metrics = self.run_dir / "metrics.jsonl"
        if ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            _truncate_metrics(metrics, self.step)
        if self.global_rng_state is not None:
            _set_rng_state(self.global_rng_state, self.generator, ctx.device)

        eval_batch = self._eval_batch() if ctx.main and cfg.eval.every else None
        preview_items = (fixed_crops(self.dataset, self.holdout, cfg.preview.num_images)
                         if ctx.main and cfg.preview.num_images else [])
        # The loader gets its own generator: by default it draws a worker base seed from the global generator, which
        # would shift the dropout stream of a resumed run (crops do not depend on it; see diffaug.training.data).
        loader = torch.utils.data.DataLoader(
            self.dataset, num_workers=cfg.data.num_workers, pin_memory=ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, _LOADER, ctx.rank)),
            batch_sampler=ShardedBatchSampler(start=self.samples_seen, num_steps=max(0, end - self.step),
                                              batch_size=cfg.optim.batch_size, rank=ctx.rank,
                                              world_size=ctx.world_size))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc="train",
                   disable=not (ctx.main and self.progress))
        log_file = metrics.open("a", encoding="utf-8") if ctx.main else None
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()

        def log(record: dict[str, Any]) -> None:
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()

        try:
            if eval_batch is not None and self.step == 0:
                log({"step": 0, **self.evaluate(eval_batch)})
            for batch in loader:
                stats = self.train_step(batch)
                window.append(stats)
                stage_name = cfg.stage_at(self.step - 1)[0]
                bar.set_postfix(loss=f"{stats['loss']:.4f}", stage=stage_name, refresh=False)
                bar.update(1)
                at_stage_end = self.step in (cfg.train.max_steps, total)
                if self.step % cfg.log_every == 0 or self.step == end:
                    sums = ctx.all_reduce_sum([sum(w[k] for w in window) for k in ("loss", "mse", "vb", "dropped")]
                                              + [float(len(window))])
                    n = sums[-1]
                    elapsed = time.perf_counter() - window_start
                    log({"step": self.step, "stage": stage_name, "lr": stats["lr"], "loss": sums[0] / n,
                         "mse": sums[1] / n, "vb": sums[2] / n, "drop_fraction": sums[3] / (n * cfg.optim.batch_size),
                         "steps_per_s": len(window) / elapsed if elapsed > 0 else None})
                    window, window_start = [], time.perf_counter()
                if eval_batch is not None and (self.step % cfg.eval.every == 0 or self.step == total):
                    log({"step": self.step, **self.evaluate(eval_batch)})
                if ctx.main and preview_items and cfg.preview.every and self.step % cfg.preview.every == 0:
                    self.preview(preview_items)
                if self.step % cfg.checkpoint.every == 0 or at_stage_end or self.step == end:
                    self._save()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        return self._finish(preview_items)

    def _finish(self, preview_items: list[dict[str, Any]]) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        resumed_from = self.resume["path"] if self.resume else None
        if self.step < cfg.total_steps:
            return TrainResult(self.run_dir, self.step, False, None, resumed_from)
        # replicas must agree: compare every rank's weights (a DDP bug or a non-deterministic op would show here)
        digests = ctx.gather({"model": weights_digest(self.model), "ema": weights_digest(self.ema.shadow)})
        model_dir = self.run_dir / "model"
        if ctx.main:
            if any(d != digests[0] for d in digests):
                raise RuntimeError(f"the {ctx.world_size} processes ended with different weights: {digests}")
            if preview_items and not (cfg.preview.every and self.step % cfg.preview.every == 0):
                self.preview(preview_items)
            self.ema.shadow.save_pretrained(model_dir)
            atomic_write_json(self.run_dir / "train_state.json", {
                "step": self.step, "samples_seen": self.samples_seen, "world_size": ctx.world_size,
                "class_scheme": self.dataset.scheme.name, "num_classes": self.dataset.scheme.num_classes,
                "rank_weights_sha256": digests,
                "num_parameters": sum(p.numel() for p in self.model.parameters()),
            })
        ctx.barrier()
        return TrainResult(self.run_dir, self.step, True, model_dir, resumed_from)


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process calls this; they join one process
    group (NCCL on CUDA, gloo on the CPU), train with DistributedDataParallel on disjoint shards of the data stream,
    and rank 0 writes the files.

    Args:
        cfg: the validated config (:func:`diffaug.training.config.load_config`).
        stop_after: stop after this many steps of this call (a checkpoint is written there), as if interrupted;
            None runs to the end of the budget.
        progress: show a progress bar (rank 0 only).

    Returns:
        A :class:`TrainResult`; when finished, ``model_dir`` holds the EMA model.

    Raises:
        ConfigError: the config is invalid or disagrees with the run already in ``output_dir``.
        DataFormatError: the data folder is missing, empty or malformed.
    """
    if stop_after is not None and stop_after < 1:
        raise InvalidInputError(f"stop_after must be >= 1, got {stop_after}")
    cfg.validate()
    ctx = _init_distributed(cfg.device)
    try:
        with _seeded_global_rng(derive_seed(cfg.seed, _GLOBAL, ctx.rank), ctx.device):
            trainer = _Trainer(cfg, ctx, progress=progress)
            if trainer.resume is not None and trainer.step >= cfg.total_steps and (trainer.run_dir / "model").is_dir():
                return TrainResult(trainer.run_dir, trainer.step, True, trainer.run_dir / "model",
                                   trainer.resume["path"])
            return trainer.run(stop_after)
    finally:
        ctx.close()
