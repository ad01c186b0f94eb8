"""FID / KID maths against closed forms, with a tiny stand-in feature extractor; the Inception path only errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from diffaug.errors import InvalidInputError, WeightsError
from diffaug.evaluation.fid import (
    InceptionFeatures,
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    kid_from_features,
)


def test_frechet_distance_matches_closed_form_for_commuting_covariances(rng):
    # Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ commute, so Tr((Σ1Σ2)^½) = Σ √(a b) and
    # FD = ‖μ1 − μ2‖² + Σ (√a − √b)².
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_against_direct_formula(rng):
    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = x @ x.T + 0.1 * np.eye(5), y @ y.T + 0.1 * np.eye(5)
    # Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), a symmetric form that needs no complex arithmetic.
    r = linalg.sqrtm(s1).real
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r @ s2 @ r).real)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(np.ones(5), s1, np.ones(5), s1) == pytest.approx(0.0, abs=1e-8)


def _mean_std_extractor(images: np.ndarray) -> np.ndarray:
    """A tiny stand-in for Inception: per-channel mean and standard deviation (6 features)."""
    x = images.astype(np.float64) / 255.0
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def test_fid_on_images_equals_frechet_distance_of_extracted_features(rng):
    real = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)
    f_r, f_f = _mean_std_extractor(real), _mean_std_extractor(fake)
    expected = frechet_distance(*feature_statistics(f_r), *feature_statistics(f_f))
    assert fid(real, fake, _mean_std_extractor) == pytest.approx(expected)
    assert fid(list(real), list(real), _mean_std_extractor) == pytest.approx(0.0, abs=1e-10)
    assert expected > 0.01  # brighter images are measurably far


def test_fid_of_gaussian_samples_approaches_the_population_value(rng):
    n, d = 20000, 3
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5])
    a, b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    x = rng.normal(size=(n, d)) * np.sqrt(a) + mu1
    y = rng.normal(size=(n, d)) * np.sqrt(b) + mu2
    population = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(population, abs=0.03)


def test_kid_is_unbiased_mmd_with_cubic_kernel(rng):
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 4)) + 0.5
    d, m = 4, 7

    def k(u, v):
        return (u @ v / d + 1.0) ** 3

    expected = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
                + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)) / (m * (m - 1)) \
        - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = kid_from_features(x, y, subset_size=7, num_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-10)  # the full set each time: no subset randomness
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_shifted_positive(rng):
    real = rng.integers(0, 200, size=(60, 8, 8, 3), dtype=np.uint8)
    same = rng.integers(0, 200, size=(60, 8, 8, 3), dtype=np.uint8)
    shifted = (same.astype(int) + 55).astype(np.uint8)
    k_same, _ = kid(real, same, _mean_std_extractor, subset_size=30, num_subsets=20, rng=np.random.default_rng(1))
    k_shift, _ = kid(real, shifted, _mean_std_extractor, subset_size=30, num_subsets=20, rng=np.random.default_rng(1))
    assert abs(k_same) < 0.02 < k_shift


def test_inception_needs_a_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="--inception PATH"):
        InceptionFeatures(None)
    with pytest.raises(WeightsError, match="not found"):
        InceptionFeatures(tmp_path / "inception-2015-12-05.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not a TorchScript model"):
        InceptionFeatures(bad)


def test_bad_feature_inputs():
    with pytest.raises(InvalidInputError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(InvalidInputError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(InvalidInputError, match="uint8"):
        fid([np.zeros((4, 4, 3), np.float32)] * 2, [np.zeros((4, 4, 3), np.uint8)] * 2, _mean_std_extractor)
