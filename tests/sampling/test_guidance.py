"""Schedules, samplers and guidance against the reference's numbers, k-diffusion, diffusers and closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd35.errors import SD35Error
from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX
from sd35.models.random_init import random_state_dict
from sd35.presets import SD35_MEDIUM
from sd35.sampling import (
    SAMPLERS,
    GuidedDenoiser,
    SkipLayerGuidance,
    flow_denoiser,
    flow_sigma,
    get_sampler,
    img2img_sigmas,
    reference_sigmas,
    sample_dpmpp_2m,
    sample_euler,
)
from tests.sampling.kdiffusion_ref import load_sampling

# --------------------------------------------------------------------------------------------- schedules


def test_reference_sigmas_match_reference_md():
    s = reference_sigmas(50, 3.0)
    assert s.dtype == torch.float32 and s.shape == (51,)
    head = torch.tensor([1.0, 0.993124, 0.986057, 0.978790, 0.971314, 0.963621])
    tail = torch.tensor([0.216593, 0.170296, 0.120533, 0.066900, 0.008929, 0.0])
    torch.testing.assert_close(s[:6], head, atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-6:], tail, atol=1e-6, rtol=0)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # The double shift: sigma_min = flow_sigma(1/1000) is shifted again (REFERENCE.md 2.2).
    assert float(s[-2]) == pytest.approx(flow_sigma(flow_sigma(0.001, 3.0), 3.0), rel=1e-6)


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 28, 40, 50, 100])
def test_reference_sigmas_match_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(reference_sigmas(steps, shift), scheduler.sigmas, rtol=1e-6, atol=1e-7)


def test_schedule_errors():
    for steps in (0, -3, 2.5, True):
        with pytest.raises(SD35Error, match="steps"):
            reference_sigmas(steps)
    for shift in (0.0, -1.0):
        with pytest.raises(SD35Error, match="shift"):
            reference_sigmas(10, shift)


def test_img2img_sigmas_cut_like_the_reference():
    s = reference_sigmas(50)
    assert torch.equal(img2img_sigmas(s, 1.0), s)
    # int(50 * (1 - 0.8)) == 9 in float arithmetic, as in the reference (not 10).
    assert torch.equal(img2img_sigmas(s, 0.8), s[9:])
    assert torch.equal(img2img_sigmas(s, 0.5), s[25:])
    assert len(img2img_sigmas(s, 0.01)) == 2
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(SD35Error, match="denoise"):
            img2img_sigmas(s, bad)


# --------------------------------------------------------------------------------------------- samplers


class GaussianData:
    """Data ~ N(mu, s^2) per channel, flow ``x = (1 - sigma) x0 + sigma n``: everything in closed form.

    With ``a = 1 - sigma``, x ~ N(a mu, a^2 s^2 + sigma^2) and Cov(x0, x) = a s^2, so the exact denoiser
    is ``E[x0 | x] = mu + a s^2 / (a^2 s^2 + sigma^2) (x - a mu)``. The probability-flow ODE is then
    solved by the monotone Gaussian transport ``x(sigma) = a mu + std(sigma) n`` from ``x(1) = n``.
    Both samplers end with a jump to ``D(x, sigma_last)``, so the exact sampler output is
    ``mu + a_L s^2 / std_L * n`` with ``a_L, std_L`` at the last non-zero sigma (which tends to
    ``mu + s n`` as sigma_last -> 0).
    """

    def __init__(self):
        self.mu = torch.tensor([0.3, -0.5, 1.0, 0.0]).view(1, 4, 1, 1)
        self.s = torch.tensor([0.5, 1.0, 0.2, 1.5]).view(1, 4, 1, 1)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.view(-1, 1, 1, 1)
        a = 1 - sigma
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + sigma**2) * (x - a * self.mu)

    def exact_output(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[-2].double()
        a = 1 - sigma
        s = self.s.double()
        std = (a**2 * s**2 + sigma**2).sqrt()
        return (self.mu.double() + a * s**2 / std * noise.double()).float()


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _trace(sampler, model, x, sigmas):
    xs, ds = [], []
    out = sampler(model, x, sigmas, callback=lambda i, n, x, d: (xs.append(x), ds.append(d)))
    return out, xs, ds


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [50, 7])
def test_samplers_equal_k_diffusion_step_by_step(name, steps):
    kd = load_sampling()
    data = GaussianData()
    sigmas = reference_sigmas(steps)
    x = _noise((3, 4, 5, 6))
    ours, xs, ds = _trace(get_sampler(name), data.denoiser, x, sigmas)

    kd_x, kd_d = [], []
    kd_sampler = {"euler": kd.sample_euler, "dpmpp_2m": kd.sample_dpmpp_2m}[name]
    kd_out = kd_sampler(
        data.denoiser,
        x,
        sigmas,
        callback=lambda e: (kd_x.append(e["x"]), kd_d.append(e["denoised"])),
        disable=True,
    )
    # k-diffusion reports x *before* each step; ours reports it after.
    assert len(xs) == len(kd_x) == steps
    for i in range(steps):
        torch.testing.assert_close(ds[i], kd_d[i], atol=1e-6, rtol=0)
        expected = kd_x[i + 1] if i + 1 < steps else kd_out
        torch.testing.assert_close(xs[i], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, kd_out, atol=1e-6, rtol=0)


def test_samplers_converge_to_the_data_distribution_with_their_orders():
    data = GaussianData()
    noise = _noise((2048, 4, 2, 2))
    errors = {"euler": [], "dpmpp_2m": []}
    for steps in (40, 80, 160):
        sigmas = reference_sigmas(steps)
        target = data.exact_output(noise, sigmas)
        for name in errors:
            out = get_sampler(name)(data.denoiser, noise, sigmas)
            errors[name].append((out - target).pow(2).mean().sqrt().item())
            if steps == 160:  # right mean and std per channel over 8192 points
                torch.testing.assert_close(out.mean((0, 2, 3)), data.mu.flatten(), atol=0.05, rtol=0)
                torch.testing.assert_close(out.std((0, 2, 3)), data.s.flatten(), rtol=0.05, atol=0)
    euler, dpm = errors["euler"], errors["dpmpp_2m"]
    # Doubling the steps halves Euler's error (first order) and quarters DPM++(2M)'s (second order).
    for k in range(2):
        assert 1.8 < euler[k] / euler[k + 1] < 2.2, euler
        assert dpm[k] / dpm[k + 1] > 3.5, dpm
    assert dpm[-1] < euler[-1] / 3
    assert euler[-1] < 0.02 and dpm[-1] < 0.005


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_samplers_run_in_float32(name):
    data = GaussianData()
    seen = []

    def model(x, sigma):
        seen.append((x.dtype, sigma.dtype, sigma.shape))
        return data.denoiser(x, sigma).half()

    out = get_sampler(name)(model, _noise((2, 4, 3, 3)).half(), reference_sigmas(4).double())
    assert out.dtype == torch.float32
    assert all(s == (torch.float32, torch.float32, (2,)) for s in seen)


def test_sampler_registry():
    assert SAMPLERS["euler"] is sample_euler and SAMPLERS["dpmpp_2m"] is sample_dpmpp_2m
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(SD35Error, match="euler, euler_ancestral") as err:
        get_sampler("nope")
    assert "'nope'" in str(err.value)


# --------------------------------------------------------------------------------------------- guidance

DEPTH = 4
SLG = SkipLayerGuidance(layers=(1, 2)).filled(
    SD35_MEDIUM.slg
)  # the reference's scale/start/end; blocks that exist here


@pytest.fixture(scope="module")
def mmditx() -> MMDiTX:
    cfg = tiny_configs(depth=DEPTH).mmditx
    return MMDiTX.from_state_dict(random_state_dict(MMDiTX(cfg), seed=3)).eval()


def _cond(model: MMDiTX, batch: int = 1, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return torch.randn(batch, length, cfg.context_dim, generator=g), torch.randn(
        batch, cfg.pooled_dim, generator=g
    )


class ForwardLog:
    """Records (batch, skip_layers) of every MMDiT-X forward through a forward pre-hook."""

    def __init__(self, model: MMDiTX):
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        skip = kwargs.get("skip_layers", args[4] if len(args) > 4 else ())
        self.calls.append((args[0].shape[0], tuple(skip)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def skip_steps(self) -> list[int]:
        """0-based step of each skip pass, where a step starts at every forward without skipped layers."""
        step, out = -1, []
        for _, skip in self.calls:
            if skip:
                out.append(step)
            else:
                step += 1
        return out


def _by_hand(model, x, sigma, cond, skip=()):
    """D = x - v * sigma from a plain forward, batch of cond rows repeated to x's batch."""
    ctx, y = (t.expand(x.shape[0], *t.shape[1:]) for t in cond)
    v = model(x, sigma * 1000, y, ctx, skip_layers=skip)
    return x - v * sigma.view(-1, 1, 1, 1)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """max |actual - expected| / max |expected| < tol (batched and separate forwards round differently)."""
    rel = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert rel < tol, rel


def test_flow_denoiser_is_x_minus_v_sigma(mmditx):
    x, sigma = _noise((2, 16, 8, 8)), torch.tensor([0.9, 0.3])
    ctx, y = _cond(mmditx, batch=2)
    v = mmditx(x, sigma * 1000, y, ctx)
    torch.testing.assert_close(flow_denoiser(mmditx)(x, sigma, y, ctx), x - v * sigma.view(2, 1, 1, 1))


@pytest.mark.parametrize("cond_batch", [1, 2])
def test_cfg_equals_two_forwards_combined_by_hand(mmditx, cond_batch):
    cond, uncond = _cond(mmditx, cond_batch, seed=1), _cond(mmditx, cond_batch, seed=2)
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, cond, uncond, cfg=5.0, slg=None, sigmas=sigmas)
    x = _noise((2, 16, 8, 8))
    sigma = sigmas[20].expand(2)
    with ForwardLog(mmditx) as log:
        d = guided(x, sigma)
    assert log.calls == [(4, ())]  # one forward of [cond ; uncond]
    d_cond, d_uncond = _by_hand(mmditx, x, sigma, cond), _by_hand(mmditx, x, sigma, uncond)
    _assert_rel(d, d_uncond + (d_cond - d_uncond) * 5.0)


def test_cfg_with_contexts_of_different_lengths(mmditx):
    cond, uncond = _cond(mmditx, length=9, seed=1), _cond(mmditx, length=7, seed=2)
    sigmas = reference_sigmas(10)
    x, sigma = _noise((1, 16, 8, 8)), sigmas[3].reshape(1)
    with ForwardLog(mmditx) as log:
        d = GuidedDenoiser(mmditx, cond, uncond, cfg=4.0, slg=None, sigmas=sigmas)(x, sigma)
    assert log.calls == [(1, ()), (1, ())]
    d_cond, d_uncond = _by_hand(mmditx, x, sigma, cond), _by_hand(mmditx, x, sigma, uncond)
    _assert_rel(d, d_uncond + (d_cond - d_uncond) * 4.0)


@pytest.mark.parametrize("uncond_given", [False, True])
def test_cfg_one_is_a_single_cond_forward(mmditx, uncond_given):
    cond = _cond(mmditx, seed=1)
    uncond = _cond(mmditx, seed=2) if uncond_given else None
    sigmas = reference_sigmas(50)
    x, sigma = _noise((2, 16, 8, 8)), sigmas[30].expand(2)
    with ForwardLog(mmditx) as log:
        d = GuidedDenoiser(mmditx, cond, uncond, cfg=1.0, slg=SLG, sigmas=sigmas)(x, sigma)
    assert log.calls == [(2, ())]
    _assert_rel(d, _by_hand(mmditx, x, sigma, cond))


def test_slg_result_by_hand(mmditx):
    cond, uncond = _cond(mmditx, seed=1), _cond(mmditx, seed=2)
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, cond, uncond, cfg=5.0, slg=SLG, sigmas=sigmas)
    x = _noise((2, 16, 8, 8))
    for step, active in ((3, True), (10, False), (0, False)):
        sigma = sigmas[step].expand(2)
        with ForwardLog(mmditx) as log:
            d = guided(x, sigma)
        d_cond, d_uncond = _by_hand(mmditx, x, sigma, cond), _by_hand(mmditx, x, sigma, uncond)
        expected = d_uncond + (d_cond - d_uncond) * 5.0
        if active:
            assert log.calls == [(4, ()), (2, (1, 2))]  # the skip pass: cond rows only
            expected = expected + (d_cond - _by_hand(mmditx, x, sigma, cond, skip=(1, 2))) * SLG.scale
        else:
            assert log.calls == [(4, ())]
        _assert_rel(d, expected)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_slg_window_is_steps_1_to_9_of_50(mmditx, name):
    assert [i for i in range(50) if SD35_MEDIUM.slg.active(i, 50)] == list(range(1, 10))
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, _cond(mmditx, seed=1), _cond(mmditx, seed=2), 5.0, SLG, sigmas)
    with ForwardLog(mmditx) as log:
        get_sampler(name)(guided, _noise((1, 16, 8, 8)), sigmas)
    assert len(log.calls) == 50 + 9
    assert log.skip_steps() == list(range(1, 10))
    assert all(c == (1, (1, 2)) for c in log.calls if c[1])


def test_slg_window_counts_the_full_schedule_for_img2img(mmditx):
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, _cond(mmditx, seed=1), _cond(mmditx, seed=2), 5.0, SLG, sigmas)
    tail = img2img_sigmas(sigmas, 0.9)  # int(50 * 0.1) == 4: starts at full-schedule step 4
    assert torch.equal(tail, sigmas[4:])
    with ForwardLog(mmditx) as log:
        sample_euler(guided, _noise((1, 16, 8, 8)), tail)
    assert log.skip_steps() == list(range(0, 6))  # full-schedule steps 4..9
    # A sigma between two schedule entries (a multi-evaluation sampler) belongs to the step above it.
    assert guided.step_index(((sigmas[4] + sigmas[5]) / 2).reshape(1)) == 4
    assert guided.step_index(sigmas[5].reshape(1)) == 5
    assert guided.step_index(sigmas[50].reshape(1)) == 50


def test_bad_guidance_configs(mmditx):
    bad = [
        dict(layers=()),
        dict(layers=(-1,)),
        dict(layers=(1.5,)),
        dict(scale=-0.1),
        dict(scale=float("nan")),
        dict(start=0.2, end=0.2),
        dict(start=0.3, end=0.2),
        dict(start=-0.1),
        dict(end=1.5),
    ]
    for kwargs in bad:
        with pytest.raises(SD35Error, match="Skip Layer Guidance"):
            SkipLayerGuidance(**kwargs)
    assert SkipLayerGuidance(layers=[7, 8, 9]).layers == (7, 8, 9)
    assert not SkipLayerGuidance(scale=0.0).filled(SD35_MEDIUM.slg).active(5, 50)
    with pytest.raises(ValueError, match="incomplete"):
        SkipLayerGuidance(scale=1.0).active(5, 50)  # the model's values must be filled in first
    sigmas = reference_sigmas(10)
    cond = _cond(mmditx)
    with pytest.raises(SD35Error, match="joint blocks 0..3"):
        GuidedDenoiser(mmditx, cond, cond, 5.0, SD35_MEDIUM.slg, sigmas)  # 7, 8, 9 at depth 4
    with pytest.raises(SD35Error, match="uncond"):
        GuidedDenoiser(mmditx, cond, None, 5.0, None, sigmas)
    with pytest.raises(TypeError, match="SkipLayerGuidance"):
        GuidedDenoiser(mmditx, cond, cond, 5.0, sigmas, SLG)  # slg and sigmas swapped


def test_euler_cfg_slg_trajectory_equals_diffusers_v_space_loop(mmditx):
    """Diffusers' StableDiffusion3Pipeline: v-space guidance, batch [uncond, cond], scheduler Euler step."""
    steps, cfg = 50, 4.5
    cond, uncond = _cond(mmditx, seed=1), _cond(mmditx, seed=2)
    x0 = _noise((1, 16, 8, 8), seed=5)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    ctx, y = torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])
    latents = x0
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v_uncond, v_cond = mmditx(torch.cat([latents] * 2), t.expand(2), y, ctx).chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
            if steps * SLG.start < i < steps * SLG.end:
                v_skip = mmditx(latents, t.expand(1), cond[1], cond[0], skip_layers=SLG.layers)
                v = v + (v_cond - v_skip) * SLG.scale
            latents = scheduler.step(v, t, latents, return_dict=False)[0]

    sigmas = reference_sigmas(steps)
    ours = sample_euler(GuidedDenoiser(mmditx, cond, uncond, cfg, SLG, sigmas), x0, sigmas)
    _assert_rel(ours, latents)
