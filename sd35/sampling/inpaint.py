"""Where a sampling starts, and inpainting by masked latent blending at every step.

txt2img starts from pure noise; img2img from the latent noised to the first sigma by the flow forward
process ``sigma*noise + (1-sigma)*latent`` (the reference's img2img, ``sd3_infer.py``
``SD3Inferencer.do_sampling``, and ComfyUI's ``CONST.noise_scaling``).

Inpainting: outside the mask the sample is pinned to the original latent, noised to the current sigma
with the run's own noise, and the denoised prediction there is the original latent itself. This is
ComfyUI's ``KSamplerX0Inpaint`` (``comfy/samplers.py``) for a flow model, where ``scale_latent_inpaint`` is
that forward process. Inside the mask the model is free. The mask is soft (feathered), so the seam blends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sd35.sampling.noise import Generators, NoiseSampler
from sd35.sampling.sampler_base import Callback, Denoiser
from sd35.sampling.samplers import run_sampler


class MaskedDenoiser:
    """Wraps a denoiser: ``mask`` (1 = repaint, broadcast to x) selects where the model's prediction is used."""

    def __init__(self, denoiser: Denoiser, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.latent, self.noise, self.mask = denoiser, latent, noise, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        keep = 1.0 - self.mask
        x = x * self.mask + (s * self.noise + (1.0 - s) * self.latent) * keep
        return self.denoiser(x, sigma) * self.mask + self.latent * keep


def sample_from(
    sampler: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    run: torch.Tensor,
    *,
    shift: float,
    latent: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    step_noise: Callable[[torch.Tensor, torch.Tensor], NoiseSampler | None] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """One sampling over the sigmas ``run``: from ``noise`` (txt2img), or from ``latent`` noised to
    ``run[0]`` (img2img), blended with :class:`MaskedDenoiser` where ``mask`` is below 1 (inpainting).
    ``step_noise(x, run)`` makes the stochastic samplers' noise (None: ``generator``'s stream)."""
    x = noise * run[0] if latent is None else run[0] * noise + (1.0 - run[0]) * latent
    if mask is not None:
        denoiser = MaskedDenoiser(denoiser, latent, noise, mask)
    return run_sampler(
        sampler,
        denoiser,
        x,
        run,
        shift=shift,
        callback=callback,
        generator=generator,
        noise_sampler=None if step_noise is None else step_noise(x, run),
    )
