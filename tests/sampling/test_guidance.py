"""Guidance (sd35/sampling/guidance.py): CFG, Skip Layer Guidance and the flow denoiser on a tiny MMDiT-X,
against forwards combined by hand and diffusers' StableDiffusion3Pipeline loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd35.errors import SD35Error
from sd35.models.mmditx import MMDiTX
from sd35.presets import SD35_MEDIUM
from sd35.sampling import (
    GuidedDenoiser,
    SkipLayerGuidance,
    flow_denoiser,
    get_sampler,
    img2img_sigmas,
    reference_sigmas,
    sample_euler,
)
from tests.helpers import rel_err
from tests.sampling.sampling_helpers import seeded_randn, text_cond

SLG = SkipLayerGuidance(layers=(1, 2)).filled(
    SD35_MEDIUM.slg
)  # the reference's scale/start/end; blocks that exist here


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
    """rel_err(actual, expected) < tol (batched and separate forwards round differently)."""
    err = rel_err(actual, expected)
    assert err < tol, err


def test_flow_denoiser_is_x_minus_v_sigma(mmditx):
    x, sigma = seeded_randn((2, 16, 8, 8)), torch.tensor([0.9, 0.3])
    ctx, y = text_cond(mmditx, batch=2)
    v = mmditx(x, sigma * 1000, y, ctx)
    torch.testing.assert_close(flow_denoiser(mmditx)(x, sigma, y, ctx), x - v * sigma.view(2, 1, 1, 1))


@pytest.mark.parametrize("cond_batch", [1, 2])
def test_cfg_equals_two_forwards_combined_by_hand(mmditx, cond_batch):
    cond, uncond = text_cond(mmditx, cond_batch, seed=1), text_cond(mmditx, cond_batch, seed=2)
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, cond, uncond, cfg=5.0, slg=None, sigmas=sigmas)
    x = seeded_randn((2, 16, 8, 8))
    sigma = sigmas[20].expand(2)
    with ForwardLog(mmditx) as log:
        d = guided(x, sigma)
    assert log.calls == [(4, ())]  # one forward of [cond ; uncond]
    d_cond, d_uncond = _by_hand(mmditx, x, sigma, cond), _by_hand(mmditx, x, sigma, uncond)
    _assert_rel(d, d_uncond + (d_cond - d_uncond) * 5.0)


def test_cfg_with_contexts_of_different_lengths(mmditx):
    cond, uncond = text_cond(mmditx, length=9, seed=1), text_cond(mmditx, length=7, seed=2)
    sigmas = reference_sigmas(10)
    x, sigma = seeded_randn((1, 16, 8, 8)), sigmas[3].reshape(1)
    with ForwardLog(mmditx) as log:
        d = GuidedDenoiser(mmditx, cond, uncond, cfg=4.0, slg=None, sigmas=sigmas)(x, sigma)
    assert log.calls == [(1, ()), (1, ())]
    d_cond, d_uncond = _by_hand(mmditx, x, sigma, cond), _by_hand(mmditx, x, sigma, uncond)
    _assert_rel(d, d_uncond + (d_cond - d_uncond) * 4.0)


@pytest.mark.parametrize("uncond_given", [False, True])
def test_cfg_one_is_a_single_cond_forward(mmditx, uncond_given):
    cond = text_cond(mmditx, seed=1)
    uncond = text_cond(mmditx, seed=2) if uncond_given else None
    sigmas = reference_sigmas(50)
    x, sigma = seeded_randn((2, 16, 8, 8)), sigmas[30].expand(2)
    with ForwardLog(mmditx) as log:
        d = GuidedDenoiser(mmditx, cond, uncond, cfg=1.0, slg=SLG, sigmas=sigmas)(x, sigma)
    assert log.calls == [(2, ())]
    _assert_rel(d, _by_hand(mmditx, x, sigma, cond))


def test_slg_result_by_hand(mmditx):
    cond, uncond = text_cond(mmditx, seed=1), text_cond(mmditx, seed=2)
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, cond, uncond, cfg=5.0, slg=SLG, sigmas=sigmas)
    x = seeded_randn((2, 16, 8, 8))
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
    guided = GuidedDenoiser(mmditx, text_cond(mmditx, seed=1), text_cond(mmditx, seed=2), 5.0, SLG, sigmas)
    with ForwardLog(mmditx) as log:
        get_sampler(name)(guided, seeded_randn((1, 16, 8, 8)), sigmas)
    assert len(log.calls) == 50 + 9
    assert log.skip_steps() == list(range(1, 10))
    assert all(c == (1, (1, 2)) for c in log.calls if c[1])


def test_slg_window_counts_the_full_schedule_for_img2img(mmditx):
    sigmas = reference_sigmas(50)
    guided = GuidedDenoiser(mmditx, text_cond(mmditx, seed=1), text_cond(mmditx, seed=2), 5.0, SLG, sigmas)
    tail = img2img_sigmas(sigmas, 0.9)  # int(50 * 0.1) == 4: starts at full-schedule step 4
    assert torch.equal(tail, sigmas[4:])
    with ForwardLog(mmditx) as log:
        sample_euler(guided, seeded_randn((1, 16, 8, 8)), tail)
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
    cond = text_cond(mmditx)
    with pytest.raises(SD35Error, match="joint blocks 0..3"):
        GuidedDenoiser(mmditx, cond, cond, 5.0, SD35_MEDIUM.slg, sigmas)  # 7, 8, 9 at depth 4
    with pytest.raises(SD35Error, match="uncond"):
        GuidedDenoiser(mmditx, cond, None, 5.0, None, sigmas)
    with pytest.raises(TypeError, match="SkipLayerGuidance"):
        GuidedDenoiser(mmditx, cond, cond, 5.0, sigmas, SLG)  # slg and sigmas swapped


def test_euler_cfg_slg_trajectory_equals_diffusers_v_space_loop(mmditx):
    """Diffusers' StableDiffusion3Pipeline: v-space guidance, batch [uncond, cond], scheduler Euler step."""
    steps, cfg = 50, 4.5
    cond, uncond = text_cond(mmditx, seed=1), text_cond(mmditx, seed=2)
    x0 = seeded_randn((1, 16, 8, 8), seed=5)

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


@pytest.mark.parametrize(
    "until, sigma, uses",
    [
        (None, 0.5, "text"),
        (0.0, 1.0, "zero"),  # ConditioningZeroOut alone: zeros even at sigma 1
        (0.1, 0.99, "text"),  # before 10% of the model's time (sigma above the edge)
        (0.1, 0.5, "zero"),
        (0.1, "edge", "both"),  # on the edge ComfyUI averages the two conditionings
    ],
)
def test_negative_until_zeroes_the_negative_by_sigma(mmditx, until, sigma, uses):
    """ComfyUI's SD3 example negative: the text over [0, p] of the model's time, its ConditioningZeroOut
    over [p, 1] (``comfy/samplers.py`` ``get_area_and_mult``), the edge by ``percent_to_sigma``."""
    cond, uncond = text_cond(mmditx, seed=1), text_cond(mmditx, seed=2)
    zero = tuple(torch.zeros_like(t) for t in uncond)
    if sigma == "edge":
        sigma = 3.0 * 0.9 / (1 + 2.0 * 0.9)  # percent_to_sigma(0.1) at shift 3
    sigmas = reference_sigmas(10)
    x, s = seeded_randn((1, 16, 8, 8)), torch.tensor([sigma])
    guided = GuidedDenoiser(
        mmditx, cond, uncond, cfg=4.0, slg=None, sigmas=sigmas, shift=3.0, negative_until=until
    )
    d_cond = _by_hand(mmditx, x, s, cond)
    d_text, d_zero = _by_hand(mmditx, x, s, uncond), _by_hand(mmditx, x, s, zero)
    d_uncond = {"text": d_text, "zero": d_zero, "both": (d_text + d_zero) / 2}[uses]
    _assert_rel(guided(x, s), d_uncond + (d_cond - d_uncond) * 4.0)
