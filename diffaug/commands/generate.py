"""``diffaug generate``: pre-generate a balanced synthetic dataset on disk (resumable, deterministic).

    diffaug generate --out DIR [--data DIR] [--weights builtin|PATH|REPO_ID] [--policy balance|enlarge|both]
                     [--per-tile N] [--seed N] [--limit N] [--format tiles|hovernet|both] [--engine local|ray]
                     [--device cpu|cuda] [--batch-size N] [--strength P] [--num-inference-steps N]
                     [--guidance-scale W]

Without ``--data`` it runs on the four CoNSeP sample tiles shipped with diffaug, and without ``--weights`` on the
built-in checkpoint, so ``diffaug generate --out diffaug-demo`` works offline on a fresh install.

Each source tile is cut into model-size windows (the last row and column flush with the border); each window gives
``--per-tile`` outputs. An output's label maps are the window's, edited by the policy (balance: major-class nuclei
become rare-class donor shapes from a donor bank built once over the whole data folder; enlarge: nuclei shifted by a
few pixels; both: balance, then enlarge), and its image is re-rendered by the diffusion model from the real window
with DiffMix's partial-noise DDIM (``--strength``, ``--num-inference-steps``, ``--guidance-scale``).

Output folder:

* ``tiles/`` (``--format tiles|both``): a tile folder, ``NAME.png`` + ``NAME.npz`` (``inst_map``, ``type_map``,
  ``inst_type``, ``source_inst_id``: the source tile's id of each nucleus) and ``classes.json`` (the scheme, and
  ``mpp`` when the data declares it); ``NAME`` is ``TILE[_yYYYYxXXXX]_COPY``;
* ``hovernet/`` (``--format hovernet|both``): HoVer-Net training patches ``NAME.npy`` (H, W, 5) = RGB, inst, type;
* ``manifest.jsonl``: one record per output, in plan order: source tile, window, copy, seeds (job and item), policy,
  the edit's record, nuclei per class before/after, weights (id, sha256 of ``model.safetensors``, Hub commit),
  strength, steps, guidance, precision, µm/px of the tile and of the model, and the output files;
* ``summary.json``: class counts before/after and the job's parameters; ``class_counts.png`` (bar chart) and
  ``contact_sheet.png`` (real | edited labels | synthetic, first 8 outputs);
* ``job.json``: the job's fingerprint; ``records/``: one record per finished output (the resume state).

**µm/px.** A data folder declares its resolution with a number under ``"mpp"`` in its ``classes.json`` (e.g.
``"mpp": 0.25`` for CoNSeP at 40x); a model with ``"mpp"`` in its ``config.json``. Both go into every record; a
missing one is ``null``. Windows are cut at the data's native resolution: nothing is resampled.

**Determinism and resuming.** Output ``i`` draws its label edit and start noise only from a seed derived from
``--seed`` and ``i``, and batches are fixed slices of the plan, so the same command writes the same bytes however
often it is interrupted. Kill it at any moment and rerun the same command: finished outputs are kept, partial files
are removed, the rest is computed. A different ``--batch-size``, ``--engine`` or ``--device`` gives the same label
maps and records and images equal up to float rounding (at most 1 grey level on under 0.1 % of pixels). Running on
a folder that holds another job (other data, seed, weights, policy or parameters) is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate a balanced synthetic dataset on disk (resumable)"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shares(text: str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLASS=SHARE pairs such as 1=0.25,2=0.25,3=0.25,4=0.25, got "
                                         f"{text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (rerun the same command to resume)")
    parser.add_argument("--data", type=Path, help="tile folder NAME.png + NAME.npz [+ classes.json] (default: the "
                                                  "4 CoNSeP sample tiles shipped with diffaug)")
    parser.add_argument("--weights", default="builtin",
                        help="'builtin' (default: diffaug's small CoNSeP model), a model folder, a registered name "
                             "(diffmix-consep, diffmix-glysac) or a Hub repo id ORG/NAME")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) for --weights ORG/NAME")
    parser.add_argument("--policy", default="balance", choices=["balance", "enlarge", "both"],
                        help="label edit: balance rare classes, enlarge (shift nuclei), or both (default balance)")
    parser.add_argument("--per-tile", type=int, default=1, help="outputs per source window (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="job seed (default 0); same command, same bytes")
    parser.add_argument("--limit", type=int, help="generate only the first N outputs of the plan")
    parser.add_argument("--format", default="tiles", choices=["tiles", "hovernet", "both"],
                        help="tile folder, HoVer-Net .npy patches, or both (default tiles)")
    parser.add_argument("--classes", help="class scheme to read the data in (default: the model's)")
    synth = parser.add_argument_group("synthesis (defaults: DiffMix's)")
    synth.add_argument("--strength", type=float, default=0.55,
                       help="partial-noise strength in (0, 1]; 1 samples from pure noise (default 0.55)")
    synth.add_argument("--num-inference-steps", type=int, default=100, help="DDIM steps N (default 100)")
    synth.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance w (default 1.5)")
    synth.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="fp32 (default) or bf16 autocast (CUDA: faster, slightly different images)")
    run = parser.add_argument_group("execution (changes images only by float rounding)")
    run.add_argument("--engine", default="local", choices=["local", "ray"],
                     help="local (this process) or ray (Ray Data actors; pip install 'diffaug[ray]')")
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    run.add_argument("--batch-size", type=int, default=4, help="outputs per model call (default 4)")
    run.add_argument("--ray-address", help="Ray cluster to join (default: start Ray locally)")
    run.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, or per CPU slot without GPUs)")
    balance = parser.add_argument_group("balance options (defaults: DiffMix's)")
    balance.add_argument("--ratio", type=float, help="share of eligible major nuclei to convert (0.8)")
    balance.add_argument("--rare-classes", type=_int_list, help="comma-separated minor classes (default: the rarest)")
    balance.add_argument("--target-distribution", type=_shares, metavar="K=SHARE,...",
                         help="class shares to reach instead of --ratio")
    balance.add_argument("--border-margin", type=float, help="majors this close to the window border are kept (default: 30 px, scaled down on windows under 256 px)")
    balance.add_argument("--size-ratio", type=float, help="dilated major area / donor area, at least (2.3)")
    balance.add_argument("--donor-source", choices=["same-tile-first", "same-tile", "dataset"],
                         help="where donors come from (same-tile-first)")
    enlarge = parser.add_argument_group("enlarge options")
    enlarge.add_argument("--fraction", type=float, help="share of nuclei picked to move (0.5)")
    enlarge.add_argument("--shift-range", type=_int_list, metavar="MIN,MAX", help="shift per axis in pixels (0,3)")


_BALANCE = ("ratio", "rare_classes", "target_distribution", "border_margin", "size_ratio", "donor_source")
_ENLARGE = ("fraction", "shift_range")


def run(args: argparse.Namespace) -> int:
    from diffaug.generate import GenerateOptions, generate
    from diffaug.generate.report import format_summary

    options = GenerateOptions(
        out=args.out, data=args.data, weights=args.weights, revision=args.revision, policy=args.policy,
        per_tile=args.per_tile, seed=args.seed, limit=args.limit, format=args.format, engine=args.engine,
        device=args.device, batch_size=args.batch_size, strength=args.strength,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, precision=args.precision,
        classes=args.classes, ray_address=args.ray_address, workers=args.workers,
        balance={k: getattr(args, k) for k in _BALANCE if getattr(args, k) is not None},
        enlarge={k: getattr(args, k) for k in _ENLARGE if getattr(args, k) is not None})
    result = generate(options)
    summary = result.summary
    print(format_summary(summary))
    state = ("resumed: " if result.resumed and result.generated else "already complete: " if result.resumed else "")
    print(f"{state}{result.generated} of {result.outputs} outputs generated in this run")
    folders = [summary["files"][k] for k in ("tiles", "hovernet") if k in summary["files"]]
    print(f"outputs:  {result.out.resolve()}/ ({', '.join(folders)}, manifest.jsonl, summary.json)")
    for picture in result.pictures:
        print(f"picture:  {picture.resolve()}")
    return 0
