"""diffaug.diffusion: schedule, respacing, posterior, learned range, hybrid loss and DDIM.

Expected values are worked out in plain Python from the papers' formulas (no diffaug code), on a one-pixel example,
or read from the SDM/DiffMix fixture (``ddim_cases.npz``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    classifier_free_guidance,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
    respaced_timesteps,
    start_index,
)
from diffaug.errors import ConfigError, InvalidInputError

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------ first-principles helpers
def beta(t: int, T: int = 1000) -> float:
    """β_t of the linear schedule, 0-based: 1e-4·s + (0.02 − 1e-4)·s·t/(T − 1), s = 1000/T."""
    s = 1000.0 / T
    return 1e-4 * s + (0.02 * s - 1e-4 * s) * t / (T - 1)


def alpha_bar(t: int, T: int = 1000) -> float:
    """ᾱ_t = ∏_{s≤t} (1 − β_s); ᾱ_{−1} = 1."""
    return math.prod(1.0 - beta(s, T) for s in range(t + 1))


def posterior(x0: float, xt: float, t: int) -> tuple[float, float]:
    """Mean and variance of q(x_{t−1} | x_t, x_0) (DDPM eq. 7)."""
    ab, ab_prev, b = alpha_bar(t), alpha_bar(t - 1), beta(t)
    mean = b * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - b) / (1 - ab) * xt
    return mean, b * (1 - ab_prev) / (1 - ab)


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def one_pixel(value: float) -> torch.Tensor:
    return torch.tensor([[[[value]]]], dtype=torch.float64)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})


@pytest.fixture(scope="module")
def ddim_cases(sdm_fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(sdm_fixture_dir / "ddim_cases.npz") as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------- schedule
def test_alphas_cumprod_equals_fixture(diffusion: GaussianDiffusion, ddim_cases: dict[str, np.ndarray]) -> None:
    expected = ddim_cases["alphas_cumprod_T1000"]
    assert diffusion.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(diffusion.alphas_cumprod, expected)


def test_linear_schedule_scales_with_T() -> None:
    betas = linear_beta_schedule(500)
    assert betas.shape == (500,)
    assert betas[0] == pytest.approx(2e-4) and betas[-1] == pytest.approx(0.04)
    for t in (0, 1, 250, 499):
        assert betas[t] == pytest.approx(beta(t, 500), rel=1e-12)
    for bad in (20, 0, 10.0, True):
        with pytest.raises(ConfigError, match="num_train_timesteps"):
            linear_beta_schedule(bad)


def test_config_is_strict_and_round_trips(diffusion: GaussianDiffusion) -> None:
    assert diffusion.to_config() == {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    assert GaussianDiffusion.from_config(DiffusionConfig(num_train_timesteps=250)).num_timesteps == 250
    with pytest.raises(ConfigError, match="unknown key"):
        GaussianDiffusion.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear", "learn_sigma": True})
    with pytest.raises(ConfigError, match="beta_schedule"):
        GaussianDiffusion.from_config({"beta_schedule": "cosine"})
    with pytest.raises(ConfigError, match="respaced"):
        diffusion.respace(10).to_config()


# ------------------------------------------------------------------------------------------------ respacing
def test_respacing_keeps_original_steps(diffusion: GaussianDiffusion) -> None:
    np.testing.assert_array_equal(respaced_timesteps(1000, "ddim100"), np.arange(0, 1000, 10))
    np.testing.assert_array_equal(respaced_timesteps(1000, 10), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(respaced_timesteps(1000, 30), np.arange(0, 1000, 34))  # smallest stride with 30
    sampler = diffusion.respace(100)
    assert sampler.num_timesteps == 100 and int(sampler.timestep_map[54]) == 540
    # the respaced chain has the original marginals at the kept steps (README: ᾱ at respaced 54 = ᾱ_540 = 0.0510680)
    np.testing.assert_allclose(sampler.alphas_cumprod, diffusion.alphas_cumprod[::10], rtol=1e-12)
    assert sampler.alphas_cumprod[54] == pytest.approx(0.0510680, abs=5e-8)
    assert sampler.model_timesteps(torch.tensor([54, 0])).tolist() == [540, 0]


@pytest.mark.parametrize("bad", [0, -3, 1001, 999, "ddim", "dd10", 2.5])
def test_respacing_rejects_bad_step_counts(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        respaced_timesteps(1000, bad)  # type: ignore[arg-type]


def test_start_index_rounds() -> None:
    assert start_index(100, 0.55) == 54  # DiffMix: original t = 540, 55 model steps
    assert start_index(100, 0.29) == 28  # 100·0.29 = 28.999…: int() would give 27 (28 steps)
    assert start_index(100, 0.58) == 57
    assert start_index(10, 1.0) == 9
    assert start_index(10, 0.25) == 2  # 2.5 rounds half up to 3 steps
    for strength in (0.0, -0.1, 1.01, float("nan"), "0.5"):
        with pytest.raises(InvalidInputError, match="strength"):
            start_index(100, strength)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="num_inference_steps"):
        start_index(0, 0.5)
    with pytest.raises(InvalidInputError, match="0 model steps"):
        start_index(4, 0.1)


# ------------------------------------------------------------------------------------- forward and posterior
def test_q_sample_and_posterior_by_hand(diffusion: GaussianDiffusion) -> None:
    x0, eps, t = 0.5, 0.3, 7
    xt = math.sqrt(alpha_bar(t)) * x0 + math.sqrt(1 - alpha_bar(t)) * eps
    tt = torch.tensor([t])
    got = diffusion.q_sample(one_pixel(x0), tt, one_pixel(eps))
    assert got.item() == pytest.approx(xt, rel=1e-12)

    mean, var = posterior(x0, xt, t)
    post = diffusion.q_posterior_mean_variance(one_pixel(x0), one_pixel(xt), tt)
    assert post.mean.item() == pytest.approx(mean, rel=1e-12)
    assert post.variance.item() == pytest.approx(var, rel=1e-12)
    assert post.log_variance.item() == pytest.approx(math.log(var), rel=1e-12)
    # β̃_0 = 0: its log is clipped to log β̃_1
    post0 = diffusion.q_posterior_mean_variance(one_pixel(x0), one_pixel(xt), torch.tensor([0]))
    assert post0.variance.item() == 0.0
    assert post0.log_variance.item() == pytest.approx(math.log(posterior(0, 0, 1)[1]), rel=1e-12)


def test_eps_and_xstart_are_inverse(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    x0 = diffusion.predict_xstart_from_eps(x, t, eps)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x, t, x0), eps, rtol=1e-9, atol=1e-9)


def test_learned_range_interpolates_in_log_space(diffusion: GaussianDiffusion) -> None:
    t = torch.tensor([5, 5, 5, 0])
    v = torch.tensor([1.0, -1.0, 0.2, -1.0], dtype=torch.float64).reshape(4, 1, 1, 1)
    got = diffusion.model_log_variance(v, t).flatten().tolist()
    log_b, log_bt = math.log(beta(5)), math.log(posterior(0, 0, 5)[1])
    assert got[0] == pytest.approx(log_b, rel=1e-12)  # v = 1: upper bound β_t
    assert got[1] == pytest.approx(log_bt, rel=1e-12)  # v = −1: lower bound β̃_t
    assert got[2] == pytest.approx(0.6 * log_b + 0.4 * log_bt, rel=1e-12)  # f = (v+1)/2 = 0.6, in log space
    assert got[3] == pytest.approx(math.log(posterior(0, 0, 1)[1]), rel=1e-12)  # t = 0 clipped to β̃_1


# ------------------------------------------------------------------------------------------------ the loss
def constant_model(eps_value: float, v_value: float, calls: list[tuple[torch.Tensor, object]]):
    def model_fn(x_t: torch.Tensor, timesteps: torch.Tensor, y: object) -> torch.Tensor:
        calls.append((timesteps.clone(), y))
        eps = torch.full_like(x_t, eps_value)
        v = torch.full_like(x_t, v_value)
        return torch.cat([eps, v], dim=1)

    return model_fn


def test_hybrid_loss_kl_term_by_hand(diffusion: GaussianDiffusion) -> None:
    """t > 0: L = (ε − ε̂)² + KL(q ‖ p_θ)/ln 2 on one pixel, everything written out."""
    x0, eps, eps_hat, v, t = 0.5, 0.3, 0.2, 0.4, 10
    ab = alpha_bar(t)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    x0_hat = (xt - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
    mu_q, var_q = posterior(x0, xt, t)
    mu_p, _ = posterior(x0_hat, xt, t)  # μ_θ = μ̃(x̂_0(ε̂), x_t)
    f = (v + 1) / 2
    log_var_p = f * math.log(beta(t)) + (1 - f) * math.log(var_q)
    var_p = math.exp(log_var_p)
    kl_nats = 0.5 * (math.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
    expected_vb = kl_nats / LN2
    expected_mse = (eps - eps_hat) ** 2

    calls: list[tuple[torch.Tensor, object]] = []
    y = object()
    out = diffusion.training_losses(
        constant_model(eps_hat, v, calls), one_pixel(x0), torch.tensor([t]), one_pixel(eps), y=y
    )
    assert out["mse"].item() == pytest.approx(expected_mse, rel=1e-10)
    assert out["vb"].item() == pytest.approx(expected_vb, rel=1e-9)
    assert out["loss"].item() == pytest.approx(expected_mse + expected_vb, rel=1e-9)
    assert expected_vb > 1e-3  # the example is not degenerate
    assert calls[0][0].tolist() == [t] and calls[0][1] is y


@pytest.mark.parametrize("x0", [0.0 + 1 / 255, -1.0, 1.0])
def test_hybrid_loss_decoder_nll_at_t0_by_hand(diffusion: GaussianDiffusion, x0: float) -> None:
    """t = 0: L_vb = −log P(bin of x_0) / ln 2 under N(μ_θ, σ²), the edge bins open to ±∞."""
    eps, eps_hat, v = -0.4, 0.1, -0.2
    ab = alpha_bar(0)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    x0_hat = (xt - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
    mu = posterior(x0_hat, xt, 0)[0]  # ᾱ_{−1} = 1: μ̃_0 = x̂_0 exactly
    assert mu == pytest.approx(x0_hat, rel=1e-12)
    f = (v + 1) / 2
    sigma = math.exp(0.5 * (f * math.log(beta(0)) + (1 - f) * math.log(posterior(0, 0, 1)[1])))
    upper = phi((x0 + 1 / 255 - mu) / sigma) if x0 < 1 else 1.0
    lower = phi((x0 - 1 / 255 - mu) / sigma) if x0 > -1 else 0.0
    expected_vb = -math.log(upper - lower) / LN2

    out = diffusion.training_losses(constant_model(eps_hat, v, []), one_pixel(x0), torch.tensor([0]), one_pixel(eps))
    assert out["vb"].item() == pytest.approx(expected_vb, rel=1e-8)
    assert out["mse"].item() == pytest.approx((eps - eps_hat) ** 2, rel=1e-10)


def test_vb_trains_only_the_variance(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5) - 1
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps_hat = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = (0.5 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    out = diffusion.training_losses(
        lambda x_t, ts, y: torch.cat([eps_hat, v], dim=1), x0, torch.tensor([0, 300]), noise
    )
    grad_eps_vb, grad_v_vb = torch.autograd.grad(out["vb"].sum(), [eps_hat, v], allow_unused=True)
    assert grad_eps_vb is None or torch.count_nonzero(grad_eps_vb) == 0  # mean detached
    assert grad_v_vb is not None and grad_v_vb.abs().sum() > 0
    grad_eps_mse, grad_v_mse = torch.autograd.grad(out["mse"].sum(), [eps_hat, v], allow_unused=True)
    assert grad_v_mse is None or torch.count_nonzero(grad_v_mse) == 0
    torch.testing.assert_close(grad_eps_mse, -2 * (noise - eps_hat.detach()) / 48)


def test_loss_helpers_match_closed_forms() -> None:
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in (0.3, math.log(0.5), -0.1, math.log(2.0)))
    expected = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.4**2) / (2 * 2.0) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expected, rel=1e-12)
    # far-off bins stay finite and keep precision where 1 − Φ would round to 0
    x = torch.tensor([0.0, 0.0], dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x, torch.tensor([-0.9, 0.9], dtype=torch.float64), torch.log(
        torch.tensor([0.05, 0.05], dtype=torch.float64)))
    assert torch.isfinite(ll).all() and ll[0].item() == pytest.approx(ll[1].item(), rel=1e-9)
    assert ll[0].item() < -150


def test_losses_reject_bad_inputs(diffusion: GaussianDiffusion) -> None:
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(InvalidInputError, match="timesteps must lie"):
        diffusion.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(InvalidInputError, match="shape \\(2,\\)"):
        diffusion.q_sample(x, torch.tensor([3]), x)
    with pytest.raises(InvalidInputError, match="int64"):
        diffusion.q_sample(x, torch.tensor([3.0, 1.0]), x)
    with pytest.raises(InvalidInputError, match="2C"):
        diffusion.training_losses(lambda x_t, t, y: x_t, x, torch.tensor([1, 2]), x)


# ---------------------------------------------------------------------------------------------------- DDIM
def test_guidance_convention() -> None:
    cond = torch.tensor([[1.0, 2.0, 10.0]]).reshape(1, 3, 1, 1)
    uncond = torch.tensor([[3.0, 1.0, 20.0]]).reshape(1, 3, 1, 1)
    for w, eps0 in ((1.0, 1.0), (0.0, 3.0), (1.5, 0.0), (0.5, 2.0), (3.0, -3.0)):
        got = classifier_free_guidance(cond, uncond, w, eps_channels=2).flatten().tolist()
        assert got[0] == pytest.approx(eps0)  # ε_u + w·(ε_c − ε_u)
        assert got[1] == pytest.approx(1.0 + w * 1.0)
        assert got[2] == 10.0  # variance channel from the conditional pass


def test_ddim_step_by_hand(diffusion: GaussianDiffusion) -> None:
    sampler = diffusion.respace(10)  # original steps 0, 100, ..., 900
    i = 3
    ab, ab_prev = alpha_bar(300), alpha_bar(200)
    x, eps = 0.7, -0.2
    x0 = math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps
    assert x0 > 1  # clipping happens, so the re-derived ε matters
    x0c = 1.0
    eps_c = (math.sqrt(1 / ab) * x - x0c) / math.sqrt(1 / ab - 1)
    expected = math.sqrt(ab_prev) * x0c + math.sqrt(1 - ab_prev) * eps_c
    out = sampler.ddim_step(one_pixel(eps), one_pixel(x), torch.tensor([i]))
    assert out.pred_original_sample.item() == 1.0
    assert out.prev_sample.item() == pytest.approx(expected, rel=1e-10)
    unclipped = sampler.ddim_step(one_pixel(eps), one_pixel(x), torch.tensor([i]), clip_denoised=False)
    assert unclipped.pred_original_sample.item() == pytest.approx(x0, rel=1e-10)
    # the last step (ᾱ_{−1} = 1) returns x̂_0
    last = sampler.ddim_step(one_pixel(0.1), one_pixel(0.3), torch.tensor([0]))
    assert last.prev_sample.item() == pytest.approx(last.pred_original_sample.item(), abs=1e-15)


def test_ddim_eta(diffusion: GaussianDiffusion) -> None:
    sampler = diffusion.respace(10)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = 0.1 * x
    t = torch.tensor([5, 5])
    det = sampler.ddim_step(eps, x, t, eta=0.0)
    assert torch.equal(det.prev_sample, sampler.ddim_step(eps, x, t, eta=0.0).prev_sample)
    a = sampler.ddim_step(eps, x, t, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    b = sampler.ddim_step(eps, x, t, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(a, b) and not torch.allclose(a, det.prev_sample)
    # η = 1: σ_t² equals the posterior variance of the respaced chain (DDIM eq. 16 → DDPM)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ab, ab_prev = alpha_bar(500), alpha_bar(400)
    sigma = math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    assert sigma**2 == pytest.approx(float(sampler.posterior_variance[5]), rel=1e-9)
    x0 = det.pred_original_sample
    eps_c = sampler.predict_eps_from_xstart(x, t, x0)
    expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps_c + sigma * z
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="eta"):
        sampler.ddim_step(eps, x, t, eta=-0.5)


@pytest.mark.parametrize("case", range(4))
def test_ddim_matches_fixture_steps(
    diffusion: GaussianDiffusion, ddim_cases: dict[str, np.ndarray], case: int
) -> None:
    """Replay the fixture's recorded steps without the model: q_sample start and step-to-step DDIM updates.

    Given the recorded clipped x̂_0 of a step, the ε that the original used afterwards is fully determined
    (step 4 of the README), so a consecutive pair (x before, x̂_0) must reproduce the recorded x after.
    """
    d = {k[len(f"d{case}_"):]: v for k, v in ddim_cases.items() if k.startswith(f"d{case}_")}
    sampler = diffusion.respace(int(d["num_inference_steps"]))
    start = start_index(int(d["num_inference_steps"]), float(d["strength"]))
    assert start == int(d["t_start_respaced"])
    assert int(sampler.timestep_map[start]) == int(d["t_start_orig"])
    np.testing.assert_array_equal(sampler.timestep_map[start::-1], d["model_timesteps_orig"])
    noise = torch.from_numpy(d["noise"])[None]
    if float(d["strength"]) < 1:
        x0 = torch.from_numpy(d["image"].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        x_start = sampler.q_sample(x0, torch.tensor([start]), noise)
    else:
        x_start = noise
    np.testing.assert_array_equal(x_start[0].numpy(), d["x_start"])

    states = {0: x_start}
    for k, x_after in zip(d["record_steps"].tolist(), d["x_after"]):
        states[k] = torch.from_numpy(x_after)[None]
    checked = 0
    for j, k in enumerate(d["record_steps"].tolist()):
        if k - 1 not in states:
            continue
        i = start - (k - 1)  # respaced index of the model call of step k
        x = states[k - 1]
        pred = torch.from_numpy(d["pred_xstart"][j])[None]
        eps = sampler.predict_eps_from_xstart(x, torch.tensor([i]), pred)
        out = sampler.ddim_step(eps, x, torch.tensor([i]))
        torch.testing.assert_close(out.pred_original_sample, pred, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.prev_sample, states[k], rtol=0, atol=2e-5)
        checked += 1
    assert checked >= 2
    np.testing.assert_array_equal(d["x_after"][-1], d["final"])


def test_diffusion_imports_no_model() -> None:
    import subprocess

    code = (
        "import sys, diffaug.diffusion; "
        "bad = [m for m in sys.modules if m.startswith(('diffaug.models', 'diffaug.pipelines'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
