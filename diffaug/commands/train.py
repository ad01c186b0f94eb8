"""``diffaug train``: train a semantic diffusion model on a tile folder.

Examples::

    diffaug train --config tiny data.root=../shared/data/consep_train output_dir=runs/tiny
    diffaug train --config my.yaml train.max_steps=50000 finetune.max_steps=10000
    torchrun --nproc_per_node 2 -m diffaug train --config my.yaml

Re-running the same command on the same ``output_dir`` resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import os

HELP = "train a semantic diffusion model on a tile folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Overrides are dotted KEY=VALUE pairs read as YAML, e.g. train.max_steps=50 data.root=DIR optim.batch_size=4.\n"
        "Sections: data, model, diffusion, optim, train (stage 1), finetune (stage 2: condition drop rate), ema,\n"
        "checkpoint, preview, eval; top-level keys: seed, output_dir, device, log_every. Shipped configs: tiny,\n"
        "builtin. Run under `torchrun --nproc_per_node N` for DDP. Re-run the same command to resume.")
    parser.add_argument("--config", required=True, metavar="CONFIG",
                        help="training config: a YAML file, or the name of a shipped config (tiny, builtin)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=50")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import yaml

    from diffaug.training.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from diffaug.training.loop import train

    result = train(cfg, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 reports
        if result.model_dir is None:
            print(f"stopped at step {result.step}; re-run the same command to resume from {result.run_dir}")
        else:
            print(f"trained {result.step} steps; EMA model: {result.model_dir} (config.json + model.safetensors), "
                  f"training state and previews: {result.run_dir}")
    return 0
