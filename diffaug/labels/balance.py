"""Balancing map (DiffMix, taken from GradMix's label mixing; SPEC §1): turn major-class nuclei into rare ones.

DiffMix conditions its diffusion model on label maps in which some nuclei of the common ("major") classes are
replaced by the shapes of nuclei of the rare ("minor") classes; the model then renders a new image for the edited
map, so only labels are edited here (GradMix's colour blending is not needed). For one target tile:

1. The minor classes are the rare classes (:func:`rare_classes_of` by default); every other class is major.
2. Major nuclei whose centroid lies within ``border_margin`` px of the tile border are not eligible. DiffMix uses
   30 px on its 256-px tiles; by default (``border_margin=None``) diffaug keeps 30 px on maps of 256 px and more and
   scales it down in proportion on smaller ones (30 x min(H, W) / 256: 7.5 px on a 64-px model window), or the margin
   alone would leave no nucleus eligible (:func:`default_border_margin`).
3. ``ratio`` (80 %) of the eligible major nuclei are picked at random and processed smallest first.
4. Each picked nucleus is dilated ``dilation_iterations`` (2) times with a 3x3 square.
5. Its donor is the first unused minor nucleus, in donor order, whose area is at most
   (dilated area) / ``size_ratio`` (2.3). Donor order is this tile's own minor nuclei in random order, then the
   rest of the dataset's :class:`DonorBank` in random order (``donor_source``). A donor serves a tile at most once
   but may serve many tiles.
6. The major nucleus is cleared, and the donor's shape is pasted with its centroid on the major's centroid, in the
   rare class, under the major's id.

**Decisions** (SPEC §1), where the reference code differs: a paste never covers another nucleus or leaves the tile
(the next donor in order is tried, up to ``max_donor_tries``, then the nucleus is skipped and the skip recorded); ids
stay 1..N and ``inst_type`` and centroids are recomputed; donors are whole nuclei only (one piece, not cut by their
tile's border), so a paste never brings in a half nucleus or a split one. Instead of ``ratio`` a
``target_distribution`` of class shares may be given: each tile then converts just enough eligible nuclei of its
over-represented classes to bring every under-represented class to its target share (as far as eligible nuclei and
donors allow).

**Defaults.** The parameters default to DiffMix's published values (ratio 0.8, 2 dilations, size ratio 2.3, margin
30 px), which are stated per nucleus and per tile, not tuned to one dataset. On CoNSeP's 432 training tiles in
HoVer-Net's 4 classes they raise the share of "other" nuclei in the edited maps from 2.4 % to 42 % (``diffaug labels
--policy balance --seed 0``). That overshoots a balanced mix on purpose: DiffMix trains on the real tiles *plus* one
synthetic tile per real one, and in that union "other" holds 22 %, near the 25 % of a balanced 4-class set. So the
published ratio needs no change; ``target_distribution`` is there for users who want a chosen class mix in the
edited maps themselves rather than a conversion rate.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage as ndi

from diffaug.errors import InvalidInputError
from diffaug.labels.edit import LabelEdit, check_generator, finish_edit, prepare_maps, round_half_up
from diffaug.labels.instances import instance_areas, instance_centroids, instance_piece_counts, instance_types
from diffaug.labels.validate import label_map_problems

if TYPE_CHECKING:
    from diffaug.data.tiles import Tile, TileFolder

__all__ = ["Donor", "DonorBank", "DonorSource", "balance_label_map", "check_balance_params", "default_border_margin", "extract_donors",
           "rare_classes_of"]

DonorSource = Literal["same-tile-first", "same-tile", "dataset"]
_DONOR_SOURCES = ("same-tile-first", "same-tile", "dataset")


@dataclass(frozen=True)
class Donor:
    """A whole minor-class nucleus that can be pasted into other tiles.

    Attributes:
        tile: name of the tile it comes from ("" when unnamed).
        id: its id in that tile.
        cls: its class.
        mask: bool (h, w) crop of its shape (its bounding box).
        centroid: its centroid (x, y) in crop coordinates.
        area: its pixel count.
    """

    tile: str
    id: int
    cls: int
    mask: np.ndarray
    centroid: tuple[float, float]
    area: int


def rare_classes_of(class_counts: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """The rare ("minor") classes of a dataset, from its nucleus counts per class.

    A class is rare when it holds under half of the share it would have in a balanced dataset (share < 1 / (2K)
    for K foreground classes). When no class is that rare, the single rarest class is. Classes with no nuclei at all
    are never rare: they cannot donate.

    Args:
        class_counts: nuclei per class, index = class (index 0, background, is ignored).

    Example:
        >>> rare_classes_of([0, 432, 4507, 6609, 6668])  # CoNSeP training tiles, HoVer-Net's 4 classes
        (1,)
    """
    counts = np.asarray(class_counts, dtype=np.float64)[1:]
    if counts.size == 0 or counts.sum() == 0:
        raise InvalidInputError("rare_classes_of: no nuclei with a class; balancing needs a class-labelled dataset")
    share = counts / counts.sum()
    present = counts > 0
    rare = np.flatnonzero(present & (share < 0.5 / counts.size))
    if rare.size == 0:
        rare = np.array([int(np.argmin(np.where(present, counts, np.inf)))])
    return tuple(int(k) + 1 for k in rare)


def extract_donors(inst_map: np.ndarray, type_map: np.ndarray, classes: Iterable[int], *, tile: str = "",
                   inst_type: np.ndarray | None = None) -> list[Donor]:
    """The whole nuclei of ``classes`` in one tile, as donors (in id order).

    A nucleus in several pieces or touching the tile border (so possibly cut by it) is not a whole nucleus and is
    left out. ``inst_type`` is the class per id 1..max when already known (saves a pass).
    """
    classes = {int(c) for c in classes}
    if inst_type is None:
        inst_type = instance_types(inst_map, type_map)
    wanted = np.flatnonzero(np.isin(inst_type, list(classes))) + 1
    if wanted.size == 0:
        return []
    pieces = instance_piece_counts(inst_map)
    boxes = ndi.find_objects(inst_map)
    height, width = inst_map.shape
    donors = []
    for nid in wanted.tolist():
        rows, cols = boxes[nid - 1]
        if pieces[nid] != 1 or rows.start == 0 or cols.start == 0 or rows.stop == height or cols.stop == width:
            continue
        mask = inst_map[rows, cols] == nid
        ys, xs = np.nonzero(mask)
        donors.append(Donor(tile=tile, id=nid, cls=int(inst_type[nid - 1]), mask=mask,
                            centroid=(float(xs.mean()), float(ys.mean())), area=int(xs.size)))
    return donors


class DonorBank:
    """The donors of a dataset, and its class counts (which decide the rare classes).

    Build it once per dataset with :meth:`from_folder` or :meth:`from_maps` and pass it to every
    :func:`balance_label_map` call; it is read-only there, so one bank serves all tiles (and DataLoader workers).

    Args:
        donors: the donor nuclei.
        class_counts: nuclei per class over the dataset, index = class (counting background at index 0, which is
            ignored), so its length is the number of classes counting background.
        rare_classes: the minor classes; defaults to :func:`rare_classes_of` ``(class_counts)``.

    Example:
        >>> bank = DonorBank.from_folder("shared/data/consep_train")  # doctest: +SKIP
        >>> bank.rare_classes, len(bank)  # doctest: +SKIP
        ((1,), 317)
    """

    def __init__(self, donors: Sequence[Donor], class_counts: Sequence[int] | np.ndarray, *,
                 rare_classes: Sequence[int] | None = None) -> None:
        self.donors: tuple[Donor, ...] = tuple(donors)
        self.class_counts = np.asarray(class_counts, dtype=np.int64).copy()
        self.class_counts[0] = 0
        self.num_classes = int(self.class_counts.size)
        if rare_classes is None:
            self.rare_classes = rare_classes_of(self.class_counts)
        else:
            self.rare_classes = _check_classes(rare_classes, self.num_classes, "DonorBank: rare_classes")
        self.areas = np.array([d.area for d in self.donors], dtype=np.int64)
        self.classes = np.array([d.cls for d in self.donors], dtype=np.int64)
        self.tile_names = sorted({d.tile for d in self.donors})
        codes = {name: i for i, name in enumerate(self.tile_names)}
        self.tile_codes = np.array([codes[d.tile] for d in self.donors], dtype=np.int64)
        bad = set(self.classes.tolist()) - set(range(1, self.num_classes))
        if bad:
            raise InvalidInputError(f"DonorBank: donors of classes {sorted(bad)} outside 1..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.donors)

    def __repr__(self) -> str:
        return (f"DonorBank({len(self)} donors, rare_classes={self.rare_classes}, "
                f"class_counts={self.class_counts[1:].tolist()})")

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts: nuclei and donors per class, and the rare classes."""
        donors = np.bincount(self.classes, minlength=self.num_classes) if len(self) else np.zeros(self.num_classes)
        return {"class_counts": {str(k): int(self.class_counts[k]) for k in range(1, self.num_classes)},
                "donors": {str(k): int(donors[k]) for k in range(1, self.num_classes) if donors[k]},
                "rare_classes": list(self.rare_classes)}

    @classmethod
    def from_maps(cls, maps: Iterable[Tile | tuple[np.ndarray, np.ndarray]], *, names: Sequence[str] | None = None,
                  num_classes: int | None = None, donor_classes: Literal["rare", "all"] | Sequence[int] = "rare",
                  rare_classes: Sequence[int] | None = None) -> DonorBank:
        """Build a bank from label maps.

        Args:
            maps: :class:`~diffaug.data.tiles.Tile` objects (their names name the donors) or ``(inst_map,
                type_map)`` pairs.
            names: tile names for pairs (default ``tile0``, ``tile1``, ...).
            num_classes: classes counting background; defaults to the largest class seen + 1.
            donor_classes: which classes to keep donors of: ``"rare"`` (the minor classes, enough for ratio
                balancing), ``"all"`` (needed by ``target_distribution`` balancing that raises several classes), or
                explicit classes.
            rare_classes: the minor classes; defaults to :func:`rare_classes_of` of the counted classes.

        Raises:
            InvalidInputError: on an instance-only map (balancing needs classes) or an invalid map.
        """
        counts = np.zeros(1, dtype=np.int64)
        donors: list[Donor] = []
        for index, item in enumerate(maps):
            if isinstance(item, tuple):
                inst_map, type_map = item
                name = names[index] if names is not None else f"tile{index}"
            else:
                inst_map, type_map, name = item.inst_map, item.type_map, item.name
            if type_map is None:
                raise InvalidInputError(f"DonorBank: tile {name!r} has no type_map; balancing needs classes, and an "
                                        "instance-only dataset can only be enlarged")
            problems = label_map_problems(inst_map, type_map, where=f"DonorBank: tile {name!r}",
                                          num_classes=num_classes, require_contiguous=False)
            if problems:
                raise InvalidInputError("\n".join(problems))
            inst_type = instance_types(inst_map, type_map)
            tile_counts = np.bincount(inst_type[inst_type > 0], minlength=1)
            if tile_counts.size > counts.size:
                counts = np.pad(counts, (0, tile_counts.size - counts.size))
            counts[:tile_counts.size] += tile_counts
            # Donors of every class are collected now: the rare classes are known only once all tiles are counted.
            donors.extend(extract_donors(inst_map, type_map, range(1, inst_type.max(initial=0) + 1), tile=name,
                                         inst_type=inst_type))
        if num_classes is not None:
            counts = np.pad(counts, (0, max(0, num_classes - counts.size)))
        if counts[1:].sum() == 0:
            raise InvalidInputError("DonorBank: the maps hold no nuclei; nothing to balance")
        rare = rare_classes_of(counts) if rare_classes is None else rare_classes
        if donor_classes == "rare":
            keep = set(int(c) for c in rare)
        elif donor_classes == "all":
            keep = set(range(1, counts.size))
        else:
            keep = set(_check_classes(donor_classes, counts.size, "DonorBank: donor_classes"))
        return cls([d for d in donors if d.cls in keep], counts, rare_classes=rare)

    @classmethod
    def from_folder(cls, folder: TileFolder | str | os.PathLike[str], *,
                    donor_classes: Literal["rare", "all"] | Sequence[int] = "rare",
                    rare_classes: Sequence[int] | None = None) -> DonorBank:
        """Build a bank from a tile folder (read in its default classes when a path is given)."""
        from diffaug.data.tiles import TileFolder

        if not isinstance(folder, TileFolder):
            folder = TileFolder(folder, require_images=False)
        if not folder.has_classes:
            raise InvalidInputError(f"{folder.root}: instance-only folder (no classes); balancing needs classes. "
                                    "Use the enlarge policy, or add type maps and classes.json")
        tiles = (folder.read(name, image=False) for name in folder.names)
        return cls.from_maps(tiles, num_classes=folder.scheme.num_classes, donor_classes=donor_classes,
                             rare_classes=rare_classes)


def _check_classes(classes: Iterable[int], num_classes: int, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(c) for c in classes)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be class ids, got {classes!r}") from None
    if not values or any(c < 1 or c >= num_classes for c in values) or len(set(values)) != len(values):
        raise InvalidInputError(f"{what} must be distinct classes in 1..{num_classes - 1}, got {list(values)}")
    return values


def _check_target(target: Mapping[int, float], num_classes: int | None,
                  present: Iterable[int] = ()) -> dict[int, float]:
    where = "target_distribution"
    try:
        shares = {int(k): float(v) for k, v in target.items()}
    except (AttributeError, TypeError, ValueError):
        raise InvalidInputError(f"{where} must map class ids to shares, e.g. {{1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}}"
                                ) from None
    if any(v < 0 or not np.isfinite(v) for v in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
        raise InvalidInputError(f"{where}: shares must be >= 0 and sum to 1, got {shares}")
    top = num_classes if num_classes is not None else max(shares, default=0) + 1
    if any(k < 1 or k >= top for k in shares):
        raise InvalidInputError(f"{where}: classes must be in 1..{top - 1}, got {sorted(shares)}")
    missing = sorted(set(int(k) for k in present) - set(shares))
    if missing:
        raise InvalidInputError(f"{where}: no share for classes {missing}; give every class a share (0 to convert "
                                "all its eligible nuclei)")
    return shares


def default_border_margin(shape: tuple[int, ...]) -> float:
    """DiffMix's 30-px border margin for a map of ``shape`` (H, W): 30 at 256 px and above, in proportion below.

    >>> default_border_margin((256, 256)), default_border_margin((1000, 540)), default_border_margin((64, 64))
    (30.0, 30.0, 7.5)
    """
    return 30.0 * min(1.0, min(shape[:2]) / 256.0)


def check_balance_params(*, ratio: float = 0.8, rare_classes: Sequence[int] | None = None,
                         target_distribution: Mapping[int, float] | None = None, dilation_iterations: int = 2,
                         size_ratio: float = 2.3, border_margin: float | None = None,
                         donor_source: DonorSource = "same-tile-first", max_donor_tries: int = 20,
                         num_classes: int | None = None) -> None:
    """Check :func:`balance_label_map`'s parameters without maps, so a job can fail before it starts.

    With ``num_classes`` (counting background) the classes are checked too, and a ``target_distribution`` must
    give a share to every class.
    """
    where = "balance_label_map"
    if not 0.0 <= float(ratio) <= 1.0:
        raise InvalidInputError(f"{where}: ratio must be in [0, 1] (share of eligible major nuclei), got {ratio}")
    if int(dilation_iterations) != dilation_iterations or dilation_iterations < 0:
        raise InvalidInputError(f"{where}: dilation_iterations must be an integer >= 0, got {dilation_iterations}")
    if not float(size_ratio) > 0:
        raise InvalidInputError(f"{where}: size_ratio must be > 0, got {size_ratio}")
    if border_margin is not None and not float(border_margin) >= 0:
        raise InvalidInputError(f"{where}: border_margin must be >= 0 pixels, got {border_margin}")
    if donor_source not in _DONOR_SOURCES:
        raise InvalidInputError(f"{where}: donor_source must be one of {', '.join(_DONOR_SOURCES)}; got "
                                f"{donor_source!r}")
    if int(max_donor_tries) != max_donor_tries or max_donor_tries < 1:
        raise InvalidInputError(f"{where}: max_donor_tries must be an integer >= 1, got {max_donor_tries}")
    if target_distribution is not None and rare_classes is not None:
        raise InvalidInputError(f"{where}: give rare_classes (with ratio) or target_distribution, not both")
    if num_classes is not None:
        if rare_classes is not None:
            _check_classes(rare_classes, num_classes, f"{where}: rare_classes")
        if target_distribution is not None:
            _check_target(target_distribution, num_classes, range(1, num_classes))


def _pick_by_ratio(rng: np.random.Generator, eligible: np.ndarray, ratio: float) -> np.ndarray:
    return rng.permutation(eligible)[:round_half_up(ratio * eligible.size)]


def _pick_by_target(rng: np.random.Generator, eligible: np.ndarray, inst_type: np.ndarray,
                    shares: dict[int, float], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Picked ids and the class each should become, for one tile in target-distribution mode.

    Every class under its target share gets a quota of conversions (its deficit); every class over it offers its
    eligible nuclei, at most as many as keep it at its target. When the offer is short, the quotas shrink in
    proportion (largest remainders first), so the rarest class is not starved by a commoner one.
    """
    n = inst_type.size
    counts = np.bincount(inst_type, minlength=num_classes)
    deficit = np.zeros(num_classes, dtype=np.int64)
    offered = []
    for k in range(1, num_classes):
        desired = shares.get(k, 0.0) * n
        if counts[k] < desired:
            deficit[k] = round_half_up(desired - counts[k])
        elif counts[k] > desired:
            surplus = int(np.floor(counts[k] - desired))  # give away no more than keeps the class at its target
            offered.append(rng.permutation(eligible[inst_type[eligible - 1] == k])[:surplus])
    pool = np.concatenate(offered) if offered else np.zeros(0, dtype=np.int64)
    wanted = int(deficit.sum())
    quota = deficit
    if pool.size < wanted:
        exact = deficit * pool.size / wanted
        quota = np.floor(exact).astype(np.int64)
        remainder_order = np.argsort(-(exact - quota), kind="stable")
        quota[remainder_order[:pool.size - int(quota.sum())]] += 1
    picked = rng.permutation(pool)[:int(quota.sum())]
    classes = rng.permutation(np.repeat(np.arange(num_classes), quota))
    return picked, classes


def balance_label_map(inst_map: np.ndarray, type_map: np.ndarray | None, *, rng: np.random.Generator,
                      bank: DonorBank | None = None, tile_name: str | None = None,
                      rare_classes: Sequence[int] | None = None, ratio: float = 0.8,
                      target_distribution: Mapping[int, float] | None = None, dilation_iterations: int = 2,
                      size_ratio: float = 2.3, border_margin: float | None = None,
                      donor_source: DonorSource = "same-tile-first", max_donor_tries: int = 20) -> LabelEdit:
    """Replace major-class nuclei by rare-class donor shapes (see the module docstring for the procedure).

    Args:
        inst_map: (H, W) instance ids (ids need not be contiguous; the output's are).
        type_map: (H, W) classes. Required: balancing needs classes.
        rng: the source of all randomness (picks and donor order).
        bank: the dataset's donors and class counts. Without it only the tile's own minor nuclei donate, and
            ``rare_classes`` must be given.
        tile_name: the tile's name in ``bank``; its entries there are skipped, since the tile's own donors are
            taken from the maps passed in. Pass it whenever the tile is in the bank, or its donors may be used twice.
        rare_classes: minor classes; default ``bank.rare_classes``.
        ratio: share of the eligible major nuclei to convert. Not used with ``target_distribution``.
        target_distribution: class -> share of all nuclei (summing to 1), instead of ``ratio``; donors must be in
            the bank for every class to raise (build it with ``donor_classes="all"``).
        dilation_iterations: dilations (3x3 square) of a major nucleus before its area is compared with donors'.
        size_ratio: a donor fits a major when (dilated major area) >= size_ratio x (donor area).
        border_margin: majors whose centroid is closer than this many pixels to the tile border are kept; default
            :func:`default_border_margin` of the map's shape (DiffMix's 30 px at 256 px and above).
        donor_source: ``"same-tile-first"`` (the tile's minor nuclei, then the bank's), ``"same-tile"``, or
            ``"dataset"`` (the bank only, in one random order).
        max_donor_tries: donors (in order, among those small enough) tried per major before it is skipped because
            none can be pasted without covering another nucleus or leaving the tile.

    Returns:
        A :class:`~diffaug.labels.edit.LabelEdit` whose ids are those of the input (replaced nuclei keep their id).
        ``record["replaced"]`` lists, per converted nucleus, its id, source id, old and new class, areas and the
        donor (tile and id); ``record["skipped"]`` the picked nuclei left as they were, with the reason.

    Raises:
        InvalidInputError: instance-only input, invalid maps or parameters, a class outside the bank's classes, or
            no rare classes known.

    Example:
        >>> inst = np.zeros((96, 96), np.int32); typ = np.zeros_like(inst)
        >>> inst[44:52, 44:52] = 1; typ[44:52, 44:52] = 3   # a major nucleus of 64 px, far from the border
        >>> inst[5:9, 5:9] = 2; typ[5:9, 5:9] = 1           # a minor one of 16 px, near the border (donates anyway)
        >>> edit = balance_label_map(inst, typ, rng=np.random.default_rng(0), rare_classes=[1])
        >>> edit.inst_type.tolist(), edit.record["replaced"][0]["donor"]
        ([1, 1], {'tile': None, 'id': 2, 'same_tile': True})
    """
    where = "balance_label_map"
    check_generator(rng, where)
    if type_map is None:
        raise InvalidInputError(f"{where}: no type_map; balancing needs classes. Instance-only maps can only be "
                                "enlarged (enlarge_label_map)")
    check_balance_params(ratio=ratio, rare_classes=rare_classes, target_distribution=target_distribution,
                         dilation_iterations=dilation_iterations, size_ratio=size_ratio, border_margin=border_margin,
                         donor_source=donor_source, max_donor_tries=max_donor_tries)
    if bank is not None and not isinstance(bank, DonorBank):
        raise InvalidInputError(f"{where}: bank must be a DonorBank, got {type(bank).__name__}")
    if bank is None and donor_source == "dataset":
        raise InvalidInputError(f"{where}: donor_source='dataset' needs a DonorBank (bank=...)")
    inst, typ, source_ids = prepare_maps(inst_map, type_map, where)
    num_classes = bank.num_classes if bank is not None else None
    if num_classes is not None and typ.size and int(typ.max()) >= num_classes:
        raise InvalidInputError(f"{where}: type_map has class {int(typ.max())} but the donor bank's classes are "
                                f"0..{num_classes - 1}; use maps and bank in the same class scheme")
    if num_classes is None:
        num_classes = int(typ.max(initial=0)) + 1
    inst_type = instance_types(inst, typ)
    areas = instance_areas(inst)
    centroids = instance_centroids(inst)
    height, width = inst.shape
    if border_margin is None:
        border_margin = default_border_margin(inst.shape)
    # Step 2: eligibility by the centroid's distance to the border (pixel-centre coordinates).
    distance = np.minimum.reduce([centroids[:, 0], centroids[:, 1], width - 1 - centroids[:, 0],
                                  height - 1 - centroids[:, 1]]) if inst_type.size else np.zeros(0)
    inner = np.flatnonzero(distance >= border_margin) + 1

    # Step 1 and 3: the receiving (minor) classes and the picked majors.
    if target_distribution is not None:
        shares = _check_target(target_distribution, num_classes, np.unique(inst_type).tolist())
        num_classes = max(num_classes, max(shares) + 1)
        picked, assigned = _pick_by_target(rng, inner, inst_type, shares, num_classes)
        receiving = tuple(sorted(set(assigned.tolist())))
        params: dict[str, Any] = {"target_distribution": {str(k): v for k, v in sorted(shares.items())}}
    else:
        if rare_classes is None:
            if bank is None:
                raise InvalidInputError(f"{where}: pass rare_classes, or a DonorBank whose dataset counts decide them")
            receiving = bank.rare_classes
        else:
            receiving = _check_classes(rare_classes, max(num_classes, max(rare_classes, default=0) + 1),
                                       f"{where}: rare_classes")
        majors = inner[~np.isin(inst_type[inner - 1], receiving)]
        picked = _pick_by_ratio(rng, majors, ratio)
        assigned = np.zeros(picked.size, dtype=np.int64)  # 0: any receiving class
        params = {"ratio": float(ratio), "rare_classes": list(receiving)}
    order = np.lexsort((picked, areas[picked]))  # smallest first
    picked, assigned = picked[order], assigned[order]

    # Step 5's donor order: this tile's minor nuclei, then the bank's, each in random order.
    local: list[Donor] = []
    if donor_source != "dataset" and receiving:
        local = extract_donors(inst, typ, receiving, tile="", inst_type=inst_type)
        local = [local[i] for i in rng.permutation(len(local))]
    bank_order = np.zeros(0, dtype=np.int64)
    if bank is not None and donor_source != "same-tile" and len(bank) and receiving:
        usable = np.isin(bank.classes, receiving)
        if donor_source == "same-tile-first" and tile_name in bank.tile_names:
            usable &= bank.tile_codes != bank.tile_names.index(tile_name)
        bank_order = rng.permutation(np.flatnonzero(usable))
    donor_area = np.concatenate([np.array([d.area for d in local], dtype=np.int64),
                                 bank.areas[bank_order] if bank is not None else bank_order])
    donor_class = np.concatenate([np.array([d.cls for d in local], dtype=np.int64),
                                  bank.classes[bank_order] if bank is not None else bank_order])
    used = np.zeros(donor_area.size, dtype=bool)

    def donor_at(index: int) -> Donor:
        return local[index] if index < len(local) else bank.donors[bank_order[index - len(local)]]  # type: ignore

    boxes = ndi.find_objects(inst)
    kernel = np.ones((3, 3), dtype=np.uint8)
    replaced: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for nid, target_class in zip(picked.tolist(), assigned.tolist()):
        rows, cols = boxes[nid - 1]
        own = inst[rows, cols] == nid
        dilated_area = _dilated_area(own, int(dilation_iterations), kernel)
        allowed = ~used & (donor_area * size_ratio <= dilated_area)
        if target_class:
            allowed &= donor_class == target_class
        candidates = np.flatnonzero(allowed)
        entry: dict[str, Any] = {"id": nid, "source_id": int(source_ids[nid - 1]),
                                 "from_class": int(inst_type[nid - 1])}
        if candidates.size == 0:
            skipped.append({**entry, "reason": "no unused donor small enough"})
            continue
        centre_x, centre_y = centroids[nid - 1]
        for index in candidates[:int(max_donor_tries)].tolist():
            donor = donor_at(index)
            top = round_half_up(centre_y - donor.centroid[1])
            left = round_half_up(centre_x - donor.centroid[0])
            h, w = donor.mask.shape
            if top < 0 or left < 0 or top + h > height or left + w > width:
                continue
            under = inst[top:top + h, left:left + w][donor.mask]
            if ((under != 0) & (under != nid)).any():
                continue
            # Step 6: clear the major, paste the donor under the major's id, in the donor's class.
            inst[rows, cols][own] = 0
            typ[rows, cols][own] = 0
            inst[top:top + h, left:left + w][donor.mask] = nid
            typ[top:top + h, left:left + w][donor.mask] = donor.cls
            used[index] = True
            is_local = index < len(local)
            replaced.append({**entry, "to_class": donor.cls, "area_before": int(areas[nid]),
                             "dilated_area": dilated_area, "area_after": donor.area,
                             "donor": {"tile": tile_name if is_local else donor.tile,
                                       "id": int(source_ids[donor.id - 1]) if is_local else donor.id,
                                       "same_tile": is_local}})
            break
        else:
            skipped.append({**entry, "reason": "no donor fits without covering another nucleus or leaving the tile"})
    params.update({"dilation_iterations": int(dilation_iterations), "size_ratio": float(size_ratio),
                   "border_margin": float(border_margin), "donor_source": donor_source,
                   "max_donor_tries": int(max_donor_tries)})
    record = {
        "policy": "balance",
        "params": params,
        "receiving_classes": list(receiving),
        "n_nuclei": int(inst_type.size),
        "n_eligible": int(inner.size),
        "n_picked": int(picked.size),
        "n_replaced": len(replaced),
        "n_donors": int(donor_area.size),
        "replaced": replaced,
        "skipped": skipped,
    }
    return finish_edit(inst, typ, source_ids, record)


def _dilated_area(mask: np.ndarray, iterations: int, kernel: np.ndarray) -> int:
    """Area of ``mask`` after ``iterations`` dilations with ``kernel``, computed on a crop padded to hold them."""
    import cv2

    if iterations == 0:
        return int(mask.sum())
    padded = np.pad(mask.astype(np.uint8), iterations)
    return int(np.count_nonzero(cv2.dilate(padded, kernel, iterations=iterations)))
