"""``diffaug download NAME_OR_REPO_ID [--revision R]``: fetch published weights into the local caches, so that later
runs work offline (``HF_HUB_OFFLINE=1``).

- A **registered name** (``diffaug download --list``; e.g. ``diffmix-consep``) is an original-format checkpoint on
  the Hub: it is downloaded into the Hugging Face cache and converted once into diffaug's format (``config.json`` +
  ``model.safetensors``), cached under diffaug's cache as ``converted/<name>/<commit sha>/``. Its ``source.json``
  records the repo, file, revision and the **commit sha** the revision resolved to.
- A **Hub repo id** in diffaug's format (``org/name``) is downloaded as it is.

The command prints where the weights are and the resolved commit sha; pass that sha as ``--revision`` (or
``revision=`` in Python) to pin exactly these weights later. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

HELP = "download published weights into the Hugging Face cache"

__all__ = ["HELP", "add_arguments", "run", "download"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME_OR_REPO_ID",
                        help="a registered name (see --list) or a Hub repo id 'org/name' in diffaug's format")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit sha (default: the registered revision, else main)")
    parser.add_argument("--cache-dir", default=None,
                        help="Hugging Face cache folder (default: $HF_HUB_CACHE, i.e. ~/.cache/huggingface/hub)")
    parser.add_argument("--list", action="store_true", help="list the registered weights and exit")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def download(name: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
             ) -> dict[str, Any]:
    """Download (and for registered names, convert once) the weights ``name``; return where they are and the commit.

    Raises:
        WeightsError: not cached and the Hub cannot be reached (or ``HF_HUB_OFFLINE=1``), an unknown repo, revision
            or file, or a checkpoint that does not match its registered flags.
    """
    from diffaug.errors import WeightsError
    from diffaug.hub import REGISTRY, resolve_pretrained_info

    if os.path.isdir(os.path.expanduser(name)):
        raise WeightsError(f"{name} is a local folder, nothing to download; use it directly as model={name!r}")
    if name not in REGISTRY and "/" not in name:
        raise WeightsError(f"{name!r} is neither a registered name ({', '.join(sorted(REGISTRY))}) nor a Hub repo id "
                           "of the form 'org/name'; see `diffaug download --list`")
    info = resolve_pretrained_info(name, revision=revision, cache_dir=cache_dir)
    result: dict[str, Any] = {"name": name, "kind": info.kind, "path": str(info.path), "repo_id": info.repo_id,
                              "revision": info.revision, "commit_sha": info.commit_sha}
    if info.kind == "registry":
        entry = REGISTRY[name]
        result.update({"filename": entry.filename, "license": entry.license})
    return result


def _print_list() -> None:
    from diffaug.hub import REGISTRY

    width = max((len(n) for n in REGISTRY), default=4)
    for name, entry in sorted(REGISTRY.items()):
        print(f"{name:<{width}}  {entry.repo_id}/{entry.filename} @ {entry.revision}")
        if entry.description:
            print(f"{'':<{width}}  {entry.description}")
        if entry.license:
            print(f"{'':<{width}}  licence: {entry.license}")


def run(args: argparse.Namespace) -> int:
    if args.list:
        _print_list()
        return 0
    if not args.name:
        from diffaug.errors import InvalidInputError

        raise InvalidInputError("give a registered name or a Hub repo id to download (or --list to see the names)")
    result = download(args.name, revision=args.revision, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['name']}: ready at {result['path']}")
    if result["commit_sha"]:
        print(f"  resolved {result['repo_id']}@{result['revision']} to commit {result['commit_sha']}")
        print(f"  pin it with --revision {result['commit_sha']} (or revision='{result['commit_sha']}' in Python)")
    else:
        print(f"  {result['repo_id']}@{result['revision']}: the commit sha is not known from the cache layout")
    if result.get("license"):
        print(f"  licence: {result['license']}")
    return 0
