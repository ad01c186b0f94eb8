"""The ``diffaug`` command line.

Each subcommand lives in its own module under :mod:`diffaug.commands` and is imported only when it runs, so
``diffaug --help`` stays fast. A subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from diffaug.errors import DiffaugError

__all__ = ["main", "COMMANDS"]

#: subcommand name -> (module, one-line help). Help is duplicated here so ``--help`` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str]] = {
    "labels": ("diffaug.commands.labels", "edit label maps of a tile folder (balance rare classes / enlarge)"),
    "convert": ("diffaug.commands.convert", "convert an original SDM/DiffMix checkpoint to diffaug's format"),
    "train": ("diffaug.commands.train", "train a semantic diffusion model on a tile folder"),
    "sample": ("diffaug.commands.sample", "synthesise images for label maps with a trained model"),
    "generate": ("diffaug.commands.generate", "generate a balanced synthetic dataset on disk (resumable)"),
    "evaluate": ("diffaug.commands.evaluate", "label fidelity and downstream evaluation"),
    "download": ("diffaug.commands.download", "download published weights into the Hugging Face cache"),
    "env": ("diffaug.commands.env", "print versions and devices, for bug reports"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    from diffaug import __version__

    parser = argparse.ArgumentParser(
        prog="diffaug",
        description="Diffusion-based augmentation of nuclei segmentation datasets (DiffMix and related methods).",
    )
    parser.add_argument("--version", action="version", version=f"diffaug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffaug`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass finds the subcommand; its module then adds its own arguments. Help is held back from the first pass,
    # or `diffaug labels --help` would print before the subcommand's arguments exist.
    wants_help = any(a in ("-h", "--help") for a in argv)
    args, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if args.command is None:
        parser.print_help()
        return 0 if not argv or wants_help else 2
    module = importlib.import_module(args._module)
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except DiffaugError as exc:
        print(f"diffaug {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffaug {args.command}: interrupted; rerun the same command to resume where supported.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
