"""Adaptive projected guidance (APG) in GuidedDenoiser: the formula on hand-made tensors and on a tiny MMDiT-X."""

from __future__ import annotations

import pytest
import torch

from sd35.errors import SD35Error
from sd35.sampling import APG, GuidedDenoiser, SkipLayerGuidance, reference_sigmas
from sd35.sampling.guidance import apg_project
from tests.helpers import rel_err
from tests.sampling.sampling_helpers import seeded_randn, text_cond

SIGMAS = reference_sigmas(10)


def _guided(model, apg, cfg=4.0, slg=None):
    return GuidedDenoiser(
        model, text_cond(model, seed=1), text_cond(model, seed=2), cfg, slg, SIGMAS, apg=apg
    )


def _dot(a, b):
    return (a.double() * b.double()).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------- the config


def test_apg_defaults_and_validation():
    apg = APG()
    assert (apg.eta, apg.norm_threshold, apg.momentum) == (0.0, 0.0, 0.0)
    assert APG(eta=1, norm_threshold=5, momentum=-0.5) == APG(1.0, 5.0, -0.5)
    for bad in (
        {"eta": float("nan")},
        {"eta": "1"},
        {"norm_threshold": -1.0},
        {"norm_threshold": float("inf")},
        {"momentum": 1.5},
        {"momentum": -1.01},
        {"momentum": True},
    ):
        with pytest.raises(SD35Error, match="APG"):
            APG(**bad)
    with pytest.raises(AttributeError):
        apg.eta = 1.0  # frozen


def test_apg_is_keyword_only_and_typed(mmditx):
    cond, uncond = text_cond(mmditx, seed=1), text_cond(mmditx, seed=2)
    with pytest.raises(TypeError):
        GuidedDenoiser(mmditx, cond, uncond, 4.0, None, SIGMAS, APG())
    with pytest.raises(TypeError, match="apg"):
        GuidedDenoiser(mmditx, cond, uncond, 4.0, None, SIGMAS, apg={"eta": 0})
    assert GuidedDenoiser(mmditx, cond, uncond, 4.0, None, SIGMAS).apg is None


# --------------------------------------------------------------------------------------------- the formula


def test_projection_on_hand_made_tensors():
    # Image 0: v = (3, 4) along (2, 0) -> (3, 0) + (0, 4). Image 1: v = (1, 1) along (0, -5) -> (0, 1) + (1, 0).
    v = torch.tensor([[3.0, 4.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    d = torch.tensor([[2.0, 0.0], [0.0, -5.0]]).reshape(2, 1, 1, 2)
    par, orth = apg_project(v, d)
    torch.testing.assert_close(par, torch.tensor([[3.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2))
    torch.testing.assert_close(orth, torch.tensor([[0.0, 4.0], [1.0, 0.0]]).reshape(2, 1, 1, 2))
    assert par.dtype == torch.float32
    # Random (B, C, H, W): per image, par is a multiple of d, orth is orthogonal to d, and they sum to v.
    v, d = seeded_randn((3, 4, 5, 6), seed=1), seeded_randn((3, 4, 5, 6), seed=2)
    par, orth = apg_project(v, d)
    torch.testing.assert_close(par + orth, v)
    assert _dot(orth, d).abs().max() < 1e-4
    coef = _dot(v, d) / _dot(d, d)
    torch.testing.assert_close(par, (coef.view(-1, 1, 1, 1) * d.double()).float(), rtol=1e-5, atol=1e-6)
    # A zero direction has no parallel part.
    par, orth = apg_project(v, torch.zeros_like(v))
    assert torch.equal(par, torch.zeros_like(v)) and torch.equal(orth, v)


def test_eta_one_without_threshold_or_momentum_is_cfg(mmditx):
    d_cond, d_uncond = seeded_randn((2, 16, 8, 8), seed=1), seeded_randn((2, 16, 8, 8), seed=2)
    sigma = SIGMAS[3].expand(2)
    guided = _guided(mmditx, APG(eta=1.0), cfg=4.0)
    expected = d_uncond + (d_cond - d_uncond) * 4.0
    torch.testing.assert_close(guided.apg_combine(d_cond, d_uncond, sigma), expected, rtol=1e-5, atol=1e-5)
    # And through the model: the same result as the plain CFG denoiser.
    x = seeded_randn((2, 16, 8, 8), seed=3)
    torch.testing.assert_close(guided(x, sigma), _guided(mmditx, None)(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, -1.0])
def test_eta_weights_the_parallel_part(mmditx, eta):
    d_cond, d_uncond = seeded_randn((2, 16, 4, 4), seed=1), seeded_randn((2, 16, 4, 4), seed=2)
    out = _guided(mmditx, APG(eta=eta), cfg=5.0).apg_combine(d_cond, d_uncond, SIGMAS[2].expand(2))
    par, orth = apg_project(d_cond - d_uncond, d_cond)
    torch.testing.assert_close(out, d_cond + 4.0 * (orth + eta * par))
    update = (out - d_cond) / 4.0
    if eta == 0:
        assert _dot(update, d_cond).abs().max() < 1e-3  # no component along D_cond is left
    # The orthogonal part is untouched by eta.
    torch.testing.assert_close(apg_project(update, d_cond)[1], orth, rtol=1e-4, atol=1e-5)


def test_momentum_accumulates_and_resets(mmditx):
    shape = (1, 16, 4, 4)
    conds = [seeded_randn(shape, seed=10 + i) for i in range(4)]
    unconds = [seeded_randn(shape, seed=20 + i) for i in range(4)]
    guided = _guided(mmditx, APG(eta=1.0, momentum=0.5), cfg=3.0)
    running = torch.zeros(shape)
    for i in range(3):  # decreasing sigmas: one generation
        out = guided.apg_combine(conds[i], unconds[i], SIGMAS[i].reshape(1))
        running = (conds[i] - unconds[i]) + 0.5 * running
        torch.testing.assert_close(out, conds[i] + 2.0 * running, rtol=1e-5, atol=1e-5)
    # A higher sigma starts a new generation: the running average starts again from this call.
    out = guided.apg_combine(conds[3], unconds[3], SIGMAS[0].reshape(1))
    torch.testing.assert_close(out, conds[3] + 2.0 * (conds[3] - unconds[3]), rtol=1e-5, atol=1e-5)
    # A new denoiser (a new generation) has no state; reset() clears it too.
    fresh = _guided(mmditx, APG(eta=1.0, momentum=0.5), cfg=3.0)
    out = fresh.apg_combine(conds[1], unconds[1], SIGMAS[5].reshape(1))
    torch.testing.assert_close(out, conds[1] + 2.0 * (conds[1] - unconds[1]), rtol=1e-5, atol=1e-5)
    guided.reset()
    out = guided.apg_combine(conds[2], unconds[2], SIGMAS[6].reshape(1))
    torch.testing.assert_close(out, conds[2] + 2.0 * (conds[2] - unconds[2]), rtol=1e-5, atol=1e-5)


def test_negative_momentum(mmditx):
    shape = (1, 16, 4, 4)
    g1, g2 = seeded_randn(shape, seed=1), seeded_randn(shape, seed=2)
    zero = torch.zeros(shape)
    guided = _guided(mmditx, APG(eta=1.0, momentum=-0.5), cfg=2.0)
    guided.apg_combine(g1, zero, SIGMAS[1].reshape(1))
    out = guided.apg_combine(g2, zero, SIGMAS[2].reshape(1))
    torch.testing.assert_close(out, g2 + (g2 - 0.5 * g1), rtol=1e-5, atol=1e-5)


def test_norm_threshold_caps_the_guidance_norm_per_image(mmditx):
    d_uncond = torch.zeros(2, 16, 4, 4)
    diff = seeded_randn((2, 16, 4, 4), seed=5)
    diff = diff / diff.flatten(1).norm(dim=1).view(2, 1, 1, 1) * torch.tensor([10.0, 1.0]).view(2, 1, 1, 1)
    d_cond = d_uncond + diff
    out = _guided(mmditx, APG(eta=1.0, norm_threshold=2.0), cfg=6.0).apg_combine(d_cond, d_uncond, SIGMAS[1])
    update = (out - d_cond) / 5.0
    norms = update.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([2.0, 1.0]), rtol=1e-5, atol=1e-6)  # capped / left alone
    torch.testing.assert_close(update[0], diff[0] * 0.2, rtol=1e-5, atol=1e-6)  # same direction, rescaled
    torch.testing.assert_close(update[1], diff[1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- a real model


def test_apg_on_a_tiny_mmditx(mmditx):
    x = seeded_randn((2, 16, 8, 8), seed=7)
    apg = APG(eta=0.0, norm_threshold=5.0, momentum=-0.5)
    guided, plain = _guided(mmditx, apg, cfg=5.0), _guided(mmditx, None, cfg=5.0)
    # A few Euler steps with both denoisers: APG runs, stays finite and differs from CFG.
    xa, xc = x.clone(), x.clone()
    for i in range(4):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        da, dc = guided(xa, s.expand(2)), plain(xc, s.expand(2))
        assert torch.isfinite(da).all()
        xa = xa + (xa - da) / s * (s_next - s)
        xc = xc + (xc - dc) / s * (s_next - s)
    assert guided._apg_running is not None  # internal state, no public reader: the momentum buffer was filled
    assert (xa - xc).abs().max() > 1e-3
    # By hand for one call: D_cond and D_uncond from the plain denoiser's parts.
    sigma = SIGMAS[5].expand(2)
    fresh = _guided(mmditx, APG(eta=0.3), cfg=5.0)
    cond_only = GuidedDenoiser(mmditx, text_cond(mmditx, seed=1), None, 1.0, None, SIGMAS)
    uncond_only = GuidedDenoiser(mmditx, text_cond(mmditx, seed=2), None, 1.0, None, SIGMAS)
    d_cond, d_uncond = cond_only(x, sigma), uncond_only(x, sigma)
    par, orth = apg_project(d_cond - d_uncond, d_cond)
    expected = d_cond + 4.0 * (orth + 0.3 * par)
    rel = rel_err(fresh(x, sigma), expected)
    assert rel < 1e-5, rel


def test_slg_is_added_after_apg(mmditx):
    slg = SkipLayerGuidance(layers=(1, 2), scale=2.5, start=0.0, end=1.0)  # active on steps 1..9 of 10
    x, sigma = seeded_randn((1, 16, 8, 8), seed=9), SIGMAS[3].reshape(1)
    apg = APG(eta=0.0, norm_threshold=3.0)
    with_slg = _guided(mmditx, apg, slg=slg)(x, sigma)
    without = _guided(mmditx, apg)(x, sigma)
    slg_term = _guided(mmditx, None, slg=slg)(x, sigma) - _guided(mmditx, None)(x, sigma)
    torch.testing.assert_close(with_slg - without, slg_term, rtol=1e-4, atol=1e-5)


def test_apg_with_cfg_one_is_the_cond_prediction(mmditx):
    x, sigma = seeded_randn((1, 16, 8, 8), seed=11), SIGMAS[4].reshape(1)
    cond = text_cond(mmditx, seed=1)
    with_apg = GuidedDenoiser(
        mmditx, cond, None, 1.0, None, SIGMAS, apg=APG(norm_threshold=1.0, momentum=0.5)
    )
    torch.testing.assert_close(
        with_apg(x, sigma), GuidedDenoiser(mmditx, cond, None, 1.0, None, SIGMAS)(x, sigma)
    )
