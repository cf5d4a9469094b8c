"""A cheap, deterministic stand-in for the MMDiT-X: what the sampler-parity fixtures are computed with.

The ComfyUI parity fixtures (``tests/fixtures/comfyui``, written by ``scripts/comfy_fixtures.py``) compare
*sampler maths*: sigmas, noise, guidance and update formulas. The transformer itself was already shown to
agree with ComfyUI's to 6e-6, so the fixtures run both engines on this small smooth function instead, which
has the transformer's call signature (``velocity(x, t, y, context, skip_layers=())``) and responds to every
input the samplers and guidance vary: the latent, the timestep, the prompt (context and pooled vector)
and the skipped joint blocks (Skip Layer Guidance). Its weights are drawn from a fixed seed and stored in the
fixture file, so the tests use exactly the function the oracle ran.

With ``h = M x + (mean_L(context) P + y Q) g(skip) + (t / 1000) b`` per pixel (``M`` mixes channels), it
returns the velocity ``v = x - tanh(h)``, i.e. the denoised estimate ``x - sigma v`` moves ``x`` towards
the bounded ``tanh(h)``; ``g(skip) = 1 - sum(gains[l] for l in skip)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHANNELS = 16
CONTEXT_DIM = 8
POOLED_DIM = 6
DEPTH = 4


@dataclass(frozen=True)
class StandInVelocity:
    """The stand-in transformer; see the module docstring. Make one with :meth:`seeded` or from tensors."""

    mix: torch.Tensor  # (C, C)
    context_proj: torch.Tensor  # (CONTEXT_DIM, C)
    pooled_proj: torch.Tensor  # (POOLED_DIM, C)
    time_bias: torch.Tensor  # (C,)
    layer_gains: torch.Tensor  # (DEPTH,)

    @classmethod
    def seeded(cls, seed: int = 0) -> StandInVelocity:
        """The stand-in with weights drawn from ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(seed)
        return cls(
            mix=torch.randn(CHANNELS, CHANNELS, generator=g) * 0.3,
            context_proj=torch.randn(CONTEXT_DIM, CHANNELS, generator=g) * 0.5,
            pooled_proj=torch.randn(POOLED_DIM, CHANNELS, generator=g) * 0.5,
            time_bias=torch.randn(CHANNELS, generator=g),
            layer_gains=torch.rand(DEPTH, generator=g) * 0.4,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights by name (what the fixture file stores under ``standin.*``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor,
        skip_layers: Sequence[int] = (),
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        gain = 1.0 - sum(float(self.layer_gains[layer]) for layer in skip_layers)
        prompt = (
            context.to(torch.float32).mean(dim=1) @ self.context_proj + y.to(torch.float32) @ self.pooled_proj
        )
        h = torch.einsum("oc,bchw->bohw", self.mix, x)
        h = h + (prompt * gain)[:, :, None, None]
        h = h + (t.to(torch.float32) / 1000.0)[:, None, None, None] * self.time_bias[None, :, None, None]
        return x - torch.tanh(h)


def standin_conditioning(seed: int = 1, tokens: int = 5) -> tuple[torch.Tensor, ...]:
    """``(context, pooled, neg_context, neg_pooled)`` for the fixtures, each batch 1, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, tokens, CONTEXT_DIM, generator=g),
        torch.randn(1, POOLED_DIM, generator=g),
        torch.randn(1, tokens, CONTEXT_DIM, generator=g),
        torch.randn(1, POOLED_DIM, generator=g),
    )
