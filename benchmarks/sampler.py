"""Benchmark: the plain against the fast (lossless) path of SemanticSynthesisPipeline, on the same inputs, in one run.

Plain path: per step, one forward with the label maps y and one with the null condition (SPADE's γ/β convolutions
of y recomputed at every step). Fast path (SPEC §4): SPADE γ/β once per call, one encoder pass shared by both
branches, one decoder pass of batch 2B. Both paths run the same DiffMix call (partial noise, DDIM, w = 1.5) from the
same start noise; the table gives seconds per call and per step (best and median of N repeats, alternating the two
paths so both see the same machine load), the speed-up, and how far the outputs differ (final x and uint8).

Configurations:

- ``fixture-64``: the converted SDM/DiffMix parity model of ``shared/fixtures/sdm_reference`` (2.55 M parameters,
  SPADE-dominated), on a fixture tile, DiffMix's full call (ddim100, strength 0.55: 55 model steps);
- ``wide-64``: a wider model (C = 128, channel_mult 1,1,2,2, two res blocks, attention at 16 and 8; 57 M parameters)
  with seeded random weights, a few steps of the same call (``--wide-steps``);
- on CUDA, when present: DiffMix's 256-px model (652 M parameters, seeded random weights), float32 against bf16
  autocast + channels_last, plain and fast.

Usage::

    PYTHONPATH=. python benchmarks/sampler.py                 # table + benchmarks/results/sampler.json
    PYTHONPATH=. python benchmarks/sampler.py --threads 1     # on a shared, loaded machine
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffaug._io import atomic_write_json  # noqa: E402
from diffaug.diffusion import GaussianDiffusion  # noqa: E402
from diffaug.models import SemanticUNet, SemanticUNetConfig, convert_sdm_checkpoint  # noqa: E402
from diffaug.pipelines import SemanticSynthesisPipeline  # noqa: E402

FIXTURES = Path(os.environ.get("DIFFAUG_FIXTURES", REPO.parent / "shared" / "fixtures")) / "sdm_reference"

WIDE_64 = SemanticUNetConfig(image_size=64, model_channels=128, channel_mult=(1, 1, 2, 2), num_classes=5,
                             num_res_blocks=2, attention_resolutions=(16, 8), num_head_channels=64)


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter from a seeded generator, as the fixture did (zero-initialised output convs would make
    both paths trivially equal): weights N(0, 1/fan_in), biases N(0, 0.05²), norm scales 1 + N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tile_inputs(size: int, batch: int) -> dict[str, Any]:
    """Image and label maps from the fixture's DDIM tiles (64² crops), resized by tiling to ``size``."""
    with np.load(FIXTURES / "ddim_cases.npz") as z:
        picks = [k % 4 for k in range(batch)]
        reps = max(1, size // 64)

        def tiled(key: str, i: int) -> np.ndarray:
            arr = z[f"d{i}_{key}"]
            reps_shape = (reps, reps) + (1,) * (arr.ndim - 2)
            return np.ascontiguousarray(np.tile(arr, reps_shape)[:size, :size])

        return {
            "image": [tiled("image", i) for i in picks],
            "inst_map": [tiled("inst_map", i) for i in picks],
            "type_map": [tiled("type_map", i) for i in picks],
        }


def run_pair(pipe: SemanticSynthesisPipeline, inputs: dict[str, Any], *, steps: int, strength: float,
             repeats: int, autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Time the plain and the fast path alternately on identical inputs and noise; compare their outputs."""
    batch = len(inputs["inst_map"])
    size = inputs["inst_map"][0].shape
    noise = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    finals: dict[str, torch.Tensor] = {}
    images: dict[str, list[np.ndarray]] = {}
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    model_steps = 0

    def keep_final(mode: str):
        def callback(step_index: int, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            nonlocal model_steps
            model_steps = max(model_steps, step_index)
            finals[mode] = x.float().cpu()
        return callback

    for _ in range(repeats):
        for mode in ("plain", "fast"):
            sync(pipe.device)
            start = time.perf_counter()
            out = pipe(**inputs, strength=strength, num_inference_steps=steps, guidance_scale=1.5, noise=noise,
                       fast=mode == "fast", autocast_dtype=autocast_dtype, callback=keep_final(mode))
            sync(pipe.device)
            times[mode].append(time.perf_counter() - start)
            images[mode] = out.images
    best = {m: min(v) for m, v in times.items()}
    diff_uint8 = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                     for a, b in zip(images["plain"], images["fast"]))
    return {
        "batch": batch,
        "size": list(size),
        "model_steps": model_steps,
        "repeats": repeats,
        "plain_s": {"best": best["plain"], "median": statistics.median(times["plain"])},
        "fast_s": {"best": best["fast"], "median": statistics.median(times["fast"])},
        "plain_s_per_step": best["plain"] / model_steps,
        "fast_s_per_step": best["fast"] / model_steps,
        "speedup_best": best["plain"] / best["fast"],
        "speedup_median": statistics.median(times["plain"]) / statistics.median(times["fast"]),
        "max_abs_diff_final_x": float((finals["plain"] - finals["fast"]).abs().max()),
        "max_diff_uint8": diff_uint8,
        # share of final pixels clipped at ±1, where any two paths agree trivially (random weights saturate)
        "saturated_fraction": float((finals["fast"].abs() >= 1).float().mean()),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixture_pipeline() -> SemanticSynthesisPipeline:
    folder = Path(tempfile.mkdtemp(prefix="diffaug_bench_")) / "fixture_model"
    convert_sdm_checkpoint(FIXTURES / "state_dict.pt", FIXTURES / "config.json", folder)
    return SemanticSynthesisPipeline.from_pretrained(str(folder))


def random_pipeline(config: SemanticUNetConfig, seed: int, device: str = "cpu") -> SemanticSynthesisPipeline:
    model = randomise_(SemanticUNet(config), seed).eval()
    return SemanticSynthesisPipeline(model, GaussianDiffusion.from_config(config.diffusion)).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (best and median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=1, help="images per call on CPU")
    parser.add_argument("--wide-steps", type=int, default=3, help="model steps of the wide CPU config")
    parser.add_argument("--cuda-steps", type=int, default=10, help="model steps of DiffMix-256 on CUDA")
    parser.add_argument("--cuda-batch", type=int, default=4, help="images per call on CUDA")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sampler.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()

    fixture = fixture_pipeline()
    rows.append({"config": "fixture-64", "device": "cpu", "precision": "float32",
                 "parameters": sum(p.numel() for p in fixture.model.parameters()),
                 **run_pair(fixture, tile_inputs(64, args.batch), steps=100, strength=0.55, repeats=args.repeats)})

    wide = random_pipeline(WIDE_64, seed=0)
    # strength = steps/100 with ddim100: the call starts at t = 10·steps − 10 and runs `steps` model steps
    rows.append({"config": "wide-64", "device": "cpu", "precision": "float32",
                 "parameters": sum(p.numel() for p in wide.model.parameters()),
                 **run_pair(wide, tile_inputs(64, args.batch), steps=100, strength=args.wide_steps / 100,
                            repeats=args.repeats)})
    del wide

    if torch.cuda.is_available():
        config = SemanticUNetConfig.diffmix_256(num_classes=5)
        big = random_pipeline(config, seed=0, device="cuda")
        inputs = tile_inputs(256, args.cuda_batch)
        strength = args.cuda_steps / 100
        rows.append({"config": "diffmix-256", "device": torch.cuda.get_device_name(), "precision": "float32",
                     "parameters": sum(p.numel() for p in big.model.parameters()),
                     **run_pair(big, inputs, steps=100, strength=strength, repeats=args.repeats)})
        big.to(channels_last=True)
        torch.cuda.reset_peak_memory_stats()
        rows.append({"config": "diffmix-256", "device": torch.cuda.get_device_name(),
                     "precision": "bf16 autocast + channels_last",
                     "parameters": sum(p.numel() for p in big.model.parameters()),
                     **run_pair(big, inputs, steps=100, strength=strength, repeats=args.repeats,
                                autocast_dtype=torch.bfloat16),
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})

    header = (f"{'config':<12} {'device':<10} {'precision':<30} {'B':>2} {'steps':>5} {'plain s':>9} {'fast s':>9} "
              f"{'plain s/step':>12} {'fast s/step':>11} {'speed-up':>8} {'max|Δx|':>9} {'Δuint8':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<12} {r['device'][:10]:<10} {r['precision']:<30} {r['batch']:>2} {r['model_steps']:>5} "
              f"{r['plain_s']['best']:>9.2f} {r['fast_s']['best']:>9.2f} {r['plain_s_per_step']:>12.3f} "
              f"{r['fast_s_per_step']:>11.3f} {r['speedup_best']:>7.2f}x {r['max_abs_diff_final_x']:>9.1e} "
              f"{r['max_diff_uint8']:>6d}")
    print("(times: best of", args.repeats, "calls; speed-up = plain / fast; median speed-ups in the JSON)")

    result = {
        "benchmark": "sampler: plain vs fast path of SemanticSynthesisPipeline",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
