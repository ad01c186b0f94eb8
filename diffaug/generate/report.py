"""The end of a job: ``manifest.jsonl`` in plan order, ``summary.json``, a class count chart and a contact sheet.

Everything here is derived from the per-item records and output files, so rerunning it (after a kill during the
finalisation, or on a finished job) rewrites the same bytes. ``summary.json`` is written last and marks the job
complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffaug.errors import DataFormatError
from diffaug.generate.job import Layout
from diffaug.generate.plan import Item
from diffaug.generate.worker import JobContext, crop_window

__all__ = ["finalize", "read_records", "format_summary", "CONTACT_ROWS"]

#: Items shown on the contact sheet (the first ones of the plan).
CONTACT_ROWS = 8


def read_records(layout: Layout, items: Sequence[Item]) -> list[str]:
    """The record lines of ``items`` in plan order; a missing record is an error (the job is not complete)."""
    lines = []
    for item in items:
        path = layout.record(item.name)
        try:
            lines.append(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataFormatError(f"{path}: missing; the job is not complete (rerun the same command)") from None
    return lines


def _class_totals(records: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for record in records:
        for name, count in record["nuclei"][key].items():
            totals[name] = totals.get(name, 0) + count
    return totals


def _summary(context: JobContext, records: Sequence[dict[str, Any]], layout: Layout) -> dict[str, Any]:
    before, after = _class_totals(records, "before"), _class_totals(records, "after")
    nb, na = sum(before.values()), sum(after.values())
    changed = sum(r["nuclei"]["changed"] for r in records)
    classes = [{"name": name, "before": before[name], "after": after.get(name, 0),
                "share_before": before[name] / max(nb, 1), "share_after": after.get(name, 0) / max(na, 1)}
               for name in before]
    files = {"manifest": layout.manifest.name, "class_chart": layout.class_chart.name,
             "contact_sheet": layout.contact_sheet.name}
    if "tiles" in context.formats:
        files["tiles"] = "tiles/"
    if "hovernet" in context.formats:
        files["hovernet"] = "hovernet/"
    return {
        "outputs": len(records),
        "source_tiles": len({r["source_tile"] for r in records}),
        "policy": context.policy,
        "seed": context.seed,
        "data": {"path": str(context.data_root.resolve()), "tiles": len(context.tiles),
                 "scheme": context.scheme.name, "mpp": context.tile_mpp},
        "weights": dict(context.weights_record),
        "params": {"strength": context.strength, "num_inference_steps": context.num_inference_steps,
                   "guidance_scale": context.guidance_scale, "precision": context.precision,
                   "window": context.size, "per_tile": context.per_tile, "limit": context.limit,
                   "balance": dict(context.balance), "enlarge": dict(context.enlarge)},
        "rare_classes": None if context.bank is None else list(context.bank.rare_classes),
        "nuclei_before": nb,
        "nuclei_after": na,
        "nuclei_changed": changed,
        "classes": classes,
        "files": files,
    }


def _read_output(layout: Layout, name: str, formats: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                                             np.ndarray | None]:
    """An output's synthetic image and edited maps, from the tile folder or the HoVer-Net patch."""
    if "tiles" in formats:
        from diffaug.data.tiles import read_image, read_label_npz

        arrays = read_label_npz(layout.tiles / f"{name}.npz")
        return read_image(layout.tiles / f"{name}.png"), arrays["inst_map"], arrays.get("type_map")
    patch = np.load(layout.hovernet / f"{name}.npy", allow_pickle=False)
    return (patch[..., :3].astype(np.uint8), patch[..., 3].astype(np.int32),
            patch[..., 4].astype(np.int32) if patch.shape[2] == 5 else None)


def _contact_sheet(context: JobContext, items: Sequence[Item], layout: Layout) -> np.ndarray:
    from diffaug.data.tiles import TileFolder
    from diffaug.viz import contact_sheet, overlay_labels

    folder = TileFolder(context.data_root, classes=context.classes)
    rows = []
    for item in items[:CONTACT_ROWS]:
        real = crop_window(folder.read(item.tile), item)[0]
        synthetic, inst_map, type_map = _read_output(layout, item.name, context.formats)
        rows.append([real, overlay_labels(real, inst_map, type_map), synthetic])
    return contact_sheet(rows, header=["real", "edited labels", "synthetic"])


def finalize(context: JobContext, items: Sequence[Item]) -> dict[str, Any]:
    """Write the pictures, ``manifest.jsonl`` and ``summary.json`` (last) of a job whose items are all done."""
    from diffaug._io import atomic_write_json, atomic_write_png, atomic_write_text
    from diffaug.viz import class_count_chart

    layout = context.layout
    lines = read_records(layout, items)
    records = [json.loads(line) for line in lines]
    summary = _summary(context, records, layout)
    before = {row["name"]: row["before"] for row in summary["classes"]}
    after = {row["name"]: row["after"] for row in summary["classes"]}
    class_count_chart(before, after, layout.class_chart,
                      title=f"Nuclei per class: source windows (before) vs generated ({context.policy})")
    atomic_write_png(layout.contact_sheet, _contact_sheet(context, items, layout))
    atomic_write_text(layout.manifest, "".join(lines))
    atomic_write_json(layout.summary, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The class table of a summary, for the terminal."""
    lines = [f"{'class':<28}{'before':>9}{'share':>8}{'after':>9}{'share':>8}"]
    for row in summary["classes"]:
        lines.append(f"{row['name'][:27]:<28}{row['before']:>9}{row['share_before']:>8.1%}{row['after']:>9}"
                     f"{row['share_after']:>8.1%}")
    lines.append(f"{'total':<28}{summary['nuclei_before']:>9}{'':>8}{summary['nuclei_after']:>9}")
    lines.append(f"{summary['policy']}: {summary['nuclei_changed']} nuclei changed in {summary['outputs']} outputs "
                 f"from {summary['source_tiles']} source tiles")
    return "\n".join(lines)
