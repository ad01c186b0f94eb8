"""``generate(options)``: validate, plan, claim (or resume) the output folder, run an engine, finalise.

Every check that needs no model runs before the first file is written, so a bad flag never leaves a half-made
output folder behind.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaug.errors import ConfigError, DataFormatError, DiffaugError, InvalidInputError
from diffaug.generate.job import (GenerateOptions, Layout, check_or_write_job, data_digest, environment_note,
                                  job_lock, remove_stale_temporaries)
from diffaug.generate.plan import batches, plan_items, tile_windows
from diffaug.generate.weights import WeightsInfo, resolve_weights
from diffaug.generate.worker import JobContext, resolve_device

__all__ = ["GenerateResult", "generate", "read_data_mpp"]

_POLICIES = ("balance", "enlarge", "both")
_FORMATS = {"tiles": ("tiles",), "hovernet": ("hovernet",), "both": ("tiles", "hovernet")}
_ENGINES = ("local", "ray")
_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class GenerateResult:
    """What a :func:`generate` call did.

    Attributes:
        out: the output folder.
        outputs: items in the job.
        generated: outputs this call added (0 for a job that was already complete).
        resumed: the folder already held this job.
        summary: the content of ``summary.json``.
        workers: processes that ran the model (1 for the local engine, the actors for Ray; 0 if nothing ran).
    """

    out: Path
    outputs: int
    generated: int
    resumed: bool
    summary: dict[str, Any]
    workers: int = 0

    @property
    def pictures(self) -> list[Path]:
        """The class count chart and the contact sheet."""
        layout = Layout(self.out)
        return [layout.class_chart, layout.contact_sheet]


def _check_number(value: Any, flag: str, *, integer: bool = False, minimum: float | None = None) -> None:
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or \
            (minimum is not None and value < minimum):
        need = "an integer" if integer else "a number"
        raise ConfigError(f"{flag} must be {need}{f' >= {minimum:g}' if minimum is not None else ''}, got {value!r}")


def _check_options(options: GenerateOptions) -> None:
    """Flag checks that need neither data nor model."""
    from diffaug.diffusion import start_index

    for value, name, choices in ((options.policy, "--policy", _POLICIES), (options.format, "--format", _FORMATS),
                                 (options.engine, "--engine", _ENGINES), (options.precision, "--precision",
                                                                          _PRECISIONS)):
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    _check_number(options.seed, "--seed", integer=True, minimum=0)
    _check_number(options.per_tile, "--per-tile", integer=True, minimum=1)
    _check_number(options.batch_size, "--batch-size", integer=True, minimum=1)
    if options.limit is not None:
        _check_number(options.limit, "--limit", integer=True, minimum=1)
    if options.workers is not None:
        _check_number(options.workers, "--workers", integer=True, minimum=1)
    _check_number(options.guidance_scale, "--guidance-scale")
    try:
        start_index(options.num_inference_steps, options.strength)
    except DiffaugError as exc:
        raise ConfigError(f"--strength {options.strength} / --num-inference-steps {options.num_inference_steps}: "
                          f"{exc}") from None
    if options.engine == "local" and (options.ray_address is not None or options.workers is not None):
        raise ConfigError("--ray-address and --workers apply to --engine ray only")


def read_data_mpp(root: Path) -> float | None:
    """µm per pixel a tile folder declares: the number under ``"mpp"`` in its ``classes.json`` (None if absent)."""
    path = root / "classes.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("mpp")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DataFormatError(f"{path}: unreadable ({exc})") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataFormatError(f"{path}: 'mpp' must be a positive number (µm per pixel), got {value!r}")
    return float(value)


def _open_data(root: Path, weights: WeightsInfo, classes: str | None) -> Any:
    """The tile folder in the model's class scheme; a scheme the model does not speak is an error."""
    from diffaug.data.tiles import TileFolder

    if classes is not None:
        folder = TileFolder(root, classes=classes)
    else:
        try:  # the model's scheme, reached by the data's standard merge if it has one
            folder = TileFolder(root, classes=weights.class_scheme or "default")
        except DataFormatError:
            raise
        except InvalidInputError:  # the data cannot be read in the model's scheme: say so below
            folder = TileFolder(root)
    model = f"the model ({weights.id}) has {weights.num_classes} classes counting background" + \
        (f", scheme {weights.class_scheme!r}" if weights.class_scheme else "")
    if not folder.has_classes:
        if weights.num_classes != 2:
            raise ConfigError(f"--data {root}: instance-only tiles (no classes), but {model}; use a model trained "
                              "without classes (2 classes: background, nucleus) or data with type maps")
    elif weights.class_scheme is not None and folder.scheme.name != weights.class_scheme:
        raise ConfigError(f"--data {root}: read in classes {folder.scheme.name!r}, but {model}; read the data in the "
                          f"model's scheme (--classes {weights.class_scheme}) or use a model of this scheme")
    elif folder.scheme.num_classes != weights.num_classes:
        raise ConfigError(f"--data {root}: has {folder.scheme.num_classes} classes counting background "
                          f"({folder.scheme.name!r}), but {model}; use --classes to read it in the model's scheme")
    return folder


def _check_edit_options(options: GenerateOptions, folder: Any) -> None:
    from diffaug.labels.balance import check_balance_params
    from diffaug.labels.enlarge import check_enlarge_params

    uses_balance = options.policy in ("balance", "both")
    if uses_balance and not folder.has_classes:
        raise ConfigError(f"--policy {options.policy}: the tiles in {folder.root} have no classes; balancing needs "
                          "classes. Use --policy enlarge")
    for edit, used, given, check in (
            ("balance", uses_balance, options.balance,
             lambda: check_balance_params(num_classes=folder.scheme.num_classes, **options.balance)),
            ("enlarge", options.policy in ("enlarge", "both"), options.enlarge,
             lambda: check_enlarge_params(**options.enlarge))):
        if not used:
            if given:
                raise ConfigError(f"{edit} options {sorted(given)} given, but --policy is {options.policy}")
            continue
        try:
            check()
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"{edit} options: {exc}") from None
        except DiffaugError as exc:
            raise ConfigError(f"--policy {options.policy}: {exc}") from None


def _tile_shapes(folder: Any) -> list[tuple[str, tuple[int, int]]]:
    from diffaug.data.tiles import read_label_npz

    shapes = []
    for name in folder.names:
        inst = read_label_npz(folder.root / f"{name}.npz")["inst_map"]
        if inst.ndim != 2:
            raise DataFormatError(f"{folder.root / (name + '.npz')}: inst_map has shape {inst.shape}, expected (H, W)")
        shapes.append((name, (int(inst.shape[0]), int(inst.shape[1]))))
    return shapes


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sorted(options.items()):
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = {str(k): v for k, v in sorted(value.items())}
        out[key] = value
    return out


def generate(options: GenerateOptions) -> GenerateResult:
    """Generate (or resume, or re-finalise) the synthetic dataset described by ``options``.

    Raises:
        ConfigError: invalid flags, data in a class scheme the model does not speak, ``--device cuda`` without
            CUDA, or an output folder holding another job.
        DataFormatError: no tiles in the data folder, unreadable tiles.
        WeightsError: unknown weights.
        MissingExtraError: ``engine="ray"`` without ``diffaug[ray]``.
    """
    from diffaug.assets import sample_tiles_dir
    from diffaug.generate.engines import import_ray, run_local, run_ray
    from diffaug.generate.report import finalize

    _check_options(options)
    device = options.device
    if options.engine == "ray":
        import_ray()  # the device is checked against the cluster's resources when Ray starts
    else:
        device = resolve_device(options.device)
    data = Path(options.data) if options.data is not None else sample_tiles_dir()
    out = Path(options.out)
    if out.resolve() == data.resolve():
        raise ConfigError(f"--out {out}: is the data folder itself; choose a new folder")
    if not data.is_dir():
        raise DataFormatError(f"--data {data}: folder not found; pass a folder of NAME.png + NAME.npz tiles")
    weights = resolve_weights(options.weights, options.revision)
    folder = _open_data(data, weights, options.classes)
    _check_edit_options(options, folder)
    shapes = _tile_shapes(folder)
    for name, shape in shapes:
        tile_windows(shape, weights.image_size, tile=name)
    items = plan_items(shapes, size=weights.image_size, per_tile=options.per_tile, limit=options.limit)
    formats = _FORMATS[options.format]
    balance, enlarge = _jsonable(dict(options.balance)), _jsonable(dict(options.enlarge))
    tile_mpp = read_data_mpp(data)
    spec = {
        "data": {"sha256": data_digest(data, folder.names), "tiles": len(folder.names), "classes": folder.scheme.name},
        "seed": options.seed,
        "weights": {"sha256": weights.sha256},
        "policy": options.policy,
        "params": {"per_tile": options.per_tile, "limit": options.limit, "format": options.format,
                   "strength": options.strength, "num_inference_steps": options.num_inference_steps,
                   "guidance_scale": options.guidance_scale, "precision": options.precision,
                   "window": weights.image_size, "balance": balance, "enlarge": enlarge},
    }
    info = {"data": str(data.resolve()), "mpp": {"tile": tile_mpp, "model": weights.mpp},
            "weights": weights.record(), "versions": environment_note()}
    layout = Layout(out)
    with job_lock(layout):
        resumed, job = check_or_write_job(layout, spec, info)
        remove_stale_temporaries(layout)
        bank = None
        if options.policy in ("balance", "both"):
            from diffaug.labels.balance import DonorBank

            bank = DonorBank.from_folder(folder, rare_classes=options.balance.get("rare_classes"),
                                         donor_classes="all" if "target_distribution" in options.balance else "rare")
        context = JobContext(
            data_root=data, classes=folder.scheme.name,
            scheme=folder.scheme, tiles=tuple(shapes), size=weights.image_size, per_tile=options.per_tile,
            limit=options.limit, seed=options.seed, policy=options.policy, balance=dict(options.balance),
            enlarge=dict(options.enlarge), bank=bank, weights=weights, weights_record=job["info"]["weights"],
            strength=float(options.strength), num_inference_steps=int(options.num_inference_steps),
            guidance_scale=float(options.guidance_scale), precision=options.precision, formats=formats, out=out,
            tile_mpp=tile_mpp)
        if "tiles" in formats:
            _write_classes_json(layout, folder.scheme, tile_mpp)
        missing = {item.index for item in items if not layout.record(item.name).is_file()}
        # whole batches of the plan are rerun, so each batch is always computed with the same members
        pending = [b for b in batches(items, options.batch_size) if any(item.index in missing for item in b)]
        generated = len(missing)
        workers = 0
        if pending:
            if options.engine == "ray":
                workers = run_ray(context, pending, total=len(items), device=device, progress=options.progress,
                                   address=options.ray_address, workers=options.workers)
            else:
                run_local(context, pending, total=len(items), device=device, progress=options.progress)
                workers = 1
        summary = finalize(context, items)
    return GenerateResult(out=out, outputs=len(items), generated=generated, resumed=resumed, summary=summary,
                          workers=workers)


def _write_classes_json(layout: Layout, scheme: Any, mpp: float | None) -> None:
    """The output tile folder's ``classes.json``: the scheme (no merge block) and the data's µm/px, if declared."""
    from diffaug._io import atomic_write_json

    content = scheme.to_json()
    if mpp is not None:
        content["mpp"] = mpp
    atomic_write_json(layout.tiles / "classes.json", content)

