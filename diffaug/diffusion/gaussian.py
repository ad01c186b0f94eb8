"""Gaussian diffusion maths of SDM / DiffMix: forward process, posterior, learned-range variance, hybrid loss, DDIM.

This module imports no model. Functions that need the network take its *output* (or a callable), as in
improved-diffusion, so the same maths serves training, sampling and tests with a stand-in function.

Notation map (papers → names here):

=====================  ==============================  =================================================
paper                  here                            meaning
=====================  ==============================  =================================================
β_t                    ``betas``                       forward variance of step t (DDPM eq. 2)
ᾱ_t                    ``alphas_cumprod``              ∏_{s≤t} (1 − β_s)
ᾱ_{t−1}                ``alphas_cumprod_prev``         with ᾱ_{−1} = 1
β̃_t                   ``posterior_variance``          variance of q(x_{t−1} | x_t, x_0) (DDPM eq. 7)
μ̃_t coefficients      ``posterior_mean_coef1/2``      μ̃ = coef1·x_0 + coef2·x_t (DDPM eq. 7)
ε_θ                    ``eps`` (channels 0..C−1)       the model's noise prediction
v                      ``v`` (channels C..2C−1)        variance interpolation in [−1, 1] (iDDPM eq. 15)
x̂_0                   ``pred_xstart``                 predicted clean image
=====================  ==============================  =================================================

Timestep indices are 0-based. A respaced diffusion (``respace``) is itself a :class:`GaussianDiffusion` over the kept
steps; its methods take *respaced* indices, and ``timestep_map`` gives the original index the model must receive.

Precision follows the reference: every schedule coefficient is a float64 numpy array, indexed per step and cast to
the dtype of the tensor it multiplies (float32 in practice), so float32 runs match the original bit for bit in the
schedule and the float64 path stays available for references.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from diffaug.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffaug.diffusion.schedule import BetaSchedule, make_beta_schedule, respaced_timesteps
from diffaug.errors import ConfigError, InvalidInputError

__all__ = [
    "DDIMStepOutput",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ModelFn",
    "PosteriorOutput",
    "classifier_free_guidance",
]

#: ``model_fn(x_t, timesteps, y) -> (B, 2C, H, W)``: ε then the variance interpolation v. ``timesteps`` are original
#: indices (int64, shape (B,)); ``y`` is passed through unchanged (it may be None).
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class DiffusionConfig:
    """The ``"diffusion"`` block of a model's ``config.json``.

    Attributes:
        num_train_timesteps: T, the number of forward steps the model was trained with.
        beta_schedule: the β schedule; SDM and DiffMix use ``"linear"``.
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DiffusionConfig:
        """Build from a mapping, strictly: unknown keys and wrong types are errors.

        Raises:
            ConfigError: the mapping has unknown keys or invalid values.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"the 'diffusion' config must be a JSON object, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the 'diffusion' config; the known keys are {sorted(known)}")
        out = cls(**config)
        make_beta_schedule(out.beta_schedule, out.num_train_timesteps)  # validates both values
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable mapping that :meth:`from_dict` reads back."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PosteriorOutput:
    """A Gaussian over x_{t−1}: mean, variance and log-variance (broadcastable to the sample)."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor


@dataclass(frozen=True)
class DDIMStepOutput:
    """Result of one DDIM step.

    Attributes:
        prev_sample: x_{t−1}, the state after the step.
        pred_original_sample: x̂_0 of this step (clipped to [−1, 1] when ``clip_denoised``).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, eps_channels: int
) -> torch.Tensor:
    """Combine conditional and unconditional model outputs: ε̂ = ε_u + w·(ε_c − ε_u) on the ε channels.

    Applied for every w: w = 1 gives the conditional ε, w = 0 the unconditional one, w > 1 extrapolates away from
    the unconditional prediction. The papers' s in ε_c + s·(ε_c − ε_u) is w − 1. The remaining (variance) channels
    are taken from the conditional output. (The reference code silently skips guidance for w ≤ 1; we do not.)

    Args:
        cond: model output with the condition, (B, 2C, H, W) or (B, C, H, W).
        uncond: model output with the null condition, same shape.
        guidance_scale: w.
        eps_channels: C, the number of leading ε channels.

    Returns:
        A new tensor shaped like ``cond``.
    """
    if cond.shape != uncond.shape:
        raise InvalidInputError(f"guidance needs outputs of one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    eps_c, rest = cond[:, :eps_channels], cond[:, eps_channels:]
    eps_u = uncond[:, :eps_channels]
    return torch.cat([eps_u + guidance_scale * (eps_c - eps_u), rest], dim=1)


class GaussianDiffusion:
    """Schedule and maths of an ε-predicting diffusion with learned-range variance (SDM, DiffMix, iDDPM).

    Build the training diffusion from a config, and a sampling one with :meth:`respace`::

        >>> diffusion = GaussianDiffusion.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
        >>> sampler = diffusion.respace(100)          # "ddim100": original steps 0, 10, ..., 990
        >>> int(sampler.timestep_map[54])
        540

    Args:
        betas: β_t of the process, float64, shape (T,), each in (0, 1).
        timestep_map: original timestep of each step; identity for an unrespaced diffusion.
        config: the config this diffusion was built from (kept for :meth:`to_config`; None for custom betas).
    """

    def __init__(
        self,
        betas: np.ndarray,
        timestep_map: np.ndarray | None = None,
        config: DiffusionConfig | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not np.all((betas > 0) & (betas < 1)):
            raise ConfigError("betas must be a non-empty 1-D array with every value in (0, 1)")
        self.config = config
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = (
            np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, np.int64)
        )
        if self.timestep_map.shape != betas.shape:
            raise ConfigError("timestep_map must have one original timestep per beta")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (DDPM eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε  (DDPM eq. 4 solved for x_0)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)  (DDPM eqs. 6–7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is clipped to log β̃_1 (iDDPM §3.1; the reference does the same).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas  # a one-step chain has no β̃_1; its decoder variance falls back to β_0
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | DiffusionConfig) -> GaussianDiffusion:
        """Build from the ``"diffusion"`` block of a model's ``config.json`` (strict: unknown keys are errors)."""
        cfg = config if isinstance(config, DiffusionConfig) else DiffusionConfig.from_dict(config)
        return cls(make_beta_schedule(cfg.beta_schedule, cfg.num_train_timesteps), config=cfg)

    def to_config(self) -> dict[str, Any]:
        """The ``"diffusion"`` config block this diffusion was built from.

        Raises:
            ConfigError: the diffusion was built from raw betas or respaced, so no config describes it.
        """
        if self.config is None or not self.is_original:
            raise ConfigError("only an unrespaced diffusion built with from_config has a config")
        return self.config.to_dict()

    @property
    def is_original(self) -> bool:
        """True when every step is its own original timestep (no respacing)."""
        return bool(np.array_equal(self.timestep_map, np.arange(self.num_timesteps)))

    def respace(self, num_inference_steps: int | str) -> GaussianDiffusion:
        """The diffusion over the steps kept by DDIM respacing "ddimN" (see :func:`respaced_timesteps`).

        The kept steps' ᾱ are unchanged; each new β_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}} (iDDPM §4), so that the respaced
        process has the same marginals q(x_t | x_0) at the kept steps.

        Args:
            num_inference_steps: N, or ``"ddimN"``.

        Returns:
            A new diffusion with N steps whose ``timestep_map`` holds the original indices.
        """
        if not self.is_original:
            raise InvalidInputError("respace an original (unrespaced) diffusion, not an already respaced one")
        kept = respaced_timesteps(self.num_timesteps, num_inference_steps)
        kept_alphas_cumprod = self.alphas_cumprod[kept]
        new_betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        return GaussianDiffusion(new_betas, timestep_map=kept, config=self.config)

    # -------------------------------------------------------------------------------------------------- helpers
    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.shape != (batch,):
            raise InvalidInputError(
                f"timesteps must be an int64 tensor of shape ({batch},), one per sample, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise InvalidInputError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got min {int(t.min())}, max {int(t.max())}"
            )

    @staticmethod
    def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as a tensor of ``like``'s dtype and device, shaped (B, 1, …, 1) to broadcast over ``like``."""
        values = torch.from_numpy(arr).to(t.device)[t.long()].to(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - 1))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices (what the model receives) of the steps ``t`` of this diffusion."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t.long()]

    def split_output(self, model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a (B, 2C, H, W) model output into ε and the variance interpolation v.

        Raises:
            InvalidInputError: the output does not have twice the channels of x (a model without learned variance).
        """
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] != 2 * x.shape[1] or model_output.shape[
            2:
        ] != x.shape[2:]:
            raise InvalidInputError(
                f"model output must be (B, 2C, ...) = {(x.shape[0], 2 * x.shape[1], *x.shape[2:])} (ε then the "
                f"variance interpolation v), got {tuple(model_output.shape)}"
            )
        c = x.shape[1]
        return model_output[:, :c], model_output[:, c:]

    # ---------------------------------------------------------------------------------------- forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (DDPM eq. 4).

        Args:
            x_start: x_0 in [−1, 1], (B, C, H, W).
            t: step indices of this diffusion, int64 (B,).
            noise: ε ~ N(0, I), shaped like x_start (passed explicitly: randomness is the caller's).
        """
        self._check_t(t, x_start.shape[0])
        if noise.shape != x_start.shape:
            raise InvalidInputError(f"noise must be shaped like x_start {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> PosteriorOutput:
        """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t): μ̃_t = coef1·x_0 + coef2·x_t (DDPM eq. 7).

        The log-variance is the clipped one (β̃_0 replaced by β̃_1), as used by the loss.
        """
        self._check_t(t, x_start.shape[0])
        mean = self._extract(self.posterior_mean_coef1, t, x_t) * x_start + self._extract(
            self.posterior_mean_coef2, t, x_t
        ) * x_t
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return PosteriorOutput(mean=mean, variance=variance, log_variance=log_variance)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε."""
        return self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """ε = (√(1/ᾱ_t)·x_t − x̂_0) / √(1/ᾱ_t − 1): the noise consistent with x_t and a (clipped) x̂_0."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ----------------------------------------------------------------------------------------- reverse process
    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Learned-range log-variance (iDDPM eq. 15), interpolated in log space.

        log σ²_θ = f·log β_t + (1 − f)·log β̃_t with f = (v + 1)/2, where log β̃_t is clipped at t = 0 to log β̃_1.
        v = 1 gives the upper bound β_t, v = −1 the lower bound β̃_t.
        """
        min_log = self._extract(self.posterior_log_variance_clipped, t, v)
        max_log = self._extract(self.log_betas, t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[PosteriorOutput, torch.Tensor]:
        """p_θ(x_{t−1} | x_t) from a model output: μ_θ = μ̃_t(x̂_0(ε_θ), x_t) and the learned-range variance.

        Args:
            model_output: (B, 2C, H, W), ε then v.
            x_t: the current state.
            t: step indices of this diffusion.
            clip_denoised: clip x̂_0 to [−1, 1] before forming the mean.

        Returns:
            (the Gaussian p_θ(x_{t−1} | x_t), x̂_0).
        """
        self._check_t(t, x_t.shape[0])
        eps, v = self.split_output(model_output, x_t)
        log_variance = self.model_log_variance(v, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self.q_posterior_mean_variance(pred_xstart, x_t, t).mean
        return PosteriorOutput(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance), pred_xstart

    # ------------------------------------------------------------------------------------------------ training
    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample term of the variational bound in bits per dimension (DDPM eq. 5; iDDPM §3.1).

        L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, and the discretised Gaussian decoder
        NLL L_0 = −log p_θ(x_0 | x_1) for t = 0, both averaged over dimensions and divided by ln 2.

        Returns:
            (B,) tensor.
        """
        true = self.q_posterior_mean_variance(x_start, x_t, t)
        pred, _ = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true.mean, true.log_variance, pred.mean, pred.log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=pred.mean, log_scales=0.5 * pred.log_variance)
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        y: Any = None,
    ) -> dict[str, torch.Tensor]:
        """The hybrid loss of iDDPM (eq. 16) as SDM trains it: L = mean((ε − ε_θ)²) + L_vb.

        L_vb is computed with the predicted mean **detached** (ε_θ under ``detach``), so it trains only the variance
        interpolation v while the MSE trains ε. L_vb is in bits per dimension and is not rescaled, which at
        T = 1000 is λ = 0.001 in the paper's notation.

        Args:
            model_fn: ``model_fn(x_t, timesteps, y) -> (B, 2C, H, W)``; it receives original timestep indices.
            x_start: x_0, real images in [−1, 1] on the 8-bit grid, (B, C, H, W).
            t: step indices, int64 (B,), e.g. drawn uniformly from [0, T).
            noise: ε ~ N(0, I) shaped like x_start (the caller draws it from its own generator).
            y: the condition, passed to ``model_fn`` unchanged (zero it per sample for condition dropout).

        Returns:
            Per-sample (B,) tensors: ``"loss"`` (= mse + vb), ``"mse"`` and ``"vb"``.
        """
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t), y)
        eps, v = self.split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        frozen = torch.cat([eps.detach(), v], dim=1)  # the VB term must not move the mean (iDDPM §3.1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------------------------------------- sampling
    def ddim_step(
        self,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
    ) -> DDIMStepOutput:
        """One DDIM step from x_t to x_{t−1} (Song et al. 2021, eq. 12), as DiffMix runs it.

        1. x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε, clipped to [−1, 1] when ``clip_denoised``;
        2. ε is re-derived from the clipped x̂_0: ε′ = (√(1/ᾱ_t)·x_t − x̂_0) / √(1/ᾱ_t − 1);
        3. σ_t = η·√((1 − ᾱ_{t−1})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t−1})  (eq. 16);
        4. x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1 − ᾱ_{t−1} − σ_t²)·ε′ + σ_t·z, with ᾱ_{−1} = 1 and no noise at t = 0.

        With η = 0 the step is deterministic and draws nothing; the last step (t = 0) returns x̂_0.

        Args:
            eps: the (guided) noise prediction ε, shaped like x_t.
            x_t: the current state.
            t: step indices of *this* (respaced) diffusion, int64 (B,).
            eta: η ≥ 0; 0 is DDIM, 1 matches DDPM's posterior variance.
            generator: source of z when η > 0, drawn on the generator's device (a CPU generator gives the same z
                whatever the device of x_t). None draws from torch's default generator.
            clip_denoised: clip x̂_0 to [−1, 1] (DiffMix does).

        Returns:
            x_{t−1} and this step's x̂_0.
        """
        self._check_t(t, x_t.shape[0])
        if eps.shape != x_t.shape:
            raise InvalidInputError(f"eps must be shaped like x_t {tuple(x_t.shape)}, got {tuple(eps.shape)}")
        if not eta >= 0.0:
            raise InvalidInputError(f"eta must be >= 0, got {eta}")
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        alpha_bar = self._extract(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        prev = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta > 0:
            draw_device = generator.device if generator is not None else torch.device("cpu")
            z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=draw_device).to(x_t.device)
            nonzero = (t != 0).to(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
            prev = prev + nonzero * sigma * z
        return DDIMStepOutput(prev_sample=prev, pred_original_sample=pred_xstart)
