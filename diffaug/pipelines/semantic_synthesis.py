"""Label maps (+ a real image) → images with a semantic diffusion model: DiffMix's partial-noise DDIM sampler.

The denoising loop is written out in :meth:`SemanticSynthesisPipeline.__call__`; the maths lives in
:mod:`diffaug.diffusion` and the network in :mod:`diffaug.models`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffaug.diffusion import GaussianDiffusion, classifier_free_guidance, start_index
from diffaug.errors import InvalidInputError

__all__ = ["SemanticSynthesisOutput", "SemanticSynthesisPipeline", "StepCallback"]

#: ``callback(step_index, t, x, pred_x0)`` after each model step: ``step_index`` counts model steps from 1,
#: ``t`` is the original timestep of that step's model call, ``x`` the state after the step, ``pred_x0`` the
#: step's clipped x̂_0 (both float32 (B, 3, H, W), on the pipeline's device; do not modify them in place).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

IMAGE_CHANNELS = 3


@dataclass
class SemanticSynthesisOutput:
    """Result of :class:`SemanticSynthesisPipeline`.

    Attributes:
        images: one uint8 H×W×3 array per input sample, in input order.
    """

    images: list[np.ndarray]


ArrayOrList = np.ndarray | Sequence[np.ndarray]


def _as_batch(value: ArrayOrList | None, name: str, sample_ndim: int) -> list[np.ndarray] | None:
    """A single sample or a list/tuple of samples (or a stacked array) as a list of arrays; None stays None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.ndim == sample_ndim:
            return [value]
        if value.ndim == sample_ndim + 1:
            return list(value)
        raise InvalidInputError(
            f"{name} must have {sample_ndim} dimensions (or {sample_ndim + 1} for a batch), got shape {value.shape}"
        )
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInputError(f"{name} is an empty list; pass at least one sample")
        for k, item in enumerate(value):
            if not isinstance(item, np.ndarray) or item.ndim != sample_ndim:
                raise InvalidInputError(
                    f"{name}[{k}] must be a numpy array with {sample_ndim} dimensions, got "
                    f"{getattr(item, 'shape', type(item).__name__)}"
                )
        return list(value)
    if isinstance(value, torch.Tensor):
        raise InvalidInputError(f"{name} must be a numpy array (or a list of them), not a torch tensor")
    raise InvalidInputError(f"{name} must be a numpy array or a list of numpy arrays, got {type(value).__name__}")


class SemanticSynthesisPipeline:
    """Synthesise H&E tiles from instance and type maps with a semantic diffusion model (SDM / DiffMix).

    DiffMix re-renders a *real* image under an *edited* label map: it noises the real image to an intermediate step
    and denoises it with DDIM under the edited condition. Mapping onto DiffMix's sampler:

    ==========================  ==========================================================================
    here                        DiffMix / SDM
    ==========================  ==========================================================================
    ``num_inference_steps=N``   ``--timestep_respacing ddimN``: original steps ``range(0, 1000, 1000/N)``
    ``strength=p``              ``ddim_percent=p``: start at respaced index ``round(N·p) − 1`` and run
                                ``round(N·p)`` model steps. N = 100, p = 0.55 start at original t = 540
                                (respaced index 54), then 55 model steps at t = 540, 530, …, 10, 0.
                                DiffMix truncates N·p with ``int()`` (p = 0.29 runs 28 steps); we round.
    ``strength=1.0``            pure noise: x_T = the start noise itself (DiffMix with ``noise=``); no image
    ``guidance_scale=w``        ``--s w`` (1.5 in DiffMix)
    ``eta``                     DDIM η (DiffMix: 0, deterministic)
    ==========================  ==========================================================================

    Partial noise: x_start = √ᾱ_t·x_0 + √(1 − ᾱ_t)·noise with x_0 the real image scaled to [−1, 1]. Each step
    clips x̂_0 to [−1, 1] and re-derives ε from the clipped x̂_0 (:meth:`GaussianDiffusion.ddim_step`).

    Guidance (classifier-free): ε̂ = ε_u + w·(ε_c − ε_u) on the ε channels, applied for **every** w, so w = 1 is
    conditional only, w = 0 unconditional, and 0 < w < 1 interpolates. The null condition is y = 0 on every channel.
    The papers' s in ε_c + s·(ε_c − ε_u) is w − 1. The variance channels come from the conditional pass (DDIM does
    not use them). The reference code silently skips guidance for w ≤ 1; this pipeline does not.

    Output quantisation as the reference: s = (x + 1)/2, then ``s·255 + 0.5`` clamped to [0, 255] and cast to
    uint8 (round half up).

    The fast path (``fast=True``, the default) gives the same result as the plain one (within 1e-4 in float32) with
    less work: both guidance branches run as one batch of 2B, the label-only SPADE γ/β are computed once per call
    instead of at every step, and the label-free encoder runs once for both branches.

    Example:
        >>> import numpy as np, torch
        >>> from diffaug.pipelines import SemanticSynthesisPipeline
        >>> pipe = SemanticSynthesisPipeline.from_pretrained("path/to/converted_model")  # doctest: +SKIP
        >>> out = pipe(image=image, inst_map=inst_map, type_map=type_map, strength=0.55,
        ...            num_inference_steps=100, guidance_scale=1.5,
        ...            generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        >>> out.images[0].shape, out.images[0].dtype  # doctest: +SKIP
        ((256, 256, 3), dtype('uint8'))

    Args:
        model: a :class:`diffaug.models.SemanticUNet` (or a module with the same interface).
        diffusion: the model's training diffusion (unrespaced); respaced per call.
    """

    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion) -> None:
        if not isinstance(diffusion, GaussianDiffusion) or not diffusion.is_original:
            raise InvalidInputError("diffusion must be the model's unrespaced GaussianDiffusion (from its config)")
        self.model = model
        #: Where the weights came from (set by :meth:`from_pretrained`): ``id``, ``kind``, ``repo_id``,
        #: ``revision`` and the resolved Hub ``commit_sha``, for records that must pin the weights.
        self.source: dict[str, str | None] = {"id": None, "kind": None, "repo_id": None, "revision": None,
                                              "commit_sha": None}
        self.diffusion = diffusion
        self._channels_last = False
        self._respaced: dict[int, GaussianDiffusion] = {}

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, revision: str | None = None) -> SemanticSynthesisPipeline:
        """Load a model folder or Hugging Face Hub repo (``config.json`` + ``model.safetensors``) and its diffusion.

        Args:
            path_or_repo_id: a local folder, ``"builtin"``, a registered name or a Hub repo id
                (:func:`diffaug.hub.resolve_pretrained_info`).
            revision: Hub revision (branch, tag or commit sha); pin a sha for reproducible results. The commit it
                resolved to is in :attr:`source`.
        """
        from diffaug.hub import resolve_pretrained_info
        from diffaug.models import SemanticUNet

        info = resolve_pretrained_info(path_or_repo_id, revision=revision)
        model = SemanticUNet.from_pretrained(info.path)
        pipe = cls(model, GaussianDiffusion.from_config(model.config.diffusion))
        pipe.source = {"id": str(path_or_repo_id), "kind": info.kind, "repo_id": info.repo_id,
                       "revision": info.revision, "commit_sha": info.commit_sha}
        return pipe

    def to(self, device: torch.device | str | None = None, *, channels_last: bool | None = None) -> SemanticSynthesisPipeline:
        """Move the model to ``device`` and optionally switch to channels-last memory format (faster on CUDA).

        Returns:
            self, for chaining.
        """
        if device is not None:
            self.model.to(device)
        if channels_last is not None:
            self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            self._channels_last = channels_last
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        """Classes of the type map the model knows, background (0) included."""
        return int(self.model.config.num_classes)

    def condition(self, inst_map: Sequence[np.ndarray], type_map: Sequence[np.ndarray] | None) -> torch.Tensor:
        """The model's condition y (B, label_nc, H, W), float32 on the CPU, from validated label maps.

        One-hot classes (background is channel 0) followed by the instance edge map when the model was trained with
        it, as :func:`diffaug.labels.sdm_condition` builds it.
        """
        from diffaug.labels import sdm_condition

        y = sdm_condition(None if type_map is None else np.stack(type_map), np.stack(inst_map), self.num_classes)
        if not self.model.config.instance_edges:
            y = y[:, : self.num_classes]
        return torch.from_numpy(np.ascontiguousarray(y))

    def _respace(self, num_inference_steps: int) -> GaussianDiffusion:
        if num_inference_steps not in self._respaced:
            self._respaced[num_inference_steps] = self.diffusion.respace(num_inference_steps)
        return self._respaced[num_inference_steps]

    # ----------------------------------------------------------------------------------------------- checking
    def _check_inputs(
        self,
        image: ArrayOrList | None,
        inst_map: ArrayOrList,
        type_map: ArrayOrList | None,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        noise: torch.Tensor | None,
    ) -> tuple[list[np.ndarray] | None, list[np.ndarray], list[np.ndarray] | None, int]:
        """Validate everything before any work; return the batched inputs and the start index."""
        start = start_index(num_inference_steps, strength)  # checks strength and steps
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
            guidance_scale
        ):
            raise InvalidInputError(f"guidance_scale must be a finite number (DiffMix uses 1.5), got {guidance_scale!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (eta >= 0 and math.isfinite(eta)):
            raise InvalidInputError(f"eta must be a finite number >= 0 (0 is deterministic DDIM), got {eta!r}")

        inst = _as_batch(inst_map, "inst_map", 2)
        if inst is None:
            raise InvalidInputError("inst_map is required: the condition is built from the instance map")
        types = _as_batch(type_map, "type_map", 2)
        pure_noise = float(strength) == 1.0
        images = None if pure_noise else _as_batch(image, "image", 3)
        if images is None and not pure_noise:
            raise InvalidInputError(
                f"image is required when strength < 1 (got strength={strength}): partial noise starts from the real "
                "image; pass strength=1.0 to sample from pure noise without one"
            )
        batch = len(inst)
        for name, items in (("type_map", types), ("image", images)):
            if items is not None and len(items) != batch:
                raise InvalidInputError(f"{name} has {len(items)} samples but inst_map has {batch}; pass one per sample")

        size = inst[0].shape
        for k in range(batch):
            if inst[k].shape != size:
                raise InvalidInputError(
                    f"all samples of a batch must have one size: inst_map[{k}] is {inst[k].shape}, inst_map[0] {size}"
                )
            if types is not None and types[k].shape != size:
                raise InvalidInputError(
                    f"type_map[{k}] has shape {types[k].shape} but inst_map[{k}] has {size}; the maps must match"
                )
            if images is not None:
                img = images[k]
                if img.dtype != np.uint8:
                    hint = (
                        " Put the diffusion transform before ToFloat/Normalize in the pipeline."
                        if np.issubdtype(img.dtype, np.floating)
                        else ""
                    )
                    raise InvalidInputError(f"image must be uint8 RGB (H, W, 3) in [0, 255], got {img.dtype}.{hint}")
                if img.shape != (*size, IMAGE_CHANNELS):
                    raise InvalidInputError(
                        f"image[{k}] has shape {img.shape} but the label maps are {size}; expected {(*size, 3)}"
                    )
        self._check_size(size)
        if types is not None:
            for k, tm in enumerate(types):
                if np.issubdtype(tm.dtype, np.integer) and tm.size and int(tm.max()) >= self.num_classes:
                    raise InvalidInputError(
                        f"type_map[{k}] holds class {int(tm.max())}, but the model knows classes 0..{self.num_classes - 1}"
                        " (0 = background); merge the classes to the model's scheme first"
                    )
        if noise is not None:
            expected = (batch, IMAGE_CHANNELS, *size)
            if not isinstance(noise, torch.Tensor) or noise.dtype != torch.float32:
                got = f"a {noise.dtype} tensor" if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise InvalidInputError(f"noise must be a float32 torch tensor of shape {expected}, got {got}")
            if tuple(noise.shape) != expected:
                raise InvalidInputError(f"noise must have shape (B, 3, H, W) = {expected}, got {tuple(noise.shape)}")
        return images, inst, types, start

    def _check_size(self, size: tuple[int, ...]) -> None:
        config = self.model.config
        factor = int(config.size_divisor)
        h, w = size
        if h < factor or w < factor or h % factor or w % factor:
            raise InvalidInputError(
                f"the model cannot take {h}×{w} inputs: height and width must be positive multiples of {factor} (its "
                f"total downsampling); crop to a multiple, e.g. its training size {config.image_size}×{config.image_size}"
            )

    # ---------------------------------------------------------------------------------------------- the model
    def _guided_eps(
        self,
        x: torch.Tensor,
        t_model: torch.Tensor,
        y: torch.Tensor,
        cond: Any,
        guidance_scale: float,
        fast: bool,
    ) -> torch.Tensor:
        """ε̂ = ε_u + w·(ε_c − ε_u) for the batch x (B, 3, H, W); see the class docstring for the convention."""
        needs_uncond = guidance_scale != 1.0  # at w = 1 the formula is ε_c exactly: skip the null-condition pass
        if not fast:
            out_c = self.model(x, t_model, y)
            if not needs_uncond:
                return out_c[:, :IMAGE_CHANNELS].float()
            out_u = self.model(x, t_model, torch.zeros_like(y))
            return classifier_free_guidance(out_c.float(), out_u.float(), guidance_scale, IMAGE_CHANNELS)[
                :, :IMAGE_CHANNELS
            ]
        # fast: one encoder pass (the encoder never sees y), then one decoder pass of batch 2B with γ/β precomputed
        h, skips, emb = self.model.encode(x, t_model)
        if needs_uncond:
            h, emb = torch.cat([h, h]), torch.cat([emb, emb])
            skips = [torch.cat([s, s]) for s in skips]
        out = self.model.decode(h, skips, emb, cond).float()
        if not needs_uncond:
            return out[:, :IMAGE_CHANNELS]
        out_c, out_u = out.chunk(2)
        return classifier_free_guidance(out_c, out_u, guidance_scale, IMAGE_CHANNELS)[:, :IMAGE_CHANNELS]

    # --------------------------------------------------------------------------------------------------- call
    @torch.inference_mode()
    def __call__(
        self,
        image: ArrayOrList | None = None,
        inst_map: ArrayOrList | None = None,
        type_map: ArrayOrList | None = None,
        strength: float = 0.55,
        num_inference_steps: int = 100,
        guidance_scale: float = 1.5,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        *,
        fast: bool = True,
        autocast_dtype: torch.dtype | None = None,
        callback: StepCallback | None = None,
    ) -> SemanticSynthesisOutput:
        """Synthesise one image per (inst_map, type_map) sample.

        Args:
            image: uint8 H×W×3 real image(s), the start of partial noising; a list (or a (B, H, W, 3) array) for a
                batch. Not needed, and ignored, when ``strength=1.0``.
            inst_map: int32 H×W instance map(s) (0 background, ids > 0), typically edited.
            type_map: int32 H×W class map(s) with classes 0..num_classes−1 (0 background), same foreground. None for
                a model trained without types (``sdm_condition`` then marks foreground as class 1).
            strength: fraction of the N respaced steps to run, in (0, 1]; 1.0 samples from pure noise.
            num_inference_steps: N of DDIM respacing "ddimN".
            guidance_scale: w of ε_u + w·(ε_c − ε_u), for every w (1: conditional only).
            eta: DDIM η ≥ 0; 0 is deterministic.
            generator: source of the start noise (and of η-noise); drawn on its device, so a CPU generator gives the
                same noise on every device. None uses fresh, unseeded randomness.
            noise: float32 (B, 3, H, W) N(0, 1) start noise, replacing the draw from ``generator``.
            fast: use the lossless fast path (needs the model's ``encode``/``decode``/``precompute_condition``).
            autocast_dtype: run the model under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on CUDA);
                the diffusion maths stays float32.
            callback: ``callback(step_index, t, x, pred_x0)`` after every model step (see :data:`StepCallback`).

        Returns:
            :class:`SemanticSynthesisOutput` with ``images``, uint8 H×W×3 arrays in input order.

        Raises:
            InvalidInputError: any argument is invalid (checked before any model call).
        """
        images, inst, types, start = self._check_inputs(
            image, inst_map, type_map, strength, num_inference_steps, guidance_scale, eta, noise
        )
        if fast:
            missing = [m for m in ("encode", "decode", "precompute_condition") if not hasattr(self.model, m)]
            if missing:
                raise InvalidInputError(f"fast=True needs the model methods {missing}; pass fast=False for this model")
        device = self.device
        batch, size = len(inst), inst[0].shape
        sampler = self._respace(num_inference_steps)
        memory_format = torch.channels_last if self._channels_last else torch.contiguous_format

        y = self.condition(inst, types).to(device).contiguous(memory_format=memory_format)

        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh entropy; pass a generator for reproducible results
        # the start noise: given, or drawn on the generator's device
        if noise is None:
            noise = torch.randn(
                (batch, IMAGE_CHANNELS, *size), generator=generator, device=generator.device, dtype=torch.float32
            )
        noise = noise.to(device)

        # x at the start step: pure noise, or the real image noised to respaced index `start` (DDPM eq. 4)
        t_start = torch.full((batch,), start, dtype=torch.int64, device=device)
        if images is None:
            x = noise
        else:
            x0_np = np.stack(images).astype(np.float32) / 127.5 - 1.0  # [0, 255] → [−1, 1] as the reference
            x0 = torch.from_numpy(x0_np).permute(0, 3, 1, 2).to(device)
            x = sampler.q_sample(x0, t_start, noise)

        was_training = self.model.training
        self.model.eval()
        autocast = (
            torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        try:
            with autocast:
                cond = None
                if fast:
                    # SPADE γ/β once per call; the null condition's once for batch 1, shared by every sample
                    cond = self.model.precompute_condition(y)
                    if guidance_scale != 1.0:
                        null = self.model.precompute_condition(torch.zeros_like(y[:1])).expand(batch)
                        cond = type(cond).cat([cond, null])
                # the denoising loop: respaced indices start, start−1, …, 0
                for step_index, i in enumerate(range(start, -1, -1), start=1):
                    t = torch.full((batch,), i, dtype=torch.int64, device=device)
                    t_model = sampler.model_timesteps(t)  # the model receives original indices
                    eps = self._guided_eps(
                        x.contiguous(memory_format=memory_format), t_model, y, cond, guidance_scale, fast
                    )
                    step = sampler.ddim_step(eps, x, t, eta=eta, generator=generator, clip_denoised=True)
                    x = step.prev_sample
                    if callback is not None:
                        callback(step_index, int(sampler.timestep_map[i]), x, step.pred_original_sample)
        finally:
            self.model.train(was_training)

        # quantise as the reference: s = (x + 1)/2, s·255 + 0.5, clamp to [0, 255], truncate to uint8
        pixels = ((x + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
        out = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return SemanticSynthesisOutput(images=[np.ascontiguousarray(img) for img in out])
