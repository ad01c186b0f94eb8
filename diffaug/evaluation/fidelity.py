"""Label fidelity (SIAN's protocol): does a synthetic image show the nuclei of the label map that conditioned it?

A segmenter trained on real tiles segments (a) images synthesised from held-out label maps and (b) the real tiles
of those same maps; both are scored against the maps with HoVer-Net's metrics. Scores on synthetic images near the
real ones mean the model draws the nuclei it was asked for, in the right place and class; the real-tile score is
the ceiling the segmenter itself sets.

Images are synthesised by :class:`~diffaug.pipelines.SemanticSynthesisPipeline`. With ``strength=1.0`` (the default
here) they start from pure noise, so nothing of the real image leaks in; with DiffMix's partial noise
(``strength=0.55``) the real image's low frequencies survive and fidelity reads higher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffaug._io import atomic_write_json, atomic_write_png, atomic_write_text
from diffaug.data.tiles import Tile
from diffaug.evaluation.scoring import LabelMaps, score_maps, scores_to_json
from diffaug.evaluation.synthetic import SynthesisSettings, render
from diffaug.segmenter import Segmenter, segment

__all__ = ["synthesise_from_labels", "run_fidelity", "fidelity_markdown"]


def synthesise_from_labels(pipe: Any, tiles: Sequence[Tile], *, seed: int, settings: SynthesisSettings,
                           progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """One image per tile, rendered for the tile's own label maps (see :func:`~diffaug.evaluation.synthetic.render`)."""
    return render(pipe, [(t.image, t.inst_map, t.type_map) for t in tiles], seed=seed, settings=settings,
                  progress=progress)


def run_fidelity(segmenter: Segmenter, tiles: Sequence[Tile], synthetic: Sequence[np.ndarray], *,
                 classes: Sequence[int] | None, out_dir: str | Path | None = None,
                 extra: dict[str, Any] | None = None, quality: Callable[[list[np.ndarray], list[np.ndarray]],
                                                                      dict[str, float]] | None = None
                 ) -> dict[str, Any]:
    """Score ``segmenter`` on the synthetic images and on the real tiles, both against the tiles' label maps.

    Args:
        segmenter: trained on real tiles that exclude ``tiles``.
        tiles: the held-out real tiles (their maps conditioned ``synthetic``).
        synthetic: one synthesised image per tile.
        classes: foreground classes for per-class F1, or None (instances only).
        out_dir: when given, ``fidelity.json``, ``fidelity.md`` and the synthetic images (``synthetic/NAME.png``)
            are written there.
        extra: more entries for the JSON (settings, provenance).
        quality: optional ``(real_images, synthetic_images) -> {name: value}`` (FID/KID).
    """
    t0 = time.perf_counter()
    truth = [LabelMaps(t.inst_map, t.type_map if classes is not None else None) for t in tiles]
    real_pred = segment(segmenter, [t.image for t in tiles])  # type: ignore[misc]
    synth_pred = segment(segmenter, list(synthetic))
    report: dict[str, Any] = {
        **(extra or {}),
        "n_tiles": len(tiles),
        "tiles": [t.name for t in tiles],
        "real": scores_to_json(score_maps(truth, [LabelMaps(p.inst_map, p.type_map) for p in real_pred], classes=classes)),
        "synthetic": scores_to_json(score_maps(truth, [LabelMaps(p.inst_map, p.type_map) for p in synth_pred],
                                          classes=classes)),
    }
    report["ratio"] = {k: (report["synthetic"][k] / report["real"][k] if report["real"][k] else float("nan"))
                       for k in ("dice", "aji", "pq")}
    if quality is not None:
        report["image_quality"] = quality([t.image for t in tiles], list(synthetic))  # type: ignore[misc]
    report["seconds_scoring"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        out = Path(out_dir)
        for tile, image in zip(tiles, synthetic):
            atomic_write_png(out / "synthetic" / f"{tile.name}.png", image)
        atomic_write_json(out / "fidelity.json", report)
        atomic_write_text(out / "fidelity.md", fidelity_markdown(report))
    return report


def fidelity_markdown(report: dict[str, Any]) -> str:
    """Two rows (real tiles, synthetic images) of Dice, AJI, PQ and, with classes, F1 scores."""
    names = report.get("class_names", {})
    keys = [("dice", "Dice"), ("aji", "AJI"), ("pq", "PQ")]
    if "f1_detection" in report["real"]:
        keys += [("f1_detection", "F1 det"), ("accuracy", "Acc")]
        keys += [(f"f1_per_class.{c}", f"F1 {names.get(c, c)}") for c in report["real"]["f1_per_class"]]

    def cell(scores: dict[str, Any], key: str) -> str:
        value = scores["f1_per_class"][key.split(".", 1)[1]] if key.startswith("f1_per_class.") else scores[key]
        return "n/a" if value != value else f"{value:.3f}"

    lines = ["| images | " + " | ".join(t for _, t in keys) + " |", "|---|" + "---|" * len(keys)]
    for row, title in (("real", "real tiles"), ("synthetic", "synthetic (same label maps)")):
        lines.append(f"| {title} | " + " | ".join(cell(report[row], k) for k, _ in keys) + " |")
    lines.append("")
    lines.append(f"{report['n_tiles']} held-out label maps. Synthetic/real: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in report["ratio"].items()) + ".")
    if "image_quality" in report:
        lines.append("Image quality: " + ", ".join(f"{k} {v:.4g}" for k, v in report["image_quality"].items()) + ".")
    return "\n".join(lines) + "\n"
