"""``diffaug evaluate fidelity|downstream``: judge synthetic data by what it does for a segmenter.

- ``fidelity``: a segmenter trained on real tiles (or given with ``--segmenter``) segments images synthesised from
  held-out label maps and is scored against those maps, next to its score on the real tiles of the same maps.
- ``downstream``: the segmenter trained per arm (real, gradmix, diffmix-*) and seed, scored on real test tiles; a
  markdown table, JSON and a bar chart.

Held-out tiles come from ``--test-data`` or, without it, from ``--val-images K`` source images of ``--data`` (split by
source image, never by tile; see :mod:`diffaug.evaluation.split`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from diffaug.errors import ConfigError, DataFormatError

HELP = "label fidelity and downstream evaluation"

_SMOKE = {"channels": (8, 16), "steps": 3, "batch_size": 2, "patch_size": 64, "max_train_tiles": 2,
          "max_test_tiles": 2, "num_inference_steps": 2, "seeds": 1, "tile_size": 128}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="tile folder of real tiles (NAME.png + NAME.npz)")
    p.add_argument("--out", default=None, help="output folder (default: ./diffaug-evaluate-<subcommand>)")
    p.add_argument("--val-images", type=int, default=None,
                   help="hold out K source images of --data (split by source image; default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the synthetic data and the first segmenter")
    p.add_argument("--device", default="cpu", help="torch device for the segmenter and the diffusion model")
    p.add_argument("--max-train-tiles", type=int, default=None, help="use at most N training tiles (random, seeded)")
    p.add_argument("--max-test-tiles", type=int, default=None, help="score at most N held-out tiles (random, seeded)")
    g = p.add_argument_group("segmenter")
    g.add_argument("--segmenter-steps", type=int, default=1500, help="optimiser steps per segmenter")
    g.add_argument("--batch-size", type=int, default=8, help="crops per step")
    g.add_argument("--patch-size", type=int, default=128, help="training crop size (multiple of 8)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    g.add_argument("--channels", default="16,32,64,128", help="encoder widths per level, comma-separated")
    s = p.add_argument_group("synthesis")
    s.add_argument("--weights", default=None, help="diffusion model: 'builtin', a model folder, a registered name "
                   "(diffmix-consep, diffmix-glysac) or a Hub repo id ORG/NAME")
    s.add_argument("--revision", default=None, help="Hub revision of --weights (pin a commit sha)")
    s.add_argument("--num-inference-steps", type=int, default=100, help="DDIM steps N (DiffMix: 100)")
    s.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance w (DiffMix: 1.5)")
    s.add_argument("--synthesis-batch-size", type=int, default=4, help="images per diffusion batch")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for CI: the centre 128 px of 2 train and 2 test tiles, a (8, 16)-channel segmenter "
                        "trained 3 steps, 2 DDIM steps, at most 2 seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", title="evaluations", required=True)
    fid = sub.add_parser("fidelity", help="segmenter scores on synthetic images vs real tiles of the same label maps",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(fid)
    fid.add_argument("--segmenter", default=None,
                     help="a trained segmenter folder (config.json + model.safetensors); default: train one on the "
                          "training split. With it and without --val-images, every tile of --data is evaluated")
    fid.add_argument("--strength", type=float, default=1.0,
                     help="1.0 renders from pure noise (default, nothing of the real image leaks in); DiffMix: 0.55")
    fid.add_argument("--inception", default=None,
                     help="TorchScript Inception-v3 file (e.g. inception-2015-12-05.pt) to add FID and KID")
    down = sub.add_parser("downstream", help="segmenters trained per arm and seed, scored on real test tiles",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(down)
    down.add_argument("--test-data", default=None, help="tile folder of real test tiles (default: --val-images split)")
    down.add_argument("--arms", default="real,gradmix,diffmix-balance,diffmix-enlarge,diffmix-both",
                      help="comma-separated arms: real, gradmix, diffmix-balance, diffmix-enlarge, diffmix-both")
    down.add_argument("--seeds", type=int, default=3, help="segmenters per arm (seeds seed..seed+N-1)")
    down.add_argument("--strength", type=float, default=0.55, help="partial-noise strength (DiffMix: 0.55)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve --smoke and the numeric options into one dict; reject nonsense up front."""
    try:
        channels = tuple(int(c) for c in str(args.channels).split(","))
    except ValueError:
        raise ConfigError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    s = {"channels": channels, "steps": args.segmenter_steps, "batch_size": args.batch_size,
         "patch_size": args.patch_size, "max_train_tiles": args.max_train_tiles,
         "max_test_tiles": args.max_test_tiles, "num_inference_steps": args.num_inference_steps,
         "seeds": getattr(args, "seeds", 1), "tile_size": None}
    if args.smoke:
        # Smoke sizes win, except the tile counts when given explicitly.
        s.update({k: v for k, v in _SMOKE.items() if k != "seeds" and not (k.startswith("max_") and s[k] is not None)})
        s["seeds"] = min(s["seeds"], 2)
    for key in ("max_train_tiles", "max_test_tiles"):
        if s[key] is not None and s[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["seeds"] < 1:
        raise ConfigError(f"--seeds must be >= 1, got {s['seeds']}")
    return s


def _pick(names: list[str], limit: int | None, seed: int) -> list[str]:
    if limit is None or limit >= len(names):
        return names
    rng = np.random.default_rng([seed, len(names)])
    return sorted(rng.choice(names, size=limit, replace=False).tolist())


def _folders(args: argparse.Namespace, test_data: str | None, *, allow_all: bool = False):
    """(train folder, train names, test folder, test names)."""
    from diffaug.data.tiles import TileFolder
    from diffaug.evaluation.split import split_by_source
    from diffaug.metrics import require_class_labels

    folder = TileFolder(args.data)
    if test_data is not None:
        if args.val_images is not None:
            raise ConfigError("give either --test-data or --val-images, not both")
        test = TileFolder(test_data)
        if folder.has_classes:
            require_class_labels(test, "per-class F1")
        if test.scheme.name != folder.scheme.name:
            raise DataFormatError(f"{test.root}: classes {test.scheme.name!r} differ from the training folder's "
                                  f"{folder.scheme.name!r}; score in one class scheme")
        return folder, list(folder.names), test, list(test.names)
    if allow_all and args.val_images is None:
        return folder, [], folder, list(folder.names)
    train, val = split_by_source(folder, 5 if args.val_images is None else args.val_images, seed=args.seed)
    return folder, train, folder, val


def _read(folder: Any, names: list[str], tile_size: int | None) -> list[Any]:
    """Read tiles; with ``tile_size`` (``--smoke``) keep only their centre ``tile_size`` square."""
    from diffaug.data.tiles import Tile
    from diffaug.labels import relabel_sequential

    tiles = [folder.read(n) for n in names]
    if tile_size is None:
        return tiles
    out = []
    for t in tiles:
        h, w = t.inst_map.shape
        y0, x0 = max(0, (h - tile_size) // 2), max(0, (w - tile_size) // 2)
        sl = (slice(y0, y0 + tile_size), slice(x0, x0 + tile_size))
        out.append(Tile(t.name, t.image[sl], relabel_sequential(t.inst_map[sl]),
                        None if t.type_map is None else t.type_map[sl]))
    return out


def _segmenter_config(folder: Any, channels: tuple[int, ...], provenance: dict[str, Any]):
    from diffaug.segmenter import SegmenterConfig

    scheme = folder.scheme
    return SegmenterConfig(num_classes=scheme.num_classes if scheme.has_classes else 0, channels=channels,
                           class_names=dict(scheme.names), scheme=scheme.name, provenance=provenance)


def _weights_record(args: argparse.Namespace) -> dict:
    """Resolve ``--weights`` now (a bad name fails before any training) and describe them: id, kind, Hub repo,
    revision, the commit it resolved to, and the sha256 of the weights file (no local path)."""
    from diffaug.generate.weights import resolve_weights

    return resolve_weights(args.weights, revision=args.revision).record()


def _pipe_factory(args: argparse.Namespace):
    def load():
        from diffaug.pipelines import SemanticSynthesisPipeline

        return SemanticSynthesisPipeline.from_pretrained(args.weights, revision=args.revision).to(args.device)

    return load


def _log(args: argparse.Namespace):
    def log(message: str) -> None:
        print(message, flush=True)

    return log


def run(args: argparse.Namespace) -> int:
    if args.evaluation == "fidelity":
        return _run_fidelity(args)
    return _run_downstream(args)


def _run_fidelity(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diffaug.evaluation.fidelity import run_fidelity, synthesise_from_labels
    from diffaug.evaluation.synthetic import SynthesisSettings
    from diffaug.segmenter import Segmenter, TrainingSettings, train_segmenter

    s = _settings(args)
    if args.weights is None:
        raise ConfigError("fidelity needs the diffusion model to evaluate: pass --weights PATH_OR_REPO_ID")
    synthesis = SynthesisSettings(strength=args.strength, num_inference_steps=s["num_inference_steps"],
                                  guidance_scale=args.guidance_scale, batch_size=args.synthesis_batch_size)
    quality = None
    if args.inception is not None:
        from diffaug.evaluation.fid import InceptionFeatures, fid, kid

        extractor = InceptionFeatures(args.inception, device=args.device)

        def quality(real, fake):
            k_mean, k_std = kid(real, fake, extractor, subset_size=min(1000, len(real)), num_subsets=100)
            return {"fid": fid(real, fake, extractor), "kid": k_mean, "kid_std": k_std}

    weights = _weights_record(args)
    folder, train_names, _, test_names = _folders(args, None, allow_all=args.segmenter is not None)
    test_names = _pick(test_names, s["max_test_tiles"], args.seed)
    out = Path(args.out or "diffaug-evaluate-fidelity")
    log = _log(args)
    if args.segmenter is not None:
        segmenter = Segmenter.from_pretrained(args.segmenter, device=args.device)
        if segmenter.config.scheme != folder.scheme.name:
            raise ConfigError(f"{args.segmenter}: segmenter classes {segmenter.config.scheme!r} differ from "
                              f"{folder.root}'s {folder.scheme.name!r}")
    else:
        train_names = _pick(train_names, s["max_train_tiles"], args.seed)
        config = _segmenter_config(folder, s["channels"], {"data": str(folder.root), "tiles": len(train_names),
                                                           "steps": s["steps"], "seed": args.seed})
        training = TrainingSettings(steps=s["steps"], batch_size=s["batch_size"], patch_size=s["patch_size"],
                                    lr=args.lr, seed=args.seed)
        log(f"training the segmenter on {len(train_names)} real tiles ({s['steps']} steps)")
        segmenter = train_segmenter(_read(folder, train_names, s["tile_size"]), config, training, device=args.device,
                                    progress=not args.no_progress)
        segmenter.save_pretrained(out / "segmenter")
    pipe = _pipe_factory(args)()
    tiles = _read(folder, test_names, s["tile_size"])
    log(f"synthesising {len(tiles)} images from held-out label maps ({synthesis.num_inference_steps} steps, "
        f"strength {synthesis.strength})")
    images = synthesise_from_labels(pipe, tiles, seed=args.seed, settings=synthesis)
    classes = list(folder.scheme.names) if folder.has_classes else None
    run_fidelity(segmenter, tiles, images, classes=classes, out_dir=out, quality=quality,
                 extra={"data": str(folder.root), "weights": args.weights, "revision": args.revision,
                        "weights_info": weights,
                        "segmenter": args.segmenter or str(out / "segmenter"),
                        "synthesis": asdict(synthesis),
                        "class_names": {str(k): v for k, v in folder.scheme.names.items()}})
    print((out / "fidelity.md").read_text(), end="")
    print(f"wrote {out / 'fidelity.json'}, {out / 'fidelity.md'} and the synthetic images in {out / 'synthetic'}")
    return 0


def _run_downstream(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diffaug.evaluation.downstream import NEEDS_CLASSES, NEEDS_WEIGHTS, DownstreamJob, parse_arms, run_downstream
    from diffaug.evaluation.synthetic import SynthesisSettings
    from diffaug.segmenter import TrainingSettings

    arms = parse_arms(args.arms)
    s = _settings(args)
    synthesis = SynthesisSettings(strength=args.strength, num_inference_steps=s["num_inference_steps"],
                                  guidance_scale=args.guidance_scale, batch_size=args.synthesis_batch_size)
    training = TrainingSettings(steps=s["steps"], batch_size=s["batch_size"], patch_size=s["patch_size"],
                                lr=args.lr, seed=args.seed)
    needs_weights = [a for a in arms if a in NEEDS_WEIGHTS]
    if needs_weights and args.weights is None:
        raise ConfigError(f"arm(s) {', '.join(needs_weights)} render images with a diffusion model: pass --weights "
                          "PATH_OR_REPO_ID, or leave them out of --arms")
    folder, train_names, test_folder, test_names = _folders(args, args.test_data)
    needs_classes = [a for a in arms if a in NEEDS_CLASSES]
    if needs_classes and not folder.has_classes:
        raise ConfigError(f"arm(s) {', '.join(needs_classes)} balance rare classes, but {folder.root} has no classes; "
                          "use --arms real,diffmix-enlarge for instance-only data")
    train_names = _pick(train_names, s["max_train_tiles"], args.seed)
    test_names = _pick(test_names, s["max_test_tiles"], args.seed)
    classes = list(folder.scheme.names) if folder.has_classes else None
    config = _segmenter_config(folder, s["channels"], {})
    job = DownstreamJob(
        arms=arms, seeds=[args.seed + k for k in range(s["seeds"])],
        segmenter={"num_classes": config.num_classes, "channels": list(config.channels),
                   "class_names": {str(k): v for k, v in config.class_names.items()}, "scheme": config.scheme},
        training={k: v for k, v in asdict(training).items() if k != "seed"}, synthesis=asdict(synthesis),
        synthesis_seed=args.seed, weights=args.weights if needs_weights else None,
        weights_info=_weights_record(args) if needs_weights else None, train_tiles=train_names,
        test_tiles=test_names, classes=classes, class_names={str(k): v for k, v in folder.scheme.names.items()},
        data={"train": str(folder.root), "test": str(test_folder.root)})
    out = Path(args.out or "diffaug-evaluate-downstream")
    log = _log(args)
    log(f"downstream: {len(arms)} arm(s) x {len(job.seeds)} seed(s); {len(train_names)} training tiles, "
        f"{len(test_names)} test tiles")
    train = _read(folder, train_names, s["tile_size"])
    test = _read(test_folder, test_names, s["tile_size"])
    run_downstream(job, train, test, out, device=args.device, pipe_factory=_pipe_factory(args), log=log,
                   progress=not args.no_progress)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
    return 0
