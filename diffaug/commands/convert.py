"""``diffaug convert``: turn an original SDM/DiffMix checkpoint into a diffaug model folder.

Example::

    diffaug convert --from-sdm consep-ema_0.9999_010000.pt --config flags.json --out models/diffmix-consep \\
        --class-scheme consep-hovernet
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert an original SDM/DiffMix checkpoint to diffaug's format"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-sdm", dest="from_sdm", required=True, type=Path, metavar="CKPT",
                        help="original checkpoint: a torch.save state dict (.pt, loaded with weights_only=True) or "
                             ".safetensors, with the original key names")
    parser.add_argument("--config", required=True, type=Path, metavar="CONFIG_JSON",
                        help="the original argparse flags as JSON (image_size, num_channels, num_res_blocks, "
                             "channel_mult, attention_resolutions, num_heads, num_head_channels, class_cond, "
                             "num_classes, no_instance, learn_sigma, use_scale_shift_norm, resblock_updown, ...); "
                             "other keys are ignored")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder to write config.json + model.safetensors into")
    parser.add_argument("--class-scheme", dest="class_scheme", default=None, metavar="NAME",
                        help="record the class scheme of the training type maps (e.g. consep-hovernet, glysac-3), so "
                             "pipelines can check a type map's classes")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def run(args: argparse.Namespace) -> int:
    import math

    from safetensors import safe_open

    from diffaug.data.schemes import get_scheme
    from diffaug.models import SemanticUNetConfig
    from diffaug.models.convert import convert_sdm_checkpoint

    class_names = None
    if args.class_scheme is not None:
        scheme = get_scheme(args.class_scheme)
        class_names = ("background", *(scheme.names[k] for k in sorted(scheme.names)))
    out = convert_sdm_checkpoint(args.from_sdm, args.config, args.out, class_scheme=args.class_scheme,
                                 class_names=class_names, overwrite=args.overwrite)
    config = SemanticUNetConfig.from_json_file(out / "config.json")
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:  # reads the header only
        n_params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    print(f"wrote {out}/config.json and {out}/model.safetensors: {n_params:,} parameters, image_size "
          f"{config.image_size}, label_nc {config.label_nc} ({config.num_classes} classes"
          f"{' + instance edges' if config.instance_edges else ''})")
    return 0
