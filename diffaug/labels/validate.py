"""Validity of a label map, before and after an edit.

A valid label map, as the downstream HoVer-Net needs it (SPEC §1):

* ``inst_map`` is a 2-D integer map with ids exactly 1..N (contiguous) and 0 for background;
* with a ``type_map``: same shape, class 0 exactly on background, a class > 0 on every nucleus pixel, one class per
  nucleus, and classes below ``num_classes`` when that is given;
* against a ``reference`` (the map before an edit): no nucleus is in more disconnected pieces than its source
  nucleus was. Real annotations already hold a few multi-piece nuclei (21 of 18,216 in CoNSeP's training tiles), so
  "every nucleus is one piece" would reject real tiles; what an edit must not do is *split* a nucleus.

Nuclei are matched before/after through ``source_ids`` (``LabelEdit.source_ids``: the reference id of each output
nucleus, 0 for a nucleus with no source), which edits return. Without it, output id i is matched with reference
id i, which is right for edits that keep ids (diffaug's balancing and enlarging do, on contiguous input).

:func:`label_map_problems` returns every problem found as a list of messages (a report); :func:`validate_label_map`
raises :class:`~diffaug.errors.InvalidInputError` listing them. Arrays of the wrong kind (not 2-D, not integer,
negative, mismatched shapes) raise at once in both, since nothing else can be checked on them.
"""

from __future__ import annotations

import numpy as np

from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_piece_counts

__all__ = ["label_map_problems", "validate_label_map"]

_MAX_LISTED = 8


def _ids_text(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_MAX_LISTED])
    return shown + (f", ... ({ids.size} in all)" if ids.size > _MAX_LISTED else "")


def _nuclei_text(ids: np.ndarray) -> str:
    return ("nucleus " if ids.size == 1 else "nuclei ") + _ids_text(ids)


def _check_array(where: str, key: str, arr: object, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(f"{where}: {key} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{where}: {key} must be 2-D (H, W), got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise InvalidInputError(f"{where}: {key} has shape {arr.shape} but inst_map has {shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{where}: {key} must hold integers (int32), got {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InvalidInputError(f"{where}: {key} has negative values ({int(arr.min())})")
    return arr


def label_map_problems(inst_map: np.ndarray, type_map: np.ndarray | None = None, *,
                       reference: np.ndarray | None = None, source_ids: np.ndarray | None = None,
                       num_classes: int | None = None, where: str = "label map",
                       require_contiguous: bool = True) -> list[str]:
    """Every validity problem of a label map, as messages (empty when valid).

    Args:
        inst_map: (H, W) instance ids.
        type_map: (H, W) classes, or None for instance-only maps.
        reference: the instance map before the edit; enables the no-new-pieces rule.
        source_ids: (N,) reference id of output nuclei 1..N (0: no source, so it must be a single piece). Defaults to
            the identity.
        num_classes: classes counting background; type values must be below it.
        where: names the map in messages (a file name, say).
        require_contiguous: when False, ids with gaps are not a problem (edits accept such input and renumber it).

    Raises:
        InvalidInputError: when an array is of the wrong kind or shape (see the module docstring).
    """
    _check_array(where, "inst_map", inst_map)
    problems: list[str] = []
    n = int(inst_map.max(initial=0))
    present = np.bincount(inst_map.ravel(), minlength=n + 1)[1:] > 0
    if require_contiguous and not present.all():
        missing = _ids_text(np.flatnonzero(~present) + 1)
        problems.append(f"{where}: instance ids are not contiguous 1..{n}: missing {missing}; renumber with "
                        "diffaug.labels.relabel_sequential")
    if type_map is not None:
        _check_array(where, "type_map", type_map, inst_map.shape)
        fg = inst_map > 0
        mismatch = int(((type_map > 0) != fg).sum())
        if mismatch:
            problems.append(f"{where}: type_map and inst_map foregrounds disagree on {mismatch} pixels")
        if num_classes is not None and type_map.size and int(type_map.max()) >= num_classes:
            problems.append(f"{where}: type_map has class {int(type_map.max())}, outside 0..{num_classes - 1}")
        k = int(type_map.max(initial=0)) + 1
        pairs = np.unique(inst_map[fg].astype(np.int64) * k + type_map[fg])  # distinct (id, class) pairs
        classes_per_id = np.bincount(pairs // k, minlength=n + 1)
        mixed = np.flatnonzero(classes_per_id > 1)
        if mixed.size:
            problems.append(f"{where}: {_nuclei_text(mixed)}: pixels of more than one class; each nucleus "
                            "needs a single class")
    if reference is not None:
        _check_array(where, "reference", reference, inst_map.shape)
        pieces_after = instance_piece_counts(inst_map)[1:]
        pieces_before = instance_piece_counts(reference)
        if source_ids is None:
            source = np.arange(1, n + 1)
        else:
            source = np.asarray(source_ids).reshape(-1)
            if source.size != n or not np.issubdtype(source.dtype, np.integer):
                raise InvalidInputError(f"{where}: source_ids must be {n} integers (one per nucleus), got "
                                        f"{source.size} of {source.dtype}")
        in_range = (source > 0) & (source < pieces_before.size)
        allowed = np.ones(n, dtype=np.int64)  # a nucleus without a source may be one piece
        allowed[in_range] = np.maximum(pieces_before[source[in_range]], 1)
        split = np.flatnonzero(pieces_after > allowed) + 1
        if split.size:
            i = int(split[0])
            problems.append(f"{where}: {_nuclei_text(split)}: more disconnected pieces than before the edit "
                            f"(e.g. nucleus {i}: {int(pieces_after[i - 1])} pieces, its source had "
                            f"{int(allowed[i - 1])}); the edit split a nucleus")
    return problems


def validate_label_map(inst_map: np.ndarray, type_map: np.ndarray | None = None, *,
                       reference: np.ndarray | None = None, source_ids: np.ndarray | None = None,
                       num_classes: int | None = None, where: str = "label map") -> None:
    """Raise :class:`~diffaug.errors.InvalidInputError` unless the label map is valid.

    Same arguments as :func:`label_map_problems`; the message lists every problem found.

    Example:
        >>> before = np.array([[1, 1, 0, 2]], dtype=np.int32)
        >>> validate_label_map(np.array([[1, 0, 1, 2]], dtype=np.int32), reference=before)
        Traceback (most recent call last):
        ...
        diffaug.errors.InvalidInputError: label map: nucleus 1: more disconnected pieces than before the edit \
(e.g. nucleus 1: 2 pieces, its source had 1); the edit split a nucleus
    """
    problems = label_map_problems(inst_map, type_map, reference=reference, source_ids=source_ids,
                                  num_classes=num_classes, where=where)
    if problems:
        raise InvalidInputError("\n".join(problems))
