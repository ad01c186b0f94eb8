"""Throughput of ``diffaug generate``: the local engine and the Ray engine with 1 and 2 actors, in one run.

Every configuration runs the same job (the sample tiles shipped with diffaug, the same seed, steps and outputs) into
a fresh folder, and the wall time of the whole :func:`diffaug.generate.generate` call is measured: model loading,
label editing, synthesis and writing included (for Ray: the actor pool's start, not ``ray.init``). Outputs of every
configuration are compared with the local engine's (label maps byte-identical, images within rounding).

    python benchmarks/generate.py [--weights builtin|PATH] [--outputs 16] [--steps 20] [--threads N]

Without the built-in checkpoint the tiny SDM of ``$DIFFAUG_FIXTURES/sdm_reference`` (64 px) is converted and used.
Ray rows are skipped, with the reason, when Ray is not installed. Writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffaug._io import atomic_write_json  # noqa: E402
from diffaug.data.tiles import read_image  # noqa: E402
from diffaug.errors import WeightsError  # noqa: E402
from diffaug.generate import GenerateOptions, builtin_weights, generate  # noqa: E402


def fixture_model(folder: Path) -> Path:
    from diffaug.models import convert_sdm_checkpoint

    fixtures = Path(os.environ.get("DIFFAUG_FIXTURES", REPO.parent / "shared" / "fixtures")) / "sdm_reference"
    flags = json.loads((fixtures / "config.json").read_text())
    return convert_sdm_checkpoint(fixtures / "state_dict.pt", flags, folder, class_scheme="consep-hovernet")


def compare(a: Path, b: Path) -> dict:
    """Label maps equal byte for byte; image values differing, and by how much."""
    maps_equal = all((a / "tiles" / p.name).read_bytes() == p.read_bytes() for p in (b / "tiles").glob("*.npz"))
    differing = total = worst = 0
    for png in (a / "tiles").glob("*.png"):
        diff = np.abs(read_image(png).astype(np.int16) - read_image(b / "tiles" / png.name).astype(np.int16))
        differing += int((diff > 0).sum())
        total += diff.size
        worst = max(worst, int(diff.max()))
    return {"label_maps_identical": maps_equal, "max_grey_level_difference": worst,
            "share_of_values_differing": differing / max(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="builtin")
    parser.add_argument("--outputs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (strength 0.55)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the first local row (default: torch's; a second local row uses 1)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="diffaug-bench-generate-"))
    try:
        weights, label = args.weights, args.weights
        if weights == "builtin":
            try:
                builtin_weights()
            except WeightsError:
                weights = str(fixture_model(work / "fixture_model"))
                label = "sdm_reference fixture model (64 px, 2.5 M parameters; no built-in checkpoint yet)"
                print(f"no built-in checkpoint: using the {label}")
        base = GenerateOptions(out=work / "local", weights=weights, limit=args.outputs, batch_size=args.batch_size,
                               num_inference_steps=args.steps, device="cpu", progress=False)
        rows = []

        def timed(name: str, opts: GenerateOptions, workers: int, threads: int | None = None) -> None:
            """Run ``opts`` and record images/s; ``threads``: torch threads of this process (Ray actors use 1)."""
            previous = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            start = time.perf_counter()
            result = generate(opts)
            seconds = time.perf_counter() - start
            torch.set_num_threads(previous)
            row = {"engine": name, "workers": workers,
                   "torch_threads": 1 if opts.engine == "ray" else threads or previous,
                   "outputs": result.generated, "seconds": round(seconds, 2),
                   "images_per_s": round(result.generated / seconds, 3)}
            if opts.out != base.out:
                row.update(compare(base.out, opts.out))
            rows.append(row)
            print(f"{name:<12}{workers:>8}{row['torch_threads']:>8}{result.generated:>9}{seconds:>10.1f}"
                  f"{row['images_per_s']:>10.3f}")

        print(f"{'engine':<12}{'workers':>8}{'threads':>8}{'outputs':>9}{'seconds':>10}{'images/s':>10}")
        timed("local", base, 1)
        if torch.get_num_threads() > 1:
            timed("local", GenerateOptions(**{**base.__dict__, "out": work / "local1"}), 1, threads=1)
        ray_note = None
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError as exc:
            ray_note = f"Ray rows skipped: Ray is not installed ({exc}); pip install 'diffaug[ray]'"
            print(ray_note)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
            try:
                for n in (1, 2):
                    opts = GenerateOptions(**{**base.__dict__, "out": work / f"ray{n}", "engine": "ray",
                                              "device": None, "workers": n})
                    timed("ray", opts, n)
            finally:
                ray.shutdown()
        local = rows[0]["images_per_s"]
        ratios = {f"{r['engine']}_{r['workers']}x{r['torch_threads']}_threads_vs_local":
                  round(r["images_per_s"] / local, 3) for r in rows[1:]}
        for key, value in ratios.items():
            print(f"{key}: {value:.2f}x")
        result = {
            "job": {"weights": label, "outputs": args.outputs, "num_inference_steps": args.steps,
                    "strength": base.strength, "batch_size": args.batch_size, "data": "diffaug sample tiles"},
            "machine": {"cpus": os.cpu_count(), "torch_threads_local": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_average_at_end": list(os.getloadavg())},
            "rows": rows, "ratios": ratios, "note": ray_note,
        }
        atomic_write_json(REPO / "benchmarks" / "results" / "generate.json", result)
        print(f"wrote {REPO / 'benchmarks' / 'results' / 'generate.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
