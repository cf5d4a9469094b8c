"""Inpainting by masked latent blending at every step.

Outside the mask the sample is pinned to the original latent, noised to the current sigma with the
run's own noise (the flow forward process ``sigma*noise + (1-sigma)*latent``), and the denoised
prediction there is the original latent itself. This is ComfyUI's ``KSamplerX0Inpaint``
(``comfy/samplers.py``) for a flow model, where ``scale_latent_inpaint`` is that forward process.
Inside the mask the model is free. The mask is soft (feathered), so the seam blends.
"""

from __future__ import annotations

import torch

from sd35.sampling.samplers import Denoiser


class MaskedDenoiser:
    """Wraps a denoiser: ``mask`` (1 = repaint, broadcast to x) selects where the model's prediction is used."""

    def __init__(self, denoiser: Denoiser, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.latent, self.noise, self.mask = denoiser, latent, noise, mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        keep = 1.0 - self.mask
        x = x * self.mask + (s * self.noise + (1.0 - s) * self.latent) * keep
        return self.denoiser(x, sigma) * self.mask + self.latent * keep
