"""The stochastic samplers: those that add noise at each step, with the noise source as a parameter.

Each is a plain function ``sample_X(model, x, sigmas, *, callback=None, generator=None,
noise_sampler=None, **options)`` like the deterministic ones (:mod:`sd35.sampling.samplers`), in the
*rectified-flow* form ComfyUI uses for ``CONST`` (flow) model sampling where ComfyUI has one
(``comfy/k_diffusion/sampling.py``; no code is taken from it, each docstring states its formula).
``noise_sampler`` (:data:`~sd35.sampling.noise.NoiseSampler`) gives the noise of each step; without one,
the noise continues ``generator``'s stream (:func:`~sd35.sampling.noise.stream_noise`). ComfyUI's own
choice per sampler is :func:`comfy_noise_sampler`. The samplers that work in the flow half-log-SNR take
the model's ``shift`` to move a first sigma of 1 just below it, as ComfyUI does
(:func:`~sd35.sampling.sampler_base.offset_first_sigma`).
"""

from __future__ import annotations

import math

import torch

from sd35.errors import SD35Error
from sd35.sampling.noise import Generators, NoiseSampler, brownian_noise, seeded_noise, stream_noise
from sd35.sampling.sampler_base import (
    Callback,
    Denoiser,
    denoise,
    flow_lambda,
    offset_first_sigma,
    prepare,
)


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
    noise_sampler: NoiseSampler | None = None,
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
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            sigma_down, scale, renoise = _rf_ancestral_step(sig[i], sig[i + 1], eta)
            ratio = sigma_down / sig[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = scale * x + (s_noise * renoise) * noise(sig[i], sig[i + 1])
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
    noise_sampler: NoiseSampler | None = None,
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
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    for i in range(total):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise(model, x, sigmas[i], s_in)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, scale, renoise = _rf_ancestral_step(sigma, sigma_next, eta)
            if sigma == 1.0:
                sigma_s = 0.9999
            else:
                lam_mid = (flow_lambda(sigma) + flow_lambda(sigma_down)) / 2
                sigma_s = 1.0 / (1.0 + math.exp(lam_mid))
            ratio_s = sigma_s / sigma
            u = ratio_s * x + (1 - ratio_s) * denoised
            denoised_2 = denoise(model, u, sigma_s, s_in)
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised_2
            if eta > 0:
                x = scale * x + (s_noise * renoise) * noise(sig[i], sig[i + 1])
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
    h = flow_lambda(sigma_next) - flow_lambda(sigma)
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
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    shift: float = 3.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE in the flow half-log-SNR (ComfyUI ``sample_dpmpp_2m_sde`` with
    ``sigma_to_half_log_snr`` for ``CONST`` model sampling; ``comfy/k_diffusion/sampling.py``).

    ``lambda = log((1 - sigma) / sigma)``, ``alpha = 1 - sigma``, ``h = lambda' - lambda``,
    ``E = 1 - e^(-(1+eta) h)``:
    ``x' = (sigma'/sigma) e^(-eta h) x + alpha' E D + corr + s_noise sigma' sqrt(1 - e^(-2 eta h)) noise``
    (noise if ``eta > 0``), with, from the second step on, ``corr = (1/2) alpha' E (h / h_last) (D - D_last)``
    (``solver_type="midpoint"``, ComfyUI's ``dpmpp_2m_sde``) or
    ``corr = alpha' (1 - E / ((1+eta) h)) (h / h_last) (D - D_last)`` (``"heun"``, ``dpmpp_2m_sde_heun``). A first sigma of 1 (lambda = -inf) is first moved to just below 1,
    :func:`~sd35.sampling.sampler_base.offset_first_sigma` at the model's ``shift``, as ComfyUI does.
    ComfyUI's noise here is a Brownian tree's (:func:`~sd35.sampling.noise.brownian_noise`); by default
    it is our stream. The step to sigma 0 returns ``denoised``. One model call and one noise draw per
    step; ``eta = 0`` gives a deterministic second-order multistep ODE solver. A step much longer in
    lambda than the one before (the reference schedule's last one, 0.07 -> 0.0089 at 50 steps)
    extrapolates the noisy ``D - D_last`` several-fold: at ``eta = 1`` that over-disperses the result
    (ComfyUI's maths does the same); schedules even in lambda do not.
    """
    if solver_type not in ("midpoint", "heun"):
        raise SD35Error(f"dpmpp_2m_sde's solver_type must be 'midpoint' or 'heun', got {solver_type!r}.")
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift)
    sig = sigmas.tolist()
    total = len(sig) - 1
    previous: torch.Tensor | None = None
    h_last: float | None = None
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h, x_coeff, d_coeff, noise_coeff = _sde_step(sig[i], sig[i + 1], eta)
            x = x_coeff * x + d_coeff * denoised
            if previous is not None:
                if solver_type == "midpoint":
                    weight = 0.5 * d_coeff
                else:
                    weight = (1.0 - sig[i + 1]) * (1.0 - -math.expm1(-(1 + eta) * h) / ((1 + eta) * h))
                x = x + (weight * (h / h_last)) * (denoised - previous)
            if eta > 0 and s_noise > 0:
                x = x + (s_noise * noise_coeff) * noise(sig[i], sig[i + 1])
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
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    shift: float = 3.0,
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
    first sigma of 1 is moved just below 1 first, as in :func:`sample_dpmpp_2m_sde` (whose notes on
    the Brownian noise apply here too). One model call and one noise draw per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift)
    sig = sigmas.tolist()
    total = len(sig) - 1
    d_1: torch.Tensor | None = None
    d_2: torch.Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
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
                x = x + (s_noise * noise_coeff) * noise(sig[i], sig[i + 1])
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
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Latent Consistency Model sampling (ComfyUI ``sample_lcm``, ``comfy/k_diffusion/sampling.py``).

    Denoise, then re-noise with the flow forward process (ComfyUI's ``CONST.noise_scaling``):
    ``x' = (1 - sigma') D + sigma' s_noise noise``; the step to sigma 0 returns ``D``. One model call and
    one noise draw per step. Meant for consistency (LCM/turbo-style) models: with an ordinary
    posterior-mean denoiser each re-noising loses variance, so it does not converge to the data
    distribution as the steps grow.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        x = denoised
        if sig[i + 1] > 0:
            x = (1.0 - sig[i + 1]) * denoised + (sig[i + 1] * s_noise) * noise(sig[i], sig[i + 1])
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _ve_ancestral_step(sigma_from, sigma_to, eta: float):
    """``(sigma_down, sigma_up)`` of k-diffusion's ancestral step (``get_ancestral_step``), VE form.

    ``sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))`` and
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``; ``eta = 0`` gives ``(sigma_to, 0)``. ComfyUI uses it,
    unchanged for flow models, in ``res_multistep`` (on sigma) and ``dpmpp_sde`` (on ``sigma / alpha``).
    Works on floats and on 0-d tensors alike.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 ancestral in the rectified-flow form (ComfyUI ``sample_dpm_2_ancestral_RF``).

    With ``sigma_down``, ``alpha' / alpha_down`` and ``renoise`` of :func:`_rf_ancestral_step` and
    ``d = (x - D) / sigma``: the log-midpoint ``s_mid = sqrt(sigma sigma_down)``, ``x2 = x + (s_mid - sigma)
    d``, ``d2 = (x2 - D(x2, s_mid)) / s_mid``, ``x_d = x + (sigma_down - sigma) d2``, then
    ``x' = (alpha' / alpha_down) x_d + s_noise renoise noise``. A step to ``sigma_down = 0`` is a plain
    Euler step. ComfyUI runs it on ``steps + 1`` sigmas less the penultimate (see
    :data:`~sd35.sampling.schedules.DISCARD_PENULTIMATE_SIGMA_SAMPLERS`). Two model calls and one noise
    draw per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        d = (x - denoised) / sig[i]
        sigma_down, scale, renoise = _rf_ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = math.exp((math.log(sig[i]) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - sig[i])
            d_2 = (x_2 - denoise(model, x_2, sigma_mid, s_in)) / sigma_mid
            x = x + d_2 * (sigma_down - sig[i])
            x = scale * x + (s_noise * renoise) * noise(sig[i], sig[i + 1])
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    shift: float = 3.0,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, two stages; ComfyUI ``sample_dpmpp_sde`` in the flow half-log-SNR).

    ``lambda = log((1 - sigma) / sigma)``, ``alpha = sigma e^lambda = 1 - sigma``; from ``s`` to ``t``:
    ``h = lambda_t - lambda_s``, the stage point ``lambda_1 = lambda_s + r h``, ``sigma_1 =
    1 / (1 + e^lambda_1)``. Each stage is a first-order step with k-diffusion's ancestral split taken on
    the VE ratio ``e^-lambda = sigma / alpha`` (:func:`_ve_ancestral_step` from ``e^-lambda_s`` to the
    stage's ``e^-lambda``, giving ``sd, su`` and ``h' = -log(sd) - lambda_s``):
    ``x_2 = (alpha_1/alpha_s) e^-h' x - alpha_1 expm1(-h') D + alpha_1 su_1 s_noise noise(s, sigma_1)``,
    ``D_2 = D(x_2, sigma_1)``, then with ``D' = (1 - 1/2r) D + (1/2r) D_2``,
    ``x' = (alpha_t/alpha_s) e^-h' x - alpha_t expm1(-h') D' + alpha_t su s_noise noise(s, t)``.
    A first sigma of 1 is moved just below 1 (:func:`offset_first_sigma`). ComfyUI's noise here is a
    Brownian tree's, queried at the stage sigma, so these coefficients are computed in float32 as
    ComfyUI computes them (the stage sigma then equals ComfyUI's to the bit). The step to sigma 0
    returns ``denoised``. Two model calls and two noise draws per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift).cpu()
    total = len(sigmas) - 1
    fac = 1 / (2 * r)
    for i in range(total):
        s, t = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, s.to(x.device), s_in)
        if t == 0:
            x = denoised
        else:
            lam_s, lam_t = s.logit().neg(), t.logit().neg()
            h = lam_t - lam_s
            lam_1 = lam_s + r * h
            sigma_1 = lam_1.neg().sigmoid()
            alpha_s, alpha_1, alpha_t = s * lam_s.exp(), sigma_1 * lam_1.exp(), t * lam_t.exp()
            sd, su = _ve_ancestral_step(lam_s.neg().exp(), lam_1.neg().exp(), eta)
            h_ = sd.log().neg() - lam_s
            x_2 = float(alpha_1 / alpha_s * (-h_).exp()) * x - float(alpha_1 * (-h_).expm1()) * denoised
            if eta > 0 and s_noise > 0:
                x_2 = x_2 + float(alpha_1 * s_noise * su) * noise(float(s), float(sigma_1))
            denoised_2 = denoise(model, x_2, sigma_1.to(x.device), s_in)
            sd, su = _ve_ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
            h_ = sd.log().neg() - lam_s
            mixed = (1 - fac) * denoised + fac * denoised_2
            x = float(alpha_t / alpha_s * (-h_).exp()) * x - float(alpha_t * (-h_).expm1()) * mixed
            if eta > 0 and s_noise > 0:
                x = x + float(alpha_t * s_noise * su) * noise(float(s), float(t))
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DDPM ancestral steps (Ho et al. 2020) as ComfyUI's ``sample_ddpm`` takes them, VP formulas on sigma.

    ComfyUI treats the schedule as VE sigmas here even for a flow model: with ``abar = 1 / (1 + sigma^2)``,
    ``abar' = 1 / (1 + sigma'^2)``, ``a = abar / abar'``, ``eps = (x - D) / sigma`` and ``x_vp = x /
    sqrt(1 + sigma^2)``: ``mu = sqrt(1/a) (x_vp - (1 - a) eps / sqrt(1 - abar))``, plus
    ``sqrt((1 - a)(1 - abar') / (1 - abar)) noise`` if ``sigma' > 0``, and ``x' = mu sqrt(1 + sigma'^2)``
    (``x' = mu`` at sigma' = 0). One model call and one noise draw per step. Coefficients in float32, as
    ComfyUI computes them.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    on_host = sigmas.cpu()
    for i in range(total):
        s, s_next = on_host[i], on_host[i + 1]  # coefficients in float32, as ComfyUI's
        denoised = denoise(model, x, sigmas[i], s_in)
        eps = (x - denoised) / sig[i]
        abar, abar_next = 1 / (s * s + 1), 1 / (s_next * s_next + 1)
        a = abar / abar_next
        x = float((1 / a).sqrt()) * (
            x / float((1.0 + s * s).sqrt()) - float((1 - a) / (1 - abar).sqrt()) * eps
        )
        if s_next > 0:
            x = x + float(((1 - a) * (1 - abar_next) / (1 - abar)).sqrt()) * noise(sig[i], sig[i + 1])
            x = x * float((1.0 + s_next * s_next).sqrt())
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_res_multistep(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """RES multistep, second order (Zhang et al. 2023, arXiv 2308.02157; ComfyUI ``res_multistep``).

    In ``lambda = -log sigma`` (ComfyUI uses the VE form here, also for flow models), with
    ``sd, su = ``:func:`_ve_ancestral_step` ``(sigma, sigma', eta)``: the first step (and a step to
    ``sd = 0``) is Euler to ``sd``; later ones, with ``h = lambda(sd) - lambda(sigma)``, ``c2 =
    (lambda(sigma_prev) - lambda(sd_prev)) / h``, ``phi1 = expm1(-h) / -h``, ``phi2 = (phi1 - 1) / -h``,
    ``b1 = phi1 - phi2 / c2``, ``b2 = phi2 / c2`` (0 where undefined):
    ``x' = e^-h x + h (b1 D + b2 D_prev)``; then ``+ s_noise su noise`` if ``sigma' > 0``. ``eta = 0`` is
    ComfyUI's ``res_multistep`` (deterministic), ``eta = 1`` its ``res_multistep_ancestral``
    (registered with that default in :data:`sd35.sampling.samplers.SAMPLERS`). One model
    call per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    sig = sigmas.tolist()
    total = len(sig) - 1
    noise = noise_sampler or stream_noise(x, generator)
    previous: torch.Tensor | None = None
    sd_previous = 0.0
    on_host = sigmas.cpu()
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        sd, su = (
            float(v) for v in _ve_ancestral_step(on_host[i], on_host[i + 1], eta)
        )  # float32, as ComfyUI
        if sd == 0 or previous is None:
            x = x + (x - denoised) / sig[i] * (sd - sig[i])
        else:
            lam, lam_old, lam_next = -math.log(sig[i]), -math.log(sd_previous), -math.log(sd)
            h = lam_next - lam
            c2 = (-math.log(sig[i - 1]) - lam_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = phi1 - phi2 / c2 if c2 != 0 else 0.0
            b2 = phi2 / c2 if c2 != 0 else 0.0
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * previous)
        if sig[i + 1] > 0 and su > 0:
            x = x + (s_noise * su) * noise(sig[i], sig[i + 1])
        previous, sd_previous = denoised, sd
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _er_sde_scaler(v: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise scaler ``v (e^(v^0.3) + 10)`` (Cui et al. 2023, arXiv 2309.06169)."""
    return v * ((v**0.3).exp() + 10.0)


ER_SDE_POINTS = 200  # ComfyUI's num_integration_points


@torch.no_grad()
def sample_er_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    max_stage: int = 3,
    shift: float = 3.0,
) -> torch.Tensor:
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (Cui et al. 2023; ComfyUI ``sample_er_sde``).

    With the flow's ``l = sigma / alpha = e^-lambda`` (``alpha = 1 - sigma``), the scaler ``f(v) =
    v (e^(v^0.3) + 10)`` and ``r = f(l') / f(l)``: ``x' = (alpha'/alpha) r x + alpha' (1 - r) D``; from the
    second step ``+ alpha' (dl + S f(l')) D1`` with ``dl = l' - l``, ``D1 = (D - D_prev) / (l - l_prev)``,
    ``S = sum_k dlam / f(p_k)`` over the 200 points ``p_k = l' - k dl / 200`` (``dlam = -dl / 200``; a
    Riemann sum, as ComfyUI's); from the third ``+ alpha' (dl^2 / 2 + S_u f(l')) D2`` with ``S_u =
    sum_k (p_k - l) dlam / f(p_k)``, ``D2 = (D1 - D1_prev) / ((l - l_prev2) / 2)``; then
    ``+ alpha' s_noise sqrt(l'^2 - l^2 r^2) noise``. Coefficients in float32 as ComfyUI's. A first sigma of
    1 is moved just below 1 (:func:`offset_first_sigma`). The step to sigma 0 returns ``denoised``. One
    model call and one noise draw per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift).cpu()
    sig = sigmas.tolist()
    total = len(sig) - 1
    er = sigmas.logit().exp()  # e^-lambda = sigma / alpha in float32 (0 at sigma 0)
    points = torch.arange(0, ER_SDE_POINTS, dtype=torch.float32)
    previous: torch.Tensor | None = None
    previous_d: torch.Tensor | None = None
    for i in range(total):
        denoised = denoise(model, x, sigmas[i].to(x.device), s_in)
        stage = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = denoised
        else:
            l_s, l_t = er[i], er[i + 1]
            alpha_s, alpha_t = sigmas[i] / l_s, sigmas[i + 1] / l_t
            r = _er_sde_scaler(l_t) / _er_sde_scaler(l_s)
            x = float(alpha_t / alpha_s * r) * x + float(alpha_t * (1 - r)) * denoised
            if stage >= 2:
                dl = l_t - l_s
                step = -dl / ER_SDE_POINTS
                pos = l_t + points * step
                scaled = _er_sde_scaler(pos)
                s_1 = torch.sum(1 / scaled) * step
                d_1 = (denoised - previous) / float(l_s - er[i - 1])
                x = x + float(alpha_t * (dl + s_1 * _er_sde_scaler(l_t))) * d_1
                if stage >= 3:
                    s_u = torch.sum((pos - l_s) / scaled) * step
                    d_2 = (d_1 - previous_d) / float((l_s - er[i - 2]) / 2)
                    x = x + float(alpha_t * (dl**2 / 2 + s_u * _er_sde_scaler(l_t))) * d_2
                previous_d = d_1
            if s_noise > 0:
                spread = float((l_t**2 - l_s**2 * r**2).sqrt().nan_to_num(nan=0.0))
                x = x + float(alpha_t * s_noise * spread) * noise(sig[i], sig[i + 1])
        previous = denoised
        if callback is not None:
            callback(i, total, x, denoised)
    return x


def _flow_sigma_of_lambda(lam: float) -> float:
    """The flow sigma at half-log-SNR ``lam``: ``1 / (1 + e^lam)``."""
    return 1.0 / (1.0 + math.exp(lam))


@torch.no_grad()
def sample_seeds_2(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    shift: float = 3.0,
) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, arXiv 2305.14267; ComfyUI ``sample_seeds_2``), flow half-log-SNR.

    ``h = lambda' - lambda``, ``H = (1 + eta) h``, stage point ``lambda_1 = lambda + r h``, ``sigma_1``,
    ``alpha = 1 - sigma``: ``x_2 = (sigma_1/sigma) e^(-r h eta) x - alpha_1 expm1(-r H) D + sigma_1 s_noise
    n_1``, ``n_1 = sqrt(1 - e^(-2 r h eta)) noise(sigma, sigma_1)``; ``D' = D + (D(x_2, sigma_1) - D) / 2r``;
    ``x' = (sigma'/sigma) e^(-h eta) x - alpha' expm1(-H) D' + sigma' s_noise n``, ``n = e^g n_1 +
    sqrt(1 - e^(2g)) noise(sigma_1, sigma')`` with ``g = (r - 1) h eta`` (noise only if ``eta, s_noise >
    0``). A first sigma of 1 is moved just below 1. Two model calls per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift)
    sig = sigmas.tolist()
    total = len(sig) - 1
    inject = eta > 0 and s_noise > 0
    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            s, t = sig[i], sig[i + 1]
            lam_s, lam_t = flow_lambda(s), flow_lambda(t)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            lam_1 = lam_s + r * h
            s_1 = _flow_sigma_of_lambda(lam_1)
            x_2 = (s_1 / s * math.exp(-r * h * eta)) * x - ((1 - s_1) * math.expm1(-r * h_eta)) * denoised
            if inject:
                sde_noise = math.sqrt(-math.expm1(-2 * r * h * eta)) * noise(s, s_1)
                x_2 = x_2 + sde_noise * (s_1 * s_noise)
            denoised_2 = denoise(model, x_2, s_1, s_in)
            mixed = torch.lerp(denoised, denoised_2, 1 / (2 * r))
            x = (t / s * math.exp(-h * eta)) * x - ((1 - t) * math.expm1(-h_eta)) * mixed
            if inject:
                g = (r - 1) * h * eta
                sde_noise = sde_noise * math.exp(g) + math.sqrt(-math.expm1(2 * g)) * noise(s_1, t)
                x = x + sde_noise * (t * s_noise)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


@torch.no_grad()
def sample_seeds_3(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
    shift: float = 3.0,
) -> torch.Tensor:
    """SEEDS-3 (Gonzalez et al. 2023; ComfyUI ``sample_seeds_3``), three stages in the flow half-log-SNR.

    As :func:`sample_seeds_2` with stage points ``lambda + r_1 h`` and ``lambda + r_2 h``; with
    ``E1(z) = expm1(z)`` and ``E2(z) = (expm1(z) - z) / z``: ``x_2`` as there (at ``r_1``);
    ``x_3 = (sigma_2/sigma) e^(-r_2 h eta) x - alpha_2 (a31 D + a32 D_2)``, ``a32 = (r_2/r_1) E2(-r_2 H)``,
    ``a31 = E1(-r_2 H) - a32``; ``x' = (sigma'/sigma) e^(-h eta) x - alpha' (b1 D + b3 D_3)``, ``b3 =
    E2(-H) / r_2``, ``b1 = E1(-H) - b3``; the noise carried between stages as in SEEDS-2. Three model calls
    per step.
    """
    x, sigmas, s_in = prepare(x, sigmas)
    noise = noise_sampler or stream_noise(x, generator)
    sigmas = offset_first_sigma(sigmas, shift)
    sig = sigmas.tolist()
    total = len(sig) - 1
    inject = eta > 0 and s_noise > 0

    def e2(z: float) -> float:
        return (math.expm1(z) - z) / z

    for i in range(total):
        denoised = denoise(model, x, sigmas[i], s_in)
        if sig[i + 1] == 0:
            x = denoised
        else:
            s, t = sig[i], sig[i + 1]
            lam_s, lam_t = flow_lambda(s), flow_lambda(t)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            s_1 = _flow_sigma_of_lambda(lam_s + r_1 * h)
            s_2 = _flow_sigma_of_lambda(lam_s + r_2 * h)
            x_2 = (s_1 / s * math.exp(-r_1 * h * eta)) * x - ((1 - s_1) * math.expm1(-r_1 * h_eta)) * denoised
            if inject:
                sde_noise = math.sqrt(-math.expm1(-2 * r_1 * h * eta)) * noise(s, s_1)
                x_2 = x_2 + sde_noise * (s_1 * s_noise)
            denoised_2 = denoise(model, x_2, s_1, s_in)
            a32 = r_2 / r_1 * e2(-r_2 * h_eta)
            a31 = math.expm1(-r_2 * h_eta) - a32
            x_3 = (s_2 / s * math.exp(-r_2 * h * eta)) * x - (1 - s_2) * (a31 * denoised + a32 * denoised_2)
            if inject:
                g = (r_1 - r_2) * h * eta
                sde_noise = sde_noise * math.exp(g) + math.sqrt(-math.expm1(2 * g)) * noise(s_1, s_2)
                x_3 = x_3 + sde_noise * (s_2 * s_noise)
            denoised_3 = denoise(model, x_3, s_2, s_in)
            b3 = e2(-h_eta) / r_2
            b1 = math.expm1(-h_eta) - b3
            x = (t / s * math.exp(-h * eta)) * x - (1 - t) * (b1 * denoised + b3 * denoised_3)
            if inject:
                g = (r_2 - 1) * h * eta
                sde_noise = sde_noise * math.exp(g) + math.sqrt(-math.expm1(2 * g)) * noise(s_2, t)
                x = x + sde_noise * (t * s_noise)
        if callback is not None:
            callback(i, total, x, denoised)
    return x


BROWNIAN_SAMPLERS: frozenset[str] = frozenset(
    {
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "dpmpp_2m_sde_heun",
        "dpmpp_2m_sde_heun_gpu",
        "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu",
    }
)
"""The samplers whose ComfyUI noise is a Brownian tree's (``BrownianTreeNoiseSampler``); ComfyUI's other
stochastic samplers draw ``default_noise_sampler``'s fresh seeded noise. (The ``_gpu`` variants build
the tree on the latent's device; on the CPU they are the same samplers.)"""


def comfy_noise_sampler(
    name: str, x: torch.Tensor, sigmas: torch.Tensor, seeds: int | list[int]
) -> NoiseSampler:
    """The noise ComfyUI's sampler ``name`` draws for ``x`` on the schedule ``sigmas`` with the
    KSampler's ``seeds`` (one for the batch, or one per row): a Brownian tree for
    :data:`BROWNIAN_SAMPLERS`, a fresh seeded generator for the rest."""
    if name in BROWNIAN_SAMPLERS:
        return brownian_noise(x, sigmas, seeds)
    return seeded_noise(x, seeds)
