"""Noise schedules, DDIM respacing and the partial-noise start index (pure numpy, no torch, no model).

Notation (Ho et al. 2020, "DDPM"): β_t is the variance of forward step t, α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s.
Timesteps are 0-based as in the reference code: t = 0 is the first (least noisy) step and t = T − 1 the last.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from diffaug.errors import ConfigError, InvalidInputError

__all__ = ["BetaSchedule", "linear_beta_schedule", "make_beta_schedule", "respaced_timesteps", "start_index"]

BetaSchedule = Literal["linear"]

#: β_1 and β_T of the linear schedule at T = 1000 (DDPM §4); other T scale both by 1000 / T.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """The linear β schedule of DDPM, rescaled so that any T spans the same total noise as T = 1000.

    β_t runs linearly from ``1e-4 · 1000/T`` to ``0.02 · 1000/T`` (Nichol & Dhariwal 2021, §2.2 keep this scaling).

    Args:
        num_timesteps: T, the number of diffusion steps. The last β must stay below 1, so T must exceed 20.

    Returns:
        float64 array of shape (T,).

    Raises:
        ConfigError: T is not an integer above 20.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps <= 20:
        raise ConfigError(
            f"num_train_timesteps must be an integer > 20 for the linear schedule (β_T = 0.02·1000/T must stay "
            f"below 1), got {num_timesteps!r}"
        )
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, int(num_timesteps), dtype=np.float64)


def make_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """β schedule by name.

    Args:
        name: the schedule; only ``"linear"`` (the one SDM and DiffMix use) is implemented.
        num_timesteps: T.

    Returns:
        float64 array of shape (T,).

    Raises:
        ConfigError: unknown schedule name or invalid T.
    """
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    raise ConfigError(f"beta_schedule must be 'linear' (the schedule of SDM and DiffMix), got {name!r}")


def respaced_timesteps(num_timesteps: int, num_inference_steps: int | str) -> np.ndarray:
    """Original timesteps kept by DDIM respacing "ddimN".

    "ddimN" keeps ``range(0, T, stride)`` with the integer stride that gives exactly N steps; for N dividing T that
    is stride T/N, so ddim100 at T = 1000 keeps 0, 10, …, 990 and ddim10 keeps 0, 100, …, 900. For other N the
    smallest stride with exactly N kept steps is used, as in improved-diffusion's ``space_timesteps``.

    Args:
        num_timesteps: T of the trained model.
        num_inference_steps: N, as an int or as the string ``"ddimN"``.

    Returns:
        int64 array of the N kept original timesteps, increasing. Respaced index i runs the model at ``result[i]``.

    Raises:
        InvalidInputError: N is not a positive integer, exceeds T, or no integer stride gives exactly N steps.
    """
    n = num_inference_steps
    if isinstance(n, str):
        if not (n.startswith("ddim") and n[4:].isdigit()):
            raise InvalidInputError(f"timestep respacing must be an int N or the string 'ddimN', got {n!r}")
        n = int(n[4:])
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if n > num_timesteps:
        raise InvalidInputError(
            f"num_inference_steps={n} exceeds the {num_timesteps} steps the model was trained with; use at most "
            f"{num_timesteps}"
        )
    for stride in range(1, num_timesteps + 1):
        kept = range(0, num_timesteps, stride)
        if len(kept) == n:
            return np.asarray(kept, dtype=np.int64)
    raise InvalidInputError(
        f"num_inference_steps={n} cannot be spaced evenly over {num_timesteps} steps (no integer stride gives exactly "
        f"{n} steps); pick N dividing {num_timesteps}, e.g. 10, 25, 50, 100, 250"
    )


def start_index(num_inference_steps: int, strength: float) -> int:
    """Respaced index of the first model step of a partial-noise (img2img) run.

    The run starts at respaced index ``round(N · strength) − 1`` and takes ``round(N · strength)`` model steps down to
    index 0. DiffMix computes ``int(N · p)``, which truncates 100 · 0.29 = 28.999… to 28; we round half up instead,
    so every strength written with two decimals gives the number of steps it reads as. For N = 100 and
    strength = 0.55 the start is respaced index 54, i.e. original t = 540, followed by 55 model steps.

    Args:
        num_inference_steps: N, the number of respaced steps.
        strength: the fraction of the N steps to run, in (0, 1]; 1.0 starts at the noisiest kept step.

    Returns:
        The start index in [0, N − 1].

    Raises:
        InvalidInputError: strength outside (0, 1], N < 1, or N · strength rounds to zero steps.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise InvalidInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    if not (0.0 < float(strength) <= 1.0) or math.isnan(float(strength)):
        raise InvalidInputError(
            f"strength must be in (0, 1] (1.0 samples from pure noise, DiffMix uses 0.55), got {strength!r}"
        )
    num_steps = math.floor(num_inference_steps * float(strength) + 0.5)
    if num_steps < 1:
        raise InvalidInputError(
            f"strength={strength} with num_inference_steps={num_inference_steps} gives round(N·strength) = 0 model "
            f"steps; raise strength or num_inference_steps"
        )
    return int(num_steps) - 1
