"""Image quality: Fréchet Inception Distance (FID) and Kernel Inception Distance (KID). Optional.

Both compare the feature distributions of real and synthetic images under a fixed feature extractor. The standard
extractor is Inception-v3 with the 2015 TensorFlow weights; they cannot be downloaded by diffaug, so the user passes
the file: a TorchScript export of that network that maps uint8 images (N, 3, H, W) to features when called with
``return_features=True``, such as ``inception-2015-12-05.pt`` from NVIDIA's StyleGAN2-ADA/StyleGAN3 metrics (the one
clean-fid and StyleGAN use). Any callable ``images (N, H, W, 3) uint8 -> features (N, D)`` works too (for tests, or
another backbone), but numbers are only comparable with published FIDs on the standard extractor.

Maths:

- FID (Heusel et al. 2017): with feature means μ_r, μ_g and covariances Σ_r, Σ_g,
  ``FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})``.
- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³`` (d the feature dimension), averaged over ``num_subsets`` random subsets of
  ``subset_size`` images per side.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diffaug.errors import InvalidInputError, WeightsError

__all__ = ["FeatureExtractor", "InceptionFeatures", "frechet_distance", "feature_statistics", "kid_from_features",
           "fid", "kid"]

FeatureExtractor = Callable[[np.ndarray], np.ndarray]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InvalidInputError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2})."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise InvalidInputError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, "
                                f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product: regularise both covariances slightly (as is standard for FID) and retry.
        eps = 1e-6 * np.eye(sigma1.shape[0])
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real up to round-off; a large imaginary part means bad input.
        if np.abs(covmean.imag).max() > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise InvalidInputError("covariance square root has a large imaginary part; are the features finite and "
                                    "the sets large enough?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def kid_from_features(real: np.ndarray, fake: np.ndarray, *, subset_size: int = 1000, num_subsets: int = 100,
                      rng: np.random.Generator | None = None) -> tuple[float, float]:
    """KID (mean, std over subsets) of two feature sets (N, D); see the module docstring.

    ``subset_size`` is capped at the smaller set size (which must be >= 2). ``rng`` draws the subsets
    (default ``numpy.random.default_rng(0)``).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InvalidInputError(f"feature sets must be (N, D) with the same D, got {real.shape} and {fake.shape}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise InvalidInputError("KID needs at least 2 images per side")
    rng = np.random.default_rng(0) if rng is None else rng
    d = real.shape[1]
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        k_xx = (x @ x.T / d + 1.0) ** 3
        k_yy = (y @ y.T / d + 1.0) ** 3
        k_xy = (x @ y.T / d + 1.0) ** 3
        # Unbiased MMD²: the diagonals of k_xx and k_yy are left out.
        mmd = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2.0 * k_xy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


class InceptionFeatures:
    """Inception-v3 pool features from a user-supplied TorchScript file (see the module docstring).

    Args:
        weights: path of the TorchScript Inception file. ``None`` is an error that says where to get one.
        device: torch device.
        batch_size: images per forward pass.
    """

    def __init__(self, weights: str | os.PathLike[str] | None, *, device: str = "cpu", batch_size: int = 32) -> None:
        import torch

        if weights is None:
            raise WeightsError("FID/KID need Inception weights, which diffaug cannot download: pass the path of a "
                               "TorchScript Inception-v3 file (e.g. inception-2015-12-05.pt from NVIDIA's "
                               "StyleGAN3 metrics) with --inception PATH")
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: Inception weights file not found; pass the path of a TorchScript "
                               "Inception-v3 file (e.g. inception-2015-12-05.pt)")
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the standard FID network ships in it
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"{path}: not a TorchScript model ({exc}); FID needs a TorchScript Inception-v3 "
                               "export such as inception-2015-12-05.pt") from None
        self.device = device
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        feats = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
                x = x.permute(0, 3, 1, 2).to(self.device)
                feats.append(self.model(x, return_features=True).cpu().numpy().astype(np.float64))
        return np.concatenate(feats)


def _features(images: Sequence[np.ndarray] | np.ndarray, extractor: FeatureExtractor, what: str) -> np.ndarray:
    arrays = [np.asarray(im) for im in images]
    if not arrays:
        raise InvalidInputError(f"{what}: no images")
    for i, im in enumerate(arrays):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise InvalidInputError(f"{what} image {i}: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
    shapes = {im.shape for im in arrays}
    if len(shapes) == 1:
        return np.asarray(extractor(np.stack(arrays)), dtype=np.float64)
    return np.concatenate([np.asarray(extractor(im[None]), dtype=np.float64) for im in arrays])


def fid(real: Sequence[np.ndarray] | np.ndarray, fake: Sequence[np.ndarray] | np.ndarray,
        extractor: FeatureExtractor) -> float:
    """FID between two sets of uint8 RGB images under ``extractor`` (e.g. :class:`InceptionFeatures`)."""
    mu_r, sig_r = feature_statistics(_features(real, extractor, "real"))
    mu_f, sig_f = feature_statistics(_features(fake, extractor, "synthetic"))
    return frechet_distance(mu_r, sig_r, mu_f, sig_f)


def kid(real: Sequence[np.ndarray] | np.ndarray, fake: Sequence[np.ndarray] | np.ndarray,
        extractor: FeatureExtractor, *, subset_size: int = 1000, num_subsets: int = 100,
        rng: np.random.Generator | None = None) -> tuple[float, float]:
    """KID (mean, std) between two sets of uint8 RGB images under ``extractor``."""
    return kid_from_features(_features(real, extractor, "real"), _features(fake, extractor, "synthetic"),
                             subset_size=subset_size, num_subsets=num_subsets, rng=rng)
