"""Tiny SD3 ControlNets written by diffusers itself (``SD3ControlNetModel.save_pretrained``), with random weights
in every tensor (the zero-initialised ones too, so that each residual matters)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3ControlNetModel

from sd35.loading.writers import diffusers_transformer_config
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.random_init import randomize_


def diffusers_controlnet(
    cfg: MMDiTXConfig,
    *,
    layers: int = 2,
    dual: tuple[int, ...] = (0,),
    pos_embed_type: str | None = "sincos",
    extra: int = 0,
    force_zeros: bool = True,
    seed: int = 0,
) -> SD3ControlNetModel:
    """A random diffusers ControlNet that fits the transformer of ``cfg``."""
    transformer = {k: v for k, v in diffusers_transformer_config(cfg).items() if not k.startswith("_")}
    net = SD3ControlNetModel(
        **{**transformer, "num_layers": layers, "dual_attention_layers": dual},
        extra_conditioning_channels=extra,
        pos_embed_type=pos_embed_type,
        force_zeros_for_pooled_projection=force_zeros,
    )
    return randomize_(net, seed).eval()


def write_controlnet(net: SD3ControlNetModel, folder: Path) -> Path:
    """``folder`` with diffusers' config.json and diffusion_pytorch_model.safetensors of ``net``."""
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def controlnet_inputs(
    cfg: MMDiTXConfig, hw=(8, 12), batch: int = 2, channels: int | None = None, seed: int = 3
):
    """Seeded (x, t, y, context, hint) for a ControlNet of a transformer of ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    t = torch.tensor([991.0, 13.5][:batch])
    y = torch.randn(batch, cfg.pooled_dim, generator=g)
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    hint = torch.randn(batch, channels or cfg.in_channels, *hw, generator=g)
    return x, t, y, ctx, hint
