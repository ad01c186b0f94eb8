"""Class schemes of the nuclei datasets, and the merges between them.

A *scheme* names the meaning of the values of a type map: 0 is always background, 1..K are nucleus classes. A
*merge* maps the classes of one scheme onto another (CoNSeP's 7 raw classes onto HoVer-Net's 4, say).

**Decision (SPEC §1):** a dataset is merged exactly once, at load. Every folder diffaug writes records the scheme its
maps are in (``"scheme"`` in ``classes.json``) and carries no merge block, so reading it back never merges twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from diffaug.errors import InvalidInputError

__all__ = ["ClassScheme", "ClassMerge", "SCHEMES", "MERGES", "INSTANCE_ONLY", "get_scheme", "get_merge", "apply_merge",
           "resolve_classes"]

#: Prefix of the names of schemes defined by a folder's own ``classes.json`` rather than by diffaug.
CUSTOM_PREFIX = "custom:"


@dataclass(frozen=True)
class ClassScheme:
    """Meaning of type-map values. ``names`` maps foreground ids 1..K to names; 0 is background."""

    name: str
    names: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = sorted(self.names)
        if ids != list(range(1, len(ids) + 1)):
            raise InvalidInputError(f"class scheme {self.name!r}: class ids must be 1..K without gaps, got {ids}")

    @property
    def num_foreground(self) -> int:
        """K, the number of nucleus classes."""
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """K + 1: the number of classes counting background (SDM's ``num_classes``)."""
        return len(self.names) + 1

    @property
    def has_classes(self) -> bool:
        """False for instance-only data (no type map)."""
        return len(self.names) > 0

    def to_json(self) -> dict:
        """The ``classes.json`` content diffaug writes for maps in this scheme."""
        out: dict = {"0": "background"}
        out.update({str(k): v for k, v in sorted(self.names.items())})
        out["scheme"] = self.name
        return out


@dataclass(frozen=True)
class ClassMerge:
    """Mapping of a source scheme's classes onto a target scheme (0 always maps to 0)."""

    source: str
    target: ClassScheme
    mapping: Mapping[int, int]

    def lut(self, max_value: int | None = None) -> np.ndarray:
        """Look-up table ``lut[raw] = merged``. Values not in the mapping become -1 (flagged by :func:`apply_merge`)."""
        size = max(max(self.mapping, default=0), max_value or 0) + 1
        lut = np.full(size, -1, dtype=np.int64)
        lut[0] = 0
        for raw, merged in self.mapping.items():
            lut[raw] = merged
        return lut


INSTANCE_ONLY = ClassScheme("instance-only", {})

SCHEMES: dict[str, ClassScheme] = {
    s.name: s
    for s in [
        INSTANCE_ONLY,
        ClassScheme("consep", {1: "other", 2: "inflammatory", 3: "healthy epithelial",
                               4: "dysplastic/malignant epithelial", 5: "fibroblast", 6: "muscle", 7: "endothelial"}),
        ClassScheme("consep-hovernet", {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}),
        # GLySAC's raw classes are known here only through the merge (SPEC §1), so each is named after the class it
        # merges into, with its raw id: {1,2,9,10} other, {4,5,6,7} lymphocyte, {3,8} epithelial.
        ClassScheme("glysac", {k: f"{merged} (raw {k})" for merged, ks in
                               (("other", (1, 2, 9, 10)), ("lymphocyte", (4, 5, 6, 7)), ("epithelial", (3, 8)))
                               for k in ks}),
        ClassScheme("glysac-3", {1: "other", 2: "lymphocyte", 3: "epithelial"}),
        ClassScheme("lizard", {1: "neutrophil", 2: "epithelial", 3: "lymphocyte", 4: "plasma", 5: "eosinophil",
                               6: "connective"}),
        ClassScheme("pannuke", {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}),
    ]
}

MERGES: dict[str, ClassMerge] = {
    "consep": ClassMerge("consep", SCHEMES["consep-hovernet"], {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}),
    "glysac": ClassMerge("glysac", SCHEMES["glysac-3"],
                         {1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3}),
}


def get_scheme(name: str) -> ClassScheme:
    """The known scheme called ``name``; an unknown name raises :class:`InvalidInputError` listing the known ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise InvalidInputError(f"unknown class scheme {name!r}; known schemes: {', '.join(sorted(SCHEMES))}") from None


def get_merge(source: str) -> ClassMerge:
    """The known merge whose source scheme is ``source`` (``"consep"`` -> ``"consep-hovernet"``, say)."""
    try:
        return MERGES[source]
    except KeyError:
        raise InvalidInputError(f"no class merge is defined for scheme {source!r}; merges exist for: "
                                f"{', '.join(sorted(MERGES))}") from None


def apply_merge(values: np.ndarray, merge: ClassMerge, *, what: str = "type map") -> np.ndarray:
    """Map raw class values through ``merge``. Raises on a value the merge does not know (no silent correction)."""
    values = np.asarray(values)
    if values.size == 0:
        return values.astype(np.int32)
    vmax = int(values.max())
    vmin = int(values.min())
    if vmin < 0:
        raise InvalidInputError(f"{what} has negative class {vmin}")
    lut = merge.lut(vmax)
    out = lut[values]
    if (out < 0).any():
        bad = sorted(set(np.unique(values[out < 0]).tolist()))
        raise InvalidInputError(f"{what} has classes {bad} that the {merge.source!r} -> {merge.target.name!r} merge "
                                f"does not know (known: {sorted(merge.mapping)})")
    return out.astype(np.int32)


def resolve_classes(raw: ClassScheme, merge: ClassMerge | None, classes: str, *,
                    where: str) -> tuple[ClassScheme, ClassMerge | None]:
    """Choose the scheme data in ``raw`` classes is loaded in, and the merge (if any) that gets it there.

    Args:
        raw: the scheme the stored maps are in.
        merge: the merge applied by default (a folder's ``hovernet_merge`` block, or the standard merge of a raw
            format such as CoNSeP's ``.mat``); None when the data loads raw by default.
        classes: ``"default"`` (apply ``merge`` when there is one), ``"raw"`` (never merge), or a scheme name: the
            raw scheme's own, ``merge``'s target, or the target of the known merge from ``raw`` (see
            :data:`MERGES`), which is then applied once.
        where: the file or folder named in errors.

    Returns:
        The scheme of the loaded maps and the merge to apply (None: load as stored).
    """
    if classes == "raw" or (classes == "default" and merge is None):
        return raw, None
    if classes == "default":
        return merge.target, merge  # type: ignore[union-attr]
    if classes == raw.name:
        return raw, None
    if merge is not None and classes == merge.target.name:
        return merge.target, merge
    known = MERGES.get(raw.name)
    if known is not None and classes == known.target.name:
        return known.target, known
    options = ["default", "raw", raw.name] + ([merge.target.name] if merge is not None else []) + \
        ([known.target.name] if known is not None else [])
    raise InvalidInputError(f"{where}: cannot load classes {classes!r}: the data is in scheme {raw.name!r}; "
                            f"choose classes from {sorted(set(options))}")
