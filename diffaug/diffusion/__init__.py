"""Diffusion maths of SDM / DiffMix: schedules, forward process, posterior, hybrid loss, DDIM. Imports no model."""

from diffaug.diffusion.gaussian import (
    DDIMStepOutput,
    DiffusionConfig,
    GaussianDiffusion,
    ModelFn,
    PosteriorOutput,
    classifier_free_guidance,
)
from diffaug.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffaug.diffusion.schedule import linear_beta_schedule, make_beta_schedule, respaced_timesteps, start_index

__all__ = [
    "DDIMStepOutput",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ModelFn",
    "PosteriorOutput",
    "classifier_free_guidance",
    "discretized_gaussian_log_likelihood",
    "linear_beta_schedule",
    "make_beta_schedule",
    "mean_flat",
    "normal_kl",
    "respaced_timesteps",
    "start_index",
]
