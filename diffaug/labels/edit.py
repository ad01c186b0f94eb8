"""What every label-map edit returns, and the checks every edit runs on its input.

An edit (:func:`~diffaug.labels.balance.balance_label_map`, :func:`~diffaug.labels.enlarge.enlarge_label_map`) is a
pure function of its input maps and an injected ``numpy.random.Generator``. It returns a :class:`LabelEdit`: the new
maps with ids 1..N, ``inst_type`` and centroids recomputed from them, ``source_ids`` matching each output nucleus with
its nucleus in the input, and a JSON-serialisable ``record`` of what changed, for provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_centroids, instance_ids, instance_types, relabel_sequential
from diffaug.labels.validate import label_map_problems

__all__ = ["LabelEdit"]


@dataclass
class LabelEdit:
    """The result of a label-map edit.

    Attributes:
        inst_map: int32 (H, W), ids 1..N.
        type_map: int32 (H, W), or None for instance-only maps.
        inst_type: int32 (N,), class of nucleus i+1, or None for instance-only maps.
        centroids: float64 (N, 2) in **(x, y)** order, row i for nucleus i+1.
        source_ids: int32 (N,), the id in the *input* map of nucleus i+1 (0 for a nucleus with no source). Pass it to
            :func:`~diffaug.labels.validate_label_map` with the input as ``reference``.
        record: JSON-serialisable description of the edit (policy, parameters, what changed).
    """

    inst_map: np.ndarray
    type_map: np.ndarray | None
    inst_type: np.ndarray | None
    centroids: np.ndarray
    source_ids: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nuclei(self) -> int:
        return int(self.source_ids.size)

    def record_json(self) -> str:
        """The record as one line of JSON (keys in insertion order, so equal edits give equal text)."""
        return json.dumps(self.record, separators=(",", ":"))


def check_generator(rng: Any, where: str) -> np.random.Generator:
    """Demand an injected ``numpy.random.Generator`` (never the global ``np.random`` state)."""
    if not isinstance(rng, np.random.Generator):
        raise InvalidInputError(f"{where}: rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
                                f"got {type(rng).__name__}")
    return rng


def prepare_maps(inst_map: np.ndarray, type_map: np.ndarray | None, where: str
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate input maps and return writable int32 copies with ids 1..N, plus the input id of each.

    Input ids need not be contiguous (they are renumbered in order, and ``source_ids`` keeps the input id). Every
    other problem (foreground mismatch, a nucleus with two classes, bad dtype or shape) raises.
    """
    problems = label_map_problems(inst_map, type_map, where=where, require_contiguous=False)
    if problems:
        raise InvalidInputError("\n".join(problems))
    source_ids = instance_ids(inst_map).astype(np.int32)
    if source_ids.size and source_ids[-1] != source_ids.size:
        inst = relabel_sequential(inst_map)
    else:
        inst = inst_map.astype(np.int32, copy=True)
    typ = None if type_map is None else type_map.astype(np.int32, copy=True)
    return inst, typ, source_ids


def finish_edit(inst_map: np.ndarray, type_map: np.ndarray | None, source_ids: np.ndarray,
                record: dict[str, Any]) -> LabelEdit:
    """Renumber the edited maps to 1..N and recompute ``inst_type`` and centroids.

    Args:
        inst_map: edited map whose ids index ``source_ids`` (id i came from input id ``source_ids[i-1]``); ids that
            no longer occur are dropped by the renumbering.
        type_map: edited classes, or None.
        source_ids: input id of each working id.
        record: the edit's record.
    """
    present = instance_ids(inst_map)
    if present.size and present[-1] != present.size:
        inst_map = relabel_sequential(inst_map)
    source = source_ids[present - 1].astype(np.int32) if present.size else np.zeros(0, dtype=np.int32)
    return LabelEdit(
        inst_map=inst_map.astype(np.int32, copy=False),
        type_map=type_map,
        inst_type=None if type_map is None else instance_types(inst_map, type_map),
        centroids=instance_centroids(inst_map),
        source_ids=source,
        record=record,
    )


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(np.floor(value + 0.5))
