"""Samplers for the flow model, as plain functions of ``(model, x, sigmas)``: the set ComfyUI users know.

``model(x, sigma) -> denoised`` is a denoiser in x0-space: ``x`` is (B, ...) and ``sigma`` has shape (B,).
The model is a rectified flow, ``x_sigma = (1 - sigma) x0 + sigma noise`` with sigma in [0, 1]; write
``alpha = 1 - sigma`` for its signal scale. Its probability-flow ODE is
``dx/dsigma = (x - denoised) / sigma``, the same ODE k-diffusion's samplers solve, so the reference (and
we) use k-diffusion's deterministic updates unchanged on the flow model's denoised prediction
(Stability-AI/sd3.5 ``sd3_impls.py`` ``sample_euler`` and ``sample_dpmpp_2m``).

Every sampler has the same signature, ``sample_X(model, x, sigmas, *, callback=None, generator=None,
**options) -> Tensor``, with a few keyword ``options`` of its own (ComfyUI's defaults). Names and
maths follow ComfyUI (``comfy/samplers.py`` ``KSAMPLER_NAMES``; ``comfy/k_diffusion/sampling.py``;
``comfy/extra_samplers/uni_pc.py``); no code is taken from it, each docstring states its formula.

- Deterministic ODE solvers (``generator`` is unused): ``euler`` (order 1), ``heun``, ``dpm_2``,
  ``dpmpp_2m`` (order 2), and the multistep ``lms`` (Adams-Bashforth 4), ``ipndm``, ``deis`` (tAB 3) and
  ``uni_pc`` (UniPC-3), of higher order per step once their history is full. For lms, ipndm and deis the
  Euler first step (and for ipndm its equal-step weights on a graded grid) caps the *asymptotic* global
  order at 2, but on the shifted schedules, whose first step is short, their error still falls much
  faster than second order up to 100+ steps; uni_pc approaches third order.
- Stochastic samplers (:data:`STOCHASTIC_SAMPLERS`) add noise in the *rectified-flow* form, the one
  ComfyUI uses for ``CONST`` (flow) model sampling: ``euler_ancestral``, ``dpmpp_2s_ancestral``,
  ``dpmpp_2m_sde``, ``dpmpp_3m_sde``, ``lcm``. Their noise is ``torch.randn(x.shape, generator=generator,
  dtype=float32)`` drawn on the generator's device (CPU by default) and then moved to ``x``'s device, one
  draw per step that adds noise, so a seeded generator gives the same run on any device. With
  ``generator=None`` a fresh CPU generator is seeded from torch's global RNG (so ``torch.manual_seed``
  still makes runs repeat).

``generator`` is a :data:`Generators`: one ``torch.Generator`` for the whole batch (the draw above), None,
or a sequence of generators, one per row of ``x``, for a batch that samples several independent images
at once. Then row i's noise is ``torch.randn((1, *x.shape[1:]), generator=generators[i], dtype=float32)``
on that generator's device, and the rows are concatenated on ``x``'s device: row i of a batched run draws
exactly the noise that a run of row i alone with ``generators[i]`` draws. A sequence whose length is not
the batch size is an :class:`~sd35.errors.SD35Error`.

The loop runs in float32 whatever the model's dtype: ``x``, ``sigmas`` and every ``denoised`` are cast
to float32 (the reference's x becomes float32 after its first update, which mixes in the float32
denoised: ``sd3_impls.py`` ``sample_dpmpp_2m``). Step
coefficients that need logs, exponentials or linear solves are computed from the sigmas in float64 on
the host. A last step to sigma 0 returns the denoised prediction (the limit of each update there), so
no sampler takes ``log(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np
import torch

from sd35.errors import SD35Error

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x, sigma) -> denoised``: sigma has shape (B,), the result is x0-space like ``x``."""

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``callback(step, total, x, denoised)`` after each step: ``step`` is the 0-based index of the step just
taken (``step + 1`` of ``total`` are done), ``x`` the new sample and ``denoised`` the prediction it used."""

Sampler = Callable[..., torch.Tensor]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""A sampler's ``generator``: one generator for the whole batch, one per row of ``x``, or None (see the
module docstring)."""


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of ``x`` and ``sigmas`` (on x's device) and the (B,) ones that batch a sigma."""
    x = x.to(torch.float32)
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.float32)
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise SD35Error(
            f"a sampler needs a 1-D schedule of at least two sigmas, got shape {tuple(sigmas.shape)}."
        )
    return x, sigmas, x.new_ones([x.shape[0]])


def _denoise(
    model: Denoiser, x: torch.Tensor, sigma: torch.Tensor | float, s_in: torch.Tensor
) -> torch.Tensor:
    """``model(x, sigma * s_in)`` in float32 (``sigma`` a 0-d float32 tensor or a float)."""
    return model(x, sigma * s_in).to(torch.float32)


def _noise_source(x: torch.Tensor, generator: Generators) -> Callable[[], torch.Tensor]:
    """A function drawing standard normal noise shaped like ``x``: float32 on the generator's device,
    then moved to ``x``'s device. ``generator=None`` seeds a fresh CPU generator from torch's global RNG.

    A sequence of generators, one per row of ``x``, draws row i from ``generator[i]`` alone (shaped
    ``(1, *x.shape[1:])``), so each row gets exactly the noise a batch-of-one run with that generator gets.
    """
    if generator is None:
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
        generator = torch.Generator().manual_seed(seed)
    if isinstance(generator, torch.Generator):
        single = generator

        def draw() -> torch.Tensor:
            noise = torch.randn(x.shape, generator=single, dtype=torch.float32, device=single.device)
            return noise.to(x.device)

        return draw
    rows = _row_generators(generator, x.shape[0])
    row_shape = (1, *x.shape[1:])

    def draw_rows() -> torch.Tensor:
        noise = [torch.randn(row_shape, generator=g, dtype=torch.float32, device=g.device) for g in rows]
        return torch.cat([n.to(x.device) for n in noise])

    return draw_rows


def _row_generators(generators: Sequence[torch.Generator], batch: int) -> list[torch.Generator]:
    """``generators`` as a list of one ``torch.Generator`` per row of a batch of ``batch``, else an error."""
    if not isinstance(generators, Sequence):
        raise SD35Error(
            f"generator must be a torch.Generator, a sequence of them (one per row) or None, "
            f"got {type(generators).__name__}."
        )
    rows = list(generators)
    if len(rows) != batch:
        raise SD35Error(
            f"{len(rows)} generators were given for a batch of {batch} rows; give exactly one per row."
        )
    bad = [type(g).__name__ for g in rows if not isinstance(g, torch.Generator)]
    if bad:
        raise SD35Error(
            f"every per-row generator must be a torch.Generator, got {', '.join(sorted(set(bad)))}."
        )
    return rows


def _flow_lambda(sigma: float) -> float:
    """The flow half-log-SNR ``log(alpha / sigma) = log((1 - sigma) / sigma)`` (-inf at 1, inf at 0)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def _phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_n z^n / (n + k)!`` (``phi_0 = exp``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``).

    The exponential-integrator weights; the series avoids the recurrence's cancellation for small ``z``.
    """
    if abs(z) < 1.0:
        term, total = 1.0 / math.factorial(k), 0.0
        for n in range(40):
            total += term
            term *= z / (n + k + 1)
        return total
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


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
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, s_in)
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
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, s_in)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(model, x_2, sigma_next, s_in)) / sigma_next
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
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, s_in)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = (x_2 - _denoise(model, x_2, sigma_mid, s_in)) / sigma_mid
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
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    previous: torch.Tensor | None = None
    lam_previous: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, s_in)
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


def _lagrange_integrals(nodes: list[float], a: float, b: float, points: int = 8, warp=None) -> list[float]:
    """``[int_a^b L_j(warp(s)) ds for j]``, ``L_j`` the Lagrange basis on ``nodes`` (in warped time).

    Gauss-Legendre quadrature with ``points`` nodes in ``s``: exact for polynomials of degree up to
    ``2 points - 1`` (so for LMS, where ``warp`` is the identity) and to rounding for DEIS's smooth warp.
    """
    gx, gw = np.polynomial.legendre.leggauss(points)
    s = (b - a) / 2 * gx + (a + b) / 2
    tau = s if warp is None else warp(s)
    out = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis = basis * (tau - node_k) / (node_j - node_k)
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
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
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
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma, s_in)
        slopes = [*slopes, (x - denoised) / sigma][-max_order:]
        if sigma_next == 0:
            x = denoised
        else:
            weights = _IPNDM_COEFFS[min(i + 1, max_order) - 1]
            x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, reversed(slopes), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _deis_time(sigma: np.ndarray | float) -> np.ndarray | float:
    """DEIS's time for a VE-style sigma: the VP-linear schedule fitted to EDM's ``[0.002, 80]``.

    ``alpha_bar(t) = exp(-(beta_d t^2 / 2 + beta_min t)) = 1 / (1 + sigma^2)`` with ``beta_d, beta_min``
    such that ``sigma(1e-3) = 0.002`` and ``sigma(1) = 80`` (ComfyUI ``comfy/k_diffusion/deis.py``
    ``edm2t``), inverted: ``t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d``.
    """
    eps_s, sigma_min, sigma_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d


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
    max_order)`` steps and integrated over sigma: ``c_j = int_sigma^sigma' L_j(t(s)) ds``. ComfyUI writes
    this integral over ``t`` with ``dsigma/dt`` and sums 10,000 points; we use Gauss-Legendre quadrature
    in sigma, so the coefficients agree to about 1e-4 relative (ComfyUI's sum is that coarse).
    Order ``max_order`` (3) per step once the history is full (the Euler first step caps the asymptotic
    global order at 2), one model call per step; the step to sigma 0 is
    first order (Euler), i.e. returns ``denoised``. ``generator`` is unused.
    """
    if max_order not in (1, 2, 3, 4):
        raise SD35Error(f"deis's max_order must be 1 to 4, got {max_order!r}.")
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    times = _deis_time(np.asarray(sig, dtype=np.float64)).tolist()
    total = len(sig) - 1
    slopes: list[torch.Tensor] = []
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
        slopes = [*slopes, (x - denoised) / sigmas[i]][-max_order:]
        if sig[i + 1] <= 0:
            x = denoised
        else:
            cur = min(i + 1, max_order)
            if cur == 1:
                coeffs = [sig[i + 1] - sig[i]]
            else:
                nodes = [times[i - j] for j in range(cur)]
                coeffs = _lagrange_integrals(nodes, sig[i], sig[i + 1], points=16, warp=_deis_time)
            x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes[-cur:]), strict=True))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


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
    b = np.array([math.factorial(i + 1) * hh * _phi(i + 2, hh) / b_h for i in range(order)])
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
    that ends above 0 ends with that first-order step, which caps the global order at 2). ComfyUI ends
    at VE sigma 0.001 (``timesteps[-1] = 0.001``) to dodge ``log(0)``; we take the limit ``sigma_t = 0``
    of that last first-order update instead, which returns the last ``denoised``. ``generator`` is
    unused. Checked step by step against diffusers' ``UniPCMultistepScheduler`` (bh1, VE sigmas).
    """
    if order not in (1, 2, 3):
        raise SD35Error(f"uni_pc's order must be 1 to 3, got {order!r}.")
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    lams = [-math.log(s) if s > 0 else math.inf for s in sig]
    max_order = max(1, min(order, total - 1))
    history: list[tuple[float, torch.Tensor]] = [(lams[0], _denoise(model, x, sigmas[0], s_in))]
    for i in range(total):
        k = i + 1
        lam_s, d_0 = history[-1]
        if sig[k] == 0:
            x = d_0
        else:
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
            x = x_base - b_h * sum(
                (rho * d1 for rho, d1 in zip(rhos_p, d1s, strict=True)), torch.zeros_like(x)
            )
            if k < total:  # corrector, with the model call the next step needs anyway
                d_t = _denoise(model, x, sigmas[k], s_in)
                corr = sum(
                    (rho * d1 for rho, d1 in zip(rhos_c[:-1], d1s, strict=True)), rhos_c[-1] * (d_t - d_0)
                )
                x = x_base - b_h * corr
                history = [*history, (lams[k], d_t)][-max_order:]
        if callback is not None:
            callback(i, total, x, d_0)
    return x


# --------------------------------------------------------------------------------- stochastic (flow)


def _rf_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """``(sigma_down, alpha_next / alpha_down, renoise)`` of ComfyUI's rectified-flow ancestral step.

    ``sigma_down = sigma' (1 + (sigma'/sigma - 1) eta)`` (``sigma'^2 / sigma`` at ``eta = 1``); after the
    deterministic step to ``sigma_down``, ``x' = (alpha' / alpha_down) x + renoise * noise`` with
    ``renoise = sqrt(sigma'^2 - (sigma_down alpha' / alpha_down)^2)``, which puts back exactly the
    marginal ``(1 - sigma') x0 + sigma' noise`` (``comfy/k_diffusion/sampling.py``
    ``sample_euler_ancestral_RF``).
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
    scale = alpha_next / alpha_down
    renoise = math.sqrt(max(sigma_next**2 - (sigma_down * scale) ** 2, 0.0))
    return sigma_down, scale, renoise


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral in the rectified-flow form (ComfyUI ``sample_euler_ancestral_RF``, which
    ``sample_euler_ancestral`` runs for ``CONST`` model sampling; ``comfy/k_diffusion/sampling.py``).

    With ``sigma_down``, ``alpha' / alpha_down`` and ``renoise`` from :func:`_rf_ancestral_step`: an Euler
    step to ``sigma_down``, ``x_d = (sigma_down / sigma) x + (1 - sigma_down / sigma) D``, then (if
    ``eta > 0``) ``x' = (alpha' / alpha_down) x_d + s_noise * renoise * noise``. ``eta = 0`` is
    :func:`sample_euler`. The step to sigma 0 returns ``denoised``. One model call and one noise draw per
    step; first order.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = _noise_source(x, generator)
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            sigma_down, scale, renoise = _rf_ancestral_step(sig[i], sig[i + 1], eta)
            ratio = sigma_down / sig[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = scale * x + (s_noise * renoise) * noise()
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral in the rectified-flow form (ComfyUI ``sample_dpmpp_2s_ancestral_RF``,
    run by ``sample_dpmpp_2s_ancestral`` for ``CONST`` model sampling; ``comfy/k_diffusion/sampling.py``).

    With the flow half-log-SNR ``lambda(s) = log((1 - s) / s)`` and ``sigma_down`` from
    :func:`_rf_ancestral_step`: the midpoint ``sigma_s = 1 / (1 + exp((lambda(sigma) +
    lambda(sigma_down)) / 2))`` (ComfyUI's fixed ``0.9999`` when ``sigma == 1``, where lambda is -inf);
    ``u = (sigma_s / sigma) x + (1 - sigma_s / sigma) D``, ``D_2 = D(u, sigma_s)``;
    ``x_d = (sigma_down / sigma) x + (1 - sigma_down / sigma) D_2`` (for a flow model the DPM-Solver++
    first-order update ``(sigma_t / sigma) x - alpha_t expm1(-h) D`` is exactly this Euler-like form);
    then, if ``eta > 0``, ``x' = (alpha' / alpha_down) x_d + s_noise * renoise * noise``. The step to
    sigma 0 returns ``denoised``. Two model calls and one noise draw per step; its ``eta = 0`` ODE update
    is second order.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = _noise_source(x, generator)
    for i in range(total):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(model, x, sigmas[i], s_in)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, scale, renoise = _rf_ancestral_step(sigma, sigma_next, eta)
            if sigma == 1.0:
                sigma_s = 0.9999
            else:
                lam_mid = (_flow_lambda(sigma) + _flow_lambda(sigma_down)) / 2
                sigma_s = 1.0 / (1.0 + math.exp(lam_mid))
            ratio_s = sigma_s / sigma
            u = ratio_s * x + (1 - ratio_s) * denoised
            denoised_2 = _denoise(model, u, sigma_s, s_in)
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised_2
            if eta > 0:
                x = scale * x + (s_noise * renoise) * noise()
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _sde_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float, float]:
    """``(h, x_coeff, d_coeff, noise_coeff)`` of the flow DPM-Solver++ SDE first-order step.

    ``h = lambda' - lambda`` in the flow half-log-SNR ``lambda = log((1 - sigma) / sigma)``, ``alpha' =
    1 - sigma'``: ``x' = (sigma'/sigma) e^(-eta h) x + alpha' (1 - e^(-(1 + eta) h)) D +
    sigma' sqrt(1 - e^(-2 eta h)) noise``. At ``sigma = 1`` (``h = inf``) this is its limit: the
    ``x`` term vanishes (for ``eta > 0``) and ``x' = alpha' D + sigma' noise``.
    """
    h = _flow_lambda(sigma_next) - _flow_lambda(sigma)
    decay = math.exp(-eta * h) if eta > 0 else 1.0
    x_coeff = sigma_next / sigma * decay
    d_coeff = (1.0 - sigma_next) * -math.expm1(-(1 + eta) * h)
    noise_coeff = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) if eta > 0 else 0.0
    return h, x_coeff, d_coeff, noise_coeff


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant, in the flow half-log-SNR (ComfyUI ``sample_dpmpp_2m_sde``
    with ``sigma_to_half_log_snr`` for ``CONST`` model sampling; ``comfy/k_diffusion/sampling.py``).

    ``lambda = log((1 - sigma) / sigma)``, ``alpha = 1 - sigma``, ``h = lambda' - lambda``:
    ``x' = (sigma'/sigma) e^(-eta h) x + alpha' (1 - e^(-(1+eta) h)) D``
    ``+ (1/2) alpha' (1 - e^(-(1+eta) h)) (h / h_last) (D - D_last)`` (from the second step on)
    ``+ s_noise sigma' sqrt(1 - e^(-2 eta h)) noise`` (if ``eta > 0``).
    The step to sigma 0 returns ``denoised``. ComfyUI moves a first sigma of 1 (lambda = -inf) to just
    below 1 (``offset_first_sigma_for_snr``); we take the update's exact limit there instead
    (:func:`_sde_step`); the two differ by ~1e-3 (in the second step's multistep term). ComfyUI draws
    its noise from a Brownian tree; its
    increments over the steps are independent standard normals, which is what we draw. One model call
    and one noise draw per step; ``eta = 0`` gives a deterministic second-order multistep ODE solver.
    A step much longer in lambda than the one before (the reference schedule's last one, 0.07 -> 0.0089
    at 50 steps) extrapolates the noisy ``D - D_last`` several-fold: at ``eta = 1`` that over-disperses
    the result (ComfyUI's maths does the same); schedules even in lambda do not.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = _noise_source(x, generator)
    previous: torch.Tensor | None = None
    h_last: float | None = None
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h, x_coeff, d_coeff, noise_coeff = _sde_step(sig[i], sig[i + 1], eta)
            x = x_coeff * x + d_coeff * denoised
            if previous is not None:
                x = x + (0.5 * d_coeff * (h / h_last)) * (denoised - previous)  # h / inf = 0 after sigma 1
            if eta > 0 and s_noise > 0:
                x = x + (s_noise * noise_coeff) * noise()
            h_last = h
        previous = denoised
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE in the flow half-log-SNR (ComfyUI ``sample_dpmpp_3m_sde`` with
    ``sigma_to_half_log_snr`` for ``CONST`` model sampling; ``comfy/k_diffusion/sampling.py``).

    ``lambda = log((1 - sigma) / sigma)``, ``alpha = 1 - sigma``, ``h = lambda' - lambda``,
    ``H = (1 + eta) h``, ``phi_2 = expm1(-H)/H + 1``, ``phi_3 = phi_2 / H - 1/2``:
    ``x' = (sigma'/sigma) e^(-eta h) x + alpha' (1 - e^(-H)) D + corr``
    ``+ s_noise sigma' sqrt(1 - e^(-2 eta h)) noise``
    with, from the history ``D_1, D_2`` and steps ``h_1, h_2`` (``r0 = h_1/h``, ``r1 = h_2/h``):
    ``d1_0 = (D - D_1)/r0``, ``d1_1 = (D_1 - D_2)/r1``, ``d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1)``,
    ``d2 = (d1_0 - d1_1)/(r0 + r1)``, ``corr = alpha' (phi_2 d1 - phi_3 d2)`` (third step on), or
    ``corr = alpha' phi_2 (D - D_1)/r0`` (second step). The step to sigma 0 returns ``denoised``; a
    first sigma of 1 is handled by the exact limit, as in :func:`sample_dpmpp_2m_sde` (whose notes on
    ComfyUI's offset and Brownian noise apply here too). One model call and one noise draw per step.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = _noise_source(x, generator)
    d_1: torch.Tensor | None = None
    d_2: torch.Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
        h = None
        if sig[i + 1] == 0:
            x = denoised
        else:
            h, x_coeff, d_coeff, noise_coeff = _sde_step(sig[i], sig[i + 1], eta)
            x = x_coeff * x + d_coeff * denoised
            big_h = (1 + eta) * h
            phi_2 = math.expm1(-big_h) / big_h + 1
            alpha_next = 1.0 - sig[i + 1]
            if h_2 is not None:
                # 1/r0 = h/h_1, 1/r1 = h/h_2, r0/(r0+r1) = h_1/(h_1+h_2), 1/(r0+r1) = h/(h_1+h_2):
                # written so that a first step from sigma 1 (h = inf) gives 0, not inf/inf.
                phi_3 = phi_2 / big_h - 0.5
                d1_0 = (denoised - d_1) * (h / h_1)
                d1_1 = (d_1 - d_2) * (h / h_2)
                d1 = d1_0 + (d1_0 - d1_1) * (h_1 / (h_1 + h_2))
                d2 = (d1_0 - d1_1) * (h / (h_1 + h_2))
                x = x + (alpha_next * phi_2) * d1 - (alpha_next * phi_3) * d2
            elif h_1 is not None:
                x = x + (alpha_next * phi_2 * (h / h_1)) * (denoised - d_1)
            if eta > 0 and s_noise > 0:
                x = x + (s_noise * noise_coeff) * noise()
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Latent Consistency Model sampling (ComfyUI ``sample_lcm``, ``comfy/k_diffusion/sampling.py``).

    Denoise, then re-noise with the flow forward process (ComfyUI's ``CONST.noise_scaling``):
    ``x' = (1 - sigma') D + sigma' s_noise noise``; the step to sigma 0 returns ``D``. One model call and
    one noise draw per step. Meant for consistency (LCM/turbo-style) models: with an ordinary
    posterior-mean denoiser each re-noising loses variance, so it does not converge to the data
    distribution as the steps grow.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = _noise_source(x, generator)
    for i in range(total):
        denoised = _denoise(model, x, sigmas[i], s_in)
        x = denoised
        if sig[i + 1] > 0:
            x = (1.0 - sig[i + 1]) * denoised + (sig[i + 1] * s_noise) * noise()
        if callback is not None:
            callback(i, total, x, denoised)
    return x


# --------------------------------------------------------------------------------- registry

SamplerName = Literal[
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
"""ComfyUI's sampler names (in ComfyUI's ``KSAMPLER_NAMES`` order, ``uni_pc`` last as in its list)."""

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
    "uni_pc": sample_uni_pc,
}
assert tuple(SAMPLERS) == get_args(SamplerName)

STOCHASTIC_SAMPLERS: frozenset[str] = frozenset(
    {"euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm"}
)
"""The samplers that draw noise (from their ``generator``); the others ignore it."""


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; an unknown name raises :class:`SD35Error` listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SD35Error(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.") from None
