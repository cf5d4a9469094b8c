"""Shared pieces of the sampling tests: a closed-form denoiser, seeded noise, and text conditioning of a
tiny MMDiT-X (the ``mmditx`` fixture of ``conftest.py``)."""

from __future__ import annotations

import torch

from sd35.models.mmditx import MMDiTX


class GaussianData:
    """Data ~ N(mu, s^2) per channel, flow ``x = (1 - sigma) x0 + sigma n``: everything in closed form.

    With ``a = 1 - sigma``, x ~ N(a mu, a^2 s^2 + sigma^2) and Cov(x0, x) = a s^2, so the exact denoiser
    is ``E[x0 | x] = mu + a s^2 / (a^2 s^2 + sigma^2) (x - a mu)``. The probability-flow ODE is then
    solved by the monotone Gaussian transport ``x(sigma) = a mu + std(sigma) n`` from ``x(1) = n``.
    Both samplers end with a jump to ``D(x, sigma_last)``, so the exact sampler output is
    ``mu + a_L s^2 / std_L * n`` with ``a_L, std_L`` at the last non-zero sigma (which tends to
    ``mu + s n`` as sigma_last -> 0).
    """

    def __init__(self):
        self.mu = torch.tensor([0.3, -0.5, 1.0, 0.0]).view(1, 4, 1, 1)
        self.s = torch.tensor([0.5, 1.0, 0.2, 1.5]).view(1, 4, 1, 1)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.view(-1, 1, 1, 1)
        a = 1 - sigma
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + sigma**2) * (x - a * self.mu)

    def exact_output(self, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[-2].double()
        a = 1 - sigma
        s = self.s.double()
        std = (a**2 * s**2 + sigma**2).sqrt()
        return (self.mu.double() + a * s**2 / std * noise.double()).float()


def seeded_randn(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Standard normal numbers of ``shape`` from their own generator seeded with ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def text_cond(
    model: MMDiTX, batch: int = 1, length: int = 7, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (context, pooled) for ``model``: ``batch`` rows of ``length`` tokens, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return torch.randn(batch, length, cfg.context_dim, generator=g), torch.randn(
        batch, cfg.pooled_dim, generator=g
    )
