"""Shared pieces of the MMDiT-X tests: tiny configurations, our model next to diffusers' on the same weights, and
inputs."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_state_dict
from tests.helpers import mmditx_inputs

CONFIGS = {
    "sd35m-like": dict(attn2_layers=(0, 1), qk_norm=True),
    "sd3m-like": dict(attn2_layers=(), qk_norm=False),
    "sd35l-like": dict(attn2_layers=(), qk_norm=True),  # SD3.5 Large (and Large Turbo): qk-norm, no attn2
    "attn2-subset": dict(attn2_layers=(1, 3), qk_norm=True, depth=4),
    "attn2-no-qknorm": dict(attn2_layers=(0,), qk_norm=False),
}


def diffusers_pair(name: str, seed: int = 0):
    """(config, our MMDiT-X, diffusers' SD3Transformer2DModel) of CONFIGS[name], both from one random state dict
    (diffusers' through its own single-file converter)."""
    cfg = tiny_configs(**CONFIGS[name]).mmditx
    sd = random_state_dict(MMDiTX(cfg), seed)
    ours = MMDiTX.from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()})
    ref = SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=64,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.attn2_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    return cfg, ours, ref.eval()


def inputs(cfg: MMDiTXConfig, h: int, w: int, batch: int = 2, n_ctx: int = 11):
    """Seeded (x, t, y, context) of an ``h`` x ``w`` latent at timesteps 991 and 13.5."""
    return mmditx_inputs(cfg, torch.tensor([991.0, 13.5][:batch]), (h, w), n_ctx)


def block_by_block(model: MMDiTX, *args, **kwargs) -> torch.Tensor:
    """The model's output on the block-by-block adaLN path (``fused_modulation = False``, the reading checked
    against diffusers), the fused flag restored after."""
    flag = model.fused_modulation
    model.fused_modulation = False
    try:
        return model(*args, **kwargs)
    finally:
        model.fused_modulation = flag
