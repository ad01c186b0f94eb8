"""Downstream evaluation: does adding synthetic pairs to the real training tiles help a segmenter on real test tiles?

For every arm and every seed, the same segmenter (:mod:`diffaug.segmenter`, same architecture, same optimisation
budget in steps) is trained from scratch on the arm's training set and scored on the real test tiles with HoVer-Net's
metrics (:mod:`diffaug.evaluation.scoring`). Arms:

- ``real``: the real training tiles only;
- ``gradmix``: real + one GradMix pair per real tile whose balancing edit changed something
  (:class:`diffaug.transforms.GradMixTransform`'s function);
- ``diffmix-balance`` / ``diffmix-enlarge`` / ``diffmix-both``: real + one DiffMix pair per real tile, its labels
  edited by the policy and its image rendered by the diffusion model (``--weights``).

Training batches draw uniformly from the pooled tiles of the arm, so synthetic pairs take the share of draws they
have in the pool (half, for DiffMix arms), as in DiffMix's protocol of training on the union. Each arm's synthetic set
is made once (from ``synthesis_seed``) and shared by its seeds; the seeds vary the segmenter's initialisation and data
order. The donor bank of the balancing edits is built from the training tiles only.

Results are mean ± sample standard deviation over seeds. Every finished (arm, seed) run and every synthetic set is
saved under the output folder as it completes, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaug._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffaug.data.schemes import SCHEMES, ClassScheme
from diffaug.data.tiles import Tile, TileFolder, write_classes_json, write_tile
from diffaug.errors import ConfigError
from diffaug.evaluation.scoring import INSTANCE_METRICS, LabelMaps, score_maps, scores_to_json
from diffaug.evaluation.synthetic import SynthesisSettings, diffmix_pairs, gradmix_pairs
from diffaug.segmenter import SegmenterConfig, TrainingSettings, segment, train_segmenter

__all__ = ["ARMS", "parse_arms", "DownstreamJob", "run_downstream", "summarise", "markdown_table", "bar_chart"]

ARMS: dict[str, str] = {
    "real": "real tiles only",
    "gradmix": "real + GradMix pairs (balancing swap, Poisson-blended image)",
    "diffmix-balance": "real + DiffMix pairs, balancing map",
    "diffmix-enlarge": "real + DiffMix pairs, enlarging map",
    "diffmix-both": "real + DiffMix pairs, balancing then enlarging map",
}
NEEDS_CLASSES = ("gradmix", "diffmix-balance", "diffmix-both")
NEEDS_WEIGHTS = ("diffmix-balance", "diffmix-enlarge", "diffmix-both")


def parse_arms(spec: str | Sequence[str]) -> list[str]:
    """Arms from a comma-separated string or a list; unknown or repeated arms are errors."""
    arms = [a.strip() for a in spec.split(",")] if isinstance(spec, str) else [str(a) for a in spec]
    arms = [a for a in arms if a]
    if not arms:
        raise ConfigError("--arms is empty; choose from " + ", ".join(ARMS))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown)} in --arms; known arms: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"--arms lists an arm twice: {','.join(arms)}")
    return arms


@dataclass
class DownstreamJob:
    """Everything that decides a downstream result (written to ``job.json``; resuming needs an equal job)."""

    arms: list[str]
    seeds: list[int]
    segmenter: dict[str, Any]
    training: dict[str, Any]
    synthesis: dict[str, Any]
    synthesis_seed: int
    weights: str | None
    train_tiles: list[str]
    test_tiles: list[str]
    classes: list[int] | None
    class_names: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    #: what ``weights`` resolved to (kind, Hub repo, revision, commit sha, sha256 of the file): other weights under
    #: the same name make another job
    weights_info: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_tiles(folder: Path, tiles: Sequence[Tile], scheme: ClassScheme) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_classes_json(folder, scheme)
    for tile in tiles:
        write_tile(folder, tile.name, inst_map=tile.inst_map, type_map=tile.type_map, image=tile.image,
                   inst_type=tile.inst_type)
    atomic_write_text(folder / "COMPLETE", f"{len(tiles)}\n")


def _load_tiles(folder: Path) -> list[Tile] | None:
    if not (folder / "COMPLETE").is_file():
        return None
    if int((folder / "COMPLETE").read_text()) == 0:
        return []
    view = TileFolder(folder)
    return [view.read(n) for n in view.names]


def run_downstream(job: DownstreamJob, train: Sequence[Tile], test: Sequence[Tile], out_dir: str | Path, *,
                   device: str = "cpu", pipe_factory: Callable[[], Any] | None = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Train and score the segmenter for every arm and seed of ``job``; write and return the results.

    Args:
        job: the job (arms, seeds, settings, tile names).
        train: the real training tiles (with images).
        test: the real test tiles.
        out_dir: output folder: ``job.json``, ``runs/``, ``synthetic/``, then ``results.json``, ``results.md`` and
            ``results.png``. A folder holding another job is an error.
        device: torch device of the segmenter.
        pipe_factory: returns the :class:`~diffaug.pipelines.SemanticSynthesisPipeline` (called once, only when a
            DiffMix arm needs new pairs).
        log: where progress lines go.
        progress: show progress bars.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job_data = {"fingerprint": job.fingerprint(), **asdict(job)}
    if job_path.is_file():
        previous = json.loads(job_path.read_text())
        if previous.get("fingerprint") != job_data["fingerprint"]:
            raise ConfigError(f"{out} holds a different downstream job (other data, arms, seeds or settings); use a "
                              "new --out folder or remove it")
        log(f"resuming the job in {out}")
    else:
        atomic_write_json(job_path, job_data)
    started = time.perf_counter()
    config = SegmenterConfig(**job.segmenter)
    scheme = SCHEMES.get(config.scheme) or ClassScheme(config.scheme, config.class_names)
    classes = job.classes
    truth = [LabelMaps(t.inst_map, t.type_map if classes is not None else None) for t in test]
    pipe = None
    bank = None
    results: dict[str, Any] = {}
    for arm in job.arms:
        synthetic = _load_tiles(out / "synthetic" / arm) if arm != "real" else []
        if synthetic is None:
            t0 = time.perf_counter()
            if bank is None and arm in NEEDS_CLASSES:
                from diffaug.labels import DonorBank

                bank = DonorBank.from_maps(train, num_classes=config.num_classes or None)
            if arm == "gradmix":
                by_name = {t.name: t for t in train}
                synthetic = gradmix_pairs(train, seed=job.synthesis_seed, bank=bank,  # type: ignore[arg-type]
                                          donor_tile=lambda name: (by_name[name].image, by_name[name].inst_map))
            else:
                if pipe is None:
                    if pipe_factory is None:
                        raise ConfigError(f"arm {arm} needs a diffusion model: pass --weights")
                    pipe = pipe_factory()
                synthetic = diffmix_pairs(train, arm.removeprefix("diffmix-"), pipe,  # type: ignore[arg-type]
                                          seed=job.synthesis_seed, bank=bank,
                                          settings=SynthesisSettings(**job.synthesis))
            _save_tiles(out / "synthetic" / arm, synthetic, scheme)
            log(f"{arm}: {len(synthetic)} synthetic pairs in {time.perf_counter() - t0:.0f} s")
        runs = []
        for seed in job.seeds:
            run_path = out / "runs" / f"{arm}-seed{seed}.json"
            if run_path.is_file():
                runs.append(json.loads(run_path.read_text()))
                continue
            t0 = time.perf_counter()
            settings = TrainingSettings(**{**job.training, "seed": seed})
            model = train_segmenter([*train, *synthetic], config, settings, device=device, progress=progress)
            pred = segment(model, [t.image for t in test])  # type: ignore[misc]
            scores = score_maps(truth, [LabelMaps(p.inst_map, p.type_map) for p in pred], classes=classes)
            run = {"arm": arm, "seed": seed, "n_train": len(train), "n_synthetic": len(synthetic),
                   "seconds": round(time.perf_counter() - t0, 1), "scores": scores_to_json(scores)}
            atomic_write_json(run_path, run)
            runs.append(run)
            log(f"{arm} seed {seed}: PQ {scores['pq']:.4f}, Dice {scores['dice']:.4f} ({run['seconds']} s)")
        results[arm] = {"description": ARMS[arm], "n_train": len(train), "n_synthetic": len(synthetic),
                        "runs": runs, **summarise([r["scores"] for r in runs])}
    report = {"job": job_data, "arms": results, "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown_table(report))
    bar_chart(report, out / "results.png")
    return report


def _flatten(scores: dict[str, Any]) -> dict[str, float]:
    flat = {k: float(scores[k]) for k in (*INSTANCE_METRICS, "f1_detection", "accuracy") if k in scores}
    for c, v in scores.get("f1_per_class", {}).items():
        flat[f"f1_class_{c}"] = float(v)
    return flat


def summarise(scores: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every metric over runs (NaN-aware)."""
    flat = [_flatten(s) for s in scores]
    keys = list(flat[0]) if flat else []
    mean, std = {}, {}
    for key in keys:
        values = np.array([f[key] for f in flat], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean[key] = float(finite.mean()) if finite.size else math.nan
        std[key] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {"mean": mean, "std": std}


def _columns(report: dict[str, Any]) -> list[tuple[str, str]]:
    names = report["job"].get("class_names", {})
    cols = [("dice", "Dice"), ("aji", "AJI"), ("pq", "PQ")]
    if report["job"].get("classes") is not None:
        cols += [("f1_detection", "F1 det"), ("accuracy", "Acc")]
        cols += [(f"f1_class_{c}", f"F1 {names.get(str(c), c)}") for c in report["job"]["classes"]]
    return cols


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a markdown table: one row per arm, ``mean ± std`` over seeds."""
    cols = _columns(report)
    seeds = len(report["job"]["seeds"])
    lines = ["| arm | train pairs | " + " | ".join(title for _, title in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for arm, res in report["arms"].items():
        cells = []
        for key, _ in cols:
            m, s = res["mean"].get(key, math.nan), res["std"].get(key, math.nan)
            cells.append("n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}")
        pairs = f"{res['n_train']} + {res['n_synthetic']}"
        lines.append(f"| {arm} | {pairs} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± sample std over {seeds} seed(s); test tiles: {len(report['job']['test_tiles'])}; "
                 f"segmenter steps: {report['job']['training']['steps']}; total time {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: str | Path) -> Path:
    """Grouped bar chart (one group per metric, one bar per arm, std as error bars) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cols = _columns(report)
    arms = list(report["arms"])
    width = 0.8 / max(1, len(arms))
    fig = Figure(figsize=(max(6.0, 1.2 * len(cols) + 2), 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(cols))
    for i, arm in enumerate(arms):
        res = report["arms"][arm]
        means = [res["mean"].get(k, math.nan) for k, _ in cols]
        stds = [res["std"].get(k, 0.0) for k, _ in cols]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, np.nan_to_num(means), width, yerr=stds, capsize=2, label=arm)
    ax.set_xticks(x, [title for _, title in cols], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"Downstream segmenter on real test tiles ({len(report['job']['seeds'])} seeds)")
    ax.legend(fontsize="small", ncols=min(3, len(arms)))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
