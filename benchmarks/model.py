"""Benchmark: SemanticUNet parameters, FLOPs and forward time, for the fixture config and DiffMix's 256-px config.

Measured in one run, side by side:

- parameters of each config (DiffMix's must be 652 M, SPEC §2);
- FLOPs of one forward at batch 1, counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no
  compute needed), split into SPADE's label convolutions (what ``precompute_condition`` takes out of every step) and
  the rest (SPEC §2 quotes 3.42 TFLOP for DiffMix at 256 px);
- CPU forward time in float32 (best of N, alternating the two so both see the same load): the plain forward (``model(x, t, y)``) against the cached condition
  (``model(x, t, cond=precompute_condition(y))``), with the ratio; DiffMix's 256-px model gets one plain forward at
  batch 1 (``--large-repeats`` for more, ``--skip-large-cpu`` to skip);
- on CUDA, when present: float32 against bf16 autocast + channels_last, plain and cached, with the ratios and peak
  memory.

Usage::

    PYTHONPATH=. python benchmarks/model.py                # prints a table, writes benchmarks/results/model.json
    PYTHONPATH=. python benchmarks/model.py --skip-large-cpu
    PYTHONPATH=. python benchmarks/model.py --threads 1     # on a shared, loaded machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffaug._io import atomic_write_json  # noqa: E402
from diffaug.models import SemanticUNet, SemanticUNetConfig  # noqa: E402

CONFIGS: dict[str, SemanticUNetConfig] = {
    # The tiny parity model of shared/fixtures/sdm_reference (2.55 M parameters).
    "fixture-64": SemanticUNetConfig(image_size=64, model_channels=32, channel_mult=(2, 1), num_classes=5,
                                     num_res_blocks=1, attention_resolutions=(32,), num_head_channels=16),
    # DiffMix's released CoNSeP model (SPEC §2).
    "diffmix-256": SemanticUNetConfig.diffmix_256(num_classes=5),
}


def inputs(config: SemanticUNetConfig, batch: int, device: torch.device | str,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random x in [-1, 1], timesteps, and a one-hot + edge condition of the right layout."""
    size = config.image_size
    if torch.device(device).type == "meta":
        return (torch.empty(batch, 3, size, size, device=device),
                torch.zeros(batch, dtype=torch.long, device=device),
                torch.empty(batch, config.label_nc, size, size, device=device))
    x = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=generator)
    classes = torch.randint(0, config.num_classes, (batch, size, size), generator=generator)
    y = torch.zeros(batch, config.label_nc, size, size)
    y.scatter_(1, classes[:, None], 1.0)
    if config.instance_edges:
        y[:, -1] = (torch.rand(batch, size, size, generator=generator) < 0.1).float()
    return x.to(device), t.to(device), y.to(device)


def count_flops(config: SemanticUNetConfig, batch: int = 1) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of a forward, of SPADE's label convolutions, and of the forward with them cached."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SemanticUNet(config).eval()
    x, t, y = inputs(config, batch, "meta")

    def flops(fn: Callable[[], Any]) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return float(counter.get_total_flops())

    total = flops(lambda: model(x, t, y))
    spade = flops(lambda: model.precompute_condition(y))
    cond = model.precompute_condition(y)
    cached = flops(lambda: model(x, t, cond=cond))
    return {"forward": total, "spade_condition": spade, "forward_cached": cached, "spade_share": spade / total}


def _timed(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_forward(model: SemanticUNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, repeats: int,
                 warmup: int, bf16: bool = False, cached: bool = True) -> dict[str, Any]:
    """Seconds of the plain forward and of the forward with the precomputed condition.

    The two are timed alternately, so both see the same machine load; the headline is the best of ``repeats``
    (``*_s``), the median is kept beside it. On CUDA, peak memory of each is recorded too.
    """
    cuda = x.device.type == "cuda"
    autocast = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    variants: dict[str, Callable[[], Any]] = {"plain": lambda: model(x, t, y)}
    result: dict[str, Any] = {"repeats": repeats}
    with torch.inference_mode(), autocast:
        if cached:
            cond = model.precompute_condition(y)
            result["condition_gib"] = cond.nbytes / 2**30
            variants["cached"] = lambda: model(x, t, cond=cond)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        for _ in range(repeats):
            for key, fn in variants.items():
                times[key].append(_timed(fn, cuda))
        if cuda:  # peak memory of one forward of each variant, measured apart
            for key, fn in variants.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                result[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for key, values in times.items():
        result[f"{key}_s"] = min(values)
        result[f"{key}_median_s"] = statistics.median(values)
    if cached:
        result["cached_speedup"] = result["plain_s"] / result["cached_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per measurement (small config)")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed CPU forwards of the 256-px model")
    parser.add_argument("--skip-large-cpu", action="store_true", help="skip the 256-px CPU forward (~1-2 min)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a shared, loaded machine use 1: OpenMP threads "
                             "that wait for each other on oversubscribed cores make CPU timings 10x worse and noisy")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model.json")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    report: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "load_average_at_start": os.getloadavg()},
        "configs": {},
    }
    rows: list[tuple[str, ...]] = []
    for name, config in CONFIGS.items():
        entry: dict[str, Any] = {"config": config.to_dict()}
        with torch.device("meta"):
            entry["parameters"] = SemanticUNet(config).num_parameters()
        entry["flops_batch1"] = count_flops(config)
        large = config.image_size >= 256

        # CPU, float32.
        if not (large and args.skip_large_cpu):
            model = SemanticUNet(config).eval()
            cpu: dict[str, Any] = {}
            for batch in ((1,) if large else (1, 4)):
                x, t, y = inputs(config, batch, "cpu", generator)
                cpu[f"batch{batch}"] = time_forward(model, x, t, y, repeats=args.large_repeats if large else args.repeats,
                                                    warmup=0 if large else 1, cached=not large)
            entry["cpu_float32"] = cpu
            del model

        # CUDA: float32 vs bf16 autocast + channels_last.
        if torch.cuda.is_available():
            cuda: dict[str, Any] = {}
            model = SemanticUNet(config).eval().cuda()
            for batch in (1, 4):
                x, t, y = inputs(config, batch, "cuda", generator)
                fp32 = time_forward(model, x, t, y, repeats=10, warmup=3)
                model.to(memory_format=torch.channels_last)
                bf16 = time_forward(model, x.to(memory_format=torch.channels_last), t, y, repeats=10, warmup=3,
                                    bf16=True)
                model.to(memory_format=torch.contiguous_format)
                cuda[f"batch{batch}"] = {"float32": fp32, "bf16_channels_last": bf16,
                                         "bf16_speedup": fp32["plain_s"] / bf16["plain_s"],
                                         "bf16_cached_vs_fp32_plain": fp32["plain_s"] / bf16["cached_s"]}
            entry["cuda"] = cuda
            del model
            torch.cuda.empty_cache()
        report["configs"][name] = entry

        flops = entry["flops_batch1"]
        for device_key in ("cpu_float32", "cuda"):
            for batch_key, timing in entry.get(device_key, {}).items():
                variants = ({"float32": timing} if device_key == "cpu_float32"
                            else {"float32": timing["float32"], "bf16+cl": timing["bf16_channels_last"]})
                for variant, t in variants.items():
                    batch = int(batch_key.removeprefix("batch"))
                    rate = flops["forward"] * batch / t["plain_s"] / 1e9
                    rows.append((name, f"{entry['parameters'] / 1e6:.2f} M", f"{flops['forward'] / 1e12:.3f}",
                                 f"{flops['spade_share']:.1%}", device_key.split("_")[0], variant, str(batch),
                                 f"{t['plain_s'] * 1e3:.1f}",
                                 f"{t['cached_s'] * 1e3:.1f}" if "cached_s" in t else "-",
                                 f"{t['cached_speedup']:.2f}x" if "cached_speedup" in t else "-", f"{rate:.0f}"))
        if not any(k in entry for k in ("cpu_float32", "cuda")):
            rows.append((name, f"{entry['parameters'] / 1e6:.2f} M", f"{flops['forward'] / 1e12:.3f}",
                         f"{flops['spade_share']:.1%}", "-", "-", "-", "-", "-", "-", "-"))

    header = ("config", "params", "TFLOP/fwd (b=1)", "SPADE share", "device", "dtype", "batch", "plain ms (best)",
              "cached ms (best)", "cached speedup", "GFLOP/s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if torch.cuda.is_available():
        for name, entry in report["configs"].items():
            for batch_key, timing in entry["cuda"].items():
                print(f"{name} {batch_key}: bf16 autocast + channels_last is {timing['bf16_speedup']:.2f}x float32; "
                      f"with the cached condition {timing['bf16_cached_vs_fp32_plain']:.2f}x")
    else:
        print("CUDA not available: no bf16/channels_last measurement in this run.")
    report["environment"]["load_average_at_end"] = os.getloadavg()
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
