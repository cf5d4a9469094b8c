"""Sigma schedules for rectified-flow models (SD3 / SD3.5).

A flow model sees ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma in [0, 1]. SD3.5 trains on a
shifted time, ``sigma = shift * t / (1 + (shift - 1) * t)``, and the reference builds its inference
schedule by spacing *timesteps* (``1000 * sigma``) linearly and shifting them again, so the smallest
non-zero sigma is shifted twice (Stability-AI/sd3.5 ``sd3_impls.py`` ``ModelSamplingDiscreteFlow`` and
``sd3_infer.py`` ``SD3Inferencer.get_sigmas``). We reproduce that in the same float32 arithmetic, so the
schedule matches the reference to the last bit on CPU.

:func:`get_sigmas` adds ComfyUI's other schedulers under ComfyUI's names (``comfy/samplers.py``,
``SCHEDULER_HANDLERS``), all built on the same shifted model (:func:`discrete_flow_sigmas`), so ``shift``
acts on every one of them the way ComfyUI's ``ModelSamplingSD3`` shift does.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar, get_args

import numpy as np
import torch

from sd35.errors import SD35Error

NUM_TRAIN_TIMESTEPS = 1000

T = TypeVar("T", float, torch.Tensor)


def flow_sigma(t: T, shift: float) -> T:
    """Shifted flow sigma for training time ``t`` in [0, 1]: ``shift * t / (1 + (shift - 1) * t)``.

    ``shift == 1`` returns ``t`` unchanged, as ``ModelSamplingDiscreteFlow.sigma`` does (Stability-AI/sd3.5
    ``sd3_impls.py``).
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def percent_to_sigma(percent: float, shift: float) -> float:
    """The flow model's sigma at ``percent`` of the way through its time: 1 at 0, 0 at 1, else
    ``flow_sigma(1 - percent, shift)`` (ComfyUI ``ModelSamplingDiscreteFlow.percent_to_sigma``), which places
    ComfyUI's percent windows (SLG, ControlNet, timestep ranges) and its first-sigma offset."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return flow_sigma(1.0 - percent, shift)


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise SD35Error(f"shift must be a positive number (SD3.5 Medium uses 3.0), got {shift!r}.")


def reference_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The reference's schedule: ``steps + 1`` float32 sigmas from 1.0 down to the last one, then 0.

    Like ``SD3Inferencer.get_sigmas`` (Stability-AI/sd3.5 ``sd3_infer.py``): timesteps are
    ``linspace(1000 * sigma_max, 1000 * sigma_min, steps)`` with ``sigma_min = flow_sigma(1/1000)``; each
    is divided by 1000 and shifted *again*, so for shift 3 the last non-zero sigma is 0.008929, not
    0.002994. This double shift is deliberate in the reference and kept here. Diffusers'
    ``FlowMatchEulerDiscreteScheduler`` computes the same values (in float64 before rounding).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise SD35Error(f"the number of sampling steps must be a positive integer, got {steps!r}.")
    _check_shift(shift)
    # The reference's sigma table, sigma(arange(1, 1001) / 1000), in float32: its ends are sigma_min/max.
    train_t = torch.arange(1, NUM_TRAIN_TIMESTEPS + 1) / float(NUM_TRAIN_TIMESTEPS)
    table = flow_sigma(train_t, shift)
    sigma_min, sigma_max = table[0], table[-1]
    timesteps = torch.linspace(
        float(sigma_max * NUM_TRAIN_TIMESTEPS),
        float(sigma_min * NUM_TRAIN_TIMESTEPS),
        steps,
        dtype=torch.float32,
    )
    sigmas = flow_sigma(timesteps / float(NUM_TRAIN_TIMESTEPS), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def img2img_sigmas(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of a full schedule that img2img runs: ``sigmas[int(steps * (1 - denoise)):]``.

    Exactly the reference's cut (Stability-AI/sd3.5 ``sd3_infer.py`` ``SD3Inferencer.do_sampling``),
    including its float rounding:
    ``int(50 * (1 - 0.8))`` is 9, not 10, so denoise 0.8 with 50 steps runs 41 steps from ``sigmas[9]``.
    ``denoise`` must be in (0, 1]; 1 returns the whole schedule. Keep the full schedule for the guidance
    (:class:`sd35.sampling.guidance.GuidedDenoiser` counts SLG steps over the full count, as the reference).
    """
    return sigmas[img2img_start(len(sigmas) - 1, denoise) :]


def img2img_start(steps: int, denoise: float, param: str | None = None) -> int:
    """The index of the full schedule's first sigma that img2img at ``denoise`` runs from (see
    :func:`img2img_sigmas`); an :class:`SD35Error` (naming ``param``) if that leaves no step to run."""
    if not 0 < denoise <= 1:
        raise SD35Error(f"denoise (img2img strength) must be in (0, 1], got {denoise!r}.", param=param)
    start = int(steps * (1 - denoise))
    if start >= steps:
        raise SD35Error(
            f"denoise {denoise!r} is too small to leave a single step of {steps}; raise it.", param=param
        )
    return start


def comfy_denoise_sigmas(
    scheduler: str, steps: int, denoise: float, shift: float = 3.0, *, sampler: str | None = None
) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler runs at ``denoise`` (``comfy/samplers.py`` ``KSampler.set_steps``).

    Unlike the reference's cut (:func:`img2img_sigmas`, which runs a part of the ``steps``-step schedule),
    ComfyUI always runs ``steps`` steps: the schedule of ``int(steps / denoise)`` steps, its last
    ``steps + 1`` sigmas. ``denoise`` above 0.9999 is the whole schedule; ``denoise`` <= 0 is no step at all
    (an empty tensor: the latent comes back unchanged).
    """
    if denoise > 0.9999:
        return get_sigmas(scheduler, steps, shift, sampler=sampler)
    if denoise <= 0.0:
        return torch.zeros(0)
    return get_sigmas(scheduler, int(steps / denoise), shift, sampler=sampler)[-(steps + 1) :].contiguous()


def step_window(
    sigmas: torch.Tensor, start_step: int | None, last_step: int | None, force_full_denoise: bool
) -> torch.Tensor:
    """The part of ``sigmas`` KSamplerAdvanced runs (``comfy/samplers.py`` ``KSampler.sample``).

    ``last_step`` below the schedule's end cuts it after that step, and then ``force_full_denoise`` makes
    the last sigma 0 (else the latent keeps its leftover noise); ``start_step`` starts that many steps in.
    A window with no step left is an empty tensor (ComfyUI then returns the latent as it came).
    """
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas.contiguous()


# --------------------------------------------------------------------------------------------- schedulers

SchedulerName = Literal[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]
"""The scheduler names :func:`get_sigmas` accepts: ComfyUI's (``comfy/samplers.py`` ``SCHEDULER_HANDLERS``), in
its order, each meaning what it means there. ``normal`` is also the official reference's schedule."""

SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)

KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's beta_scheduler defaults
LINEAR_QUADRATIC_THRESHOLD = 0.025  # ComfyUI's linear_quadratic_schedule default (threshold_noise)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise SD35Error(f"the number of sampling steps must be a positive integer, got {steps!r}.")


def discrete_flow_sigmas(shift: float) -> torch.Tensor:
    """The shifted model's 1000 sigmas, ``sigma(t) = flow_sigma(t / 1000, shift)`` for ``t = 1..1000`` (float32).

    This is ``ModelSamplingDiscreteFlow.sigmas`` (Stability-AI/sd3.5 ``sd3_impls.py``; ComfyUI
    ``comfy/model_sampling.py``):
    entry 0 is ``sigma_min`` (0.002994 for shift 3, 0.001 for shift 1) and entry 999 is ``sigma_max`` = 1.
    """
    _check_shift(shift)
    return flow_sigma(torch.arange(1, NUM_TRAIN_TIMESTEPS + 1) / float(NUM_TRAIN_TIMESTEPS), shift)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _sgm_uniform(steps: int, shift: float) -> torch.Tensor:
    """``sgm_uniform``: ``normal``'s timesteps with one more point and the end point dropped.

    ComfyUI ``normal_scheduler(sgm=True)``: with ``start = 1000 * sigma_max`` and ``end = 1000 * sigma_min``,
    ``t = linspace(start, end, steps + 1)[:-1]`` and ``sigma_i = flow_sigma(t_i / 1000, shift)``, then 0.
    """
    table = discrete_flow_sigmas(shift)
    start = float(table[-1] * NUM_TRAIN_TIMESTEPS)
    end = float(table[0] * NUM_TRAIN_TIMESTEPS)
    timesteps = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    return _append_zero(flow_sigma(timesteps / float(NUM_TRAIN_TIMESTEPS), shift))


def _simple(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``simple``: every (1000 / steps)-th entry of the 1000-entry table, from the top, then 0.

    ``sigma_i = table[999 - floor(i * 1000 / steps)]`` for ``i = 0..steps-1`` (``comfy/samplers.py``
    ``simple_scheduler``; the float ratio ``1000 / steps`` is what is floored, so 30 steps skip 33 or 34).
    """
    table = discrete_flow_sigmas(shift)
    ratio = NUM_TRAIN_TIMESTEPS / steps
    return _append_zero(table[[NUM_TRAIN_TIMESTEPS - 1 - int(i * ratio) for i in range(steps)]])


def _ddim_uniform(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``ddim_uniform``: table entries 1, 1 + k, 1 + 2k, ... (``k = max(1000 // steps, 1)``), reversed.

    (``comfy/samplers.py`` ``ddim_scheduler``.) The schedule starts below sigma_max (at entry
    ``1 + k * floor(998 / k)``) and, as ``k`` is floored, can have MORE than ``steps`` steps: 31 for 30
    (``k = 33``). Then 0.
    """
    table = discrete_flow_sigmas(shift)
    stride = max(NUM_TRAIN_TIMESTEPS // steps, 1)
    return _append_zero(table[list(range(1, NUM_TRAIN_TIMESTEPS, stride))[::-1]])


def _karras(steps: int, shift: float) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5).

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i = 0..n-1``, ``rho = 7``, then 0 (k-diffusion ``get_sigmas_karras``, used by ComfyUI with the
    model's shifted ``sigma_min`` / ``sigma_max``).
    """
    table = discrete_flow_sigmas(shift)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO)


def _exponential(steps: int, shift: float) -> torch.Tensor:
    """Uniform in log sigma: ``sigma_i = exp(linspace(log sigma_max, log sigma_min, n)_i)``, then 0.

    k-diffusion ``get_sigmas_exponential`` (ComfyUI's ``exponential``), with the shifted ``sigma_min/max``.
    """
    table = discrete_flow_sigmas(shift)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    return _append_zero(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float32).exp()
    )


def _kl_optimal(steps: int, shift: float) -> torch.Tensor:
    """``sigma_i = tan(i/(n-1) * atan(sigma_min) + (1 - i/(n-1)) * atan(sigma_max))`` for ``i = 0..n-1``, then 0.

    ComfyUI ``kl_optimal_scheduler`` (after AUTOMATIC1111 stable-diffusion-webui PR #15608), with the
    shifted ``sigma_min/max``. For one step ComfyUI divides 0 by 0; here it gives ``[sigma_max, 0]``.
    """
    table = discrete_flow_sigmas(shift)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if steps == 1:
        return _append_zero(table[-1:])
    frac = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    return _append_zero(torch.tan(frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)))


def _betainc_series(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Regularized incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1/2``, float64.

    From the hypergeometric series of the incomplete beta function (DLMF 8.17(ii)),
    ``B_x(a, b) = x^a * sum_n (1 - b)_n / (n! (a + n)) * x^n``, divided by ``B(a, b)``. With ``x <= 1/2``
    the terms shrink at least like ``2^-n``, so 120 terms reach float64 precision.
    """
    n = np.arange(120, dtype=np.float64)
    rising = np.cumprod(np.concatenate([[1.0], (n[1:] - b) / n[1:]]))  # (1 - b)_n / n!
    coef = rising / (a + n)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    series = np.power.outer(x, n) @ coef
    return x**a * series / math.exp(log_beta)


def _betainc(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """``I_x(a, b)`` on [0, 1], using ``I_x(a, b) = 1 - I_{1-x}(b, a)`` above 1/2."""
    low = x <= 0.5
    out = np.empty_like(x)
    out[low] = _betainc_series(x[low], a, b)
    out[~low] = 1.0 - _betainc_series(1.0 - x[~low], b, a)
    return out


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """Quantile function of the Beta(a, b) distribution (what ``scipy.stats.beta.ppf`` computes), float64.

    Bisection on the monotone ``I_x(a, b)`` for 64 halvings, enough for float64; scipy is a test-only
    dependency here, so the inverse is computed by hand.
    """
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = _betainc(mid, a, b) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    x = np.where(q >= 1.0, 1.0, np.where(q <= 0.0, 0.0, 0.5 * (lo + hi)))
    if a == b:
        # symmetric: the median is 1/2 exactly. The series sums I_(1/2)(a, a) to 1/2 give or take an ulp
        # (which way depends on the BLAS kernel, i.e. the machine), and the bisection then ends an ulp either
        # side of 1/2; the beta schedule's 999 * 1/2 is a rint tie, so that ulp would pick timestep 499 or 500
        x = np.where(q == 0.5, 0.5, x)
    return x


def _beta(steps: int, shift: float) -> torch.Tensor:
    """Beta-distributed timesteps (Lee et al. 2024, "Beta Sampling is All You Need", arXiv 2407.12173).

    ComfyUI ``beta_scheduler`` with ``alpha = beta = 0.6``: ``q_i = 1 - i/n`` for ``i = 0..n-1``,
    ``t_i = rint(BetaPPF(q_i; 0.6, 0.6) * 999)``, ``sigma_i = sigmas[t_i]`` from the 1000-entry shifted
    table (:func:`discrete_flow_sigmas`), then 0. Consecutive equal ``t_i`` are kept once, as ComfyUI
    does: from 139 steps on the schedule therefore has FEWER than ``steps`` steps (e.g. 475 for 500).
    """
    q = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    t = np.rint(beta_ppf(q, BETA_ALPHA, BETA_BETA) * (NUM_TRAIN_TIMESTEPS - 1)).astype(np.int64)
    keep = np.concatenate([[True], t[1:] != t[:-1]])
    return _append_zero(discrete_flow_sigmas(shift)[torch.from_numpy(t[keep])])


def _linear_quadratic(steps: int, shift: float) -> torch.Tensor:
    """Mochi's linear-quadratic schedule (genmoai/models ``mochi_preview/infer.py``, via ComfyUI).

    In "1 - sigma" space with ``tau = 0.025``, ``L = steps // 2`` linear steps and ``Q = steps - L``:
    ``u_i = i * tau / L`` for ``i < L``; for ``L <= i < steps``, ``u_i = a i^2 + b i + c`` with
    ``d = L - tau * steps``, ``a = d / (L Q^2)``, ``b = tau / L - 2 d / Q^2``, ``c = a L^2``; then
    ``u_steps = 1``, and ``sigma_i = (1 - u_i) * sigma_max``. One step gives ``[1, 0]``. It is defined
    in sigma space and ``sigma_max`` is 1 for every shift, so the shift does not change it (as in ComfyUI).
    """
    sigma_max = float(discrete_flow_sigmas(shift)[-1])
    if steps == 1:
        u = [0.0, 1.0]
    else:
        tau, lin = LINEAR_QUADRATIC_THRESHOLD, steps // 2
        quad = steps - lin
        d = lin - tau * steps
        qa = d / (lin * quad**2)
        qb = tau / lin - 2 * d / quad**2
        qc = qa * lin**2
        u = (
            [i * tau / lin for i in range(lin)]
            + [qa * i * i + qb * i + qc for i in range(lin, steps)]
            + [1.0]
        )
    return torch.tensor([1.0 - v for v in u], dtype=torch.float32) * sigma_max


DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
"""Samplers for which ComfyUI computes ``steps + 1`` sigmas and drops the second-to-last (``comfy/samplers.py``
``KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS``): their last step then runs from a smaller sigma straight
to 0, which these solvers (whose last step is first order) handle better. :func:`get_sigmas` applies it
when given the sampler's name."""


def get_sigmas(scheduler: str, steps: int, shift: float = 3.0, *, sampler: str | None = None) -> torch.Tensor:
    """The sigma schedule ``scheduler`` (one of :data:`SCHEDULERS`) for ``steps`` steps of the shifted model.

    With ``sampler`` one of :data:`DISCARD_PENULTIMATE_SIGMA_SAMPLERS`, the schedule is ComfyUI's for it:
    ``steps + 1`` sigmas with the second-to-last dropped (still ``steps`` steps).

    Returns float32, length ``steps + 1`` (``beta``: possibly fewer, ``ddim_uniform``: possibly more, see
    below), strictly decreasing, the last entry 0. Every name means what it means in ComfyUI v0.3.64
    (``comfy/samplers.py`` ``calculate_sigmas``; checked against its output in
    ``tests/sampling/test_comfyui_parity.py``). All schedules come from the same shifted discrete flow model
    (ComfyUI ``ModelSamplingDiscreteFlow`` with ``ModelSamplingSD3``'s shift): ``sigma(t) =
    flow_sigma(t/1000, shift)``, ``sigma_min = sigma(1)``, ``sigma_max = sigma(1000) = 1``. Per scheduler
    (``n = steps``):

    - ``normal`` (the default): the official reference's schedule, :func:`reference_sigmas`
      (``SD3Inferencer.get_sigmas``, which is ComfyUI's ``normal_scheduler``): timesteps
      ``linspace(1000 sigma_max, 1000 sigma_min, n)`` mapped through ``sigma``;
    - ``simple``: table entries ``sigmas[999 - floor(i * 1000 / n)]`` (:func:`_simple`);
    - ``sgm_uniform``: ``linspace(1000 sigma_max, 1000 sigma_min, n + 1)[:-1]`` mapped through ``sigma``;
    - ``ddim_uniform``: table entries ``1, 1 + k, ...`` (``k = 1000 // n``) reversed (:func:`_ddim_uniform`);
    - ``karras``: ``(s_max^(1/7) + i/(n-1) (s_min^(1/7) - s_max^(1/7)))^7`` (Karras et al. 2022, eq. 5);
    - ``exponential``: ``exp(linspace(log s_max, log s_min, n))`` (k-diffusion);
    - ``kl_optimal``: ``tan(i/(n-1) atan(s_min) + (1 - i/(n-1)) atan(s_max))`` (A1111 PR #15608);
    - ``beta``: table entries at ``rint(BetaPPF(1 - i/n; 0.6, 0.6) * 999)`` (Lee et al. 2024), duplicates
      dropped as in ComfyUI, so from 139 steps on it has fewer than ``n`` steps;
    - ``linear_quadratic``: Mochi's schedule, defined in sigma space (independent of the shift).

    All are followed by a final 0. Each private builder's docstring gives the formula in full.
    """
    if scheduler not in _BUILDERS:
        raise SD35Error(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
    _check_steps(steps)
    _check_shift(shift)
    if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = _BUILDERS[scheduler](steps + 1, shift)
        return torch.cat([sigmas[:-2], sigmas[-1:]]).contiguous()
    return _BUILDERS[scheduler](steps, shift).contiguous()


_BUILDERS = {
    "simple": _simple,
    "sgm_uniform": _sgm_uniform,
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "normal": reference_sigmas,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
assert tuple(_BUILDERS) == SCHEDULERS
