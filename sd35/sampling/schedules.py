"""Sigma schedules for rectified-flow models (SD3 / SD3.5).

A flow model sees ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma in [0, 1]. SD3.5 trains on a
shifted time, ``sigma = shift * t / (1 + (shift - 1) * t)``, and the reference builds its inference
schedule by spacing *timesteps* (``1000 * sigma``) linearly and shifting them again, so the smallest
non-zero sigma is shifted twice (``shared/spec/REFERENCE.md`` 2.1-2.2). We reproduce that in the same
float32 arithmetic, so the schedule matches the reference to the last bit on CPU.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from sd35.errors import SD35Error

NUM_TRAIN_TIMESTEPS = 1000

T = TypeVar("T", float, torch.Tensor)


def flow_sigma(t: T, shift: float) -> T:
    """Shifted flow sigma for training time ``t`` in [0, 1]: ``shift * t / (1 + (shift - 1) * t)``.

    ``shift == 1`` returns ``t`` unchanged, as ``ModelSamplingDiscreteFlow.sigma`` does (REFERENCE.md 2.1).
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise SD35Error(f"shift must be a positive number (SD3.5 Medium uses 3.0), got {shift!r}.")


def reference_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The reference's schedule: ``steps + 1`` float32 sigmas from 1.0 down to the last one, then 0.

    Like ``SD3Inferencer.get_sigmas`` (REFERENCE.md 2.2): timesteps are ``linspace(1000 * sigma_max,
    1000 * sigma_min, steps)`` with ``sigma_min = flow_sigma(1/1000)``; each is divided by 1000 and
    shifted *again*, so for shift 3 the last non-zero sigma is 0.008929, not 0.002994. This double shift
    is deliberate in the reference and kept here. Diffusers' ``FlowMatchEulerDiscreteScheduler``
    computes the same values (in float64 before rounding).
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

    Exactly the reference's cut (sd3_infer.py 358, REFERENCE.md 2.2), including its float rounding:
    ``int(50 * (1 - 0.8))`` is 9, not 10, so denoise 0.8 with 50 steps runs 41 steps from ``sigmas[9]``.
    ``denoise`` must be in (0, 1]; 1 returns the whole schedule. Keep the full schedule for the guidance
    (:class:`sd35.sampling.guidance.GuidedDenoiser` counts SLG steps over the full count, as the reference).
    """
    if not 0 < denoise <= 1:
        raise SD35Error(f"denoise (img2img strength) must be in (0, 1], got {denoise!r}.")
    steps = len(sigmas) - 1
    start = int(steps * (1 - denoise))
    if start >= steps:
        raise SD35Error(f"denoise {denoise!r} is too small to leave a single step of {steps}; raise it.")
    return sigmas[start:]
