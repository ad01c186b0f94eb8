"""Which weights a generation job uses: ``builtin``, a model folder, a registered name or a Hub repo id.

The built-in checkpoint is the small SDM the project trains itself (see its ``MODEL_CARD.md``); where it is found is
:func:`diffaug.hub.builtin_weights` (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffaug.errors import WeightsError
from diffaug.hub import BUILTIN, builtin_weights, resolve_pretrained_info

__all__ = ["BUILTIN", "WeightsInfo", "builtin_weights", "resolve_weights", "sha256_file"]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    """The weights of a job and what the manifest records about them.

    Attributes:
        id: what the user passed (``"builtin"``, a folder, a registered name or a Hub repo id).
        path: the local folder with ``config.json`` + ``model.safetensors``.
        sha256: sha256 of ``model.safetensors``: the identity of the weights (a job fingerprint uses it).
        kind: ``"builtin"``, ``"folder"``, ``"hub"`` or ``"registry"``.
        repo_id: Hub repository, if any.
        revision: Hub revision asked for, if any.
        commit_sha: Hub commit the revision resolved to, if any.
        image_size: the model's image size (the window side).
        num_classes: classes of its condition, background included.
        class_scheme: class scheme it was trained in, if its config names one.
        mpp: µm per pixel of its training data, if its config declares ``mpp``.
    """

    id: str
    path: Path
    sha256: str
    kind: str
    repo_id: str | None
    revision: str | None
    commit_sha: str | None
    image_size: int
    num_classes: int
    class_scheme: str | None
    mpp: float | None

    def record(self) -> dict[str, Any]:
        """The JSON block the manifest and ``job.json`` carry (no local path: it differs between machines)."""
        out = asdict(self)
        out.pop("path")
        return out


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: unreadable model config ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("image_size"), int) \
            or not isinstance(config.get("num_classes"), int):
        raise WeightsError(f"{path}: not a diffaug model config (needs integer image_size and num_classes)")
    return config


def _mpp(config: dict[str, Any], path: Path) -> float | None:
    value = config.get("mpp")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise WeightsError(f"{path / 'config.json'}: mpp must be a positive number (µm per pixel), got {value!r}")
    return float(value)


def resolve_weights(weights: str | os.PathLike[str], revision: str | None = None) -> WeightsInfo:
    """Find the weights named by ``weights`` and describe them.

    Args:
        weights: ``"builtin"`` (:func:`builtin_weights`), a model folder, a name of :data:`diffaug.hub.REGISTRY`,
            or a Hub repo id ``org/name`` in diffaug's format.
        revision: Hub revision (branch, tag or commit sha) for a repo id or registered name.

    Raises:
        WeightsError: unknown weights (no such folder, not a registered name or a repo id), a folder without the model
            files, a Hub repo that is neither cached nor downloadable, or an unreadable config.
    """
    resolved = resolve_pretrained_info(weights, revision=revision)
    path = Path(resolved.path)
    config = _read_config(path)
    return WeightsInfo(id=os.fspath(weights), path=path.resolve(), sha256=sha256_file(path / "model.safetensors"),
                       kind=resolved.kind, repo_id=resolved.repo_id, revision=resolved.revision,
                       commit_sha=resolved.commit_sha, image_size=int(config["image_size"]),
                       num_classes=int(config["num_classes"]), class_scheme=config.get("class_scheme"),
                       mpp=_mpp(config, path))
