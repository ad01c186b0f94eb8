"""DiffMix as a MONAI dictionary transform (``MapTransform`` + ``RandomizableTransform``), over the same functions as
:class:`~diffaug.transforms.DiffMixTransform` (:mod:`diffaug.transforms._core`).

Layout is MONAI's channel-first, as ``LoadImaged`` + ``EnsureChannelFirstd`` give it: the image is (3, H, W), the
maps (1, H, W). The output keeps each key's layout, container (numpy array, torch tensor or ``MetaTensor`` with its
metadata) and dtype. The image may be uint8, or a float image that still holds whole values in [0, 255] (what
``LoadImaged`` returns); an image scaled to [0, 1] or normalised is an error: put ``DiffMixd`` before
``ScaleIntensityd``/``NormalizeIntensityd``. Maps must hold whole numbers (int, or float from a loader).

Randomness comes from ``self.R`` only, so ``set_random_state`` reproduces results, and ``monai.data.DataLoader``
seeds each worker differently. Do not use it under ``Compose(lazy=True)`` followed by spatial transforms without
``mode="nearest"`` on the map keys: instance ids must never be interpolated.

Example:
    >>> from monai.transforms import Compose, LoadImaged, EnsureChannelFirstd
    >>> from diffaug.transforms import DiffMixd
    >>> t = DiffMixd(model="diffmix-consep", policy="balance", donors="data/consep_train", prob=0.5)  # doctest: +SKIP
    >>> out = t({"image": img_chw, "inst_map": inst_1hw, "type_map": type_1hw})  # doctest: +SKIP
    >>> out["image"].shape, out["is_synthetic"]  # doctest: +SKIP
    ((3, 256, 256), True)
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from diffaug.errors import InvalidInputError, MissingExtraError
from diffaug.transforms._core import DiffMixSettings, check_pool_args, take_from_pool

try:
    from monai.config import KeysCollection
    from monai.transforms import MapTransform, RandomizableTransform
    from monai.utils import convert_to_dst_type
except ImportError as exc:  # pragma: no cover - monai is a core dependency
    raise MissingExtraError("monai", "monai", "diffaug.transforms.DiffMixd") from exc

__all__ = ["DiffMixd"]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # torch tensor / MetaTensor
        return detach().cpu().numpy()
    raise InvalidInputError(f"DiffMixd: expected a numpy array or a torch tensor, got {type(value).__name__}")


def _image_hwc(value: Any, key: Hashable) -> np.ndarray:
    arr = _to_numpy(value)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise InvalidInputError(f"DiffMixd: {key!r} must be channel-first RGB (3, H, W), got shape {arr.shape}; add "
                                "EnsureChannelFirstd before DiffMixd")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr).all()
        if not finite or arr.min() < 0 or arr.max() > 255 or (arr != np.round(arr)).any() or arr.max() <= 1.0:
            raise InvalidInputError(f"DiffMixd: {key!r} is a float image that is not raw 0..255 pixel values (range "
                                    f"{float(np.nanmin(arr)):.3g}..{float(np.nanmax(arr)):.3g}); the diffusion model "
                                    "needs the raw image: put DiffMixd before ScaleIntensityd/NormalizeIntensityd")
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise InvalidInputError(f"DiffMixd: {key!r} must hold 8-bit RGB values, got {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def _map_hw(value: Any, key: Hashable) -> np.ndarray:
    arr = _to_numpy(value)
    if arr.ndim != 3 or arr.shape[0] != 1:
        raise InvalidInputError(f"DiffMixd: {key!r} must be a channel-first map (1, H, W), got shape {arr.shape}")
    arr = arr[0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InvalidInputError(f"DiffMixd: {key!r} holds non-integer values; label maps must never be "
                                    "interpolated (use mode='nearest' on the map keys)")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"DiffMixd: {key!r} must hold integer ids/classes, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise InvalidInputError(f"DiffMixd: {key!r} has values outside 0..2^31-1")
    return np.ascontiguousarray(arr.astype(np.int32))


class DiffMixd(RandomizableTransform, MapTransform):
    """DiffMix on a MONAI data dictionary: edit the maps (``policy``) and re-render the image.

    Args:
        keys: the image key, the instance-map key and, for typed data, the type-map key, in that order.
        model, policy, strength, num_inference_steps, guidance_scale, eta, revision, device, donors, rare_classes,
            balance_kwargs, enlarge_kwargs, pool, pool_ratio: as for :class:`~diffaug.transforms.DiffMixTransform`.
        prob: probability of applying the transform.
        synthetic_key: the output key that says whether the sample was re-rendered (or taken from the pool).
        allow_missing_keys: don't raise when the type-map key is missing (the sample is then instance-only).
    """

    def __init__(self, keys: KeysCollection = ("image", "inst_map", "type_map"), *,
                 model: str | os.PathLike[str] = "builtin",
                 policy: str = "balance", strength: float = 0.55, num_inference_steps: int = 100,
                 guidance_scale: float = 1.5, eta: float = 0.0, revision: str | None = None, device: str = "auto",
                 donors: str | os.PathLike[str] | None = None, rare_classes: Sequence[int] | None = None,
                 balance_kwargs: Mapping[str, Any] | None = None, enlarge_kwargs: Mapping[str, Any] | None = None,
                 pool: Any = None, pool_ratio: float = 1.0, prob: float = 0.5, synthetic_key: str = "is_synthetic",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise InvalidInputError(f"DiffMixd: prob must be a probability in [0, 1], got {prob!r}")
        RandomizableTransform.__init__(self, float(prob))
        if len(self.keys) not in (2, 3):
            raise InvalidInputError(f"DiffMixd: keys must be (image, inst_map[, type_map]), got {self.keys}")
        self.settings = DiffMixSettings.from_arguments(locals())
        self.pool, self.pool_ratio = check_pool_args(pool, pool_ratio, "DiffMixd")
        self.synthetic_key = synthetic_key
        self._seed: list[int] = [0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        # 124 bits of entropy for the draw's numpy Generator; drawn even when not applied, so the stream stays aligned
        self._seed = [int(v) for v in self.R.randint(0, 2**31 - 1, size=4)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        image_key, inst_key = self.keys[0], self.keys[1]
        type_key = self.keys[2] if len(self.keys) == 3 else None
        for key in (image_key, inst_key):
            if key not in d:
                raise InvalidInputError(f"DiffMixd: key {key!r} is missing from the data (keys: {sorted(map(str, d))})")
        if type_key is not None and type_key not in d and not self.allow_missing_keys:
            raise InvalidInputError(f"DiffMixd: key {type_key!r} is missing; pass it, or keys=(image, inst_map) for "
                                    "instance-only data")
        if not self._do_transform:
            d[self.synthetic_key] = False
            return d
        image = _image_hwc(d[image_key], image_key)
        inst = _map_hw(d[inst_key], inst_key)
        types = _map_hw(d[type_key], type_key) if type_key is not None and type_key in d else None
        rng = np.random.default_rng(self._seed)
        if self.pool is not None:
            result = take_from_pool(self.pool, self.pool_ratio, image, inst, types, rng, "DiffMixd")
        else:
            result = self.settings(image, inst, types, rng, where="DiffMixd")
        if result is None:
            d[self.synthetic_key] = False
            return d
        d[image_key] = convert_to_dst_type(np.ascontiguousarray(result.image.transpose(2, 0, 1)), d[image_key])[0]
        d[inst_key] = convert_to_dst_type(result.inst_map[None], d[inst_key])[0]
        if types is not None:
            d[type_key] = convert_to_dst_type(result.type_map[None], d[type_key])[0]  # type: ignore[index]
        d[self.synthetic_key] = True
        return d
