"""The rectified-flow training objective of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers").

For a clean latent ``x0``, noise ``n`` and a noise level ``s`` in (0, 1)::

    x_s = (1 - s) * x0 + s * n          (the straight path; s = 1 is pure noise)
    v   = n - x0                        (its velocity: the model's target)
    L   = w(s) * mean((model(x_s, 1000 * s, pooled, context) - v)^2)

``s`` is drawn from one of the paper's densities (section 3.1): ``logit_normal`` (``s = sigmoid(N(m, std))``,
the paper's best, the default with m = 0, std = 1), ``uniform``, or ``mode`` (``s = 1 - u - scale * (cos^2(pi u
/ 2) - 1 + u)``, u uniform; scale 1.29 by default). An optional ``shift`` then moves mass to higher noise as
the sampler's schedule does: ``s' = shift * s / (1 + (shift - 1) * s)``. ``w(s)`` is 1 (``none``, the
default), ``sigma_sqrt`` (``s^-2``) or ``cosmap`` (``2 / (pi (1 - 2 s + 2 s^2))``), the weightings the
diffusers SD3 trainers offer.

Randomness is drawn per sample from a generator seeded by (run seed, step, micro-batch, global sample index)
(:func:`sample_seed`): a sample gets the same noise and timestep whatever the number of processes, the per
process batch size or an interruption and resume.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sd35.errors import SD35Error

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
SIGMA_SQRT_MIN = 1e-3  # sigma_sqrt's weight s^-2 is capped at s = 1e-3 (an exact 0 would give infinity)


@dataclass(frozen=True)
class FlowLoss:
    """The objective's settings (TrainConfig's [loss] keys)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise SD35Error(
                f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got {self.timestep_sampling!r}."
            )
        if self.loss_weighting not in LOSS_WEIGHTING:
            raise SD35Error(
                f"loss_weighting must be one of {', '.join(LOSS_WEIGHTING)}, got {self.loss_weighting!r}."
            )
        if not self.shift > 0:
            raise SD35Error(f"shift must be > 0, got {self.shift}.")

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_sigmas(
            n,
            self.timestep_sampling,
            generator,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            shift=self.shift,
        )


def sample_seed(seed: int, step: int, micro: int, index: int) -> int:
    """A 63-bit seed for one sample, stable across runs, processes and Python versions."""
    digest = hashlib.blake2b(f"sd35-train:{seed}:{step}:{micro}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow time shift ``shift * s / (1 + (shift - 1) * s)`` (identity for shift 1)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    n: int,
    scheme: str = "logit_normal",
    generator: torch.Generator | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> torch.Tensor:
    """``n`` noise levels in [0, 1] (float32, CPU) from ``scheme``, then shifted."""
    if scheme == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    elif scheme == "uniform":
        s = torch.rand(n, generator=generator)
    elif scheme == "mode":
        u = torch.rand(n, generator=generator)
        s = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        s = s.clamp(0.0, 1.0)  # scales above ~1.58 would leave [0, 1]
    else:
        raise SD35Error(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got {scheme!r}.")
    return shift_sigmas(s, shift)


def loss_weights(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights for noise levels ``sigmas``."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas.clamp(min=SIGMA_SQRT_MIN) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise SD35Error(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTING)}, got {scheme!r}.")


def noisy_latents(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_s, v)``: the point on the straight path at ``sigmas`` (one per sample) and the target velocity."""
    s = sigmas.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * noise, noise - x0


def pos_offset(grid: int, h: int, w: int, u_top: float, u_left: float) -> tuple[int, int]:
    """A (top, left) crop of the ``grid`` x ``grid`` position table for an h x w token grid, from two
    uniforms in [0, 1): every valid offset is equally likely."""
    if h > grid or w > grid:
        raise SD35Error(f"a {h}x{w} token grid does not fit the {grid}x{grid} position table.")
    top = min(int(u_top * (grid - h + 1)), grid - h)
    left = min(int(u_left * (grid - w + 1)), grid - w)
    return top, left


@dataclass
class NoiseDraw:
    """Everything random about one micro-batch."""

    noise: torch.Tensor  # like the latents
    sigmas: torch.Tensor  # (B,)
    drop: torch.Tensor  # (B,) bool: train this sample on the empty caption
    crop: tuple[float, float]  # two uniforms for the position-grid crop (shared by the micro-batch)


def draw(
    objective: FlowLoss,
    latent_shape: tuple[int, ...],
    seed: int,
    step: int,
    micro: int,
    first_index: int,
    caption_dropout: float = 0.0,
) -> NoiseDraw:
    """Noise, sigmas and caption-dropout decisions for samples ``first_index ..`` of the global batch.

    Each sample's values come from its own generator (:func:`sample_seed`), so the result for a sample does
    not depend on how the global batch is split over processes. The crop uniforms depend on (seed, step,
    micro) only: every process of a step uses the same crop.
    """
    noises, sigmas, drops = [], [], []
    for i in range(latent_shape[0]):
        g = torch.Generator().manual_seed(sample_seed(seed, step, micro, first_index + i))
        noises.append(torch.randn(latent_shape[1:], generator=g))
        sigmas.append(objective.sample_sigmas(1, g))
        drops.append(torch.rand(1, generator=g) < caption_dropout)
    g = torch.Generator().manual_seed(sample_seed(seed, step, micro, -1))
    u = torch.rand(2, generator=g)
    return NoiseDraw(torch.stack(noises), torch.cat(sigmas), torch.cat(drops), (float(u[0]), float(u[1])))


def flow_loss(
    model,
    latents: torch.Tensor,
    pooled: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: str = "none",
    pos_offset: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The weighted rectified-flow MSE of one batch (a scalar, float32).

    ``model`` is called as ``model(x_s, 1000 * s, pooled, context, pos_offset=...)`` (an MMDiTX or a DDP/FSDP
    wrapper of one). The loss is the mean over the batch of each sample's weight times its mean squared error.
    """
    x_t, target = noisy_latents(latents.float(), noise.float(), sigmas.float())
    kwargs = {"pos_offset": pos_offset} if pos_offset is not None else {}
    pred = model(x_t, sigmas.float() * 1000, pooled, context, **kwargs)
    per_sample = F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)
    return (loss_weights(sigmas.float(), weighting).to(per_sample) * per_sample).mean()
