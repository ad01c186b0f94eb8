"""Pictures people look at instead of reading numbers: label overlays, contact sheets, class count charts.

Only numpy/OpenCV, except :func:`class_count_chart`, which uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CLASS_COLOURS", "overlay_labels", "contact_sheet", "class_count_chart"]

#: RGB colour per class id (0 unused); instance-only maps use class 1's colour. HoVer-Net's CoNSeP palette order.
CLASS_COLOURS = np.array([
    [0, 0, 0], [255, 255, 0], [255, 0, 0], [0, 200, 0], [0, 128, 255], [255, 0, 255], [0, 255, 255],
    [255, 128, 0], [128, 0, 255], [128, 128, 128], [255, 255, 255],
], dtype=np.uint8)


def _boundaries(inst_map: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbour differs in id, inside nuclei (thin inner contours)."""
    from diffaug.labels.condition import instance_edges

    return instance_edges(inst_map) & (inst_map > 0)


def overlay_labels(image: np.ndarray | None, inst_map: np.ndarray, type_map: np.ndarray | None = None,
                   *, fill_alpha: float = 0.25) -> np.ndarray:
    """RGB uint8 picture of a label map: class-coloured contours (and a light fill) over the image.

    With ``image=None`` the labels are drawn on black.
    """
    h, w = inst_map.shape
    base = np.zeros((h, w, 3), np.uint8) if image is None else np.asarray(image, np.uint8).copy()
    classes = (inst_map > 0).astype(np.intp) if type_map is None else np.asarray(type_map, np.intp)
    colours = CLASS_COLOURS[np.clip(classes, 0, len(CLASS_COLOURS) - 1)]
    fg = inst_map > 0
    out = base.astype(np.float32)
    out[fg] = (1 - fill_alpha) * out[fg] + fill_alpha * colours[fg]
    edge = _boundaries(inst_map)
    out[edge] = colours[edge]
    return out.round().clip(0, 255).astype(np.uint8)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], *, header: Sequence[str] | None = None,
                  gap: int = 4, max_side: int = 256) -> np.ndarray:
    """Grid of RGB uint8 images (each row one sample), resized to ``max_side``, with an optional text header."""
    import cv2

    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    ncol = max(len(r) for r in rows)
    cells = []
    for row in rows:
        cells.append([cv2.resize(img, (max_side, max_side), interpolation=cv2.INTER_NEAREST)
                      if img.shape[:2] != (max_side, max_side) else img for img in row])
    head = 22 if header else 0
    sheet = np.full((head + len(rows) * (max_side + gap) + gap, ncol * (max_side + gap) + gap, 3), 255, np.uint8)
    if header:
        for j, text in enumerate(header):
            cv2.putText(sheet, text, (gap + j * (max_side + gap) + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 0, 0), 1, cv2.LINE_AA)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            y, x = head + gap + i * (max_side + gap), gap + j * (max_side + gap)
            sheet[y:y + max_side, x:x + max_side] = img
    return sheet


def class_count_chart(before: Mapping[str, int], after: Mapping[str, int], path: str | os.PathLike[str], *,
                      title: str = "Nuclei per class") -> Path:
    """Grouped bar chart of class counts before/after, saved as PNG atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from diffaug._io import atomic_write_bytes

    names = list(dict.fromkeys([*before, *after]))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.5), dpi=100)
    tb, ta = sum(before.values()) or 1, sum(after.values()) or 1
    for off, counts, total, label in ((-0.2, before, tb, "before"), (0.2, after, ta, "after")):
        vals = [counts.get(n, 0) for n in names]
        bars = ax.bar(x + off, vals, width=0.4, label=label)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{100 * v / total:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("nuclei")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
