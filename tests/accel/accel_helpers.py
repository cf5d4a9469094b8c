"""Tiny MMDiT-X models and inputs for the accel tests (random weights, see sd35.models.random_init)."""

from __future__ import annotations

import functools

import torch

from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_state_dict
from tests.helpers import mmditx_inputs


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
    """Seeded (x, t, y, context), timesteps evenly from 990 down to 15."""
    return mmditx_inputs(cfg, torch.linspace(990.0, 15.0, batch), hw, n_ctx, seed)
