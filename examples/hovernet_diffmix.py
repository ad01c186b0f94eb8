"""Train a HoVer-Net-style nuclei segmenter with DiffMix augmentation inside the data loader.

The model, targets and losses are diffaug's small HoVer-Net-style segmenter (:mod:`diffaug.segmenter`): swap in your
own HoVer-Net; the data side is what this example is about. Two flavours of the same loop:

- ``--backend albumentations``: ``A.Compose([DiffMixTransform(...), A.RandomCrop, A.HorizontalFlip,
  A.RandomRotate90])`` called as ``compose(image=img, masks=[inst_map, type_map])``;
- ``--backend monai``: ``Compose([DiffMixd(...), RandSpatialCropd, RandFlipd, RandRotate90d])`` on channel-first
  dictionaries with keys ``image``, ``inst_map``, ``type_map``.

In both, the diffusion transform comes first: it needs the raw uint8 image and a model-size input (it re-renders a
model-size window of a larger tile). HoVer-Net's targets (nuclear pixels, horizontal/vertical maps, types) are built
*after* augmentation from the augmented label maps, so the HV maps always match the crop. Samples the transform
re-rendered carry ``is_synthetic=True``; this loop logs their share.

Usage::

    python examples/hovernet_diffmix.py --data ../shared/data/consep_train --model diffmix-consep \\
        --backend albumentations --steps 2000 --out runs/hovernet-diffmix
    python examples/hovernet_diffmix.py --smoke          # seconds: the wiring, on the bundled sample tiles

``--smoke`` runs 2 steps on the sample tiles that ship with diffaug, with the built-in checkpoint (2 DDIM steps,
every sample re-rendered, 2 loader workers): it checks the wiring offline, it does not train anything useful.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffaug.data import TileFolder
from diffaug.segmenter import Segmenter, SegmenterConfig, hovernet_loss, hovernet_targets


# ----------------------------------------------------------------------------------------------------- data side
def albumentations_pipeline(model: str, donors: str, patch: int, steps: int, seed: int, p: float):
    import albumentations as A

    from diffaug.transforms import DiffMixTransform

    return A.Compose([
        DiffMixTransform(model=model, policy="balance", donors=donors, strength=0.55, num_inference_steps=steps,
                         guidance_scale=1.5, p=p),
        A.RandomCrop(patch, patch),
        A.HorizontalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
    ], seed=seed)


def monai_pipeline(model: str, donors: str, patch: int, steps: int, p: float):
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd

    from diffaug.transforms import DiffMixd

    keys = ["image", "inst_map", "type_map"]
    return Compose([
        DiffMixd(keys=keys, model=model, policy="balance", donors=donors, strength=0.55, num_inference_steps=steps,
                 guidance_scale=1.5, prob=p),
        RandSpatialCropd(keys=keys, roi_size=(patch, patch), random_size=False),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=keys, prob=0.5),
    ])


class TileDataset(Dataset):
    """Tiles of a folder through an augmentation pipeline, then HoVer-Net targets (channel-first tensors)."""

    def __init__(self, folder: TileFolder, pipeline, backend: str) -> None:
        self.folder, self.pipeline, self.backend = folder, pipeline, backend

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tile = self.folder[index]
        if self.backend == "albumentations":
            out = self.pipeline(image=tile.image, masks=[tile.inst_map, tile.type_map])
            image, (inst_map, type_map) = out["image"], out["masks"]
        else:  # MONAI: channel-first in, channel-first out
            out = self.pipeline({"image": tile.image.transpose(2, 0, 1), "inst_map": tile.inst_map[None],
                                 "type_map": tile.type_map[None]})
            image = np.asarray(out["image"]).transpose(1, 2, 0)
            inst_map, type_map = np.asarray(out["inst_map"])[0], np.asarray(out["type_map"])[0]
        inst_map = np.ascontiguousarray(inst_map).astype(np.int32)
        type_map = np.ascontiguousarray(type_map).astype(np.int32)
        targets = hovernet_targets(inst_map, type_map)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0,
                **{k: torch.from_numpy(v) for k, v in targets.items()},
                "is_synthetic": torch.tensor(bool(out.get("is_synthetic", False)))}


def worker_init_fn(worker_id: int) -> None:
    """albumentations 2.0.8 repeats its random draws in every worker unless each worker re-seeds it (SPEC §5)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.pipeline.set_random_seed(info.seed % 2**32)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------- the loop
def train(args: argparse.Namespace) -> Path:
    folder = TileFolder(args.data)
    if not folder.has_classes:
        raise SystemExit(f"{folder.root} has no classes; DiffMix's balancing policy needs class labels")
    if args.backend == "albumentations":
        pipeline = albumentations_pipeline(args.model, str(folder.root), args.patch_size, args.diffusion_steps,
                                           args.seed, args.p)
    else:
        pipeline = monai_pipeline(args.model, str(folder.root), args.patch_size, args.diffusion_steps, args.p)
        pipeline.set_random_state(seed=args.seed)
    dataset = TileDataset(folder, pipeline, args.backend)
    if args.backend == "albumentations":
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            worker_init_fn=worker_init_fn if args.workers else None,
                            generator=torch.Generator().manual_seed(args.seed), drop_last=True)
    else:  # MONAI's DataLoader gives every worker its own random state (set_random_state on the transforms)
        from monai.data import DataLoader as MonaiDataLoader

        loader = MonaiDataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                 generator=torch.Generator().manual_seed(args.seed), drop_last=True)
    config = SegmenterConfig(num_classes=folder.scheme.num_classes, channels=args.channels,
                             class_names=dict(folder.scheme.names), scheme=folder.scheme.name)
    model = Segmenter(config, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    step, synthetic = 0, 0
    model.train()
    while step < args.steps:
        for batch in loader:
            out = model(batch["image"])
            loss, parts = hovernet_loss(out, {k: batch[k] for k in ("np", "hv", "tp")})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            synthetic += int(batch["is_synthetic"].sum())
            if step % args.log_every == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.3f} (np {parts['np_ce']:.3f}, hv {parts['hv_mse']:.3f}, "
                      f"tp {parts['tp_ce']:.3f}); synthetic samples so far {synthetic}/{step * args.batch_size}",
                      flush=True)
            if step == args.steps:
                break
    path = model.save_pretrained(args.out)
    print(f"saved the segmenter to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="tile folder with classes (default with --smoke: sample tiles)")
    parser.add_argument("--model", default="builtin",
                        help="diffusion model: builtin (default), a folder, a registered name or a Hub repo id")
    parser.add_argument("--p", type=float, default=0.5, help="probability that DiffMix re-renders a sample")
    parser.add_argument("--backend", choices=("albumentations", "monai"), default="albumentations")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=128, help="training crop (after DiffMix)")
    parser.add_argument("--diffusion-steps", type=int, default=100, help="DDIM steps of the transform")
    parser.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=(16, 32, 64, 128))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (DiffMix runs on CPU in them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="hovernet-diffmix", help="where the trained segmenter is saved")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on the bundled sample tiles (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        from diffaug.assets import sample_tiles_dir

        args.data = args.data or str(sample_tiles_dir())
        args.steps, args.batch_size, args.patch_size, args.diffusion_steps = 2, 2, 64, 2
        args.channels, args.workers, args.log_every, args.p = (8, 16), 2, 1, 1.0
    if args.data is None:
        parser.error("--data is required (or use --smoke)")
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
