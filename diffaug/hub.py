"""Finding model weights: local folders, Hugging Face Hub repositories, and a registry of published weights.

``resolve_pretrained(path_or_repo_id)`` turns what a user passes as ``model=`` into a local folder holding
``config.json`` + ``model.safetensors``:

- an existing **folder** is used as it is;
- ``"builtin"`` is the small default checkpoint that ships inside the package (:func:`builtin_weights`);
- a **registered name** (:data:`REGISTRY`, e.g. ``"diffmix-consep"``) names an original-format checkpoint on the
  Hub: it is downloaded into the Hugging Face cache, converted once with
  :func:`~diffaug.models.convert.convert_sdm_checkpoint`, and the converted folder is cached under
  :func:`diffaug_cache_dir` ``/converted/<name>/<commit sha>/``;
- any other ``org/name`` is a **Hub repository** in diffaug's format, downloaded with ``hf_hub_download``.

Hub access goes through ``huggingface_hub`` and its cache, so ``HF_HUB_OFFLINE=1`` loads from the cache without
network (note that huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` when it is first imported). A
revision defaults to the registered one, else ``main``; the commit it resolved to is reported by
:func:`resolve_pretrained_info` so that manifests can pin it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffaug.errors import WeightsError

__all__ = ["PublishedWeights", "ResolvedWeights", "REGISTRY", "resolve_pretrained", "resolve_pretrained_info",
           "diffaug_cache_dir", "hub_download", "BUILTIN", "builtin_weights"]

_MODEL_FILES = ("config.json", "model.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class PublishedWeights:
    """An original-format checkpoint published on the Hub, with what is needed to convert it.

    Attributes:
        repo_id: Hub repository.
        filename: The checkpoint file in it.
        revision: Branch, tag or commit to download by default.
        flags: The original SDM argparse flags of the model (input of the converter).
        class_scheme: Class scheme of the type maps it was trained on (:data:`diffaug.data.schemes.SCHEMES`).
        class_names: Names of the classes, background first.
        description: One line for listings and model cards.
        license: Licence of the weights as published.
    """

    repo_id: str
    filename: str
    revision: str
    flags: Mapping[str, Any]
    class_scheme: str | None = None
    class_names: tuple[str, ...] | None = None
    description: str = ""
    license: str = ""


def _diffmix_flags(num_classes: int) -> dict[str, Any]:
    """Flags of DiffMix's released 256-px models, from its sampling scripts (SPEC §5)."""
    return {
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "",
        "attention_resolutions": "32,16,8", "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
        "class_cond": True, "num_classes": num_classes, "no_instance": False, "learn_sigma": True,
        "use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": False, "dropout": 0.0,
        "diffusion_steps": 1000, "noise_schedule": "linear", "predict_xstart": False, "rescale_timesteps": False,
    }


#: Published weights by name. Their commit shas cannot be looked up offline: the revision is ``main`` and the
#: commit actually downloaded is recorded (see :func:`resolve_pretrained_info`); pass ``revision=`` to pin one.
REGISTRY: dict[str, PublishedWeights] = {
    "diffmix-consep": PublishedWeights(
        repo_id="Hyun-Jic/DiffMix", filename="consep-ema_0.9999_010000.pt", revision="main",
        flags=_diffmix_flags(num_classes=5), class_scheme="consep-hovernet",
        class_names=("background", "other", "inflammatory", "epithelial", "spindle-shaped"),
        description="DiffMix SDM fine-tuned on CoNSeP (4 HoVer-Net classes + background), EMA 0.9999, 256 px, 652 M "
                    "parameters; original-format checkpoint of 2.61 GB, converted on first use",
        license="MIT (model card of Hyun-Jic/DiffMix); the CoNSeP training data has its own terms"),
    "diffmix-glysac": PublishedWeights(
        repo_id="Hyun-Jic/DiffMix", filename="glysac-ema_0.9999_010000.pt", revision="main",
        flags=_diffmix_flags(num_classes=4), class_scheme="glysac-3",
        class_names=("background", "other", "lymphocyte", "epithelial"),
        description="DiffMix SDM fine-tuned on GLySAC (3 classes + background), EMA 0.9999, 256 px; original-format "
                    "checkpoint of 2.61 GB, converted on first use",
        license="MIT (model card of Hyun-Jic/DiffMix); the GLySAC training data has its own terms"),
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Where weights were found.

    Attributes:
        path: Folder holding ``config.json`` + ``model.safetensors``.
        kind: ``"folder"``, ``"builtin"`` (the shipped default), ``"hub"`` (a repo in diffaug's format) or
            ``"registry"`` (converted original).
        repo_id: Hub repository, if any.
        revision: Revision asked for, if any.
        commit_sha: Commit the revision resolved to in the cache, if known: record it to reproduce a run.
        name: Registered name, for ``kind == "registry"``.
    """

    path: Path
    kind: Literal["folder", "builtin", "hub", "registry"]
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    name: str | None = None


#: The ``--weights`` value naming the built-in checkpoint.
BUILTIN = "builtin"


def _builtin_candidates() -> list[Path]:
    """Where the built-in checkpoint may be, in order: the installed package, then the source checkout."""
    import importlib.resources

    candidates: list[Path] = []
    try:
        candidates.append(Path(str(importlib.resources.files("diffaug.checkpoints"))) / "builtin")
    except ModuleNotFoundError:  # a source checkout that is not installed has no diffaug.checkpoints package
        pass
    package = Path(__file__).resolve().parent  # .../diffaug
    candidates += [package / "checkpoints" / "builtin", package.parent / "checkpoints" / "builtin"]
    return list(dict.fromkeys(candidates))


def builtin_weights() -> Path:
    """The folder of the built-in checkpoint (``config.json`` + ``model.safetensors`` + ``MODEL_CARD.md``).

    Looks in the installed package (``diffaug/checkpoints/builtin``) first, then in the top-level ``checkpoints/``
    of a source checkout.

    Raises:
        WeightsError: the checkpoint is in none of those places (a broken install, or a checkout without it).

    Example:
        >>> from diffaug.hub import builtin_weights
        >>> builtin_weights()  # doctest: +SKIP
        PosixPath('.../site-packages/diffaug/checkpoints/builtin')
    """
    searched = _builtin_candidates()
    for folder in searched:
        if all((folder / name).is_file() for name in _MODEL_FILES):
            return folder
    where = "; ".join(str(p) for p in searched)
    raise WeightsError(f"the built-in checkpoint was not found (looked for {' + '.join(_MODEL_FILES)} in: {where}). "
                       "Reinstall diffaug (`pip install diffaug`, or `pip install .` in a checkout), or pass "
                       "--weights PATH (a model folder) or --weights ORG/NAME (a Hub repo in diffaug's format)")


def diffaug_cache_dir() -> Path:
    """diffaug's own cache (converted registered weights): ``$DIFFAUG_CACHE``, else ``$XDG_CACHE_HOME/diffaug``, else
    ``~/.cache/diffaug``. Read at every call."""
    if os.environ.get("DIFFAUG_CACHE"):
        return Path(os.environ["DIFFAUG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "diffaug"


def _hub_cache_location(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_download(repo_id: str, filename: str, *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download one file of a Hub repo into the Hugging Face cache (or find it there) and return its path.

    Raises:
        WeightsError: With a message saying what to do, when the file is not cached and the Hub cannot be reached
            (or ``HF_HUB_OFFLINE=1``), or the repo, revision or file does not exist.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    what = f"{repo_id} (file {filename}, revision {rev})"
    cache = _hub_cache_location(cache_dir)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached")
        raise WeightsError(f"{what} is not in the Hugging Face cache at {cache} and {why}. Download it on a machine "
                           f"with network (`diffaug download {repo_id}` or `huggingface-cli download`), or point "
                           f"HF_HUB_CACHE / cache_dir at a cache that holds it.") from None
    except GatedRepoError as exc:
        raise WeightsError(f"{what}: the repository is gated; accept its terms on the Hub and log in "
                           f"(`huggingface-cli login`). ({exc})") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{repo_id}: no such Hub repository (or it is private); check the id, or give a local "
                           f"folder") from None
    except RevisionNotFoundError:
        raise WeightsError(f"{repo_id}: revision {rev!r} does not exist; give an existing branch, tag or commit sha") \
            from None
    except EntryNotFoundError:
        raise WeightsError(f"{repo_id} (revision {rev}) has no file {filename}") from None
    except HFValidationError as exc:
        raise WeightsError(f"{repo_id!r} is not a valid Hub repo id ({exc})") from None
    except OSError as exc:  # network errors, disk full, permissions
        raise WeightsError(f"could not download {what} into {cache}: {exc}") from exc


def _commit_of(path: Path) -> str | None:
    """The commit sha of a file in a Hugging Face cache snapshot (``.../snapshots/<sha>/<file>``)."""
    sha = path.parent.name
    return sha if _COMMIT.fullmatch(sha) and path.parent.parent.name == "snapshots" else None


def _has_model_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _MODEL_FILES)


def _resolve_registered(name: str, entry: PublishedWeights, revision: str | None,
                        cache_dir: str | os.PathLike[str] | None) -> ResolvedWeights:
    rev = revision or entry.revision
    ckpt = hub_download(entry.repo_id, entry.filename, revision=rev, cache_dir=cache_dir)
    commit = _commit_of(ckpt)
    target = diffaug_cache_dir() / "converted" / name / (commit or "unknown-commit")
    if not _has_model_files(target) or commit is None:
        from diffaug import __version__
        from diffaug.models.convert import convert_sdm_checkpoint

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert_sdm_checkpoint(ckpt, dict(entry.flags), tmp, class_scheme=entry.class_scheme,
                                   class_names=entry.class_names)
            source = {"name": name, "repo_id": entry.repo_id, "filename": entry.filename, "revision": rev,
                      "commit_sha": commit, "converted_with": f"diffaug {__version__}"}
            (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
            if target.exists():  # a stale or partial folder (the rename below is atomic, so this is rare)
                shutil.rmtree(target)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _has_model_files(target):  # another process may have finished the same conversion first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ResolvedWeights(path=target, kind="registry", repo_id=entry.repo_id, revision=rev, commit_sha=commit,
                           name=name)


def resolve_pretrained_info(path_or_repo_id: str | os.PathLike[str], revision: str | None = None,
                            cache_dir: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """Find (downloading and converting if needed) the weights named by ``path_or_repo_id``.

    Args:
        path_or_repo_id: A local folder, a registered name (:data:`REGISTRY`), or a Hub repo id ``org/name``.
        revision: Hub branch, tag or commit sha (default: the registered revision, else ``main``). Not allowed with
            a folder.
        cache_dir: Hugging Face cache folder (default: huggingface_hub's, i.e. ``$HF_HUB_CACHE``).

    Returns:
        Where the ``config.json`` + ``model.safetensors`` folder is, and which commit it came from.

    Raises:
        WeightsError: The folder does not exist or lacks the model files; the id is neither a folder, a
            registered name nor a repo id; or it is not cached and cannot be downloaded.
    """
    if isinstance(path_or_repo_id, os.PathLike):
        text, is_path = os.fspath(path_or_repo_id), True
    elif isinstance(path_or_repo_id, str):
        text, is_path = path_or_repo_id, False
    else:
        raise WeightsError(f"expected a folder, a Hub repo id or a registered name, got {type(path_or_repo_id)!r}")
    if not is_path and text == BUILTIN:  # the reserved name wins over a folder called "builtin" (pass ./builtin)
        if revision is not None:
            raise WeightsError(f"the built-in checkpoint ships with diffaug and has no revisions; drop "
                               f"revision={revision!r} (--revision)")
        return ResolvedWeights(path=builtin_weights(), kind="builtin")
    local = Path(text).expanduser()
    if local.is_dir():
        if revision is not None:
            raise WeightsError(f"{local} is a local folder; revision={revision!r} only applies to Hub repos")
        missing = [n for n in _MODEL_FILES if not (local / n).is_file()]
        if missing:
            raise WeightsError(f"{local} is not a diffaug model folder: it has no {' or '.join(missing)}. An original "
                               f"SDM/DiffMix checkpoint must first be converted with `diffaug convert --from-sdm`.")
        return ResolvedWeights(path=local, kind="folder")
    if local.exists():
        raise WeightsError(f"{local} is a file; give the folder that holds {' and '.join(_MODEL_FILES)} (convert an "
                           f"original checkpoint with `diffaug convert --from-sdm`)")
    if not is_path and text in REGISTRY:
        return _resolve_registered(text, REGISTRY[text], revision, cache_dir)
    if not is_path and _REPO_ID.fullmatch(text):
        paths = [hub_download(text, name, revision=revision, cache_dir=cache_dir) for name in _MODEL_FILES]
        folder = paths[0].parent
        if any(p.parent != folder for p in paths):  # pragma: no cover - the cache keeps one snapshot per commit
            raise WeightsError(f"{text}: model files resolved to different snapshots; pin a commit with revision=")
        return ResolvedWeights(path=folder, kind="hub", repo_id=text, revision=revision or "main",
                               commit_sha=_commit_of(paths[0]))
    raise WeightsError(f"{text!r}: no such folder, and it is neither a registered name ({', '.join(sorted(REGISTRY))}) "
                       f"nor a Hub repo id of the form 'org/name'")


def resolve_pretrained(path_or_repo_id: str | os.PathLike[str], revision: str | None = None,
                       cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local folder with ``config.json`` + ``model.safetensors`` for a folder, registered name or repo id.

    See :func:`resolve_pretrained_info`, which also reports the resolved commit.
    """
    return resolve_pretrained_info(path_or_repo_id, revision=revision, cache_dir=cache_dir).path
