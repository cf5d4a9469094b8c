"""What every sampler shares: the denoiser and callback types, float32 set-up, and the flow's log-SNR.

Kept apart from the samplers so that the deterministic (:mod:`sd35.sampling.samplers`) and the stochastic
(:mod:`sd35.sampling.stochastic`) ones build on the same few helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sd35.errors import SD35Error
from sd35.sampling.schedules import percent_to_sigma

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x, sigma) -> denoised``: sigma has shape (B,), the result is x0-space like ``x``."""

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``callback(step, total, x, denoised)`` after each step: ``step`` is the 0-based index of the step just
taken (``step + 1`` of ``total`` are done), ``x`` the new sample and ``denoised`` the prediction it used."""

Sampler = Callable[..., torch.Tensor]


def prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of ``x`` and ``sigmas`` (on x's device) and the (B,) ones that batch a sigma."""
    x = x.to(torch.float32)
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.float32)
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise SD35Error(
            f"a sampler needs a 1-D schedule of at least two sigmas, got shape {tuple(sigmas.shape)}."
        )
    return x, sigmas, x.new_ones([x.shape[0]])


def denoise(
    model: Denoiser, x: torch.Tensor, sigma: torch.Tensor | float, s_in: torch.Tensor
) -> torch.Tensor:
    """``model(x, sigma * s_in)`` in float32 (``sigma`` a 0-d float32 tensor or a float)."""
    return model(x, sigma * s_in).to(torch.float32)


def flow_lambda(sigma: float) -> float:
    """The flow half-log-SNR ``log(alpha / sigma) = log((1 - sigma) / sigma)`` (-inf at 1, inf at 0)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def phi(k: int, z: float) -> float:
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


SNR_OFFSET_PERCENT = 1e-4  # ComfyUI offset_first_sigma_for_snr's percent_offset


def offset_first_sigma(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``sigmas`` with a first sigma >= 1 moved to the model's sigma at time ``1 - 1e-4`` (float32).

    ComfyUI's samplers that work in the flow half-log-SNR ``log((1 - sigma) / sigma)`` (-inf at sigma 1) do
    this first (``comfy/k_diffusion/sampling.py`` ``offset_first_sigma_for_snr``, with
    ``percent_to_sigma(1e-4) = shift t / (1 + (shift - 1) t)`` at ``t = 1 - 1e-4``, 0.9999667 at shift 3),
    so their first step runs from just below 1. The noise of a Brownian tree is still placed on the
    un-moved schedule's range.
    """
    if len(sigmas) < 2 or float(sigmas[0]) < 1:
        return sigmas
    moved = sigmas.clone()
    moved[0] = percent_to_sigma(SNR_OFFSET_PERCENT, shift)
    return moved
