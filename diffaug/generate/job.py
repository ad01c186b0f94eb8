"""A generation job's identity and its output folder: options, ``job.json`` fingerprint, layout, lock.

An output folder belongs to one job. ``job.json``, written before the first output, holds the job's *spec*: the
content hash of the data (tile names and the bytes of every ``.png``/``.npz`` and of ``classes.json``), the seed,
the sha256 of the weights, the policy and every parameter that changes an output. Rerunning a command on a folder
with the same spec resumes it; a different spec (other data, seed, weights, policy or parameters) is an error that
names what differs. Engine, device, batch size and worker count are not part of the spec: they do not change label
maps or records (images only within float rounding; see :mod:`diffaug.generate.plan`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffaug.errors import ConfigError, DataFormatError

__all__ = ["GenerateOptions", "Layout", "Policy", "OutputFormat", "data_digest", "check_or_write_job", "job_lock",
           "remove_stale_temporaries", "environment_note", "JOB_FILE"]

Policy = Literal["balance", "enlarge", "both"]
OutputFormat = Literal["tiles", "hovernet", "both"]
Engine = Literal["local", "ray"]
Precision = Literal["fp32", "bf16"]

JOB_FILE = "job.json"
_JOB_FORMAT = 1


@dataclass(frozen=True)
class GenerateOptions:
    """Everything a generation job is given (the ``diffaug generate`` flags).

    Attributes:
        out: output folder (created; an existing one must hold the same job, which is then resumed).
        data: tile folder (NAME.png + NAME.npz [+ classes.json]); None: the sample tiles shipped with diffaug.
        weights: ``"builtin"``, a model folder, a registered name or a Hub repo id.
        revision: Hub revision for a repo id or registered name.
        policy: label edit: ``"balance"`` (rare classes), ``"enlarge"`` (shift nuclei) or ``"both"`` (balance, then
            enlarge the balanced map).
        per_tile: outputs per source window.
        seed: job seed (>= 0).
        limit: only the first ``limit`` items of the plan.
        format: ``"tiles"`` (tile folder), ``"hovernet"`` (HoVer-Net ``.npy`` patches) or ``"both"``.
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data actors; extra ``diffaug[ray]``).
        device: ``"cpu"`` or ``"cuda"``; None picks CUDA when available.
        batch_size: items per model call (changes only float rounding of images).
        strength: partial-noise strength in (0, 1] (DiffMix: 0.55).
        num_inference_steps: DDIM steps N (DiffMix: 100).
        guidance_scale: classifier-free guidance w (DiffMix: 1.5).
        precision: ``"fp32"``, or ``"bf16"`` autocast (CUDA; faster, changes images).
        classes: class scheme to read the data in; None: the model's scheme.
        balance: keyword options of :func:`diffaug.labels.balance_label_map` (ratio, rare_classes, border_margin, ...).
        enlarge: keyword options of :func:`diffaug.labels.enlarge_label_map` (fraction, shift_range, max_tries).
        ray_address: Ray cluster address; None starts Ray locally (unless it is already initialised).
        workers: Ray actors; None: one per GPU, or one per CPU slot without GPUs.
        progress: show a progress bar; None: only on a terminal.
    """

    out: Path
    data: Path | None = None
    weights: str = "builtin"
    revision: str | None = None
    policy: Policy = "balance"
    per_tile: int = 1
    seed: int = 0
    limit: int | None = None
    format: OutputFormat = "tiles"
    engine: Engine = "local"
    device: Literal["cpu", "cuda"] | None = None
    batch_size: int = 4
    strength: float = 0.55
    num_inference_steps: int = 100
    guidance_scale: float = 1.5
    precision: Precision = "fp32"
    classes: str | None = None
    balance: Mapping[str, Any] = field(default_factory=dict)
    enlarge: Mapping[str, Any] = field(default_factory=dict)
    ray_address: str | None = None
    workers: int | None = None
    progress: bool | None = None


@dataclass(frozen=True)
class Layout:
    """Paths inside an output folder."""

    root: Path

    @property
    def job(self) -> Path:
        return self.root / JOB_FILE

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def hovernet(self) -> Path:
        return self.root / "hovernet"

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def class_chart(self) -> Path:
        return self.root / "class_counts.png"

    @property
    def contact_sheet(self) -> Path:
        return self.root / "contact_sheet.png"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def record(self, name: str) -> Path:
        """The per-item record file; it is written last, so its presence means the item is complete."""
        return self.records / f"{name}.json"

    def outputs(self, name: str, formats: tuple[str, ...]) -> list[str]:
        """An item's output files, relative to the root, in the order they are written."""
        files = []
        if "tiles" in formats:
            files += [f"tiles/{name}.png", f"tiles/{name}.npz"]
        if "hovernet" in formats:
            files.append(f"hovernet/{name}.npy")
        return files


def data_digest(root: Path, names: list[str]) -> str:
    """sha256 over the tile names and the bytes of each tile's ``.png`` and ``.npz`` and of ``classes.json``."""
    digest = hashlib.sha256()
    classes = root / "classes.json"
    digest.update(b"classes.json\0" + (classes.read_bytes() if classes.is_file() else b"") + b"\0")
    for name in names:
        for suffix in (".png", ".npz"):
            path = root / f"{name}{suffix}"
            digest.update(f"{name}{suffix}\0".encode())
            if path.is_file():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _differences(stored: Mapping[str, Any], spec: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(spec)):
        a, b = stored.get(key), spec.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} there, {json.dumps(b)} now")
    return out


def check_or_write_job(layout: Layout, spec: Mapping[str, Any], info: Mapping[str, Any]) -> tuple[bool, dict]:
    """Claim ``layout.root`` for the job ``spec``, or check that it already holds that job.

    Returns:
        ``(resumed, job)``: whether the folder already held the job, and the stored ``job.json`` content (its
        ``info`` is the first run's, so every record of a resumed job carries the same weights block).

    Raises:
        ConfigError: the folder holds another job, or files that are not a generation job's.
    """
    from diffaug._io import atomic_write_json

    from diffaug.generate.plan import fingerprint

    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root}: is a file, not a folder; choose a folder")
    job = {"diffaug_generate": _JOB_FORMAT, "fingerprint": fingerprint(spec), "spec": dict(spec), "info": dict(info)}
    if layout.job.is_file():
        try:
            stored = json.loads(layout.job.read_text(encoding="utf-8"))
            stored_spec = stored["spec"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{layout.job}: unreadable job file ({exc!r}); this folder was not written by "
                                  "`diffaug generate`, or was damaged: choose a new --out folder") from None
        if stored.get("fingerprint") != job["fingerprint"]:
            diffs = _differences(stored_spec, job["spec"])
            shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
            raise ConfigError(f"--out {root}: holds a different generation job ({shown}). Rerun the command that "
                              "made it to resume it, or choose a new --out folder")
        return True, stored
    if root.is_dir() and any(p.name != layout.lock.name and not _is_temporary(p) for p in root.iterdir()):
        raise ConfigError(f"--out {root}: is not empty and holds no {JOB_FILE}, so it is not a `diffaug generate` "
                          "output; choose a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.job, job)
    return False, job


@contextmanager
def job_lock(layout: Layout) -> Iterator[None]:
    """Hold an exclusive lock on the output folder, so two runs never work on one job at the same time."""
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; run one job per folder
        yield
        return
    with open(layout.lock, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out {layout.root}: another `diffaug generate` is running on this folder; wait for it "
                              "or choose another --out") from None
        try:
            yield
        finally:
            # Removed while still held; a run that opened it meanwhile only repeats identical atomic writes.
            layout.lock.unlink(missing_ok=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_temporary(path: Path) -> bool:
    """A temporary file of :mod:`diffaug._io`'s atomic writes (``.NAME.RANDOM.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def remove_stale_temporaries(layout: Layout) -> int:
    """Delete temporary files (``.NAME.*.tmp``) left by atomic writes of a killed run; returns how many."""
    count = 0
    for folder in (layout.root, layout.tiles, layout.hovernet, layout.records):
        if folder.is_dir():
            for path in folder.iterdir():
                if _is_temporary(path):
                    path.unlink(missing_ok=True)
                    count += 1
    return count


def environment_note() -> dict[str, Any]:
    """Versions recorded in ``job.json`` (informational; not part of the spec)."""
    import platform

    import numpy
    import torch

    from diffaug import __version__

    return {"diffaug": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}
