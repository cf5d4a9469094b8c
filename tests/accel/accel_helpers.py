"""Tiny MMDiT-X models and inputs for the accel tests (random weights, see sd35.models.random_init)."""

from __future__ import annotations

import functools

import torch

from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_state_dict


@functools.cache
def _weights(depth: int, attn2: tuple[int, ...], qk_norm: bool) -> tuple[MMDiTXConfig, dict]:
    cfg = tiny_configs(depth=depth, attn2_layers=attn2, qk_norm=qk_norm).mmditx
    return cfg, random_state_dict(MMDiTX(cfg), 7)


def make_model(
    depth: int = 4, attn2: tuple[int, ...] = (0, 1), qk_norm: bool = True, dtype: torch.dtype | None = None
) -> MMDiTX:
    """A fresh model (its own tensors): by default blocks 0-1 with attn2, block 2 plain, block 3 pre-only."""
    cfg, sd = _weights(depth, attn2, qk_norm)
    return MMDiTX.from_state_dict({k: v.clone() for k, v in sd.items()}, dtype=dtype).eval()


def inputs(cfg: MMDiTXConfig, batch: int = 2, hw: tuple[int, int] = (8, 8), n_ctx: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    t = torch.linspace(990.0, 15.0, batch)
    y = torch.randn(batch, cfg.pooled_dim, generator=g)
    ctx = torch.randn(batch, n_ctx, cfg.context_dim, generator=g)
    return x, t, y, ctx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def plain(model: MMDiTX, *args, **kwargs) -> torch.Tensor:
    """The model's output on the block-by-block adaLN path (the reference reading)."""
    flag = model.fused_modulation
    model.fused_modulation = False
    try:
        return model(*args, **kwargs)
    finally:
        model.fused_modulation = flag
