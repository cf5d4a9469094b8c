"""Schedules (sd35/sampling/schedules.py): ComfyUI's schedulers (``get_sigmas``) against their formulas, computed
here independently in float64, and the reference's schedule (``reference_sigmas``, ``img2img_sigmas``) against its
values and diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd35.errors import SD35Error
from sd35.sampling import (
    SCHEDULERS,
    discrete_flow_sigmas,
    flow_sigma,
    get_sigmas,
    img2img_sigmas,
    reference_sigmas,
)
from sd35.sampling.schedules import beta_ppf

STEPS = [1, 2, 10, 50]
SHIFTS = [1.0, 3.0]


def _flow(t: np.ndarray, shift: float) -> np.ndarray:
    return shift * t / (1 + (shift - 1) * t)


def _table(shift: float) -> np.ndarray:
    """ModelSamplingDiscreteFlow.sigmas in float64: sigma(t / 1000) for t = 1..1000."""
    return _flow(np.arange(1, 1001) / 1000.0, shift)


def _normal(n, shift, sgm=False):
    table = _table(shift)
    start, end = 1000 * table[-1], 1000 * table[0]
    ts = np.linspace(start, end, n + 1)[:-1] if sgm else np.linspace(start, end, n)
    return _flow(ts / 1000, shift)


def _karras(n, shift, rho=7.0):
    lo, hi = _table(shift)[0], _table(shift)[-1]
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(n, shift):
    lo, hi = _table(shift)[0], _table(shift)[-1]
    return np.exp(np.linspace(np.log(hi), np.log(lo), n))


def _kl_optimal(n, shift):
    lo, hi = _table(shift)[0], _table(shift)[-1]
    if n == 1:
        return np.array([hi])
    frac = np.arange(n) / (n - 1)
    return np.tan(frac * np.arctan(lo) + (1 - frac) * np.arctan(hi))


def _beta_indices(n, a=0.6, b=0.6):
    idx = np.rint(scipy.stats.beta.ppf(1 - np.arange(n) / n, a, b) * 999).astype(int)
    return idx[np.concatenate([[True], idx[1:] != idx[:-1]])]


def _beta(n, shift):
    return _table(shift)[_beta_indices(n)]


def _linear_quadratic(n, shift, tau=0.025):
    """1 - sigma rises linearly to tau over n // 2 steps, then along the quadratic that continues it with the
    same value and slope and reaches 1 at step n (solved here as a 3x3 system)."""
    if n == 1:
        return np.array([1.0])
    lin = n // 2
    a, b, c = np.linalg.solve(
        [[lin**2, lin, 1], [2 * lin, 1, 0], [n**2, n, 1]],
        [tau, tau / lin, 1.0],
    )
    i = np.arange(n)
    u = np.where(i < lin, i * tau / lin, a * i**2 + b * i + c)
    return (1 - u) * _table(shift)[-1]


def _simple(n, shift):
    """ComfyUI's simple: table entries 999 - floor(i * 1000 / n)."""
    return _table(shift)[[999 - int(i * 1000 / n) for i in range(n)]]


def _ddim_uniform(n, shift):
    """ComfyUI's ddim_uniform: table entries 1, 1 + k, ... (k = 1000 // n), reversed."""
    return _table(shift)[list(range(1, 1000, max(1000 // n, 1)))[::-1]]


FORMULAS = {
    # "normal" is the reference's schedule (Stability-AI/sd3.5 ``sd3_infer.py`` ``SD3Inferencer.get_sigmas``),
    # which is ComfyUI's "normal" formula
    "simple": _simple,
    "ddim_uniform": _ddim_uniform,
    "normal": _normal,
    "sgm_uniform": lambda n, shift: _normal(n, shift, sgm=True),
    "karras": _karras,
    "exponential": _exponential,
    "beta": _beta,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


def test_names():
    assert set(FORMULAS) == set(SCHEDULERS)
    assert SCHEDULERS[0] == "simple"  # ComfyUI's order


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_equals_its_formula(name, steps, shift):
    s = get_sigmas(name, steps, shift)
    assert s.dtype == torch.float32 and s.dim() == 1
    expected = np.append(FORMULAS[name](steps, shift), 0.0)
    if name == "ddim_uniform":  # starts below sigma_max and may have more steps (its stride is floored)
        assert len(s) == len(expected) >= steps + 1
    else:
        assert len(s) == steps + 1
        assert s[-1] == 0 and s[0] == pytest.approx(1.0, abs=1e-6)
    assert bool((s[1:] < s[:-1]).all()), s
    np.testing.assert_allclose(s.double().numpy(), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 28, 40, 50, 100])
@pytest.mark.parametrize("shift", SHIFTS)
def test_normal_is_the_reference_schedule_bit_for_bit(steps, shift):
    assert torch.equal(get_sigmas("normal", steps, shift), reference_sigmas(steps, shift))


def test_model_table():
    for shift in SHIFTS:
        table = discrete_flow_sigmas(shift)
        assert table.dtype == torch.float32 and table.shape == (1000,)
        np.testing.assert_allclose(table.double().numpy(), _table(shift), rtol=1e-6)
    # sigma_min of Stability-AI/sd3.5 ``sd3_impls.py`` ``ModelSamplingDiscreteFlow`` at shift 3: sigma(1 / 1000)
    assert float(discrete_flow_sigmas(3.0)[0]) == pytest.approx(0.002994012, rel=1e-6)


def test_shift_moves_every_schedule_consistently():
    for name in SCHEDULERS:
        s1, s3 = get_sigmas(name, 10, 1.0), get_sigmas(name, 10, 3.0)
        if name == "linear_quadratic":
            # Defined in sigma space as ComfyUI does, scaled by sigma_max = 1 for every shift.
            assert torch.equal(s1, s3)
        else:
            assert bool((s3[1:-1] > s1[1:-1]).all()), name  # a larger shift keeps more noise at every step
    for shift in (1.0, 3.0, 6.0):
        sigma_min = flow_sigma(0.001, shift)
        # Sigma-space schedules run from the shifted model's sigma_max to its sigma_min.
        for name in ("karras", "exponential", "kl_optimal"):
            s = get_sigmas(name, 20, shift)
            assert float(s[0]) == pytest.approx(1.0, abs=1e-6)
            assert float(s[-2]) == pytest.approx(sigma_min, rel=2e-5), name
        # Timestep-space schedules map linearly spaced timesteps through the shifted sigma (sigma_min twice).
        assert float(get_sigmas("normal", 20, shift)[-2]) == pytest.approx(
            flow_sigma(sigma_min, shift), rel=2e-5
        )
        t_last = 1 - (1 - sigma_min) * 19 / 20  # the last of linspace(1, sigma_min, 21)[:-1]
        assert float(get_sigmas("sgm_uniform", 20, shift)[-2]) == pytest.approx(
            flow_sigma(t_last, shift), rel=2e-5
        )
    # Beta picks the same table indices for every shift, so shifting its shift-1 schedule gives the shift-3 one.
    b1, b3 = get_sigmas("beta", 30, 1.0), get_sigmas("beta", 30, 3.0)
    torch.testing.assert_close(b3[:-1], flow_sigma(b1[:-1], 3.0), rtol=2e-6, atol=0)


def test_beta_drops_repeated_timesteps_like_comfyui():
    for steps in (138, 139, 500):
        s = get_sigmas("beta", steps, 3.0)
        expected = np.append(_beta(steps, 3.0), 0.0)
        assert len(s) == len(expected)
        np.testing.assert_allclose(s.double().numpy(), expected, rtol=2e-6)
        assert bool((s[1:] < s[:-1]).all())
    assert len(get_sigmas("beta", 138, 3.0)) == 139
    assert len(get_sigmas("beta", 139, 3.0)) == 139  # one repeated index dropped
    assert len(get_sigmas("beta", 500, 3.0)) == 476


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's root finder warns on its own at q near 1
def test_beta_ppf_matches_scipy():
    q = np.concatenate([np.linspace(0, 1, 401), np.logspace(-9, -1, 50), 1 - np.logspace(-9, -1, 50)])
    np.testing.assert_allclose(beta_ppf(q, 0.6, 0.6), scipy.stats.beta.ppf(q, 0.6, 0.6), rtol=0, atol=1e-12)
    # Other shapes on the well-conditioned middle (near an end where the density is 0 or infinite one float64
    # step in x moves the CDF by far more than 1e-12, and scipy's own root finder gives up there).
    q = np.linspace(0.01, 0.99, 99)
    for a, b in ((2.0, 0.5), (0.5, 3.0)):
        np.testing.assert_allclose(beta_ppf(q, a, b), scipy.stats.beta.ppf(q, a, b), rtol=0, atol=1e-12)
    # the symmetric median exactly (999 * 1/2 is a rint tie: an ulp either side of 1/2 would round otherwise)
    assert beta_ppf(np.array([0.5]), 0.6, 0.6)[0] == 0.5
    for steps in [*range(1, 151), 200, 250, 300, 500, 1000]:  # the rounded table indices agree exactly
        q = 1 - np.arange(steps) / steps
        ours = np.rint(beta_ppf(q, 0.6, 0.6) * 999)
        assert np.array_equal(ours, np.rint(scipy.stats.beta.ppf(q, 0.6, 0.6) * 999)), steps


def test_errors():
    with pytest.raises(SD35Error, match="unknown scheduler 'uniform'.*simple, sgm_uniform, karras"):
        get_sigmas("uniform", 10, 3.0)
    with pytest.raises(SD35Error, match="kl_optimal"):
        get_sigmas("Karras", 10, 3.0)
    for steps in (0, -1, 2.5, True):
        with pytest.raises(SD35Error, match="steps"):
            get_sigmas("karras", steps, 3.0)
    for shift in (0.0, -2.0):
        with pytest.raises(SD35Error, match="shift"):
            get_sigmas("beta", 10, shift)


# --------------------------------------------------------------------------------------------- the reference's schedule


def test_reference_sigmas_match_the_reference():
    """The values Stability-AI/sd3.5 ``sd3_infer.py`` ``SD3Inferencer.get_sigmas`` gives at 50 steps, shift 3."""
    s = reference_sigmas(50, 3.0)
    assert s.dtype == torch.float32 and s.shape == (51,)
    head = torch.tensor([1.0, 0.993124, 0.986057, 0.978790, 0.971314, 0.963621])
    tail = torch.tensor([0.216593, 0.170296, 0.120533, 0.066900, 0.008929, 0.0])
    torch.testing.assert_close(s[:6], head, atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-6:], tail, atol=1e-6, rtol=0)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # The double shift: sigma_min = flow_sigma(1/1000) is shifted again (``get_sigmas`` shifts the timesteps of
    # ``sd3_impls.py`` ``ModelSamplingDiscreteFlow``, whose sigma_min is already shifted).
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
