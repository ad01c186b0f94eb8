"""Downstream benchmark: the segmenter trained per arm and seed on real (+ synthetic) tiles, scored on held-out real
tiles, side by side in one run (DiffMix's Table 1 protocol at the scale this machine affords).

It runs ``diffaug evaluate downstream`` with the arguments given here, prints its table and the ratio of every arm
to the ``real`` arm, and writes ``benchmarks/results/downstream.json`` (the full results plus the exact command, the
runtime and the machine) and ``benchmarks/results/downstream.md`` (the table, command and runtime, for the README).

Examples::

    # CoNSeP, 5 held-out source images, 3 seeds, real vs GradMix (no diffusion weights needed)
    python benchmarks/downstream.py --data ../shared/data/consep_train --val-images 5 --arms real,gradmix \\
        --seeds 3 --segmenter-steps 1500
    # all arms, with a diffusion model
    python benchmarks/downstream.py --data ../shared/data/consep_train --val-images 5 --seeds 3 \\
        --weights diffmix-consep --device cuda

Every argument after the known ones is passed to ``diffaug evaluate downstream`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffaug._io import atomic_write_json, atomic_write_text  # noqa: E402
from diffaug.cli import main as cli_main  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
KEYS = ("dice", "aji", "pq", "f1_detection", "f1_class_1")


def _machine() -> dict[str, str | int | None]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def ratios(report: dict) -> dict[str, dict[str, float]]:
    """Mean of each arm divided by the ``real`` arm's mean, per metric (NaN where undefined)."""
    if "real" not in report["arms"]:
        return {}
    base = report["arms"]["real"]["mean"]
    out = {}
    for arm, res in report["arms"].items():
        if arm == "real":
            continue
        out[arm] = {k: (res["mean"][k] / base[k] if base.get(k) else math.nan) for k in res["mean"] if k in base}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "downstream"),
                        help="working folder of the evaluation (resumable; git-ignored by default)")
    args, passthrough = parser.parse_known_args(argv)
    command = ["evaluate", "downstream", *passthrough, "--out", args.out, "--no-progress"]
    started = time.perf_counter()
    code = cli_main(command)
    if code:
        return code
    runtime = time.perf_counter() - started
    report = json.loads((Path(args.out) / "results.json").read_text())
    table = (Path(args.out) / "results.md").read_text()
    rel = ratios(report)
    shown = "python benchmarks/downstream.py " + " ".join(shlex.quote(a) for a in passthrough)
    lines = [table, "Ratio to the real arm (mean / mean):", ""]
    cols = [k for k in KEYS if any(k in r for r in rel.values())]
    if rel:
        lines += ["| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {arm} | " + " | ".join(f"{r.get(k, math.nan):.2f}" for k in cols) + " |"
                  for arm, r in rel.items()]
    lines += ["", f"Command: `{shown}`", f"Runtime: {runtime / 60:.1f} min on {_machine()['cpu_count']} CPU cores"
              f"{' + ' + str(_machine()['cuda']) if _machine()['cuda'] else ''} (this run; resumed work not counted).",
              ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "downstream.json", {"command": shown, "runtime_s": round(runtime, 1),
                                                     "machine": _machine(), "ratios_to_real": rel,
                                                     "results": report})
    atomic_write_text(RESULTS / "downstream.md", text)
    print(f"wrote {RESULTS / 'downstream.json'} and {RESULTS / 'downstream.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
