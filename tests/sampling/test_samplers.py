"""The ComfyUI sampler set (sd35/sampling/samplers.py): k-diffusion / diffusers equality, orders, flow (RF) noise
maths, seeding.

The deterministic samplers are checked step by step against k-diffusion's own code (euler, dpmpp_2m, heun,
dpm_2, lms), diffusers' UniPC and hand-written DEIS / iPNDM loops, then for convergence and order on the
closed-form Gaussian denoiser of ``sampling_helpers.py``. The stochastic ones use ComfyUI's rectified-flow noise maths,
which no installed library has: each update is recomputed by hand (in float64, in a different but
equivalent parameterization) with the same seeded noise, and their outputs are checked for the right
distribution.
"""

from __future__ import annotations

import inspect
import math
from typing import get_args

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from sd35.errors import SD35Error
from sd35.sampling import reference_sigmas
from sd35.sampling.noise import stream_noise
from sd35.sampling.samplers import (
    MISSING_SAMPLERS,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    SamplerName,
    get_sampler,
    sample_deis,
    sample_dpmpp_2m,
    sample_euler,
    sample_ipndm,
    sample_uni_pc,
)
from tests.sampling.kdiffusion_ref import load_sampling
from tests.sampling.sampling_helpers import GaussianData, seeded_randn

CORE = [
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "lcm",
    "ipndm",
    "deis",
    "uni_pc",
]
"""The samplers these property tests cover (every sampler is checked against ComfyUI's output in
``test_comfyui_parity.py``)."""
COMFY_NAMES = list(get_args(SamplerName))
DETERMINISTIC = [n for n in CORE if n not in STOCHASTIC_SAMPLERS]
STOCHASTIC = [n for n in CORE if n in STOCHASTIC_SAMPLERS]


def _trace(sampler, model, x, sigmas, **kwargs):
    xs, ds = [], []
    out = sampler(model, x, sigmas, callback=lambda i, n, x, d: (xs.append(x), ds.append(d)), **kwargs)
    return out, xs, ds


def _ours_and_k_diffusion(name, steps):
    """Sampler ``name`` and k-diffusion's own ``sample_<name>`` on the Gaussian data's denoiser from the same noise,
    ``steps`` reference steps: each as (output, x of each step's callback, each step's denoised)."""
    data = GaussianData()
    sigmas = reference_sigmas(steps)
    x = seeded_randn((3, 4, 5, 6))
    ours = _trace(get_sampler(name), data.denoiser, x, sigmas)
    kd_x, kd_d = [], []
    kd_out = getattr(load_sampling(), f"sample_{name}")(
        data.denoiser,
        x,
        sigmas,
        callback=lambda e: (kd_x.append(e["x"]), kd_d.append(e["denoised"])),
        disable=True,
    )
    return ours, (kd_out, kd_x, kd_d)


def _half_precision_denoiser(seen: list):
    """The Gaussian data's denoiser answering in float16; it records the (x dtype, sigma dtype, sigma shape) of
    every call in ``seen``."""
    data = GaussianData()

    def model(x, sigma):
        seen.append((x.dtype, sigma.dtype, sigma.shape))
        return data.denoiser(x, sigma).half()

    return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flow_lambda_sigmas(steps: int, high: float = 0.98, low: float = 0.01) -> torch.Tensor:
    """1, then ``steps - 1`` sigmas even in the flow half-log-SNR from ``high`` to ``low``, then 0."""
    lam = torch.linspace(
        math.log((1 - high) / high), math.log((1 - low) / low), steps - 1, dtype=torch.float64
    )
    return torch.cat([torch.ones(1), torch.sigmoid(-lam).float(), torch.zeros(1)])


# ------------------------------------------------------------------------- registry and signatures


def test_registry_names_and_stochastic_set():
    assert list(SAMPLERS) == COMFY_NAMES
    assert isinstance(STOCHASTIC_SAMPLERS, frozenset)
    assert frozenset(STOCHASTIC) <= STOCHASTIC_SAMPLERS <= frozenset(COMFY_NAMES)
    assert STOCHASTIC == ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm"]
    assert not set(MISSING_SAMPLERS) & set(SAMPLERS)
    for name in COMFY_NAMES:
        assert get_sampler(name) is SAMPLERS[name]


def test_get_sampler_unknown_name_lists_the_valid_ones():
    with pytest.raises(SD35Error) as err:
        get_sampler("dpm_fast")
    message = str(err.value)
    assert "'dpm_fast'" in message and "adaptive-order" in message
    assert all(name in message for name in COMFY_NAMES)


def test_sampler_registry():
    assert SAMPLERS["euler"] is sample_euler and SAMPLERS["dpmpp_2m"] is sample_dpmpp_2m
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(SD35Error, match="euler, euler_ancestral") as err:
        get_sampler("nope")
    assert "'nope'" in str(err.value)


@pytest.mark.parametrize("name", COMFY_NAMES)
def test_every_sampler_has_the_same_signature(name):
    params = inspect.signature(SAMPLERS[name]).parameters
    assert list(params)[:5] == ["model", "x", "sigmas", "callback", "generator"]
    assert [p.kind for p in list(params.values())[:3]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[3:])
    assert params["callback"].default is None and params["generator"].default is None
    if name in ("euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert params["eta"].default == 1.0 and params["s_noise"].default == 1.0
    if name in STOCHASTIC_SAMPLERS:
        assert params["noise_sampler"].default is None


# ------------------------------------------------------------------------- deterministic: references


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [50, 7])
def test_samplers_equal_k_diffusion_step_by_step(name, steps):
    (ours, xs, ds), (kd_out, kd_x, kd_d) = _ours_and_k_diffusion(name, steps)
    # k-diffusion reports x *before* each step; ours reports it after.
    assert len(xs) == len(kd_x) == steps
    for i in range(steps):
        torch.testing.assert_close(ds[i], kd_d[i], atol=1e-6, rtol=0)
        expected = kd_x[i + 1] if i + 1 < steps else kd_out
        torch.testing.assert_close(xs[i], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, kd_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["heun", "dpm_2", "lms"])
@pytest.mark.parametrize("steps", [50, 7])
def test_deterministic_samplers_equal_k_diffusion_step_by_step(name, steps):
    (ours, xs, ds), (kd_out, kd_x, kd_d) = _ours_and_k_diffusion(name, steps)
    # k-diffusion reports x *before* each step; ours reports it after.
    assert len(xs) == len(kd_x) == steps
    for i in range(steps):
        torch.testing.assert_close(ds[i], kd_d[i], atol=5e-6, rtol=5e-6)
        if i + 1 < steps:
            torch.testing.assert_close(xs[i], kd_x[i + 1], atol=5e-6, rtol=5e-6)
    if name == "lms":
        # k-diffusion 0.1.1 integrates the last step too; ComfyUI (and we) return the denoised prediction.
        assert torch.equal(ours, ds[-1])
        assert (kd_out - ours).abs().max() < 0.05
    else:
        torch.testing.assert_close(ours, kd_out, atol=2e-6, rtol=0)


def _diffusers_unipc(data: GaussianData, x: torch.Tensor, sigmas: torch.Tensor):
    """diffusers' UniPC (bh1, order 3, lower_order_final) on our sigmas, read as VE sigmas like ComfyUI.

    diffusers works on the VP sample ``x / sqrt(1 + sigma^2)`` and corrects each sample in the *next*
    ``step`` call (``last_sample``); we return the corrected sample at each sigma (VE again) and the
    final prediction.
    """
    steps = len(sigmas) - 1
    scheduler = UniPCMultistepScheduler(
        solver_order=3, prediction_type="sample", solver_type="bh1", lower_order_final=True
    )
    scheduler.set_timesteps(steps)
    scheduler.sigmas = sigmas.clone()
    scheduler.timesteps = torch.arange(steps, 0, -1) * 10

    def alpha(s):
        return 1 / (1 + s**2) ** 0.5

    sample, corrected = x * alpha(sigmas[0]), []
    for j, t in enumerate(scheduler.timesteps):
        denoised = data.denoiser(sample / alpha(sigmas[j]), sigmas[j].expand(x.shape[0]))
        sample = scheduler.step(denoised, t, sample).prev_sample
        if j > 0:
            corrected.append(scheduler.last_sample / alpha(sigmas[j]))
    return corrected, sample / alpha(sigmas[-1])


@pytest.mark.parametrize("steps", [3, 7, 20])
def test_uni_pc_equals_diffusers(steps):
    data = GaussianData()
    x = seeded_randn((3, 4, 5, 6))
    # A schedule that ends above 0: the last step is diffusers' plain first-order update there.
    sigmas = reference_sigmas(steps + 1)[:-1]
    ours, xs, _ = _trace(sample_uni_pc, data.denoiser, x, sigmas)
    corrected, final = _diffusers_unipc(data, x, sigmas)
    for k, expected in enumerate(corrected):
        torch.testing.assert_close(xs[k], expected, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ours, final, atol=5e-5, rtol=1e-5)

    # Ending at 0, the corrected steps are the same and the last, first-order step ends at ComfyUI's
    # 0.001, divided by 1 - 0.001 as ComfyUI's flow inverse noise scaling does there.
    sigmas = reference_sigmas(steps)
    ours, xs, ds = _trace(sample_uni_pc, data.denoiser, x, sigmas)
    corrected, _ = _diffusers_unipc(data, x, sigmas)
    for k, expected in enumerate(corrected):
        torch.testing.assert_close(xs[k], expected, atol=5e-5, rtol=1e-5)
    ratio = 0.001 / float(sigmas[-2])
    before = xs[-2] if len(xs) > 1 else x
    torch.testing.assert_close(ours, (ratio * before + (1 - ratio) * ds[-1]) / 0.999, atol=2e-6, rtol=1e-6)


def _deis_coefficients_by_t_integral(sigmas: list[float], i: int, order: int) -> list[float]:
    """DEIS tAB weights as ComfyUI writes them, ``int_{t_i}^{t_{i+1}} L_j(t) dsigma/dt dt`` in DEIS's VP time.

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (``edm2t``), so ``dsigma/dt = (beta_d t +
    beta_min) (sigma^2 + 1) / (2 sigma)``; composite Simpson's rule on 4001 points in float64.
    """
    beta_d = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
    beta_min = math.log(80.0**2 + 1) - 0.5 * beta_d

    def t_of(s):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + s * s)) - beta_min) / beta_d

    ts = [t_of(sigmas[i - j]) for j in range(order)]
    tau = torch.linspace(t_of(sigmas[i]), t_of(sigmas[i + 1]), 4001, dtype=torch.float64)
    sig = torch.sqrt(torch.expm1(beta_d * tau**2 / 2 + beta_min * tau))
    dsig = (beta_d * tau + beta_min) * (sig**2 + 1) / (2 * sig)
    weights = torch.ones(4001, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    step = (tau[1] - tau[0]) / 3
    out = []
    for j in range(order):
        basis = torch.ones_like(tau)
        for k in range(order):
            if k != j:
                basis = basis * (tau - ts[k]) / (ts[j] - ts[k])
        out.append(float(step * (weights * basis * dsig).sum()))
    return out


def test_deis_equals_a_hand_computed_t_integral_loop():
    data = GaussianData()
    x = seeded_randn((3, 4, 5, 6))
    sigmas = reference_sigmas(9)
    ours, xs, ds = _trace(sample_deis, data.denoiser, x, sigmas)
    sig = sigmas.double().tolist()
    cur, slopes = x.double(), []
    for i in range(9):
        denoised = data.denoiser(cur.float(), sigmas[i].expand(3)).double()
        torch.testing.assert_close(ds[i].double(), denoised, atol=5e-5, rtol=0)
        slopes.append((cur - denoised) / sig[i])
        if sig[i + 1] == 0:
            cur = denoised
        else:
            order = min(i + 1, 3)
            coeffs = [sig[i + 1] - sig[i]] if order == 1 else _deis_coefficients_by_t_integral(sig, i, order)
            cur = cur + sum(c * slopes[-1 - j] for j, c in enumerate(coeffs))
        torch.testing.assert_close(xs[i].double(), cur, atol=5e-5, rtol=0)
    assert torch.equal(ours, ds[-1])


def test_ipndm_equals_the_fixed_adams_bashforth_weights():
    data = GaussianData()
    x = seeded_randn((3, 4, 5, 6))
    sigmas = reference_sigmas(8)
    ours, xs, ds = _trace(sample_ipndm, data.denoiser, x, sigmas)
    weights = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    sig = sigmas.double().tolist()
    cur, slopes = x.double(), []
    for i in range(8):
        denoised = data.denoiser(cur.float(), sigmas[i].expand(3)).double()
        slopes.append((cur - denoised) / sig[i])
        if sig[i + 1] == 0:
            cur = denoised
        else:
            w = weights[min(i, 3)]
            cur = cur + (sig[i + 1] - sig[i]) * sum(w[j] * slopes[-1 - j] for j in range(len(w)))
        torch.testing.assert_close(xs[i].double(), cur, atol=5e-5, rtol=0)
    assert torch.equal(ours, ds[-1])


# ------------------------------------------------------------------------- deterministic: orders


def test_samplers_converge_to_the_data_distribution_with_their_orders():
    data = GaussianData()
    noise = seeded_randn((2048, 4, 2, 2))
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


def test_deterministic_samplers_converge_with_their_orders():
    """Error vs the exact ODE output on the reference schedule at 16, 32, 64, 128 steps.

    Euler halves its error per doubling, heun / dpm_2 / dpmpp_2m quarter it. The multistep methods
    (lms: 4-step Adams-Bashforth; ipndm; deis: 3-step tAB; uni_pc: UniPC-3) fall faster than second
    order over this range (3 doublings: > 150x, where second order gives 64x). (Asymptotically their
    Euler / first-order start makes them second order, see the docstrings.)
    """
    data = GaussianData()
    noise = seeded_randn((1024, 4, 2, 2))
    step_counts = (16, 32, 64, 128)
    errors: dict[str, list[float]] = {name: [] for name in DETERMINISTIC}
    for steps in step_counts:
        sigmas = reference_sigmas(steps)
        target = data.exact_output(noise, sigmas)
        for name in DETERMINISTIC:
            out = get_sampler(name)(data.denoiser, noise, sigmas)
            errors[name].append((out - target).pow(2).mean().sqrt().item())
    ratios = {name: [e[k] / e[k + 1] for k in range(len(e) - 1)] for name, e in errors.items()}
    assert all(1.9 < r < 2.1 for r in ratios["euler"]), ratios["euler"]
    for name in ("heun", "dpm_2", "dpmpp_2m"):
        assert all(3.3 < r < 4.6 for r in ratios[name]), (name, ratios[name])
    for name in ("lms", "ipndm", "deis", "uni_pc"):
        assert all(r > 3.5 for r in ratios[name]), (name, ratios[name])
        assert errors[name][0] / errors[name][-1] > 150, (name, errors[name])
    for name in DETERMINISTIC:
        assert errors[name][-1] < 0.02, (name, errors[name])


NOT_FLOW_FORM = frozenset({"ddpm", "res_multistep_ancestral"})
"""ComfyUI takes these stochastic steps with VP/VE formulas even for a flow model, so their noise does not
keep the flow marginal; that they are ComfyUI's is checked in ``test_comfyui_parity.py``."""


@pytest.mark.parametrize("name", COMFY_NAMES)
def test_straight_paths_are_exact_and_keep_the_flow_marginal(name):
    """With an oracle denoiser (it returns the true x0), the flow ODE path ``x0 + sigma (n - x0)`` is
    straight: every ODE sampler follows it exactly, and every stochastic step keeps ``x ~ alpha x0 +
    sigma N(0, 1)`` (its noise is exactly balanced), whatever the step sizes."""
    x0 = torch.randn(1, 4, 32, 32, generator=_gen(3))
    n = seeded_randn((64, 4, 32, 32), seed=4)
    sigmas = torch.tensor([1.0, 0.93, 0.7, 0.45, 0.4, 0.12, 0.03])

    def oracle(x, sigma):
        return x0.expand_as(x)

    out, xs, ds = _trace(get_sampler(name), oracle, n, sigmas, generator=_gen(5))
    assert len(xs) == 6 and all(torch.equal(d, x0.expand_as(n)) for d in ds)
    if name in NOT_FLOW_FORM:
        return
    if name == "ipndm_v":
        # ComfyUI's order-4 weights (after zju-pi/diff-sampler) sum to 1 + q (h2/h3 - h1/h2), not 1, on an
        # uneven grid, so from the fourth step on not even a straight path is followed; orders 1-3 are exact
        xs = xs[:3]
    for k, x in enumerate(xs):
        sigma = sigmas[k + 1]
        if name in STOCHASTIC_SAMPLERS:
            z = (x - (1 - sigma) * x0) / sigma
            assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01, (k, z.mean(), z.std())
        else:
            torch.testing.assert_close(x, x0 + sigma * (n - x0), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in COMFY_NAMES if not n.startswith("uni_pc")])
def test_the_step_to_zero_returns_the_denoised_prediction(name):
    """(UniPC ends at ComfyUI's 0.001 instead: ``test_uni_pc_equals_diffusers``.)"""
    data = GaussianData()
    out, xs, ds = _trace(
        get_sampler(name), data.denoiser, seeded_randn((2, 4, 3, 3)), reference_sigmas(6), generator=_gen(1)
    )
    assert len(xs) == len(ds) == 6
    # ddpm reaches it through VP formulas in float32 (ComfyUI's), so only to rounding
    torch.testing.assert_close(out, ds[-1], atol=2e-5 if name == "ddpm" else 1e-6, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_samplers_run_in_float32(name):
    seen = []
    model = _half_precision_denoiser(seen)
    out = get_sampler(name)(model, seeded_randn((2, 4, 3, 3)).half(), reference_sigmas(4).double())
    assert out.dtype == torch.float32
    assert all(s == (torch.float32, torch.float32, (2,)) for s in seen)


@pytest.mark.parametrize("name", COMFY_NAMES)
def test_samplers_run_in_float32_and_ignore_or_use_the_generator(name):
    seen = []
    model = _half_precision_denoiser(seen)
    g = _gen(9)
    state = g.get_state()
    out = get_sampler(name)(
        model, seeded_randn((2, 4, 3, 3)).half(), reference_sigmas(5).double(), generator=g
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(s == (torch.float32, torch.float32, (2,)) for s in seen)
    assert torch.equal(g.get_state(), state) is (name not in STOCHASTIC_SAMPLERS)


def test_model_calls_per_step():
    data = GaussianData()
    calls = {}
    for name in COMFY_NAMES:
        sigmas_seen = []

        def model(x, sigma, sigmas_seen=sigmas_seen):
            sigmas_seen.append(float(sigma[0]))
            return data.denoiser(x, sigma)

        get_sampler(name)(model, seeded_randn((1, 4, 2, 2)), reference_sigmas(8), generator=_gen(0))
        calls[name] = len(sigmas_seen)
    # Two calls per step except the last for the two-stage samplers, three for seeds_3, up to three for
    # heunpp2 (two on the second-to-last step, one on the last); one for the rest.
    two_stage = (
        "heun",
        "dpm_2",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "seeds_2",
    )
    special = {"seeds_3": 22, "heunpp2": 21}
    assert calls == {name: special.get(name, 15 if name in two_stage else 8) for name in COMFY_NAMES}


# ------------------------------------------------------------------------- stochastic: RF maths by hand


SEED = 1234


def _hand_noise(shape, count):
    g = _gen(SEED)
    return [torch.randn(shape, generator=g, dtype=torch.float32).double() for _ in range(count)]


def _den64(data, x, sigma):
    return data.denoiser(x.float(), torch.full((x.shape[0],), float(sigma))).double()


def test_euler_ancestral_rf_step_by_hand():
    """sigma_d = s'(1 + (s'/s - 1) eta); flow DDIM to sigma_d; rescale to alpha'; add the missing noise."""
    data = GaussianData()
    x = seeded_randn((64, 4, 3, 3))
    s, s1, eta, s_noise = 0.8, 0.5, 0.7, 0.9
    out = SAMPLERS["euler_ancestral"](
        data.denoiser, x, torch.tensor([s, s1]), generator=_gen(SEED), eta=eta, s_noise=s_noise
    )
    (eps,) = _hand_noise(x.shape, 1)
    xd = x.double()
    d = _den64(data, xd, s)
    noise_hat = (xd - (1 - s) * d) / s  # the noise this x and prediction imply
    s_down = s1 * (1 + (s1 / s - 1) * eta)
    x_down = (1 - s_down) * d + s_down * noise_hat
    scale = (1 - s1) / (1 - s_down)
    expected = scale * x_down + s_noise * math.sqrt(s1**2 - (scale * s_down) ** 2) * eps
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)
    # eta = 0 is plain Euler, and draws nothing.
    g = _gen(SEED)
    plain = SAMPLERS["euler_ancestral"](data.denoiser, x, reference_sigmas(5), generator=g, eta=0.0)
    torch.testing.assert_close(
        plain, SAMPLERS["euler"](data.denoiser, x, reference_sigmas(5)), atol=1e-6, rtol=0
    )
    assert torch.equal(g.get_state(), _gen(SEED).get_state())


def test_dpmpp_2s_ancestral_rf_step_by_hand():
    """Flow DDIM half-way in log-SNR to sigma_d, the model there, a flow DDIM move to sigma_d with that
    prediction, then the RF renoise."""
    data = GaussianData()
    x = seeded_randn((64, 4, 3, 3))
    s, s1, eta, s_noise = 0.8, 0.5, 0.6, 1.1
    seen = []

    def model(x, sigma):
        seen.append(float(sigma[0]))
        return data.denoiser(x, sigma)

    out = SAMPLERS["dpmpp_2s_ancestral"](
        model, x, torch.tensor([s, s1]), generator=_gen(SEED), eta=eta, s_noise=s_noise
    )
    (eps,) = _hand_noise(x.shape, 1)
    xd = x.double()
    s_down = s1 * (1 + (s1 / s - 1) * eta)
    # Midpoint in lambda = log(alpha / sigma): its SNR is the geometric mean of the two ends' SNRs.
    s_mid = 1 / (1 + math.sqrt((1 - s) / s * (1 - s_down) / s_down))
    assert seen == pytest.approx([s, s_mid], rel=1e-6)
    d = _den64(data, xd, s)
    u = (1 - s_mid) * d + s_mid * (xd - (1 - s) * d) / s
    d2 = _den64(data, u, s_mid)
    x_down = (1 - s_down) * d2 + s_down * (xd - (1 - s) * d2) / s
    scale = (1 - s1) / (1 - s_down)
    expected = scale * x_down + s_noise * math.sqrt(s1**2 - (scale * s_down) ** 2) * eps
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)
    # At sigma = 1 the midpoint is ComfyUI's fixed 0.9999.
    seen.clear()
    SAMPLERS["dpmpp_2s_ancestral"](model, x, torch.tensor([1.0, 0.9]), generator=_gen(SEED))
    assert seen == pytest.approx([1.0, 0.9999], rel=1e-7)


def _sde_first_order(x, d, s, s1, eta):
    """x' = (s'/s) rho^eta x + alpha' (1 - rho^(1+eta)) D, noise scale s' sqrt(1 - rho^(2 eta)),
    with rho = e^(-h) = (alpha s') / (s alpha') the SNR ratio (no logarithms)."""
    rho = (1 - s) * s1 / (s * (1 - s1))
    return (
        s1 / s * rho**eta * x + (1 - s1) * (1 - rho ** (1 + eta)) * d,
        s1 * math.sqrt(1 - rho ** (2 * eta)),
        rho,
    )


def test_dpmpp_2m_sde_rf_steps_by_hand():
    data = GaussianData()
    x = seeded_randn((64, 4, 3, 3))
    sig, eta, s_noise = [0.9, 0.6, 0.3, 0.12], 0.8, 0.9
    out, xs, _ = _trace(
        SAMPLERS["dpmpp_2m_sde"],
        data.denoiser,
        x,
        torch.tensor(sig),
        generator=_gen(SEED),
        eta=eta,
        s_noise=s_noise,
    )
    eps = _hand_noise(x.shape, 3)
    cur, prev, h_prev = x.double(), None, None
    for i in range(3):
        d = _den64(data, cur, sig[i])
        nxt, noise_scale, rho = _sde_first_order(cur, d, sig[i], sig[i + 1], eta)
        h = -math.log(rho)
        if prev is not None:  # midpoint multistep term: half the D weight times (h / h_last) (D - D_last)
            nxt = nxt + 0.5 * (1 - sig[i + 1]) * (1 - rho ** (1 + eta)) * (h / h_prev) * (d - prev)
        cur, prev, h_prev = nxt + s_noise * noise_scale * eps[i], d, h
        torch.testing.assert_close(xs[i].double(), cur, atol=3e-6, rtol=0)


def test_dpmpp_3m_sde_rf_steps_by_hand():
    data = GaussianData()
    x = seeded_randn((64, 4, 3, 3))
    sig, eta, s_noise = [0.9, 0.7, 0.45, 0.25, 0.1], 0.6, 1.0
    out, xs, _ = _trace(
        SAMPLERS["dpmpp_3m_sde"],
        data.denoiser,
        x,
        torch.tensor(sig),
        generator=_gen(SEED),
        eta=eta,
        s_noise=s_noise,
    )
    eps = _hand_noise(x.shape, 4)
    cur, ds, hs = x.double(), [], []
    for i in range(4):
        d = _den64(data, cur, sig[i])
        nxt, noise_scale, rho = _sde_first_order(cur, d, sig[i], sig[i + 1], eta)
        h = -math.log(rho)
        big_h = (1 + eta) * h
        phi_2 = (rho ** (1 + eta) - 1) / big_h + 1
        alpha = 1 - sig[i + 1]
        if len(ds) >= 2:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            nxt = nxt + alpha * phi_2 * d1 - alpha * (phi_2 / big_h - 0.5) * d2
        elif ds:
            nxt = nxt + alpha * phi_2 * (d - ds[-1]) / (hs[-1] / h)
        cur = nxt + s_noise * noise_scale * eps[i]
        ds.append(d)
        hs.append(h)
        torch.testing.assert_close(xs[i].double(), cur, atol=3e-6, rtol=0)


def test_lcm_steps_by_hand():
    data = GaussianData()
    x = seeded_randn((64, 4, 3, 3))
    sig = [1.0, 0.7, 0.3, 0.0]
    out, xs, ds = _trace(
        SAMPLERS["lcm"], data.denoiser, x, torch.tensor(sig), generator=_gen(SEED), s_noise=0.8
    )
    eps = _hand_noise(x.shape, 2)
    cur = x.double()
    for i in range(3):
        d = _den64(data, cur, sig[i])
        cur = (1 - sig[i + 1]) * d + sig[i + 1] * 0.8 * eps[i] if sig[i + 1] > 0 else d
        torch.testing.assert_close(xs[i].double(), cur, atol=2e-6, rtol=0)
    assert torch.equal(out, ds[-1])


@pytest.mark.parametrize(
    "name", ["dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "er_sde", "seeds_2", "seeds_3"]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sde_samplers_start_just_below_sigma_one_as_comfyui(name, eta):
    """lambda(1) = -inf: ComfyUI starts these at sigma = shift(1 - 1e-4) (``offset_first_sigma_for_snr``),
    and so do we, at the shift given."""
    data = GaussianData()
    x = seeded_randn((8, 4, 3, 3))
    sigmas = reference_sigmas(12)
    options = {} if name == "er_sde" else {"eta": eta}
    out = SAMPLERS[name](data.denoiser, x, sigmas, generator=_gen(SEED), shift=3.0, **options)
    assert torch.isfinite(out).all()
    offset = sigmas.clone()
    offset[0] = 3 * (1 - 1e-4) / (1 + 2 * (1 - 1e-4))  # ComfyUI's percent_to_sigma(1e-4) at shift 3
    given = SAMPLERS[name](data.denoiser, x, offset, generator=_gen(SEED), shift=3.0, **options)
    assert torch.equal(out, given)
    other_shift = SAMPLERS[name](data.denoiser, x, sigmas, generator=_gen(SEED), shift=1.0, **options)
    assert not torch.equal(out, other_shift)


# ------------------------------------------------------------------------- stochastic: distribution, seeding


@pytest.mark.parametrize(
    ("name", "steps", "tol"),
    [
        ("dpmpp_2m_sde", 48, 0.035),
        ("dpmpp_3m_sde", 48, 0.035),
        ("dpmpp_2s_ancestral", 48, 0.035),
        ("euler_ancestral", 128, 0.06),  # first order: its std error halves per doubling (9% at 48 steps)
    ],
)
def test_stochastic_samplers_sample_the_data_distribution(name, steps, tol):
    """Final samples ~ N(mu, s^2) per channel (up to the last sigma's tiny shrink), on a schedule even in
    the flow log-SNR. (On the reference schedule the last jump, 0.07 -> 0.0089 at 50 steps, is a long step
    in log-SNR, where the multistep SDE samplers' extrapolated noisy differences over-disperse at eta = 1.)"""
    data = GaussianData()
    noise = seeded_randn((2048, 4, 2, 2), seed=11)
    sigmas = _flow_lambda_sigmas(steps)
    out = get_sampler(name)(data.denoiser, noise, sigmas, generator=_gen(7))
    last = sigmas[-2].double()
    a, s, mu = 1 - last, data.s.flatten().double(), data.mu.flatten().double()
    std = a * s**2 / (a**2 * s**2 + last**2).sqrt()
    n = out.numel() // 4
    assert ((out.mean((0, 2, 3)).double() - mu).abs() < 4.5 * std / math.sqrt(n) + 0.01).all()
    torch.testing.assert_close(out.std((0, 2, 3)).double(), std, rtol=tol, atol=0)


def test_lcm_follows_its_closed_form_variance_not_the_data():
    """With a posterior-mean denoiser each LCM re-noise loses variance: Var D_i = k_i^2 (a_i^2 Var D_(i-1)
    + sigma_i^2), k = a s^2 / (a^2 s^2 + sigma^2) (mean mu after the first step). LCM is for consistency
    models; this checks it does exactly what its formula says."""
    data = GaussianData()
    noise = seeded_randn((2048, 4, 2, 2), seed=11)
    sigmas = reference_sigmas(10)
    out = get_sampler("lcm")(data.denoiser, noise, sigmas, generator=_gen(7))
    s2 = data.s.flatten().double() ** 2
    var = torch.zeros(4, dtype=torch.float64)  # D_0 at sigma = 1 is mu exactly
    for sigma in sigmas[1:-1].double():
        a = 1 - sigma
        k = a * s2 / (a**2 * s2 + sigma**2)
        var = k**2 * (a**2 * var + sigma**2)
    torch.testing.assert_close(out.std((0, 2, 3)).double(), var.sqrt(), rtol=0.03, atol=0)
    torch.testing.assert_close(out.mean((0, 2, 3)), data.mu.flatten(), atol=0.05, rtol=0)
    assert (var.sqrt() < 0.8 * s2.sqrt()).all()  # visibly not the data distribution


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_repeat_with_a_seed_and_draw_one_noise_per_step(name):
    data = GaussianData()
    x = seeded_randn((2, 4, 3, 3))
    sigmas = reference_sigmas(6)
    sampler = get_sampler(name)
    g = _gen(21)
    a = sampler(data.denoiser, x, sigmas, generator=g)
    b = sampler(data.denoiser, x, sigmas, generator=_gen(21))
    c = sampler(data.denoiser, x, sigmas, generator=_gen(22))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # One float32 draw of x's shape per step that lands above sigma 0 (5 of the 6 steps).
    expected = _gen(21)
    for _ in range(5):
        torch.randn(x.shape, generator=expected, dtype=torch.float32)
    assert torch.equal(g.get_state(), expected.get_state())
    # Without a generator the noise comes from torch's global seed.
    torch.manual_seed(5)
    d = sampler(data.denoiser, x, sigmas)
    torch.manual_seed(5)
    e = sampler(data.denoiser, x, sigmas)
    assert torch.equal(d, e) and not torch.equal(d, a)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_eta_zero_is_deterministic_and_converges(name):
    data = GaussianData()
    noise = seeded_randn((512, 4, 2, 2))
    errors = []
    for steps in (24, 48):
        sigmas = reference_sigmas(steps)
        g = _gen(1)
        out = get_sampler(name)(data.denoiser, noise, sigmas, generator=g, eta=0.0)
        assert torch.equal(g.get_state(), _gen(1).get_state())
        errors.append((out - data.exact_output(noise, sigmas)).pow(2).mean().sqrt().item())
    assert errors[1] < errors[0] / 1.8 and errors[1] < 0.1, errors


# --------------------------------------------------------------------------------- one generator per row


def test_a_generator_per_row_draws_each_rows_own_noise():
    x = torch.zeros(3, 4, 5, 6)
    draw = stream_noise(x, [_gen(10), _gen(11), _gen(12)])
    first, second = draw(1.0, 0.5), draw(0.5, 0.0)
    assert first.shape == x.shape and first.dtype == torch.float32
    for row, seed in enumerate((10, 11, 12)):
        alone = _gen(seed)
        # the very operations a batch-of-one draw makes, so equal to the bit
        assert torch.equal(
            first[row : row + 1], torch.randn((1, 4, 5, 6), generator=alone, dtype=torch.float32)
        )
        assert torch.equal(
            second[row : row + 1], torch.randn((1, 4, 5, 6), generator=alone, dtype=torch.float32)
        )
    # a single generator keeps the one draw of the whole batch
    assert torch.equal(stream_noise(x, _gen(10))(1.0, 0.5), torch.randn(x.shape, generator=_gen(10)))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_batch_with_a_generator_per_row_equals_each_row_alone(name):
    data = GaussianData()  # elementwise, so a row's result cannot depend on the others
    x = seeded_randn((3, 4, 3, 3))
    sigmas = reference_sigmas(6)
    sampler = get_sampler(name)
    batch = sampler(data.denoiser, x, sigmas, generator=(_gen(1), _gen(2), _gen(3)))
    for row, seed in enumerate((1, 2, 3)):
        alone = sampler(data.denoiser, x[row : row + 1], sigmas, generator=_gen(seed))
        assert torch.equal(batch[row : row + 1], alone)
    # a list of one generator for a batch of one is that generator
    assert torch.equal(
        sampler(data.denoiser, x[:1], sigmas, generator=[_gen(1)]),
        sampler(data.denoiser, x[:1], sigmas, generator=_gen(1)),
    )


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_generator_list_of_the_wrong_length_is_refused(name):
    x = seeded_randn((3, 4, 2, 2))
    with pytest.raises(SD35Error, match="2 generators were given for a batch of 3 rows"):
        get_sampler(name)(GaussianData().denoiser, x, reference_sigmas(3), generator=[_gen(1), _gen(2)])
    with pytest.raises(SD35Error, match="must be a torch.Generator, got int"):
        get_sampler(name)(GaussianData().denoiser, x, reference_sigmas(3), generator=[_gen(1), 2, _gen(3)])
