"""Samplers for the flow model, as plain functions of ``(model, x, sigmas)``: ComfyUI's, under its names.

``model(x, sigma) -> denoised`` is a denoiser in x0-space: ``x`` is (B, ...) and ``sigma`` has shape (B,).
The model is a rectified flow, ``x_sigma = (1 - sigma) x0 + sigma noise`` with sigma in [0, 1]; write
``alpha = 1 - sigma`` for its signal scale. Its probability-flow ODE is
``dx/dsigma = (x - denoised) / sigma``, the same ODE k-diffusion's samplers solve, so the reference (and
we) use k-diffusion's deterministic updates unchanged on the flow model's denoised prediction
(Stability-AI/sd3.5 ``sd3_impls.py`` ``sample_euler`` and ``sample_dpmpp_2m``).

Every sampler has the same signature, ``sample_X(model, x, sigmas, *, callback=None, generator=None,
**options) -> Tensor``, with a few keyword ``options`` of its own (ComfyUI's defaults). Every name means
what it means in ComfyUI v0.3.64 (``comfy/samplers.py`` ``KSAMPLER_NAMES``; ``comfy/k_diffusion/sampling.py``;
``comfy/extra_samplers/uni_pc.py``), checked against its output in ``tests/sampling/test_comfyui_parity.py``;
no code is taken from it, each docstring states its formula.

- Deterministic ODE solvers (here; ``generator`` is unused): ``euler`` (and ``ddim``, which ComfyUI runs
  as euler), ``heun``, ``heunpp2``, ``dpm_2``, ``dpmpp_2m``, ``gradient_estimation``, and the multistep
  ``lms`` (Adams-Bashforth 4), ``ipndm``, ``ipndm_v``, ``deis`` (tAB 3), ``res_multistep`` and ``uni_pc`` /
  ``uni_pc_bh2`` (UniPC-3). For lms, ipndm and deis the Euler first step (and for ipndm its equal-step
  weights on a graded grid) caps the *asymptotic* global order at 2, but on the shifted schedules, whose
  first step is short, their error still falls much faster than second order up to 100+ steps.
- Stochastic samplers (:data:`STOCHASTIC_SAMPLERS`, in :mod:`sd35.sampling.stochastic`) add noise; they
  take a ``noise_sampler`` (:mod:`sd35.sampling.noise`), and without one continue ``generator``'s stream.

``generator`` is a :data:`~sd35.sampling.noise.Generators`: one ``torch.Generator`` for the whole batch,
None, or a sequence of generators, one per row of ``x`` (see :func:`~sd35.sampling.noise.stream_noise`).

The loop runs in float32 whatever the model's dtype: ``x``, ``sigmas`` and every ``denoised`` are cast
to float32 (the reference's x becomes float32 after its first update, which mixes in the float32
denoised: ``sd3_impls.py`` ``sample_dpmpp_2m``). Step
coefficients that need logs, exponentials or linear solves are computed from the sigmas in float64 on
the host. A last step to sigma 0 returns the denoised prediction (the limit of each update there), so
no sampler takes ``log(0)``.

Some ComfyUI samplers are not here: the CFG++ ones (``*_cfg_pp``, which need the unguided prediction
inside the sampler), ``dpm_fast``, ``dpm_adaptive`` and ``sa_solver(_pece)``; :data:`MISSING_SAMPLERS`
names them and a request for one is refused with that reason.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import numpy as np
import torch

from sd35.errors import SD35Error
from sd35.sampling import stochastic
from sd35.sampling.noise import Generators, NoiseSampler
from sd35.sampling.sampler_base import Callback, Denoiser, Sampler, denoise, phi, prepare

# --------------------------------------------------------------------------------- deterministic ODE


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Euler's method on ``dx/dsigma = (x - denoised) / sigma`` (sd3.5 ``sd3_impls.py`` ``sample_euler``).

    First order, one model call per step. Without churn, this is k-diffusion's ``sample_euler`` and, for a
    flow model, the same update as diffusers' ``FlowMatchEulerDiscreteScheduler``
    (``x + (sigma' - sigma) v``).
    The step to sigma 0 lands on ``denoised``. ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, s_in)
        slope = (x - denoised) / sigma
        x = x + slope * (sigma_next - sigma)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn; k-diffusion/ComfyUI ``sample_heun``).

    With ``d = (x - D(x, s)) / s``: an Euler predictor ``x2 = x + (s' - s) d``, then
    ``x' = x + (s' - s) (d + d2) / 2`` with ``d2 = (x2 - D(x2, s')) / s'``. Second order, two model
    calls per step; the step to sigma 0 is a plain Euler step (it lands on ``denoised``).
    ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, s_in)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(model, x_2, sigma_next, s_in)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """DPM-Solver-2 style midpoint method (k-diffusion/ComfyUI ``sample_dpm_2`` without churn).

    The midpoint in log sigma, ``s_mid = exp((log s + log s') / 2) = sqrt(s s')``: an Euler step to it,
    ``x2 = x + (s_mid - s) d``, then ``x' = x + (s' - s) d2`` with ``d2 = (x2 - D(x2, s_mid)) / s_mid``.
    Second order, two model calls per step; the step to sigma 0 is a plain Euler step (it lands on
    ``denoised``). ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, s_in)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = (x_2 - denoise(model, x_2, sigma_mid, s_in)) / sigma_mid
            x = x + d_2 * (sigma_next - sigma)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), the SD3.5 default (Stability-AI/sd3.5 ``sd3_impls.py`` ``sample_dpmpp_2m``).

    An exponential integrator in ``lambda = -log(sigma)``: with ``h = lambda' - lambda``,
    ``x' = (sigma'/sigma) x - expm1(-h) D``. The first step uses ``D = denoised`` (first order); later
    steps extrapolate ``D = (1 + 1/2r) denoised - (1/2r) previous`` with ``r = h_previous / h``
    (second order, multistep: still one model call per step). The last step, to sigma 0, is the limit
    of that update (``lambda' = inf``): it returns ``denoised`` itself, as the reference does.
    ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    total = len(sigmas) - 1
    previous: torch.Tensor | None = None
    lam_previous: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, s_in)
        lam = sigma.log().neg()
        if sigma_next == 0:
            x = denoised
        else:
            lam_next = sigma_next.log().neg()
            h = lam_next - lam
            target = denoised
            if previous is not None:
                r = (lam - lam_previous) / h  # h_last / h
                half_inv_r = 1 / (2 * r)
                target = (1 + half_inv_r) * denoised - half_inv_r * previous
            x = (lam_next.neg().exp() / lam.neg().exp()) * x - (-h).expm1() * target
        previous, lam_previous = denoised, lam
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _lagrange_integrals(nodes: list[float], a: float, b: float, points: int = 8) -> list[float]:
    """``[int_a^b L_j(s) ds for j]``, ``L_j`` the Lagrange basis on ``nodes``.

    Gauss-Legendre quadrature with ``points`` nodes: exact for polynomials of degree up to ``2 points - 1``.
    """
    gx, gw = np.polynomial.legendre.leggauss(points)
    s = (b - a) / 2 * gx + (a + b) / 2
    out = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(s)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis = basis * (s - node_k) / (node_j - node_k)
        out.append(float((b - a) / 2 * np.sum(gw * basis)))
    return out


@torch.no_grad()
def sample_lms(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (variable-step Adams-Bashforth in sigma; k-diffusion/ComfyUI ``sample_lms``).

    ``x' = x + sum_j c_j d_{i-j}`` over the last ``min(i + 1, order)`` slopes ``d = (x - D) / sigma``,
    with ``c_j = int_sigma^sigma' L_j(s) ds`` and ``L_j`` the Lagrange polynomial through the past sigmas
    (k-diffusion integrates it with ``scipy.integrate.quad``; we use exact Gauss-Legendre quadrature).
    Order ``order`` (4) per step once the history is full, one model call per step; the first steps use
    the lower orders 1, 2, 3 (the Euler first step caps the asymptotic global order at 2). As in ComfyUI
    (k-diffusion 0.1.1 still integrates), the step to sigma 0 returns ``denoised``. ``generator`` is
    unused.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise SD35Error(f"lms's order must be a positive integer, got {order!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        slopes = [*slopes, (x - denoised) / sigmas[i]][-order:]
        if sig[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = _lagrange_integrals([sig[i - j] for j in range(cur)], sig[i], sig[i + 1])
            x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes[-cur:]), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


_IPNDM_COEFFS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@torch.no_grad()
def sample_ipndm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    max_order: int = 4,
) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2022, the DEIS paper; ComfyUI ``sample_ipndm``, from zju-pi/diff-sampler).

    ``x' = x + (sigma' - sigma) sum_j b_j d_{i-j}`` with the *fixed* Adams-Bashforth weights of orders
    1-4: ``(1)``, ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``, the order growing with the
    history up to ``max_order`` (4). One model call per step. The weights are those of equal steps, so the
    method is of order 4 on a uniform sigma grid; on a smoothly graded one (the shifted schedules) the
    weight mismatch leaves it second order. The step to sigma 0 returns ``denoised``. ``generator`` is unused.
    """
    if max_order not in (1, 2, 3, 4):
        raise SD35Error(f"ipndm's max_order must be 1 to 4, got {max_order!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    total = len(sigmas) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, s_in)
        slopes = [*slopes, (x - denoised) / sigma][-max_order:]
        if sigma_next == 0:
            x = denoised
        else:
            weights = _IPNDM_COEFFS[min(i + 1, max_order) - 1]
            x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, reversed(slopes), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _deis_betas() -> tuple[float, float]:
    """``(beta_d, beta_min)`` of the VP-linear schedule fitted to EDM's ``[0.002, 80]`` that DEIS uses.

    ``alpha_bar(t) = exp(-(beta_d t^2 / 2 + beta_min t)) = 1 / (1 + sigma^2)`` with ``sigma(1e-3) = 0.002``
    and ``sigma(1) = 80`` (ComfyUI ``comfy/k_diffusion/deis.py`` ``edm2t``).
    """
    eps_s, sigma_min, sigma_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def _deis_time(sigma: np.ndarray | float) -> np.ndarray | float:
    """DEIS's time for a VE-style sigma, the inverse of :func:`_deis_betas`' schedule:
    ``t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d``."""
    beta_d, beta_min = _deis_betas()
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d


DEIS_POINTS = 10_000  # ComfyUI's N for the tAB coefficient sums


def _deis_coefficients(nodes: list[float], t_cur: float, t_next: float) -> list[float]:
    """``[c_j]`` of DEIS's tAB step: ``c_j = int_t^t' L_j(tau) dsigma/dtau dtau``, ``L_j`` the Lagrange
    basis on the time ``nodes``, as ComfyUI sums it (``get_deis_coeff_list``, ``deis_mode='tab'``): a
    Riemann sum over ``tau = linspace(t, t', 10000)`` with weight ``(t' - t) / 10000``, where
    ``dsigma/dtau = (beta_d tau + beta_min) / (2 sqrt(alpha_bar (1 - alpha_bar)))``. The sum is coarse
    (its coefficients are off the exact integral by ~1e-4 relative), but it is what ComfyUI's deis is.
    """
    beta_d, beta_min = _deis_betas()
    tau = np.linspace(t_cur, t_next, DEIS_POINTS)
    alpha_bar = np.exp(-(0.5 * beta_d * tau**2 + beta_min * tau))
    integrand = 0.5 * (beta_d * tau + beta_min) / np.sqrt(alpha_bar * (1 - alpha_bar))
    dtau = (t_next - t_cur) / DEIS_POINTS
    out = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis = basis * (tau - node_k) / (node_j - node_k)
        out.append(float(np.sum(integrand * basis) * dtau))
    return out


@torch.no_grad()
def sample_deis(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    max_order: int = 3,
) -> torch.Tensor:
    """DEIS, the time-based Adams-Bashforth form "tAB" (Zhang & Chen 2022; ComfyUI ``sample_deis``,
    ``deis_mode='tab'``, coefficients from ``comfy/k_diffusion/deis.py``).

    ``x' = x + sum_j c_j d_{i-j}`` where the slopes ``d = (x - D) / sigma`` are interpolated by a
    polynomial in DEIS's VP time ``t(sigma)`` (:func:`_deis_time`) through the last ``min(i + 1,
    max_order)`` steps and integrated over sigma: ``c_j = int_sigma^sigma' L_j(t(s)) ds``, summed over
    ``t`` as ComfyUI sums it (:func:`_deis_coefficients`).
    Order ``max_order`` (3) per step once the history is full (the Euler first step caps the asymptotic
    global order at 2), one model call per step; the step to sigma 0 is
    first order (Euler), i.e. returns ``denoised``. ``generator`` is unused.
    """
    if max_order not in (1, 2, 3, 4):
        raise SD35Error(f"deis's max_order must be 1 to 4, got {max_order!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    times = _deis_time(np.asarray(sig, dtype=np.float64)).tolist()
    total = len(sig) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        slopes = [*slopes, (x - denoised) / sigmas[i]][-max_order:]
        if sig[i + 1] <= 0:
            x = denoised
        else:
            cur = min(i + 1, max_order)
            if cur == 1:
                coeffs = [sig[i + 1] - sig[i]]
            else:
                nodes = [times[i - j] for j in range(cur)]
                coeffs = _deis_coefficients(nodes, times[i], times[i + 1])
            x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes[-cur:]), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


UNIPC_FINAL_SIGMA = 0.001
"""Where ComfyUI's UniPC ends a schedule that ends at 0 (``comfy/extra_samplers/uni_pc.py`` ``sample_unipc``)."""


def _unipc_coefficients(rks: list[float], hh: float, order: int, variant: str) -> tuple[float, list, list]:
    """UniPC's ``B(h)`` and the predictor / corrector weights ``rho_p``, ``rho_c`` for ``order``.

    ``R[i][k] = r_k^i`` (i < order) and ``b_i = (i+1)! hh phi_{i+2}(hh) / B(h)``; ``rho_c`` solves
    ``R rho = b`` (``[0.5]`` at order 1), ``rho_p`` the system without the last row and column (``[0.5]``
    at order 2, none at order 1), as ComfyUI's ``multistep_uni_pc_bh_update`` does.
    """
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise SD35Error(f"uni_pc's variant must be 'bh1' or 'bh2', got {variant!r}.")
    r = np.array(rks, dtype=np.float64)
    big_r = np.stack([r**i for i in range(order)])
    b = np.array([math.factorial(i + 1) * hh * phi(i + 2, hh) / b_h for i in range(order)])
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_c = np.linalg.solve(big_r, b).tolist()
        rhos_p = [0.5] if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
    return b_h, rhos_p, rhos_c


@torch.no_grad()
def sample_uni_pc(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    order: int = 3,
    variant: str = "bh1",
) -> torch.Tensor:
    """UniPC, multistep predictor-corrector in data prediction (Zhao et al. 2023; ComfyUI ``uni_pc``,
    ``comfy/extra_samplers/uni_pc.py`` ``sample_unipc`` with ``variant='bh1'``).

    ComfyUI treats sigma as a VE sigma (``SigmaConvert``), so the half-log-SNR is ``lambda = -log sigma``
    as in ``dpmpp_2m``. From ``s`` to ``t`` with ``h = lambda_t - lambda_s``, ``hh = -h``, history
    ``D_0`` (at ``s``), ``D_k`` (at ``lambda_k``), ``r_k = (lambda_k - lambda_s) / h`` and
    ``D1_k = (D_k - D_0) / r_k``:

    - predictor ``x_t = (sigma_t / sigma_s) x - expm1(hh) D_0 - B(h) sum_k rho_p[k] D1_k``,
      ``B(h) = hh`` (bh1) or ``expm1(hh)`` (bh2);
    - corrector, with ``D_t = D(x_t, t)`` (the next step's model call, so still one call per step):
      ``x_t = (sigma_t / sigma_s) x - expm1(hh) D_0 - B(h) (sum_k rho_c[k] D1_k + rho_c[-1] (D_t - D_0))``;

    weights from :func:`_unipc_coefficients`. The order grows 1, 2, ... up to ``min(order, steps - 1)``
    and, ComfyUI's ``lower_order_final``, falls to 2 on the second-to-last step; the last step has no
    corrector. Order 3 per step plus the corrector's extra order where the history is full (a schedule
    that ends above 0 ends with that first-order step, which caps the global order at 2). A schedule
    ending at 0 ends at :data:`UNIPC_FINAL_SIGMA` instead, as ComfyUI's does (``timesteps[-1] = 0.001``,
    to dodge ``log(0)``): the result keeps a trace of noise, ``x = 0.001/sigma x + (1 - 0.001/sigma) D``,
    and is then divided by ``1 - 0.001`` (ComfyUI sets the schedule's last entry to 0.001 in place, and its
    flow ``inverse_noise_scaling`` then divides by ``1 - sigma_last``). ComfyUI runs UniPC in float32 VP
    form (``SigmaConvert``), whose cancellation at small sigmas leaves it ~1e-4 (relative) off this
    float64-coefficient form (up to 6e-4 where the last sigma is tiny). ComfyUI gives it ``steps + 1``
    sigmas less the penultimate (:func:`~sd35.sampling.schedules.get_sigmas` with ``sampler="uni_pc"``),
    which matters: without that rule the demo model's colour score at CFG 4 and 20 steps falls from 97.5%
    to 62.5% (benchmarks/RESULTS.md). ``variant="bh2"`` is ComfyUI's ``uni_pc_bh2``. ``generator`` is
    unused. Checked step by step against diffusers' ``UniPCMultistepScheduler`` (bh1, VE sigmas).
    """
    if order not in (1, 2, 3):
        raise SD35Error(f"uni_pc's order must be 1 to 3, got {order!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    if sig[-1] == 0:
        sig[-1] = UNIPC_FINAL_SIGMA
    lams = [-math.log(s) for s in sig]
    max_order = max(1, min(order, total - 1))
    history: list[tuple[float, torch.Tensor]] = [(lams[0], denoise(model, x, sigmas[0], s_in))]
    for i in range(total):
        k = i + 1
        lam_s, d_0 = history[-1]
        step_order = min(max_order, k, total + 1 - k)
        h = lams[k] - lam_s
        hh = -h
        rks, d1s = [], []
        for lam_j, d_j in reversed(history[-step_order:-1]):
            rk = (lam_j - lam_s) / h
            rks.append(rk)
            d1s.append((d_j - d_0) / rk)
        b_h, rhos_p, rhos_c = _unipc_coefficients([*rks, 1.0], hh, step_order, variant)
        x_base = (sig[k] / sig[i]) * x - math.expm1(hh) * d_0
        x = x_base - b_h * sum((rho * d1 for rho, d1 in zip(rhos_p, d1s, strict=True)), torch.zeros_like(x))
        if k < total:  # corrector, with the model call the next step needs anyway
            d_t = denoise(model, x, sigmas[k], s_in)
            corr = sum((rho * d1 for rho, d1 in zip(rhos_c[:-1], d1s, strict=True)), rhos_c[-1] * (d_t - d_0))
            x = x_base - b_h * corr
            history = [*history, (lams[k], d_t)][-max_order:]
        if callback is not None:
            callback(i, total, x, d_0)
    if sigmas[-1] == 0:
        x = x / (1.0 - UNIPC_FINAL_SIGMA)  # ComfyUI's flow inverse_noise_scaling at its moved last sigma
    return x


@torch.no_grad()
def sample_heunpp2(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Heun++ (ComfyUI ``sample_heunpp2``, from Carzit/sd-webui-samplers-scheduler): Heun with a third
    evaluation two sigmas ahead, weighted by the sigmas.

    With ``d = (x - D(x, s_i)) / s_i``, ``dt = s_{i+1} - s_i``: the last step is Euler; the one before
    it Heun with weights ``w2 = s_{i+1} / (2 s_0)``, ``w1 = 1 - w2``; other steps take
    ``x2 = x + d dt``, ``d2`` at ``s_{i+1}``, ``x3 = x2 + d2 (s_{i+2} - s_{i+1})``, ``d3`` at ``s_{i+2}``
    and ``x' = x + (w1 d + w2 d2 + w3 d3) dt`` with ``w2 = s_{i+1} / (3 s_0)``, ``w3 = s_{i+2} / (3 s_0)``,
    ``w1 = 1 - w2 - w3``. Up to three model calls per step. ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        d = (x - denoised) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == sig[-1]:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(model, x_2, sigmas[i + 1], s_in)) / sig[i + 1]
            if sig[i + 2] == sig[-1]:
                w2 = sig[i + 1] / (2 * sig[0])
                x = x + (d * (1 - w2) + d_2 * w2) * dt
            else:
                x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
                d_3 = (x_3 - denoise(model, x_3, sigmas[i + 2], s_in)) / sig[i + 2]
                w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
                x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _ipndm_v_weights(sig: list[float], i: int, order: int) -> list[float]:
    """The variable-step iPNDM weights (zju-pi/diff-sampler ``ipndm_v``, ComfyUI ``sample_ipndm_v``).

    With ``h_n = s_{i+1} - s_i`` and the earlier steps ``h_{n-1}, h_{n-2}, h_{n-3}``: order 1 ``[1]``;
    order 2 ``[(2 + h_n/h_{n-1}) / 2, -(h_n/h_{n-1}) / 2]``; orders 3 and 4 add the terms ``temp1``,
    ``temp2`` of that method (written out below), which reduce to the fixed Adams-Bashforth weights of
    :func:`sample_ipndm` on a uniform grid. On an uneven grid the order-4 weights sum to
    ``1 + q (h_{n-2}/h_{n-3} - h_{n-1}/h_{n-2})``, not 1 (so the method is not consistent there); that is
    ComfyUI's formula, kept as it is.
    """
    if order == 1:
        return [1.0]
    h0 = sig[i + 1] - sig[i]
    h1 = sig[i] - sig[i - 1]
    c1, c2 = (2 + h0 / h1) / 2, -(h0 / h1) / 2
    if order == 2:
        return [c1, c2]
    h2 = sig[i - 1] - sig[i - 2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [c1 + t1, c2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = sig[i - 2] - sig[i - 3]
    t2 = (
        ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2)))
        * (h0 * (h0 + h1) * (h0 + h1 + h2))
        / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [
        c1 + t1 + t2,
        c2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


@torch.no_grad()
def sample_ipndm_v(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    max_order: int = 4,
) -> torch.Tensor:
    """iPNDM with variable-step weights (ComfyUI ``sample_ipndm_v``): :func:`sample_ipndm`'s update
    ``x' = x + (sigma' - sigma) sum_j b_j d_{i-j}`` with the weights of :func:`_ipndm_v_weights`, which
    account for unequal steps. The step to sigma 0 returns ``denoised``. ``generator`` is unused.
    """
    if max_order not in (1, 2, 3, 4):
        raise SD35Error(f"ipndm_v's max_order must be 1 to 4, got {max_order!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        slopes = [*slopes, (x - denoised) / sigmas[i]][-max_order:]
        if sig[i + 1] == 0:
            x = denoised
        else:
            weights = _ipndm_v_weights(sig, i, min(i + 1, max_order))
            x = x + (sig[i + 1] - sig[i]) * sum(w * d for w, d in zip(weights, reversed(slopes), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_gradient_estimation(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    ge_gamma: float = 2.0,
) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
    Optimization Perspective"; ComfyUI ``sample_gradient_estimation``).

    An Euler step ``x + d dt`` (``d = (x - D) / sigma``, ``dt = sigma' - sigma``), and from the second step
    ``+ (ge_gamma - 1) (d - d_prev) dt``. The step to sigma 0 returns ``denoised``. ``generator`` is unused.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    d_prev: torch.Tensor | None = None
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        d = (x - denoised) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if d_prev is not None:
                x = x + (ge_gamma - 1) * (d - d_prev) * dt
        d_prev = d
        if callback is not None:
            callback(i, total, x, denoised)
    return x


# --------------------------------------------------------------------------------- registry

SamplerName = Literal[
    "euler",
    "euler_ancestral",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_ancestral",
    "gradient_estimation",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
"""ComfyUI's sampler names that we have, in ComfyUI's ``SAMPLER_NAMES`` order."""

_2M_SDE_HEUN = functools.partial(stochastic.sample_dpmpp_2m_sde, solver_type="heun")
_UNI_PC_BH2 = functools.partial(sample_uni_pc, variant="bh2")
_RES_MULTISTEP_ANCESTRAL = functools.partial(stochastic.sample_res_multistep, eta=1.0)

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": stochastic.sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": stochastic.sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": stochastic.sample_dpmpp_2s_ancestral,
    "dpmpp_sde": stochastic.sample_dpmpp_sde,
    "dpmpp_sde_gpu": stochastic.sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": stochastic.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": stochastic.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": _2M_SDE_HEUN,
    "dpmpp_2m_sde_heun_gpu": _2M_SDE_HEUN,
    "dpmpp_3m_sde": stochastic.sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": stochastic.sample_dpmpp_3m_sde,
    "ddpm": stochastic.sample_ddpm,
    "lcm": stochastic.sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": stochastic.sample_res_multistep,
    "res_multistep_ancestral": _RES_MULTISTEP_ANCESTRAL,
    "gradient_estimation": sample_gradient_estimation,
    "er_sde": stochastic.sample_er_sde,
    "seeds_2": stochastic.sample_seeds_2,
    "seeds_3": stochastic.sample_seeds_3,
    "ddim": sample_euler,  # ComfyUI's "ddim" is euler (with random inpainting noise, which txt2img never uses)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": _UNI_PC_BH2,
}
assert tuple(SAMPLERS) == get_args(SamplerName)

STOCHASTIC_SAMPLERS: frozenset[str] = stochastic.BROWNIAN_SAMPLERS | frozenset(
    {
        "euler_ancestral",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "ddpm",
        "lcm",
        "res_multistep_ancestral",
        "er_sde",
        "seeds_2",
        "seeds_3",
    }
)
"""The samplers that draw noise (from their ``noise_sampler``, else their ``generator``); the others
ignore ``generator``. (``res_multistep`` takes a noise sampler too, but at its ``eta = 0`` adds none.)"""

SHIFTED_SAMPLERS: frozenset[str] = frozenset(
    name
    for name in SAMPLERS
    if name.startswith(("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"))
    or name in ("er_sde", "seeds_2", "seeds_3")
)
"""The samplers that take the model's ``shift`` (to move a first sigma of 1 just below it, as ComfyUI)."""

MISSING_SAMPLERS: dict[str, str] = {
    **{
        name: "CFG++ samplers need the unguided prediction inside the sampler, which our guidance does not expose"
        for name in (
            "euler_cfg_pp",
            "euler_ancestral_cfg_pp",
            "dpmpp_2s_ancestral_cfg_pp",
            "dpmpp_2m_cfg_pp",
            "res_multistep_cfg_pp",
            "res_multistep_ancestral_cfg_pp",
            "gradient_estimation_cfg_pp",
        )
    },
    "dpm_fast": "an adaptive-order DPM-Solver whose steps do not follow a scheduler",
    "dpm_adaptive": "an adaptive-step DPM-Solver whose steps do not follow a scheduler",
    "sa_solver": "not implemented yet",
    "sa_solver_pece": "not implemented yet",
}
"""ComfyUI's samplers we do not have, and why."""


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; an unknown name raises :class:`SD35Error` listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        why = (
            f" (ComfyUI's {name} is not available here: {MISSING_SAMPLERS[name]})"
            if name in MISSING_SAMPLERS
            else ""
        )
        raise SD35Error(f"unknown sampler {name!r}{why}; choose one of: {', '.join(SAMPLERS)}.") from None


def run_sampler(
    name: str,
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    shift: float,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Sampler ``name`` on ``(model, x, sigmas)`` with what it takes: ``noise_sampler`` (None: the
    ``generator``'s stream) for those that can add noise, the model's ``shift`` for
    :data:`SHIFTED_SAMPLERS`. The one place a sampler is called by name."""
    sample = get_sampler(name)
    options: dict[str, object] = {}
    if name in STOCHASTIC_SAMPLERS or name == "res_multistep":
        options["noise_sampler"] = noise_sampler
    if name in SHIFTED_SAMPLERS:
        options["shift"] = shift
    return sample(model, x, sigmas, callback=callback, generator=generator, **options)
