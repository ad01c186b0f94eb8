"""The functional core shared by :class:`~diffaug.transforms.DiffMixTransform` (Albumentations),
:class:`~diffaug.transforms.DiffMixd` (MONAI) and the pool's :class:`~diffaug.transforms.DiffMixSynthesizer`.

One DiffMix draw on a sample (image, inst_map, type_map), all randomness from one ``numpy.random.Generator``:

1. **Window.** The model renders ``S x S`` images (``S`` = its ``image_size``). A sample of exactly that size is
   used whole. A larger sample (HoVer-Net's 540² patches, 1000² images) gets one ``S x S`` window at a random
   position: only that window is edited, re-rendered and pasted back; the rest of the sample stays real. A smaller
   sample is an error (the model cannot render it).
2. **Label edit** of the window (:mod:`diffaug.labels`): ``balance`` (rare-class donor swap), ``enlarge`` (small
   random shifts) or ``both`` (balance, then enlarge). Nuclei cut by the window border (partly outside it) are
   frozen: an edit that touched one is undone for that nucleus, together with any edit that then collides with it,
   so a nucleus is never split between an edited inside and an unedited outside.
3. **Synthesis**: DiffMix's partial-noise DDIM (:class:`~diffaug.pipelines.SemanticSynthesisPipeline`) re-renders
   the window from the real window image under the edited labels. The start noise is drawn on the CPU from a seed
   taken from the generator, so a seed gives the same noise on every device. The window is rendered even when the
   edit changed nothing (no eligible nucleus): the sample still gets a new image.
4. **Paste back**: the window's pixels and labels replace the sample's; ids are renumbered 1..N over the sample.
   Nuclei crossing the window border keep their labels; their inside part is rendered by the model from those
   labels, their outside part stays real, so the labels stay right while the texture may show a seam.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from diffaug.errors import InvalidInputError

if TYPE_CHECKING:
    from diffaug.labels.balance import DonorBank
    from diffaug.labels.edit import LabelEdit
    from diffaug.pipelines import SemanticSynthesisPipeline

__all__ = ["Policy", "POLICIES", "DiffMixResult", "DiffMixSettings", "choose_window", "edit_window",
           "check_image", "check_maps", "check_pool_args", "take_from_pool", "resolve_device", "load_pipeline",
           "load_donor_bank", "clear_caches", "DiffMixSynthesizer"]

Policy = Literal["balance", "enlarge", "both"]
POLICIES: tuple[str, ...] = ("balance", "enlarge", "both")

_BALANCE_KEYS = ("ratio", "target_distribution", "dilation_iterations", "size_ratio", "border_margin",
                 "donor_source", "max_donor_tries")
_ENLARGE_KEYS = ("fraction", "shift_range", "max_tries")


@dataclass
class DiffMixResult:
    """One DiffMix draw.

    Attributes:
        image: uint8 (H, W, 3), the sample with its window re-rendered.
        inst_map: int32 (H, W), ids 1..N.
        type_map: int32 (H, W), or None for instance-only samples.
        window: (y0, x0, size): where the model's window sat.
        seed: the seed of the start noise (CPU ``torch.Generator``).
        record: JSON-serialisable provenance: policy, window, seed, the edits' records, nuclei frozen and reverted.
    """

    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray | None
    window: tuple[int, int, int]
    seed: int
    record: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_image(image: Any, where: str) -> np.ndarray:
    """Demand an RGB uint8 (H, W, 3) image; a float image gets the "put the transform earlier" advice."""
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"{where}: image must be a numpy array (H, W, 3), got {type(image).__name__}")
    if np.issubdtype(image.dtype, np.floating):
        raise InvalidInputError(f"{where}: image is {image.dtype}, but the diffusion model needs the raw uint8 RGB "
                                "image; put DiffMixTransform before ToFloat/Normalize (and any other transform that "
                                "makes the image float)")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"{where}: image must be uint8 RGB, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"{where}: image must be RGB (H, W, 3), got shape {image.shape}")
    return image


def check_maps(inst_map: Any, type_map: Any, image_shape: tuple[int, ...], where: str,
               num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Check the label maps against each other, the image and (optionally) the model's classes."""
    from diffaug.labels.validate import label_map_problems

    for key, arr in (("inst_map", inst_map), ("type_map", type_map)):
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise InvalidInputError(f"{where}: {key} must be a 2-D numpy array (H, W), got "
                                    f"{getattr(arr, 'shape', type(arr).__name__)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"{where}: {key} must hold integer ids/classes (int32), got {arr.dtype}; label "
                                    "maps must never be interpolated linearly or normalised")
        if arr.shape != tuple(image_shape[:2]):
            raise InvalidInputError(f"{where}: image is {tuple(image_shape[:2])} but {key} is {arr.shape}; image and "
                                    "maps must have the same height and width")
    problems = label_map_problems(inst_map, type_map, where=where, require_contiguous=False)
    if problems:
        raise InvalidInputError("\n".join(problems))
    if type_map is not None and num_classes is not None and type_map.size and int(type_map.max()) >= num_classes:
        raise InvalidInputError(f"{where}: type_map holds class {int(type_map.max())}, but the model knows classes "
                                f"0..{num_classes - 1} (0 = background); merge the classes to the model's scheme "
                                "(e.g. CoNSeP's 7 raw classes to HoVer-Net's 4) before this transform")
    return inst_map, type_map


@dataclass(frozen=True)
class DiffMixSettings:
    """Everything one DiffMix draw needs besides the sample and the generator; validated on construction.

    Args:
        model: a converted model folder, a registered name (``diffaug.hub.REGISTRY``) or a Hub repo id.
        policy: ``"balance"``, ``"enlarge"`` or ``"both"``.
        strength, num_inference_steps, guidance_scale, eta: the sampler's (see
            :class:`~diffaug.pipelines.SemanticSynthesisPipeline`).
        revision: Hub revision (branch, tag or commit sha) of ``model``.
        device: ``"auto"`` (CUDA in the main process when available, CPU in DataLoader workers), or a torch device.
        donors: a tile folder to build the donor bank from (the rare classes default to its rarest); without it,
            balancing uses the sample's own rare nuclei only and needs ``rare_classes``.
        rare_classes: the minor classes for balancing (default: the donor bank's).
        balance_kwargs: more :func:`~diffaug.labels.balance_label_map` parameters (``ratio``,
            ``target_distribution``, ``dilation_iterations``, ``size_ratio``, ``border_margin``, ``donor_source``,
            ``max_donor_tries``).
        enlarge_kwargs: more :func:`~diffaug.labels.enlarge_label_map` parameters (``fraction``, ``shift_range``,
            ``max_tries``).
    """

    model: str
    policy: str = "balance"
    strength: float = 0.55
    num_inference_steps: int = 100
    guidance_scale: float = 1.5
    eta: float = 0.0
    revision: str | None = None
    device: str = "auto"
    donors: str | None = None
    rare_classes: tuple[int, ...] | None = None
    balance_kwargs: Mapping[str, Any] | None = None
    enlarge_kwargs: Mapping[str, Any] | None = None

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> DiffMixSettings:
        """Settings from a transform's ``__init__`` arguments (``locals()``); other names are ignored."""
        from dataclasses import fields

        return cls(**{f.name: arguments[f.name] for f in fields(cls) if f.name in arguments})

    def __post_init__(self) -> None:
        where = "DiffMix"
        # Normalise to plain, serialisable values (the dataclass is frozen, hence object.__setattr__).
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if isinstance(self.donors, os.PathLike):
            object.__setattr__(self, "donors", os.fspath(self.donors))
        if self.rare_classes is not None and not isinstance(self.rare_classes, (str, bytes)):
            try:
                object.__setattr__(self, "rare_classes", tuple(self.rare_classes))
            except TypeError:
                pass
        for name in ("balance_kwargs", "enlarge_kwargs"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, dict(value))
        target = (self.balance_kwargs or {}).get("target_distribution")
        if isinstance(target, Mapping):  # JSON turns the class ids into strings; back to ints
            try:
                self.balance_kwargs["target_distribution"] = {int(k): v for k, v in target.items()}  # type: ignore
            except (TypeError, ValueError):
                pass  # reported by check_balance_params below
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise InvalidInputError(f"{where}: model must be a model folder, a registered name or a Hub repo id "
                                    f"(a string, so that the pipeline stays serialisable), got {self.model!r}")
        if self.policy not in POLICIES:
            raise InvalidInputError(f"{where}: unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not _is_number(self.strength) or not 0.0 < float(self.strength) <= 1.0:
            raise InvalidInputError(f"{where}: strength must be in (0, 1] (0.55 = DiffMix's start at t=540 of 1000; 1.0 "
                                    f"= pure noise), got {self.strength!r}")
        if (isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, (int, np.integer))
                or not 1 <= self.num_inference_steps <= 1000):
            raise InvalidInputError(f"{where}: num_inference_steps must be an integer in 1..1000 (DiffMix: 100), got "
                                    f"{self.num_inference_steps!r}")
        if round(float(self.strength) * int(self.num_inference_steps)) < 1:
            raise InvalidInputError(f"{where}: strength={self.strength} x num_inference_steps="
                                    f"{self.num_inference_steps} rounds to 0 denoising steps; raise either")
        if not _is_number(self.guidance_scale) or not np.isfinite(self.guidance_scale):
            raise InvalidInputError(f"{where}: guidance_scale must be a finite number (DiffMix: 1.5), got "
                                    f"{self.guidance_scale!r}")
        if not _is_number(self.eta) or not (0.0 <= float(self.eta) and np.isfinite(self.eta)):
            raise InvalidInputError(f"{where}: eta must be a finite number >= 0 (0 = deterministic DDIM), got "
                                    f"{self.eta!r}")
        if self.revision is not None and not isinstance(self.revision, str):
            raise InvalidInputError(f"{where}: revision must be a branch, tag or commit sha, got {self.revision!r}")
        if not isinstance(self.device, str) or not self.device:
            raise InvalidInputError(f"{where}: device must be 'auto', 'cpu' or a torch device string like 'cuda:0', "
                                    f"got {self.device!r}")
        if self.donors is not None and not os.path.isdir(str(self.donors)):
            raise InvalidInputError(f"{where}: donors={self.donors!r} is not a folder; pass the training tile folder "
                                    "(NAME.png + NAME.npz) to build the donor bank from")
        if self.rare_classes is not None:
            classes = tuple(self.rare_classes)
            if (not classes or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
                                   for c in classes) or len(set(classes)) != len(classes)):
                raise InvalidInputError(f"{where}: rare_classes must be distinct class ids >= 1, got "
                                        f"{self.rare_classes!r}")
        self._check_kwargs(self.balance_kwargs, _BALANCE_KEYS, "balance_kwargs")
        self._check_kwargs(self.enlarge_kwargs, _ENLARGE_KEYS, "enlarge_kwargs")
        if self.policy in ("balance", "both"):
            from diffaug.labels.balance import check_balance_params

            kwargs = dict(self.balance_kwargs or {})
            check_balance_params(rare_classes=self.rare_classes, **kwargs)
            if self.donors is None and self.rare_classes is None:
                raise InvalidInputError(f"{where}: balancing needs the rare classes: pass donors=TRAIN_TILE_FOLDER "
                                        "(builds a donor bank and takes its rarest classes) or rare_classes=[...] "
                                        "(then only the sample's own rare nuclei donate)")
            if kwargs.get("donor_source") == "dataset" and self.donors is None:
                raise InvalidInputError(f"{where}: donor_source='dataset' needs donors=TRAIN_TILE_FOLDER")
        if self.policy in ("enlarge", "both"):
            from diffaug.labels.enlarge import check_enlarge_params

            check_enlarge_params(**dict(self.enlarge_kwargs or {}))

    @staticmethod
    def _check_kwargs(kwargs: Any, allowed: tuple[str, ...], name: str) -> None:
        if kwargs is None:
            return
        if not isinstance(kwargs, Mapping):
            raise InvalidInputError(f"DiffMix: {name} must be a dict, got {type(kwargs).__name__}")
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise InvalidInputError(f"DiffMix: unknown {name} {unknown}; allowed: {', '.join(allowed)}")

    # ---------------------------------------------------------------------------------------------- resources
    def pipeline(self) -> SemanticSynthesisPipeline:
        return load_pipeline(str(self.model), self.revision, resolve_device(self.device))

    def bank(self) -> DonorBank | None:
        if self.donors is None or self.policy == "enlarge":
            return None
        return load_donor_bank(str(self.donors), self.rare_classes,
                               "all" if (self.balance_kwargs or {}).get("target_distribution") else "rare")

    # ---------------------------------------------------------------------------------------------- one draw
    def __call__(self, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None,
                 rng: np.random.Generator, *, where: str = "DiffMix") -> DiffMixResult:
        """Edit and re-render one sample (see the module docstring). ``type_map=None``: instance-only sample."""
        import torch

        check_image(image, where)
        pipe = self.pipeline()
        num_classes = pipe.num_classes
        check_maps(inst_map, type_map, image.shape, where, num_classes)
        if type_map is None and self.policy in ("balance", "both"):
            raise InvalidInputError(f"{where}: policy {self.policy!r} needs a type map (masks=[inst_map, type_map]); "
                                    "an instance-only sample can only be enlarged (policy='enlarge')")
        size = int(pipe.model.config.image_size)
        height, width = inst_map.shape
        if height < size or width < size:
            raise InvalidInputError(f"{where}: the sample is {height}x{width} but the model renders {size}x{size} "
                                    f"windows; give samples of at least {size}x{size} (put DiffMixTransform before "
                                    "any crop to a smaller size)")
        y0, x0 = choose_window((height, width), size, rng)
        new_inst, new_type, record = edit_window(
            inst_map, type_map, (y0, x0, size), self.policy, rng, bank=self.bank(), rare_classes=self.rare_classes,
            balance_kwargs=self.balance_kwargs, enlarge_kwargs=self.enlarge_kwargs, num_classes=num_classes)
        seed = int(rng.integers(0, 2**63 - 1))
        noise = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        win = (slice(y0, y0 + size), slice(x0, x0 + size))
        out = pipe(image=np.ascontiguousarray(image[win]), inst_map=np.ascontiguousarray(new_inst[win]),
                   type_map=None if new_type is None else np.ascontiguousarray(new_type[win]),
                   strength=float(self.strength), num_inference_steps=int(self.num_inference_steps),
                   guidance_scale=float(self.guidance_scale), eta=float(self.eta),
                   generator=torch.Generator().manual_seed(seed), noise=noise)
        new_image = image.copy()
        new_image[win] = out.images[0]
        record.update({"window": [y0, x0, size], "seed": seed, "model": str(self.model),
                       "commit_sha": getattr(pipe, "source", {}).get("commit_sha")})
        return DiffMixResult(image=new_image, inst_map=new_inst, type_map=new_type, window=(y0, x0, size),
                             seed=seed, record=record)


class DiffMixSynthesizer:
    """Makes synthetic pairs for a :class:`~diffaug.transforms.pool.PoolFiller`: ``synth(index) -> (image, inst_map,
    type_map)`` reads a source tile, crops a random ``tile_shape`` patch from it, and applies one DiffMix draw.

    Deterministic per index: item ``index`` uses ``numpy.random.default_rng([seed, index])``. Picklable (holds only
    plain settings), so it can run in a separate process, one per GPU (``device="cuda:1"``).

    Args:
        source: tile folder of real training tiles (``NAME.png`` + ``NAME.npz``), at least ``tile_shape`` large.
        tile_shape: (H, W) of the pairs, the pool's tile shape (the training patch size).
        seed: job seed.
        settings: the DiffMix settings, as keyword arguments of :class:`DiffMixTransform` (``model``, ``policy``,
            ``strength``, ...) without ``p``, ``pool`` and ``pool_ratio``.

    Example:
        >>> synth = DiffMixSynthesizer("data/consep_train", (256, 256), seed=0, model="diffmix-consep",
        ...                            donors="data/consep_train")  # doctest: +SKIP
        >>> with SynthesisPool.create(64, (256, 256)) as pool, PoolFiller(pool, synth):  # doctest: +SKIP
        ...     train(DiffMixTransform(model="diffmix-consep", pool=pool.name, rare_classes=[1]))
    """

    def __init__(self, source: str | os.PathLike[str], tile_shape: tuple[int, int], *, seed: int = 0,
                 **settings: Any) -> None:
        from diffaug.data.tiles import TileFolder

        self.source = str(source)
        self.tile_shape = (int(tile_shape[0]), int(tile_shape[1]))
        self.seed = int(seed)
        self.settings = DiffMixSettings(**settings)
        folder = TileFolder(self.source)
        self._names = list(folder.names)
        self._folder: Any = folder

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_folder"] = None
        return state

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        from diffaug.data.tiles import TileFolder

        if self._folder is None:
            self._folder = TileFolder(self.source)
        rng = np.random.default_rng([self.seed, int(index)])
        name = self._names[int(index) % len(self._names)]
        tile = self._folder.read(name)
        height, width = self.tile_shape
        if tile.shape[0] < height or tile.shape[1] < width:
            raise InvalidInputError(f"{self.source}/{name}: tile is {tile.shape}, smaller than the pool's pairs "
                                    f"{self.tile_shape}")
        y0 = int(rng.integers(0, tile.shape[0] - height + 1))
        x0 = int(rng.integers(0, tile.shape[1] - width + 1))
        win = (slice(y0, y0 + height), slice(x0, x0 + width))
        types = None if tile.type_map is None else np.ascontiguousarray(tile.type_map[win])
        result = self.settings(np.ascontiguousarray(tile.image[win]), np.ascontiguousarray(tile.inst_map[win]),
                               types, rng, where=f"{self.source}/{name}")
        return result.image, result.inst_map, result.type_map


# ----------------------------------------------------------------------------------------------------- windows
def choose_window(shape: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a uniformly random ``size x size`` window inside ``shape`` (0, 0 when they are equal)."""
    height, width = shape
    if height < size or width < size:
        raise InvalidInputError(f"a {size}x{size} window does not fit in {height}x{width}")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def _chain(first: LabelEdit, second: LabelEdit) -> LabelEdit:
    """``second`` applied to ``first``'s output, with ``source_ids`` pointing at ``first``'s input."""
    from dataclasses import replace

    src = second.source_ids
    through = np.where(src > 0, first.source_ids[np.clip(src - 1, 0, None)] if first.source_ids.size else 0, 0)
    return replace(second, source_ids=through.astype(np.int32))


def _run_policy(inst: np.ndarray, typ: np.ndarray | None, policy: str, rng: np.random.Generator, *,
                bank: DonorBank | None, rare_classes: Sequence[int] | None, balance_kwargs: Mapping[str, Any] | None,
                enlarge_kwargs: Mapping[str, Any] | None) -> tuple[LabelEdit, list[dict[str, Any]]]:
    from diffaug.labels.balance import balance_label_map
    from diffaug.labels.enlarge import enlarge_label_map

    records = []
    edit = None
    if policy in ("balance", "both"):
        kwargs = dict(balance_kwargs or {})
        if bank is None and kwargs.get("donor_source") is None:
            kwargs["donor_source"] = "same-tile"
        edit = balance_label_map(inst, typ, rng=rng, bank=bank, rare_classes=rare_classes, **kwargs)
        records.append(edit.record)
    if policy in ("enlarge", "both"):
        src_inst, src_typ = (inst, typ) if edit is None else (edit.inst_map, edit.type_map)
        moved = enlarge_label_map(src_inst, src_typ, rng=rng, **dict(enlarge_kwargs or {}))
        records.append(moved.record)
        edit = moved if edit is None else _chain(edit, moved)
    assert edit is not None
    return edit, records


def edit_window(inst_map: np.ndarray, type_map: np.ndarray | None, window: tuple[int, int, int], policy: str,
                rng: np.random.Generator, *, bank: DonorBank | None = None,
                rare_classes: Sequence[int] | None = None, balance_kwargs: Mapping[str, Any] | None = None,
                enlarge_kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Edit the labels inside ``window = (y0, x0, size)`` of a sample; nuclei cut by the window border are frozen.

    Returns the sample's new maps (ids 1..N over the whole sample, in the order of the input's ids, new nuclei
    last) and a record: ``{"policy", "edits": [...], "frozen": n, "reverted": [input ids]}``.
    """
    y0, x0, size = window
    win = (slice(y0, y0 + size), slice(x0, x0 + size))
    crop_inst = np.ascontiguousarray(inst_map[win]).astype(np.int32, copy=False)
    crop_type = None if type_map is None else np.ascontiguousarray(type_map[win]).astype(np.int32, copy=False)
    if bank is not None and num_classes is not None and bank.num_classes > num_classes:
        raise InvalidInputError(f"the donor bank holds classes up to {bank.num_classes - 1}, but the model knows "
                                f"0..{num_classes - 1}; build it from tiles in the model's class scheme")
    if bank is None and policy in ("balance", "both") and type_map is not None:
        bank = outside_donor_bank(inst_map, type_map, window, rare_classes, num_classes)
    edit, records = _run_policy(crop_inst, crop_type, policy, rng, bank=bank, rare_classes=rare_classes,
                                balance_kwargs=balance_kwargs, enlarge_kwargs=enlarge_kwargs)

    # Work in the input's id space: output nucleus i came from input id source_ids[i-1]; new nuclei get fresh ids.
    top = int(inst_map.max(initial=0))
    src = edit.source_ids.astype(np.int64)
    fresh = np.flatnonzero(src == 0)
    src[fresh] = top + 1 + np.arange(fresh.size)
    lut = np.concatenate([[0], src])
    new_crop = lut[edit.inst_map]
    classes_after = {} if edit.inst_type is None else dict(zip(src.tolist(), edit.inst_type.tolist()))

    # Frozen nuclei: partly outside the window (counting pieces outside too).
    whole = np.bincount(inst_map.ravel(), minlength=top + 1)
    inside = np.bincount(crop_inst.ravel(), minlength=top + 1)
    frozen = set((np.flatnonzero((inside[1:] > 0) & (inside[1:] < whole[1:])) + 1).tolist())
    reverted = _revert(crop_inst, crop_type, new_crop, edit, frozen, classes_after)

    new_type_crop = None
    if crop_type is not None:
        cls_lut = np.zeros(int(new_crop.max(initial=0)) + 1, dtype=np.int32)
        for nid, cls in classes_after.items():
            if nid < cls_lut.size:
                cls_lut[nid] = cls
        new_type_crop = cls_lut[new_crop]
        keep = np.isin(new_crop, list(reverted)) if reverted else np.zeros(new_crop.shape, bool)
        new_type_crop[keep] = crop_type[keep]  # a reverted nucleus keeps its own class
    full_inst = inst_map.astype(np.int64, copy=True)
    full_inst[win] = new_crop
    from diffaug.labels.instances import relabel_sequential

    out_inst = relabel_sequential(full_inst).astype(np.int32, copy=False)
    out_type = None
    if type_map is not None:
        out_type = type_map.astype(np.int32, copy=True)
        out_type[win] = new_type_crop
    record = {"policy": policy, "edits": records, "frozen": len(frozen), "reverted": sorted(reverted)}
    return out_inst, out_type, record


def outside_donor_bank(inst_map: np.ndarray, type_map: np.ndarray, window: tuple[int, int, int],
                       rare_classes: Sequence[int] | None, num_classes: int | None) -> DonorBank | None:
    """The sample's own donors outside the window: its whole rare nuclei that have no pixel in the window (those in
    the window donate first, from the window's maps). None when there are none, or the sample is the window."""
    from diffaug.labels.balance import DonorBank

    y0, x0, size = window
    if inst_map.shape == (size, size) or rare_classes is None:
        return None
    touching = np.unique(inst_map[y0:y0 + size, x0:x0 + size])
    outside = np.where(np.isin(inst_map, touching), 0, inst_map)
    if not outside.any():
        return None
    types = np.where(outside > 0, type_map, 0)
    rare = tuple(int(c) for c in rare_classes)
    classes = max(int(types.max()) + 1, max(rare) + 1, num_classes or 0)
    bank = DonorBank.from_maps([(outside, types)], names=["outside-window"], num_classes=classes, rare_classes=rare)
    return bank if len(bank) else None


def _revert(crop_inst: np.ndarray, crop_type: np.ndarray | None, new_crop: np.ndarray, edit: LabelEdit,
            frozen: set[int], classes_after: dict[int, int]) -> set[int]:
    """Undo, in place on ``new_crop`` (input-id space), the edit of every frozen nucleus it touched, and of every
    nucleus that then collides with a restored one. Returns the reverted input ids.

    Terminates: each round reverts at least one more nucleus, and reverting all of them gives back the input (whose
    nuclei do not overlap).
    """
    changed_px = new_crop != crop_inst
    if crop_type is not None:
        # A class change with the same pixels is a change too (balancing may keep a shape).
        cls_lut = np.zeros(int(new_crop.max(initial=0)) + 1, dtype=np.int64)
        for nid, cls in classes_after.items():
            cls_lut[nid] = cls
        changed_px |= (new_crop > 0) & (cls_lut[new_crop] != crop_type)
    changed = set(np.unique(crop_inst[changed_px]).tolist()) | set(np.unique(new_crop[changed_px]).tolist())
    changed.discard(0)
    todo = frozen & changed
    reverted: set[int] = set()
    while todo:
        reverted |= todo
        for nid in todo:
            new_crop[new_crop == nid] = 0
        restore = np.isin(crop_inst, list(reverted))
        clashes = set(np.unique(new_crop[restore]).tolist()) - {0} - reverted
        new_crop[restore] = crop_inst[restore]
        todo = clashes  # the clashing nuclei go back too; their old pixels are restored in the next round
    for nid in reverted:
        if crop_type is not None:
            where = crop_inst == nid
            if where.any():
                classes_after[nid] = int(crop_type[where][0])
        else:
            classes_after.pop(nid, None)
    return reverted


# ----------------------------------------------------------------------------------------------------- the pool
def check_pool_args(pool: Any, pool_ratio: Any, where: str) -> tuple[str | None, float]:
    """``pool`` (a SynthesisPool or its name) as its name, and ``pool_ratio`` checked to lie in (0, 1]."""
    name = pool
    if pool is not None and not isinstance(pool, str):
        name = getattr(pool, "name", None)
        if not isinstance(name, str):
            raise InvalidInputError(f"{where}: pool must be a SynthesisPool or its name, got {type(pool).__name__}")
    if not _is_number(pool_ratio) or not 0.0 < float(pool_ratio) <= 1.0:
        raise InvalidInputError(f"{where}: pool_ratio must be in (0, 1] (share of applied calls that take a pool "
                                f"pair), got {pool_ratio!r}")
    if name is None and float(pool_ratio) != 1.0:
        raise InvalidInputError(f"{where}: pool_ratio only applies with a pool; pass pool=... or leave pool_ratio at 1")
    return name, float(pool_ratio)


def take_from_pool(pool_name: str, pool_ratio: float, image: np.ndarray, inst_map: np.ndarray,
                   type_map: np.ndarray | None, rng: np.random.Generator, where: str) -> DiffMixResult | None:
    """With probability ``pool_ratio`` a pair from the pool, as a :class:`DiffMixResult`; None when the draw says no
    or the pool is empty (then the real sample is kept: a take never waits)."""
    from diffaug.transforms.pool import attach_pool

    check_maps(inst_map, type_map, image.shape, where)
    pool = attach_pool(pool_name)
    if pool.tile_shape != inst_map.shape:
        raise InvalidInputError(f"{where}: the pool holds {pool.tile_shape} pairs but the sample is {inst_map.shape}; "
                                "create the pool with the training patch size, or place the transform after the crop "
                                "to that size")
    if pool.with_types != (type_map is not None):
        raise InvalidInputError(f"{where}: the pool {'holds' if pool.with_types else 'has no'} type maps but the "
                                f"sample has {'none' if type_map is None else 'one'}; use a pool that matches the data "
                                "(with_types=False for instance-only data)")
    if rng.random() >= pool_ratio:
        return None
    pair = pool.try_take(rng)
    if pair is None:
        return None
    return DiffMixResult(image=pair.image, inst_map=pair.inst_map, type_map=pair.type_map, window=(0, 0, 0),
                         seed=-1, record={"pool": pool_name, "pool_seq": pair.seq, "pool_use": pair.use})


# ----------------------------------------------------------------------------------------------------- resources
def in_dataloader_worker() -> bool:
    """Whether this code runs in a ``torch.utils.data.DataLoader`` worker process."""
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def resolve_device(device: str) -> str:
    """The torch device to run the model on. ``"auto"``: CUDA in the main process when available, CPU in
    DataLoader workers (a forked worker must never initialise CUDA). An explicit CUDA device in a worker is an
    error: use a pool fed from the main process instead.
    """
    if in_dataloader_worker():
        if device == "auto" or device.startswith("cpu"):
            return "cpu"
        raise InvalidInputError(f"device={device!r} inside a DataLoader worker: workers must not initialise CUDA "
                                "(forked workers break). Use device='auto' or 'cpu' for in-worker synthesis, or a "
                                "SynthesisPool filled from the main process (or one process per GPU)")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_PIPELINES: dict[tuple[int, str, str | None, str], Any] = {}
_BANKS: dict[tuple[int, str, tuple[int, ...] | None, str], Any] = {}
_LOAD_LOCK = threading.Lock()


def load_pipeline(model: str, revision: str | None, device: str) -> SemanticSynthesisPipeline:
    """The pipeline of ``model`` on ``device``, loaded on first use and cached per process."""
    key = (os.getpid(), model, revision, device)
    pipe = _PIPELINES.get(key)
    if pipe is None:
        with _LOAD_LOCK:
            pipe = _PIPELINES.get(key)
            if pipe is None:
                from diffaug.pipelines import SemanticSynthesisPipeline

                pipe = SemanticSynthesisPipeline.from_pretrained(model, revision=revision).to(device)
                _PIPELINES[key] = pipe
    return pipe


def load_donor_bank(folder: str, rare_classes: tuple[int, ...] | None, donor_classes: str) -> DonorBank:
    """The donor bank of a tile folder, built on first use and cached per process."""
    key = (os.getpid(), os.path.abspath(folder), None if rare_classes is None else tuple(rare_classes), donor_classes)
    bank = _BANKS.get(key)
    if bank is None:
        with _LOAD_LOCK:
            bank = _BANKS.get(key)
            if bank is None:
                from diffaug.labels.balance import DonorBank

                bank = DonorBank.from_folder(folder, donor_classes=donor_classes,  # type: ignore[arg-type]
                                             rare_classes=rare_classes)
                _BANKS[key] = bank
    return bank


def clear_caches() -> None:
    """Forget the cached pipelines and donor banks of this process (frees their memory)."""
    _PIPELINES.clear()
    _BANKS.clear()
