"""``diffaug labels``: edit the label maps of a tile folder (DiffMix's balancing or enlarging maps).

    diffaug labels [--data DIR] --policy balance|enlarge --out DIR [--seed N] [--preview]

Without ``--data`` it edits the four CoNSeP sample tiles that ship inside the package (the offline demo). The output
folder is itself a tile folder, in the classes the input was read in (``classes.json`` records the
scheme, so reading it back never merges twice):

* ``NAME_POLICY.npz`` per source tile ``NAME``: ``inst_map``, ``type_map``, ``inst_type``, ``inst_centroid`` (x, y)
  and ``source_inst_id`` (the source tile's id of each nucleus); instance-only input gives instance-only output;
* ``NAME_POLICY.png``: a byte copy of the source image. No diffusion model has re-rendered it, so it does **not**
  match the edited labels; the records say so. ``diffaug sample`` renders images for these maps;
* ``records.jsonl``: one JSON object per tile (what changed: nuclei replaced and their donors, or nuclei moved and
  their shifts; the seed);
* ``summary.json``: nuclei per class before and after, also printed as a table;
* with ``--preview``, ``preview/NAME_POLICY.png``: the image with class-coloured contours (:mod:`diffaug.viz`),
  before | after, and ``preview/class_counts.png``, a bar chart of the summary.

Tile ``i`` (in name order) draws its randomness from ``np.random.SeedSequence(seed, spawn_key=(i,))`` (the i-th child
of ``SeedSequence(seed).spawn``), so the same seed gives
byte-identical output. Everything is written to a hidden folder beside ``--out`` and renamed into place once every
tile is written and checked (each edited map passes ``validate_label_map`` against its source): a failed or
interrupted run leaves nothing behind. Files inside that folder are written plainly, without a per-file fsync (the
folder rename is what makes the output appear), which halves the run time on slow disks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffaug.errors import ConfigError, DiffaugError

HELP = "edit label maps of a tile folder (balance rare classes / enlarge)"

IMAGE_NOTE = ("copied from the source tile: no diffusion model has re-rendered it, so it does not match the edited "
              "labels (render images for these maps with `diffaug sample`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="tile folder: NAME.png + NAME.npz [+ classes.json] (default: the "
                        "four CoNSeP sample tiles shipped with diffaug)")
    parser.add_argument("--policy", required=True, choices=["balance", "enlarge"],
                        help="balance: turn major-class nuclei into rare-class ones; enlarge: shift nuclei")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="job seed (default 0); same seed, same bytes")
    parser.add_argument("--preview", action="store_true", help="also write before|after contour overlays")
    parser.add_argument("--classes", default="default",
                        help="'default' (the folder's merged classes when classes.json has a merge block), 'raw', "
                             "or a scheme name")
    balance = parser.add_argument_group("balance options (defaults: DiffMix's)")
    balance.add_argument("--ratio", type=float, help="share of eligible major nuclei to convert (0.8)")
    balance.add_argument("--rare-classes", help="comma-separated minor classes (default: the data's rarest)")
    balance.add_argument("--target-distribution", metavar="K=SHARE,...",
                         help="class shares to reach instead of --ratio, e.g. 1=0.25,2=0.25,3=0.25,4=0.25")
    balance.add_argument("--dilation", type=int, dest="dilation_iterations", help="dilations of a major (2)")
    balance.add_argument("--size-ratio", type=float, help="dilated major area / donor area, at least (2.3)")
    balance.add_argument("--border-margin", type=float, help="majors this close to the border are kept (default: 30 px, scaled down on tiles under 256 px)")
    balance.add_argument("--donor-source", choices=["same-tile-first", "same-tile", "dataset"],
                         help="where donors come from (same-tile-first)")
    balance.add_argument("--max-donor-tries", type=int, help="donors tried per major before skipping it (20)")
    enlarge = parser.add_argument_group("enlarge options")
    enlarge.add_argument("--fraction", type=float, help="share of nuclei picked to move (0.5)")
    enlarge.add_argument("--shift-range", metavar="MIN,MAX", help="shift magnitude per axis in pixels (0,3)")
    enlarge.add_argument("--max-tries", type=int, help="shifts drawn per picked nucleus (10)")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _shares(text: str) -> dict[int, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise ConfigError(f"--target-distribution: expected CLASS=SHARE pairs such as 1=0.25,2=0.25,3=0.25,4=0.25, "
                          f"got {text!r}") from None


def _policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The library keyword arguments the user set (the library's defaults apply to the others)."""
    if args.policy == "balance":
        names = ["ratio", "dilation_iterations", "size_ratio", "border_margin", "donor_source", "max_donor_tries"]
        other = ["fraction", "shift_range", "max_tries"]
    else:
        names = ["fraction", "max_tries"]
        other = ["ratio", "rare_classes", "target_distribution", "dilation_iterations", "size_ratio",
                 "border_margin", "donor_source", "max_donor_tries"]
    given = [name for name in other if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-").replace("dilation-iterations", "dilation") for name in given)
        raise ConfigError(f"{flags}: not options of --policy {args.policy}")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.policy == "balance":
        if args.rare_classes is not None:
            options["rare_classes"] = _int_list(args.rare_classes, "--rare-classes")
        if args.target_distribution is not None:
            options["target_distribution"] = _shares(args.target_distribution)
    elif args.shift_range is not None:
        values = _int_list(args.shift_range, "--shift-range")
        if len(values) != 2:
            raise ConfigError(f"--shift-range: expected MIN,MAX, got {args.shift_range!r}")
        options["shift_range"] = tuple(values)
    return options


def _check_out(out: Path, data: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder, or empty this one")
    if out.resolve() == data.resolve():
        raise ConfigError(f"--out {out}: is the data folder itself; choose a new folder")


def run(args: argparse.Namespace) -> int:
    from diffaug.data.tiles import TileFolder
    from diffaug.labels.balance import check_balance_params
    from diffaug.labels.enlarge import check_enlarge_params

    # Everything that can be checked before touching the disk is checked here.
    if args.seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {args.seed}")
    options = _policy_options(args)
    if args.data is None:
        from diffaug.assets import sample_tiles_dir

        args.data = sample_tiles_dir()
        print(f"--data not given: using the CoNSeP sample tiles shipped with diffaug ({args.data})")
    _check_out(args.out, args.data)
    folder = TileFolder(args.data, classes=args.classes)
    if args.policy == "balance":
        if not folder.has_classes:
            raise ConfigError(f"--data {args.data}: instance-only folder (no classes.json / type maps); balancing "
                              "needs classes. Use --policy enlarge, or add type maps and a classes.json")
        try:
            check_balance_params(num_classes=folder.scheme.num_classes, **options)
        except DiffaugError as exc:
            raise ConfigError(f"--policy balance: {exc}") from None
    else:
        try:
            check_enlarge_params(**options)
        except DiffaugError as exc:
            raise ConfigError(f"--policy enlarge: {exc}") from None

    created = _missing_ancestor(args.out.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.partial-", dir=args.out.parent))
    try:
        summary = _run_job(folder, args, options, staging)
        if args.out.exists():
            args.out.rmdir()  # checked empty above
        os.rename(staging, args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    print(_format_summary(summary))
    print(f"wrote {summary['tiles']} edited tiles, records.jsonl and summary.json to {args.out.resolve()}"
          + (f"; overlays in {(args.out / 'preview').resolve()}" if args.preview else ""))
    return 0


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (removed again if the job fails)."""
    missing = None
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing = parent
    return missing


def _run_job(folder: Any, args: argparse.Namespace, options: dict[str, Any], staging: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from diffaug._io import atomic_write_json, atomic_write_text
    from diffaug.data.tiles import write_classes_json
    from diffaug.labels.balance import DonorBank, balance_label_map
    from diffaug.labels.enlarge import enlarge_label_map
    from diffaug.labels.validate import validate_label_map
    from diffaug.viz import class_count_chart

    names = folder.names
    num_classes = folder.scheme.num_classes if folder.has_classes else None
    bank = None
    if args.policy == "balance":
        reading = tqdm(names, desc="donor bank", unit="tile", disable=None, leave=False)
        donor_classes = "all" if "target_distribution" in options else "rare"
        bank = DonorBank.from_maps((folder.read(name, image=False) for name in reading), num_classes=num_classes,
                                   donor_classes=donor_classes, rare_classes=options.get("rare_classes"))
    before = np.zeros(max(num_classes or 0, 2), dtype=np.int64)
    after = np.zeros_like(before)
    changed = 0
    records = []
    for index, name in enumerate(tqdm(names, desc=f"labels {args.policy}", unit="tile", disable=None)):
        tile = folder.read(name)
        rng = np.random.default_rng(np.random.SeedSequence(args.seed, spawn_key=(index,)))
        if bank is not None:
            edit = balance_label_map(tile.inst_map, tile.type_map, rng=rng, bank=bank, tile_name=name, **options)
            changed += edit.record["n_replaced"]
        else:
            edit = enlarge_label_map(tile.inst_map, tile.type_map, rng=rng, **options)
            changed += edit.record["n_moved"]
        out_name = f"{name}_{args.policy}"
        validate_label_map(edit.inst_map, edit.type_map, reference=tile.inst_map, source_ids=edit.source_ids,
                           num_classes=num_classes, where=f"edited {name}")
        arrays = {"inst_map": edit.inst_map}
        if edit.type_map is not None:
            arrays.update(type_map=edit.type_map, inst_type=edit.inst_type)
        arrays.update(inst_centroid=edit.centroids, source_inst_id=edit.source_ids)
        np.savez_compressed(staging / f"{out_name}.npz", **arrays)
        shutil.copyfile(folder.root / f"{name}.png", staging / f"{out_name}.png")
        if args.preview:
            _write_png(staging / "preview" / f"{out_name}.png", _before_after(tile, edit))
        before += _class_counts(tile.inst_map, tile.type_map, before.size)
        after += _class_counts(edit.inst_map, edit.type_map, after.size)
        records.append(json.dumps({"tile": out_name, "source_tile": name, "seed": {"job": args.seed, "index": index},
                                   "image": IMAGE_NOTE, **edit.record}, separators=(",", ":")))
    atomic_write_text(staging / "records.jsonl", "\n".join(records) + "\n")
    write_classes_json(staging, folder.scheme)
    summary = _summary(folder, args, options, bank, before, after, changed)
    atomic_write_json(staging / "summary.json", summary)
    if args.preview:
        class_count_chart({f"{r['class']} {r['name']}": r["before"] for r in summary["classes"]},
                          {f"{r['class']} {r['name']}": r["after"] for r in summary["classes"]},
                          staging / "preview" / "class_counts.png",
                          title=f"Nuclei per class, before/after --policy {args.policy}")
    return summary


def _before_after(tile: Any, edit: Any, gap: int = 4) -> np.ndarray:
    """The tile's image with its source contours | a white gap | the edited contours."""
    from diffaug.viz import overlay_labels

    left = overlay_labels(tile.image, tile.inst_map, tile.type_map)
    right = overlay_labels(tile.image, edit.inst_map, edit.type_map)
    return np.concatenate([left, np.full((left.shape[0], gap, 3), 255, np.uint8), right], axis=1)


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"{path}: could not write the preview image")


def _class_counts(inst_map: np.ndarray, type_map: np.ndarray | None, size: int) -> np.ndarray:
    """Nuclei per class (index = class); instance-only maps count every nucleus as class 1."""
    from diffaug.labels.instances import instance_types

    if type_map is None:
        return np.bincount(np.ones(int(inst_map.max(initial=0)), dtype=np.int64), minlength=size)
    return np.bincount(instance_types(inst_map, type_map), minlength=size)


def _summary(folder: Any, args: argparse.Namespace, options: dict[str, Any], bank: Any, before: np.ndarray,
             after: np.ndarray, changed: int) -> dict[str, Any]:
    names = dict(folder.scheme.names) if folder.has_classes else {1: "nucleus"}
    classes = []
    for k, name in sorted(names.items()):
        classes.append({"class": k, "name": name, "before": int(before[k]), "after": int(after[k]),
                        "share_before": float(before[k] / max(before[1:].sum(), 1)),
                        "share_after": float(after[k] / max(after[1:].sum(), 1))})
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    if "target_distribution" in options:
        options["target_distribution"] = {str(k): v for k, v in options["target_distribution"].items()}
    return {
        "policy": args.policy,
        "data": str(folder.root.resolve()),
        "scheme": folder.scheme.name,
        "seed": args.seed,
        "tiles": len(folder),
        "options": options,
        "rare_classes": list(bank.rare_classes) if bank is not None else None,
        "donors": len(bank) if bank is not None else None,
        "nuclei_before": int(before[1:].sum()),
        "nuclei_after": int(after[1:].sum()),
        "nuclei_changed": changed,
        "changed_share": float(changed / max(before[1:].sum(), 1)),
        "classes": classes,
        "image": IMAGE_NOTE,
    }


def _format_summary(summary: dict[str, Any]) -> str:
    verb = "replaced" if summary["policy"] == "balance" else "moved"
    lines = [f"{'class':<28}{'before':>9}{'share':>8}{'after':>9}{'share':>8}"]
    for row in summary["classes"]:
        label = f"{row['class']} {row['name']}"[:27]
        lines.append(f"{label:<28}{row['before']:>9}{row['share_before']:>8.1%}{row['after']:>9}"
                     f"{row['share_after']:>8.1%}")
    lines.append(f"{'total':<28}{summary['nuclei_before']:>9}{'':>8}{summary['nuclei_after']:>9}")
    lines.append(f"{summary['policy']}: {summary['nuclei_changed']} of {summary['nuclei_before']} nuclei {verb} "
                 f"({summary['changed_share']:.1%}) in {summary['tiles']} tiles")
    return "\n".join(lines)
