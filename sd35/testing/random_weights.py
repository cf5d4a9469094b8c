"""Seeded random weights whose every tensor matters.

Default initialisation leaves norm weights at 1 and many biases at 0, which would hide a swapped
or dropped tensor in an equivalence test. Here every floating tensor gets distinct random values
at a scale that keeps activations O(1): matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2),
biases and other vectors ~ N(0, 0.1^2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fill every floating parameter and buffer of ``module`` in place, deterministically from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    named = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in sorted(named, key=lambda kv: kv[0]):
        if not t.is_floating_point():
            continue
        if t.dim() >= 2:
            fan_in = math.prod(t.shape[1:])
            value = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
            if (
                name.endswith("pos_embed")
                or "embedding" in name
                or "embed_tokens" in name
                or name.endswith("shared.weight")
            ):
                value = torch.randn(t.shape, generator=g) * 0.5
        elif "norm" in name or name.split(".")[-2:-1] in (["ln_q"], ["ln_k"]) or "ln_" in name:
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            value = 0.1 * torch.randn(t.shape, generator=g)
        t.copy_(value.to(t.dtype))
    return module.to(dtype)


def random_state_dict(
    module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` after :func:`randomize_` (contiguous CPU tensors, ready for safetensors)."""
    randomize_(module, seed, dtype)
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
