"""DiffMix as an Albumentations transform: edit a sample's label maps and re-render its image with a semantic
diffusion model, inside an ``A.Compose`` pipeline (SPEC §3-5).

Conventions (albumentations 2.0.8):

- **Targets.** Pass the label maps as ``masks=[inst_map, type_map]`` (int32), or ``masks=[inst_map]`` for
  instance-only data. Both maps are edited together, which ``additional_targets={"type_map": "mask"}`` cannot do
  (``apply_to_mask`` cannot tell the two maps apart). Declared as ``masks``, the maps also follow every later
  spatial transform with nearest interpolation. Other targets (``mask``, ``bboxes``, ``keypoints``, ``images``,
  volumes) cannot follow a label edit and are an error.
- **Output.** The edited ``masks`` (ids 1..N, classes kept, no nucleus split), the synthesised ``image``, and
  ``is_synthetic`` (bool): True when this sample was re-rendered or taken from the pool. It is False on samples the
  transform left alone, and it is always present, so a default collate stacks it. Use it to weight or log synthetic
  samples, and keep them out of validation (build the validation pipeline without this transform).
- **Order.** Put the transform before ``ToFloat``/``Normalize`` (it needs the raw uint8 image; a float image is an
  error) and before any crop below the model's size. Crops above it, flips and rotations may come before or after.
- **Sizes.** A sample larger than the model's ``image_size`` gets one model-size window, at a random position,
  edited, re-rendered and pasted back; see :mod:`diffaug.transforms._core`. Smaller is an error.
- **Cost.** Without a pool (the default) every applied call runs the sampler: ``round(strength x
  num_inference_steps)`` model steps, each one forward of batch 2 (guidance). That is exact and simple, and fine for
  small models or a loader that may wait; DiffMix's 652 M-parameter model needs about a second per sample on a big
  GPU. For throughput, give a :class:`~diffaug.transforms.pool.SynthesisPool` (``pool=``): the transform then only
  copies finished pairs, at ``pool_ratio``, and never waits for them.
- **Randomness.** Every draw (window, label edit, start noise) comes from the transform's own generator, which
  ``A.Compose(seed=...)`` seeds: the same seed gives the same outputs. In a DataLoader worker the stream is re-seeded
  once per worker from (that generator, the worker's torch seed), so workers draw differently, and a rerun draws the
  same as long as the DataLoader is seeded (``generator=torch.Generator().manual_seed(s)`` or ``torch.manual_seed``
  in the script). albumentations 2.0.8 itself repeats its *other* transforms' draws across workers unless a
  ``worker_init_fn`` re-seeds them.
- **Devices.** The model is loaded on first use and cached per process. ``device="auto"`` runs it on CUDA in the
  main process when available and on CPU inside DataLoader workers, which must never initialise CUDA.
- **Serialisation.** Every argument is plain data (the model is a folder, a registered name or a Hub repo id; the
  pool is its name), so ``A.to_dict``/``A.from_dict`` and ``A.save``/``A.load`` round-trip it. ``A.load`` needs
  ``diffaug.transforms`` imported first.

Example:
    >>> import albumentations as A
    >>> from diffaug.transforms import DiffMixTransform
    >>> aug = A.Compose([
    ...     DiffMixTransform(model="diffmix-consep", policy="balance", donors="data/consep_train", p=0.5),
    ...     A.HorizontalFlip(), A.RandomRotate90(),
    ... ], seed=0)  # doctest: +SKIP
    >>> out = aug(image=image, masks=[inst_map, type_map])  # doctest: +SKIP
    >>> out["image"], out["masks"], out["is_synthetic"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema, DualTransform

from diffaug.errors import InvalidInputError
from diffaug.transforms._core import DiffMixResult, DiffMixSettings, check_image, check_pool_args, take_from_pool

__all__ = ["DiffMixTransform"]

SYNTHETIC_KEY = "is_synthetic"
_UNSUPPORTED_TARGETS = ("mask", "images", "bboxes", "keypoints", "volume", "volumes", "mask3d", "masks3d")


def split_masks(masks: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``masks`` as given to the transform (a list, or the (N, H, W) array Compose stacks) -> (inst_map, type_map)."""
    if masks is None:
        raise InvalidInputError(f"{where}: no label maps: call it as transform(image=img, masks=[inst_map, type_map]) "
                                "(or masks=[inst_map] for instance-only data)")
    count = len(masks) if isinstance(masks, (list, tuple)) else (masks.shape[0] if isinstance(masks, np.ndarray)
                                                                 and masks.ndim == 3 else -1)
    if count not in (1, 2):
        shape = getattr(masks, "shape", None)
        raise InvalidInputError(f"{where}: masks must be [inst_map, type_map] (or [inst_map]), got "
                                f"{count if count >= 0 else 'an array of shape ' + str(shape)} maps"
                                + (f" of shape {shape}" if count >= 0 and shape is not None else ""))
    inst = np.asarray(masks[0])
    return inst, (np.asarray(masks[1]) if count == 2 else None)


def _join_masks(like: Any, inst: np.ndarray, types: np.ndarray | None) -> Any:
    maps = [inst] if types is None else [inst, types]
    if isinstance(like, np.ndarray):
        return np.stack(maps).astype(like.dtype, copy=False) if np.issubdtype(like.dtype, np.integer) \
            else np.stack(maps)
    return maps


class DiffMixTransform(DualTransform):
    """DiffMix in an Albumentations pipeline: edit the label maps (``policy``), then re-render the image from the
    real one with a semantic diffusion model (partial-noise DDIM). See the module docstring for the conventions.

    Args:
        model: ``"builtin"`` (default: the small CoNSeP model that ships with diffaug, 64-px windows), a converted
            model folder, a registered name (``"diffmix-consep"``, ``"diffmix-glysac"``; see
            ``diffaug.hub.REGISTRY``) or a Hub repo id in diffaug's format. Loaded on first use, once per process.
        policy: ``"balance"`` (swap common nuclei for rare-class shapes), ``"enlarge"`` (small random shifts) or
            ``"both"``.
        strength: share of the ``num_inference_steps`` DDIM steps to run from the noised real image, in (0, 1];
            0.55 with 100 steps is DiffMix (start at t=540). 1.0 samples from pure noise.
        num_inference_steps: N of DiffMix's ``ddimN`` respacing.
        guidance_scale: w in ε_u + w·(ε_c − ε_u) (1.5 in DiffMix; 1 = conditional only).
        eta: DDIM η (0 = deterministic, as DiffMix).
        revision: Hub revision of ``model`` (pin a commit sha for reproducible runs).
        device: ``"auto"``, ``"cpu"`` or a torch device (not CUDA inside DataLoader workers).
        donors: a training tile folder to build the balancing donor bank from (rare classes default to its
            rarest). Without it, balancing uses only each sample's own rare nuclei and needs ``rare_classes``.
        rare_classes: the rare classes to balance towards (default: the donor bank's).
        balance_kwargs: more balancing parameters (``ratio``, ``target_distribution``, ``dilation_iterations``,
            ``size_ratio``, ``border_margin``, ``donor_source``, ``max_donor_tries``).
        enlarge_kwargs: more enlarging parameters (``fraction``, ``shift_range``, ``max_tries``).
        pool: a :class:`~diffaug.transforms.pool.SynthesisPool` or its name. With a pool the transform never runs
            the model: an applied call takes a pool pair with probability ``pool_ratio``, and keeps the real sample
            when the pool is empty.
        pool_ratio: share of applied calls that take a pool pair, in (0, 1] (only with ``pool``).
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        # Plain types only: ranges and meanings are checked in __init__, raising diffaug's errors. Every __init__
        # argument must be listed here: albumentations silently resets an unlisted one to its default.
        model: Any  # str or os.PathLike; stored as str
        policy: str
        strength: float
        num_inference_steps: int
        guidance_scale: float
        eta: float
        revision: str | None
        device: str
        donors: Any  # str, os.PathLike or None; stored as str
        rare_classes: tuple[int, ...] | None
        balance_kwargs: dict[str, Any] | None
        enlarge_kwargs: dict[str, Any] | None
        pool: Any
        pool_ratio: float
        p: float

    def __init__(self, model: str = "builtin", policy: Literal["balance", "enlarge", "both"] = "balance",
                 strength: float = 0.55, num_inference_steps: int = 100, guidance_scale: float = 1.5, eta: float = 0.0,
                 revision: str | None = None, device: str = "auto", donors: str | os.PathLike[str] | None = None,
                 rare_classes: Sequence[int] | None = None, balance_kwargs: Mapping[str, Any] | None = None,
                 enlarge_kwargs: Mapping[str, Any] | None = None, pool: Any = None, pool_ratio: float = 1.0,
                 p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InvalidInputError(f"DiffMixTransform: p must be a probability in [0, 1], got {p!r}")
        super().__init__(p=float(p))
        self._settings = DiffMixSettings.from_arguments(locals())
        # Public attributes mirror __init__ exactly: albumentations serialises them by name.
        self.model = self._settings.model
        self.policy = policy
        self.strength = float(strength)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.revision = revision
        self.device = device
        self.donors = self._settings.donors
        self.rare_classes = self._settings.rare_classes
        self.balance_kwargs = self._settings.balance_kwargs
        self.enlarge_kwargs = self._settings.enlarge_kwargs
        self.pool, self.pool_ratio = check_pool_args(pool, pool_ratio, "DiffMixTransform")
        self._stream_key: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------ serialisation
    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("model", "policy", "strength", "num_inference_steps", "guidance_scale", "eta", "revision", "device",
                "donors", "rare_classes", "balance_kwargs", "enlarge_kwargs", "pool", "pool_ratio")

    def get_transform_init_args(self) -> dict[str, Any]:
        # Unlike the base class, keep None and empty values: the round trip must restore every argument as given.
        args = {name: getattr(self, name) for name in self.get_transform_init_args_names()}
        if args["rare_classes"] is not None:
            args["rare_classes"] = list(args["rare_classes"])
        return args

    # ------------------------------------------------------------------------------------------ randomness
    def _reseed_in_worker(self) -> None:
        """Give each DataLoader worker its own stream: (this transform's state, the worker's torch seed)."""
        try:
            from torch.utils.data import get_worker_info
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        info = get_worker_info()
        if info is None:
            return
        key = (os.getpid(), int(info.seed))
        if self._stream_key == key:
            return
        entropy = int(self.random_generator.integers(0, 2**63 - 1))
        seq = np.random.SeedSequence([entropy, int(info.seed) % 2**64])
        self.random_generator = np.random.default_rng(seq)
        self.py_random = random.Random(int(seq.generate_state(1, np.uint64)[0]))
        self._stream_key = key

    def __call__(self, *args: Any, force_apply: bool = False, **kwargs: Any) -> Any:
        self._reseed_in_worker()
        out = super().__call__(*args, force_apply=force_apply, **kwargs)
        out.setdefault(SYNTHETIC_KEY, False)
        return out

    # ------------------------------------------------------------------------------------------ the draw
    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        where = "DiffMixTransform"
        bad = [k for k in _UNSUPPORTED_TARGETS if data.get(k) is not None]
        if bad:
            raise InvalidInputError(f"{where}: cannot edit the targets {bad} consistently with the label maps; pass "
                                    "the maps as masks=[inst_map, type_map] and add other targets after this transform")
        if data.get("masks") is None:
            raise InvalidInputError(f"{where}: no label maps: call it as transform(image=img, masks=[inst_map, "
                                    "type_map]) (or masks=[inst_map] for instance-only data)")
        image = check_image(data.get("image"), where)
        inst, types = split_masks(data["masks"], where)
        rng = self.random_generator
        if self.pool is not None:
            return {"diffmix": take_from_pool(self.pool, self.pool_ratio, image, inst, types, rng, where)}
        result = self._settings(image, inst, types, rng, where=where)
        return {"diffmix": result}

    def apply_with_params(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        result: DiffMixResult | None = params.get("diffmix")
        out = dict(kwargs)
        if result is None:  # pool mode, no pair taken: the real sample goes through unchanged
            out[SYNTHETIC_KEY] = False
            return out
        out["image"] = result.image
        out["masks"] = _join_masks(kwargs["masks"], result.inst_map, result.type_map)
        out[SYNTHETIC_KEY] = True
        return out

    def apply(self, img: np.ndarray, *args: Any, **params: Any) -> np.ndarray:  # pragma: no cover - not used
        raise NotImplementedError("DiffMixTransform applies through apply_with_params")

