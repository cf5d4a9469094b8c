"""ODE samplers for the flow model, as plain functions of ``(model, x, sigmas)``.

``model(x, sigma) -> denoised`` is a denoiser in x0-space: ``x`` is (B, ...) and ``sigma`` has shape (B,).
For a flow model the probability-flow ODE is ``dx/dsigma = (x - denoised) / sigma``, the same ODE
k-diffusion's samplers solve, so the reference (and we) use its Euler and DPM-Solver++(2M) updates
unchanged on the flow model's denoised prediction (``shared/spec/REFERENCE.md`` 2.4).

The loop runs in float32 whatever the model's dtype: ``x``, ``sigmas`` and every ``denoised`` are cast
to float32 (the reference's x becomes float32 after its first update, REFERENCE.md 6.4). No noise is
injected; both samplers are deterministic given ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sd35.errors import SD35Error

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x, sigma) -> denoised``: sigma has shape (B,), the result is x0-space like ``x``."""

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``callback(step, total, x, denoised)`` after each step: ``step`` is the 0-based index of the step just
taken (``step + 1`` of ``total`` are done), ``x`` the new sample and ``denoised`` the prediction it used."""

Sampler = Callable[..., torch.Tensor]


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of ``x`` and ``sigmas`` (on x's device) and the (B,) ones that batch a sigma."""
    x = x.to(torch.float32)
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.float32)
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise SD35Error(
            f"a sampler needs a 1-D schedule of at least two sigmas, got shape {tuple(sigmas.shape)}."
        )
    return x, sigmas, x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_euler(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """Euler's method on ``dx/dsigma = (x - denoised) / sigma`` (REFERENCE.md 2.4, sd3_impls.py ``sample_euler``).

    One model call per step. Without churn, this is k-diffusion's ``sample_euler`` and, for a flow model,
    the same update as diffusers' ``FlowMatchEulerDiscreteScheduler`` (``x + (sigma' - sigma) * v``).
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in).to(torch.float32)
        slope = (x - denoised) / sigma
        x = x + slope * (sigma_next - sigma)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M), the SD3.5 default (REFERENCE.md 2.4, sd3_impls.py ``sample_dpmpp_2m``).

    An exponential integrator in ``lambda = -log(sigma)``: with ``h = lambda' - lambda``,
    ``x' = (sigma'/sigma) x - expm1(-h) D``. The first step uses ``D = denoised`` (first order); later
    steps extrapolate ``D = (1 + 1/2r) denoised - (1/2r) previous`` with ``r = h_previous / h``
    (second order, multistep: still one model call per step). The last step, to sigma 0, is the limit
    of that update (``lambda' = inf``): it returns ``denoised`` itself, as the reference does.
    """
    x, sigmas, s_in = _prepare(x, sigmas)
    total = len(sigmas) - 1
    previous: torch.Tensor | None = None
    lam_previous: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in).to(torch.float32)
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


SAMPLERS: dict[str, Sampler] = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; an unknown name raises :class:`SD35Error` listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SD35Error(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.") from None
