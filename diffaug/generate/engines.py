"""Engines that run the pending batches of a job: in this process, or on Ray Data actors.

Both call the same :class:`~diffaug.generate.worker.BatchWorker` on the same fixed batches of the plan, so they write
the same label maps and records, and images equal up to float rounding.

The Ray engine (extra ``diffaug[ray]``) turns each pending batch into one row of a Ray dataset and maps the rows
with ``map_batches(batch_size=1)`` over a pool of actors, each holding one model: one actor per GPU, or one per CPU
slot (one thread each) without GPUs. Actors read the data and write their outputs themselves, so on a cluster the
data, the weights folder and the output folder must be on storage every node sees. By default Ray starts locally
(``ray.init()``); ``ray_address`` joins a running cluster; an already initialised Ray is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffaug.errors import ConfigError, DiffaugError, MissingExtraError
from diffaug.generate.plan import Item
from diffaug.generate.worker import BatchWorker, JobContext, resolve_device

__all__ = ["run_local", "run_ray", "import_ray"]


def _progress(total: int, done: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="img", desc="generate", dynamic_ncols=True, smoothing=0.1,
                disable=None if enabled is None else not enabled)


def run_local(context: JobContext, pending: Sequence[Sequence[Item]], *, total: int, device: str | None,
              progress: bool | None = None) -> None:
    """Run ``pending`` batches in this process, with a progress bar (ETA) over the whole job's ``total`` items."""
    worker = BatchWorker(context, resolve_device(device))
    todo = sum(len(b) for b in pending)
    with _progress(total, total - todo, progress) as bar:
        for batch in pending:
            worker(batch)
            bar.update(len(batch))


def import_ray() -> Any:
    """``ray`` with Ray Data, or :class:`MissingExtraError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("ray[data]", "ray", "--engine ray") from exc
    return ray


class _RayBatchActor:
    """A Ray Data actor: one model, one worker; each input row is one batch of the plan (``start``..``stop``)."""

    def __init__(self, context: JobContext, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # this process is the actor's own (a CPU actor holds one slot: 1 thread)
        self.worker = BatchWorker(context, device)
        self.items = context.items()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = []
        for start, stop in zip(rows["start"].tolist(), rows["stop"].tolist()):
            self.worker(self.items[start:stop])
            counts.append(stop - start)
        return {"count": np.asarray(counts, dtype=np.int64)}


class _QuietRayData:
    """Switch off Ray Data's progress bars and execution logs for a ``with`` block, then restore them."""

    _FIELDS = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start")

    def __init__(self, ray: Any) -> None:
        self.context = ray.data.DataContext.get_current()
        self.logger = logging.getLogger("ray.data")

    def __enter__(self) -> None:
        self.saved = {name: getattr(self.context, name) for name in self._FIELDS if hasattr(self.context, name)}
        self.level = self.logger.level
        for name in self.saved:
            setattr(self.context, name, False)
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(self.context, name, value)
        self.logger.setLevel(self.level)


def run_ray(context: JobContext, pending: Sequence[Sequence[Item]], *, total: int, device: str | None,
            progress: bool | None = None, address: str | None = None, workers: int | None = None) -> int:
    """Run ``pending`` batches on a pool of Ray Data actors; returns the number of actors used.

    Args:
        context: the job.
        pending: the batches still to run (whole batches of the plan).
        total: items in the job (for the progress bar).
        device: ``"cuda"`` (one actor per GPU), ``"cpu"`` (one per CPU slot) or None (GPUs if the cluster has any).
        progress: progress bar on/off (None: on a terminal).
        address: Ray cluster to join; None starts Ray locally unless it is already initialised.
        workers: number of actors; None: one per GPU / CPU slot.

    Raises:
        MissingExtraError: Ray is not installed.
        ConfigError: ``--device cuda`` on a cluster without GPUs, or ``workers`` < 1.
    """
    ray = import_ray()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be an integer >= 1, got {workers!r}")
    started = False
    if not ray.is_initialized():
        if address is None:
            import diffaug

            # Local workers import diffaug from where this process does (a source checkout need not be installed);
            # a cluster's nodes need diffaug installed.
            source = str(Path(diffaug.__file__).resolve().parents[1])
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": source}}, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        started = True
    elif address is not None:
        raise ConfigError(f"--ray-address {address}: Ray is already initialised in this process; drop the address "
                          "or call ray.shutdown() first")
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        use_gpu = device == "cuda" or (device is None and gpus > 0)
        if use_gpu and gpus == 0:
            raise ConfigError("--device cuda: the Ray cluster has no GPUs; use --device cpu")
        slots = gpus if use_gpu else max(cpus, 1)
        size = max(1, min(workers or slots, len(pending)))
        todo = sum(len(b) for b in pending)
        if todo == 0:
            return 0
        rows = [{"start": b[0].index, "stop": b[-1].index + 1} for b in pending]
        quiet = _QuietRayData(ray)  # our progress bar replaces Ray Data's progress logs
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        mapped = dataset.map_batches(
            _RayBatchActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
            fn_constructor_kwargs={"context": context, "device": "cuda" if use_gpu else "cpu",
                                   "threads": max(1, cpus // gpus) if use_gpu else 1},
            num_gpus=1 if use_gpu else 0, num_cpus=1)
        with quiet, _progress(total, total - todo, progress) as bar:
            try:
                for row in mapped.iter_rows():
                    bar.update(int(row["count"]))
            except Exception as exc:  # an actor's DiffaugError arrives wrapped in Ray's exceptions: unwrap it
                cause: BaseException | None = exc
                while cause is not None and not isinstance(cause, DiffaugError):
                    cause = getattr(cause, "cause", None) or cause.__cause__
                if cause is None:
                    raise
                raise cause from None
        return size
    finally:
        if started:
            ray.shutdown()
