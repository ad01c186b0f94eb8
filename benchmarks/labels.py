"""Speed of the label edits on one core: diffaug's vectorised functions against a plain reference loop.

    python benchmarks/labels.py [--data DIR] [--tiles N] [--repeats R]

For each of ``--tiles`` CoNSeP tiles (spread over the folder), both implementations edit the same map with generators
in the same state, so they must return identical maps: the script checks that before timing anything. The reference
is the straightforward way to write the same procedure: full-image masks per nucleus (``inst_map == id``), full-image
dilation, per-donor Python checks. The balancing bank is built once from the whole folder (as ``diffaug labels``
does) and is not part of the per-tile time.

Targets (issue 3): enlarging <= 20 ms and balancing <= 50 ms per 256x256 tile on one core. Prints a table and writes
``benchmarks/results/labels.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffaug.data import TileFolder  # noqa: E402
from diffaug.labels import DonorBank, balance_label_map, enlarge_label_map  # noqa: E402
from diffaug.labels.enlarge import draw_shifts  # noqa: E402

TARGET_MS = {"enlarge": 20.0, "balance": 50.0}


# ---- the plain reference loops -----------------------------------------------------------------------------------

def reference_enlarge(inst_map, type_map, *, rng, fraction=0.5, shift_range=(0, 3), max_tries=10):
    """Enlarging written plainly: one full-image mask per nucleus, pixel lists shifted and checked."""
    inst = inst_map.astype(np.int32).copy()
    typ = type_map.astype(np.int32).copy()
    n = int(inst.max())
    picked = rng.permutation(n)[:int(np.floor(fraction * n + 0.5))] + 1
    shifts = draw_shifts(rng, (picked.size, max_tries), shift_range)
    height, width = inst.shape
    for nid, tries in zip(picked, shifts):
        ys, xs = np.nonzero(inst == nid)
        for dx, dy in tries:
            ny, nx = ys + dy, xs + dx
            if ny.min() < 0 or nx.min() < 0 or ny.max() >= height or nx.max() >= width:
                continue
            under = inst[ny, nx]
            if np.any((under != 0) & (under != nid)):
                continue
            classes = typ[ys, xs].copy()
            inst[ys, xs] = 0
            typ[ys, xs] = 0
            inst[ny, nx] = nid
            typ[ny, nx] = classes
            break
    return inst, typ


def reference_balance(inst_map, type_map, *, rng, bank, tile_name, ratio=0.8, dilation_iterations=2,
                      size_ratio=2.3, border_margin=30, max_donor_tries=20):
    """Balancing (ratio mode, same-tile donors first) written plainly, per nucleus on full-image masks."""
    inst = inst_map.astype(np.int32).copy()
    typ = type_map.astype(np.int32).copy()
    height, width = inst.shape
    rare = bank.rare_classes
    n = int(inst.max())
    info = {}
    for nid in range(1, n + 1):
        ys, xs = np.nonzero(inst == nid)
        classes, counts = np.unique(typ[ys, xs], return_counts=True)
        info[nid] = {"area": ys.size, "cx": xs.mean(), "cy": ys.mean(), "cls": int(classes[np.argmax(counts)])}
    eligible = [nid for nid in range(1, n + 1)
                if min(info[nid]["cx"], info[nid]["cy"], width - 1 - info[nid]["cx"],
                       height - 1 - info[nid]["cy"]) >= border_margin]
    majors = np.array([nid for nid in eligible if info[nid]["cls"] not in rare], dtype=np.int64)
    picked = rng.permutation(majors)[:int(np.floor(ratio * majors.size + 0.5))]
    picked = sorted(picked.tolist(), key=lambda nid: (info[nid]["area"], nid))
    # the tile's own whole minor nuclei, then the bank's, each in random order
    local = []
    for nid in range(1, n + 1):
        if info[nid]["cls"] not in rare:
            continue
        mask = inst == nid
        ys, xs = np.nonzero(mask)
        if ndi.label(mask, structure=np.ones((3, 3)))[1] != 1 or ys.min() == 0 or xs.min() == 0 \
                or ys.max() == height - 1 or xs.max() == width - 1:
            continue
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        local.append((crop, xs.mean() - xs.min(), ys.mean() - ys.min(), info[nid]["cls"], ys.size))
    local = [local[i] for i in rng.permutation(len(local))]
    usable = [i for i, d in enumerate(bank.donors) if d.cls in rare and d.tile != tile_name]
    order = rng.permutation(np.array(usable, dtype=np.int64))
    donors = local + [(bank.donors[i].mask, *bank.donors[i].centroid, bank.donors[i].cls, bank.donors[i].area)
                      for i in order]
    used = [False] * len(donors)
    for nid in picked:
        own = inst == nid
        dilated = ndi.binary_dilation(own, structure=np.ones((3, 3)), iterations=dilation_iterations)
        dilated_area = int(dilated.sum())
        tries = 0
        for index, (mask, lcx, lcy, cls, area) in enumerate(donors):
            if used[index] or area * size_ratio > dilated_area:
                continue
            if tries == max_donor_tries:
                break
            tries += 1
            top = int(np.floor(info[nid]["cy"] - lcy + 0.5))
            left = int(np.floor(info[nid]["cx"] - lcx + 0.5))
            h, w = mask.shape
            if top < 0 or left < 0 or top + h > height or left + w > width:
                continue
            ys, xs = np.nonzero(mask)
            under = inst[ys + top, xs + left]
            if np.any((under != 0) & (under != nid)):
                continue
            inst[own] = 0
            typ[own] = 0
            inst[ys + top, xs + left] = nid
            typ[ys + top, xs + left] = cls
            used[index] = True
            break
    return inst, typ


# ---- measurement -----------------------------------------------------------------------------------------------

def _time(fn, repeats):
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best.append(time.perf_counter() - start)
    return min(best)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("DIFFAUG_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=data / "consep_train")
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per tile (the best is kept)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "labels.json")
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    folder = TileFolder(args.data)
    start = time.perf_counter()
    bank = DonorBank.from_folder(folder)
    bank_s = time.perf_counter() - start
    step = max(1, len(folder) // args.tiles)
    tiles = [folder.read(name, image=False) for name in folder.names[::step][:args.tiles]]

    cases = {
        "enlarge": (lambda t, rng: enlarge_label_map(t.inst_map, t.type_map, rng=rng),
                    lambda t, rng: reference_enlarge(t.inst_map, t.type_map, rng=rng)),
        "balance": (lambda t, rng: balance_label_map(t.inst_map, t.type_map, rng=rng, bank=bank, tile_name=t.name),
                    lambda t, rng: reference_balance(t.inst_map, t.type_map, rng=rng, bank=bank, tile_name=t.name)),
    }
    results = {}
    for policy, (fast, plain) in cases.items():
        fast_ms, plain_ms, changed = [], [], 0
        for i, tile in enumerate(tiles):
            edit = fast(tile, np.random.default_rng(i))
            inst, typ = plain(tile, np.random.default_rng(i))
            if not (np.array_equal(edit.inst_map, inst) and np.array_equal(edit.type_map, typ)):
                raise SystemExit(f"{policy}: the reference loop and diffaug disagree on {tile.name}")
            changed += edit.record["n_moved" if policy == "enlarge" else "n_replaced"]
            fast_ms.append(1e3 * _time(lambda: fast(tile, np.random.default_rng(i)), args.repeats))
            plain_ms.append(1e3 * _time(lambda: plain(tile, np.random.default_rng(i)), 1))
        fast_ms, plain_ms = np.array(fast_ms), np.array(plain_ms)
        results[policy] = {
            "diffaug_ms_median": float(np.median(fast_ms)), "diffaug_ms_p95": float(np.percentile(fast_ms, 95)),
            "diffaug_ms_max": float(fast_ms.max()),
            "reference_ms_median": float(np.median(plain_ms)), "reference_ms_p95": float(np.percentile(plain_ms, 95)),
            "speedup_median": float(np.median(plain_ms / fast_ms)),
            "target_ms": TARGET_MS[policy], "meets_target": bool(np.percentile(fast_ms, 95) <= TARGET_MS[policy]),
            "outputs_identical": True, "nuclei_changed": int(changed),
        }

    print(f"{len(tiles)} tiles of {tiles[0].inst_map.shape[0]}x{tiles[0].inst_map.shape[1]} from {args.data}, one "
          f"core; donor bank of {len(bank)} donors built in {bank_s:.2f} s")
    print(f"{'policy':<9}{'diffaug ms':>12}{'p95':>8}{'reference ms':>14}{'p95':>8}{'speedup':>9}{'target':>8}"
          f"{'ok':>5}")
    for policy, r in results.items():
        print(f"{policy:<9}{r['diffaug_ms_median']:>12.2f}{r['diffaug_ms_p95']:>8.2f}{r['reference_ms_median']:>14.2f}"
              f"{r['reference_ms_p95']:>8.2f}{r['speedup_median']:>8.1f}x{r['target_ms']:>8.0f}"
              f"{'yes' if r['meets_target'] else 'NO':>5}")
    print("(median / 95th percentile over tiles of the best of the repeats; outputs of both implementations "
          "identical on every tile)")
    report = {"tiles": len(tiles), "tile_names": [t.name for t in tiles], "data": str(args.data),
              "bank_donors": len(bank), "bank_build_s": bank_s, "repeats": args.repeats, "one_core": True,
              "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
