"""SemanticSynthesisPipeline on the converted SDM/DiffMix fixture model.

Parity: every trajectory of ``ddim_cases.npz`` (run by the original DiffMix code) is reproduced with the fixture's
noise. The other tests run a few steps on 16×16 crops of the fixture tiles to stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffaug.diffusion import GaussianDiffusion
from diffaug.errors import InvalidInputError
from diffaug.models import SemanticUNet, convert_sdm_checkpoint
from diffaug.pipelines import SemanticSynthesisPipeline


@pytest.fixture(scope="module")
def model_dir(sdm_fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdm_fixture_model") / "model"
    return convert_sdm_checkpoint(sdm_fixture_dir / "state_dict.pt", sdm_fixture_dir / "config.json", out)


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> SemanticSynthesisPipeline:
    return SemanticSynthesisPipeline.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def cases(sdm_fixture_dir: Path) -> list[dict[str, Any]]:
    with np.load(sdm_fixture_dir / "ddim_cases.npz") as z:
        return [
            {k[len(f"d{i}_"):]: z[k] for k in z.files if k.startswith(f"d{i}_")} for i in range(len(z["names"]))
        ]


S = 16  # side of the crops of the fast tests


def crop(case: dict[str, Any], size: int = S) -> dict[str, np.ndarray]:
    """The size×size window (on a grid of stride size/2) of a fixture tile with the most nucleus pixels."""
    types = case["type_map"]
    starts = range(0, types.shape[0] - size + 1, size // 2)
    r, c = max(((r, c) for r in starts for c in starts), key=lambda rc: (types[rc[0] : rc[0] + size, rc[1] : rc[1] + size] > 0).sum())
    return {k: np.ascontiguousarray(case[k][r : r + size, c : c + size]) for k in ("image", "inst_map", "type_map")}


class Recorder:
    """A step callback keeping every (t, x, pred_x0)."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, step_index: int, t: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        self.steps[step_index] = (t, x.clone(), pred_x0.clone())

    @property
    def final(self) -> torch.Tensor:
        return self.steps[max(self.steps)][1]


def run_case(pipe: SemanticSynthesisPipeline, d: dict[str, Any], fast: bool) -> tuple[np.ndarray, Recorder]:
    rec = Recorder()
    out = pipe(
        image=d["image"],
        inst_map=d["inst_map"],
        type_map=d["type_map"],
        strength=float(d["strength"]),
        num_inference_steps=int(d["num_inference_steps"]),
        guidance_scale=float(d["guidance_scale"]),
        noise=torch.from_numpy(d["noise"])[None],
        fast=fast,
        callback=rec,
    )
    return out.images[0], rec


def assert_parity(d: dict[str, Any], image: np.ndarray, rec: Recorder) -> None:
    assert image.dtype == np.uint8 and image.shape == d["final_uint8"].shape
    diff = np.abs(image.astype(np.int16) - d["final_uint8"].astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())
    assert sorted(rec.steps) == list(range(1, int(d["n_model_steps"]) + 1))
    assert [rec.steps[k][0] for k in sorted(rec.steps)] == d["model_timesteps_orig"].tolist()
    for j, k in enumerate(d["record_steps"].tolist()):
        t, x, pred = rec.steps[k]
        assert t == int(d["record_t_orig"][j])
        np.testing.assert_allclose(x[0].numpy(), d["x_after"][j], rtol=0, atol=1e-3)
        np.testing.assert_allclose(pred[0].numpy(), d["pred_xstart"][j], rtol=0, atol=1e-3)
    np.testing.assert_allclose(rec.final[0].numpy(), d["final"], rtol=0, atol=1e-3)  # float x before quantising


def test_noised_start_matches_the_reference(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    """x_start = sqrt(a_t) x0 + sqrt(1 - a_t) noise at the respaced start index, for every partial-noise case."""
    for d in cases:
        if float(d["strength"]) >= 1.0:
            continue
        sampler = pipe._respace(int(d["num_inference_steps"]))
        x0 = torch.from_numpy(d["image"].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        t = torch.full((1,), int(d["t_start_respaced"]), dtype=torch.int64)
        x_start = sampler.q_sample(x0, t, torch.from_numpy(d["noise"])[None])
        np.testing.assert_allclose(x_start[0].numpy(), d["x_start"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- parity
@pytest.mark.slow
@pytest.mark.parametrize("index", range(4))
def test_parity_with_diffmix(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]], index: int) -> None:
    """Partial noise p=0.55 with ddim100 at w = 1.5, 3.0, 1.0, and pure noise with ddim10: fast path."""
    d = cases[index]
    image, rec = run_case(pipe, d, fast=True)
    assert_parity(d, image, rec)


@pytest.mark.slow
def test_plain_path_parity(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    d = cases[2]  # pure noise, ddim10, w = 1.5: both guidance passes, the fewest steps
    image, rec = run_case(pipe, d, fast=False)
    assert_parity(d, image, rec)


def test_fast_path_equals_plain_path(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    crops = [crop(cases[0]), crop(cases[1])]
    kwargs: dict[str, Any] = dict(
        image=[c["image"] for c in crops],
        inst_map=[c["inst_map"] for c in crops],
        type_map=[c["type_map"] for c in crops],
        strength=0.3,
        num_inference_steps=10,
        guidance_scale=1.5,
    )
    plain, fast = Recorder(), Recorder()
    pipe(**kwargs, generator=torch.Generator().manual_seed(5), fast=False, callback=plain)
    pipe(**kwargs, generator=torch.Generator().manual_seed(5), fast=True, callback=fast)
    assert sorted(plain.steps) == sorted(fast.steps) == [1, 2, 3]
    for k in plain.steps:
        torch.testing.assert_close(fast.steps[k][1], plain.steps[k][1], rtol=0, atol=1e-4)
        torch.testing.assert_close(fast.steps[k][2], plain.steps[k][2], rtol=0, atol=1e-4)
    assert (plain.final[0] - plain.final[1]).abs().max() > 0.1  # two different samples, not one broadcast


# ------------------------------------------------------------------------------------------------------ guidance
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0])
def test_guidance_applied_for_every_w(
    pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]], w: float, fast: bool
) -> None:
    """The first x̂_0 equals DDIM's from ε_u + w·(ε_c − ε_u), computed here from two plain model calls."""
    c = crop(cases[3])
    noise = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    rec = Recorder()
    pipe(**c, strength=0.2, num_inference_steps=10, guidance_scale=w, noise=noise, fast=fast, callback=rec)

    sampler = pipe.diffusion.respace(10)
    i = torch.tensor([1])  # round(10·0.2) − 1: original t = 100
    x0 = torch.from_numpy(c["image"].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = sampler.q_sample(x0, i, noise)
    y = pipe.condition([c["inst_map"]], [c["type_map"]])
    with torch.inference_mode():
        eps_c = pipe.model(x, torch.tensor([100]), y)[:, :3]
        eps_u = pipe.model(x, torch.tensor([100]), torch.zeros_like(y))[:, :3]
    expected = sampler.ddim_step(eps_u + w * (eps_c - eps_u), x, i)
    t, x_after, pred = rec.steps[1]
    assert t == 100
    torch.testing.assert_close(pred, expected.pred_original_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_after, expected.prev_sample, rtol=0, atol=1e-5)
    if w != 1.0:  # the reference would have silently used ε_c here
        assert (sampler.ddim_step(eps_c, x, i).prev_sample - x_after).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- inputs and outputs
def test_batch_equals_single_samples(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    crops = [crop(cases[i]) for i in (0, 2)]
    noise = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    common: dict[str, Any] = dict(strength=0.2, num_inference_steps=10, guidance_scale=1.5)
    both = pipe(
        image=np.stack([c["image"] for c in crops]),  # a stacked (B, H, W, 3) array is a batch too
        inst_map=[c["inst_map"] for c in crops],
        type_map=[c["type_map"] for c in crops],
        noise=noise,
        **common,
    )
    assert len(both.images) == 2
    for k, c in enumerate(crops):
        single = pipe(**c, noise=noise[k : k + 1], **common)
        diff = np.abs(single.images[0].astype(int) - both.images[k].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_generator_and_noise_reproduce(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    c = crop(cases[1])
    common: dict[str, Any] = dict(strength=0.2, num_inference_steps=10, guidance_scale=1.5)
    a = pipe(**c, generator=torch.Generator().manual_seed(7), **common).images[0]
    b = pipe(**c, generator=torch.Generator().manual_seed(7), **common).images[0]
    other = pipe(**c, generator=torch.Generator().manual_seed(8), **common).images[0]
    explicit = pipe(**c, noise=torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(7)), **common)
    assert np.array_equal(a, b) and np.array_equal(a, explicit.images[0])
    assert not np.array_equal(a, other)
    assert np.abs(a.astype(int) - c["image"].astype(int)).mean() > 1  # the image was re-rendered
    # η > 0 draws step noise from the generator: reproducible, and different from η = 0
    e1 = pipe(**c, eta=1.0, generator=torch.Generator().manual_seed(7), **common).images[0]
    e2 = pipe(**c, eta=1.0, generator=torch.Generator().manual_seed(7), **common).images[0]
    assert np.array_equal(e1, e2) and not np.array_equal(e1, a)


def test_pure_noise_needs_no_image(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    c = crop(cases[2])
    noise = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(3))
    common: dict[str, Any] = dict(strength=1.0, num_inference_steps=2, guidance_scale=1.5, noise=noise)
    without = pipe(inst_map=c["inst_map"], type_map=c["type_map"], **common).images[0]
    with_image = pipe(**c, **common).images[0]
    ignored_float = pipe(image=np.zeros((5, 5), np.float32), inst_map=c["inst_map"], type_map=c["type_map"], **common)
    assert np.array_equal(without, with_image) and np.array_equal(without, ignored_float.images[0])


def test_quantisation_rounds_half_up(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    rec = Recorder()
    image = pipe(**crop(cases[0]), strength=0.2, num_inference_steps=10, callback=rec).images[0]
    s = (rec.final[0] + 1) / 2
    expected = (s * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(image, expected)
    assert not np.array_equal(image, (s * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def test_to_device_and_channels_last(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    c = crop(cases[1])
    common: dict[str, Any] = dict(strength=0.2, num_inference_steps=10, generator=None)
    noise = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(4))
    ref, cl = Recorder(), Recorder()
    pipe(**c, noise=noise, callback=ref, **common)
    assert pipe.to("cpu", channels_last=True) is pipe and pipe.device == torch.device("cpu")
    try:
        assert pipe.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        pipe(**c, noise=noise, callback=cl, **common)
    finally:
        pipe.to(channels_last=False)
    torch.testing.assert_close(cl.final, ref.final, rtol=0, atol=1e-5)


def test_model_mode_is_restored(pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]]) -> None:
    pipe.model.train()
    try:
        pipe(**crop(cases[0]), strength=0.1, num_inference_steps=10)
        assert pipe.model.training
    finally:
        pipe.model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model_dir: Path, cases: list[dict[str, Any]]) -> None:
    d = cases[2]
    cpu_image, cpu_rec = run_case(SemanticSynthesisPipeline.from_pretrained(str(model_dir)), d, fast=True)
    gpu = SemanticSynthesisPipeline.from_pretrained(str(model_dir)).to("cuda")
    image, rec = run_case(gpu, d, fast=True)
    assert rec.final.device.type == "cuda"
    assert np.abs(image.astype(int) - cpu_image.astype(int)).max() <= 2
    bf16 = gpu(
        image=d["image"], inst_map=d["inst_map"], type_map=d["type_map"], strength=1.0, num_inference_steps=10,
        noise=torch.from_numpy(d["noise"])[None], autocast_dtype=torch.bfloat16,
    )
    assert bf16.images[0].shape == (64, 64, 3)


def test_constructor_checks_diffusion(model_dir: Path) -> None:
    model = SemanticUNet.from_pretrained(str(model_dir))
    diffusion = GaussianDiffusion.from_config(model.config.diffusion)
    with pytest.raises(InvalidInputError, match="unrespaced"):
        SemanticSynthesisPipeline(model, diffusion.respace(10))


# ----------------------------------------------------------------------------------------------------- bad input
def _bad_inputs(c: dict[str, np.ndarray]) -> list[tuple[str, dict[str, Any], str]]:
    img, inst, typ = c["image"], c["inst_map"], c["type_map"]
    return [
        ("strength 0", dict(strength=0.0), r"strength must be in \(0, 1\]"),
        ("strength above 1", dict(strength=1.5), r"strength must be in \(0, 1\]"),
        ("no steps", dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        ("image size differs", dict(image=img[:8]), r"image\[0\] has shape \(8, 16, 3\)"),
        ("map sizes differ", dict(type_map=typ[:, :8]), r"type_map\[0\] has shape"),
        ("float image", dict(image=img.astype(np.float32) / 255), "before ToFloat/Normalize"),
        ("int64 image", dict(image=img.astype(np.int64)), "must be uint8"),
        ("unknown class", dict(type_map=np.where(inst > 0, 7, typ).astype(np.int32)), "model knows classes 0..4"),
        ("missing image", dict(image=None), "image is required when strength < 1"),
        ("odd size", dict(image=img[:15], inst_map=inst[:15], type_map=typ[:15]), "cannot take 15×16"),
        ("noise shape", dict(noise=torch.zeros(1, 3, 8, 8)), r"noise must have shape \(B, 3, H, W\)"),
        ("noise dtype", dict(noise=torch.zeros(1, 3, S, S, dtype=torch.float64)), "float32 torch tensor"),
        ("batch mismatch", dict(type_map=[typ, typ]), "type_map has 2 samples but inst_map has 1"),
        ("guidance nan", dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        ("negative eta", dict(eta=-1.0), "eta must be"),
        ("float maps", dict(inst_map=inst.astype(np.float32)), "integers"),
        ("tensor image", dict(image=torch.zeros(S, S, 3, dtype=torch.uint8)), "not a torch tensor"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_bad_input_is_rejected_before_any_work(
    pipe: SemanticSynthesisPipeline, cases: list[dict[str, Any]], index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = crop(cases[0])
    name, override, message = _bad_inputs(c)[index]

    def no_model_call(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{name}: the model ran before the input was rejected")

    monkeypatch.setattr(pipe.model, "encode", no_model_call)
    monkeypatch.setattr(pipe.model, "forward", no_model_call)
    kwargs: dict[str, Any] = {**c, "strength": 0.5, "num_inference_steps": 10, **override}
    with pytest.raises(InvalidInputError, match=message):
        pipe(**kwargs)
