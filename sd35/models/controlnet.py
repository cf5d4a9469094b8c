"""The SD3-family ControlNet: a copy of the first MMDiT-X joint blocks that reads a control latent.

Facts from diffusers ``src/diffusers/models/controlnets/controlnet_sd3.py`` (``SD3ControlNetModel``, the
layout the InstantX and community SD3 / SD3.5 Medium ControlNets are published in) and ComfyUI
``comfy/cldm/mmdit.py`` (``ControlNet``, the same network on the official MMDiT key names):

- the image latent is patch-embedded (``x_embedder``) with the positional table added if the file has one
  (``pos_embed_type`` "sincos"; None leaves it out), and the *control* latent, embedded by its own patch
  embedding ``pos_embed_input`` (zero-initialised in training, with ``extra_conditioning_channels`` more
  inputs, e.g. 17 for an inpainting ControlNet), is added to those tokens;
- the timestep and the pooled text make the adaLN vector as in the transformer; the pooled text is
  replaced by zeros when ``force_zeros_for_pooled_projection`` (diffusers' default; ComfyUI always does);
- N joint blocks, each with the *full* context stream (no pre-only last block), dual attention (attn2)
  where the file has it, qk-norm if the file has it;
- after each block, a zero-initialised linear ``controlnet_blocks.i`` maps the image tokens to the residual
  that :func:`sd35.models.mmditx.control_residual` adds to the transformer's tokens.

Module and parameter names follow the official MMDiT-X key names (ComfyUI's, after its
``convert_diffusers_mmdit``), so a state dict in that layout loads as it is; the diffusers layout is
renamed by :mod:`sd35.control.files`. Every size is read from the weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import CheckpointError, SD35Error
from sd35.loading.tensors import StateDict, shape_of
from sd35.loading.weights import load_weights
from sd35.models.mmditx import (
    HEAD_DIM,
    MLP2,
    JointBlock,
    PatchEmbed,
    crop_pos_embed,
    embedding_and_block_sizes,
    joint_modulation_paths,
    timestep_embedding,
)
from sd35.models.modulation import FusedLinears

REQUIRED = (
    "x_embedder.proj.weight",
    "pos_embed_input.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.mlp.0.weight",
    "context_embedder.weight",
    "controlnet_blocks.0.weight",
)


@dataclass(frozen=True)
class ControlNetConfig:
    """Sizes of an SD3 ControlNet, read from its weights (:meth:`from_state_dict`).

    ``pos_embed_max_size`` None: the file has no positional table (diffusers ``pos_embed_type=None``).
    ``force_zeros_for_pooled`` is not in the weights; diffusers' ``config.json`` says it, True otherwise
    (diffusers' default, and what ComfyUI always does).
    """

    hidden_size: int
    depth: int  # the ControlNet's own joint blocks (and residuals)
    patch_size: int
    in_channels: int
    control_channels: int  # pos_embed_input's inputs: the latent's channels + extra_conditioning_channels
    pos_embed_max_size: int | None
    pooled_dim: int
    context_dim: int
    mlp_hidden: int
    qk_norm: bool
    attn2_layers: tuple[int, ...]
    timestep_dim: int = 256
    force_zeros_for_pooled: bool = True

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def extra_channels(self) -> int:
        return self.control_channels - self.in_channels

    @classmethod
    def from_state_dict(cls, sd: StateDict, force_zeros_for_pooled: bool = True) -> ControlNetConfig:
        """The configuration from key names and shapes of the official-layout tensors."""
        for key in REQUIRED:
            if key not in sd:
                raise CheckpointError(
                    f"ControlNet weights: required tensor '{key}' is missing; this is not an SD3 ControlNet "
                    "(or the file is incomplete)."
                )
        hidden, in_ch, patch, _ = shape_of(sd["x_embedder.proj.weight"])
        if hidden % HEAD_DIM:
            raise CheckpointError(
                f"ControlNet weights: hidden size {hidden} is not a multiple of the head width {HEAD_DIM}."
            )
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        heads = {int(m.group(1)) for k in sd if (m := re.match(r"controlnet_blocks\.(\d+)\.", k))}
        depth = max(blocks, default=-1) + 1
        if not blocks or blocks != set(range(depth)) or heads != blocks:
            raise CheckpointError(
                f"ControlNet weights: joint blocks {sorted(blocks)} and controlnet blocks {sorted(heads)} "
                "do not pair up as 0..N-1; the file is incomplete."
            )
        grid = None
        if "pos_embed" in sd:
            n = shape_of(sd["pos_embed"])[1]
            grid = math.isqrt(n)
            if grid * grid != n:
                raise CheckpointError(f"ControlNet weights: pos_embed has {n} positions, not a square grid.")
        return cls(
            hidden_size=hidden,
            depth=depth,
            patch_size=patch,
            in_channels=in_ch,
            control_channels=shape_of(sd["pos_embed_input.proj.weight"])[1],
            pos_embed_max_size=grid,
            force_zeros_for_pooled=force_zeros_for_pooled,
            **embedding_and_block_sizes(sd),
        )


class ControlNet(nn.Module):
    """``forward(x, t, y, context, hint) -> residuals``: one (B, L, hidden) tensor per joint block.

    x: the transformer's input latents (B, C, H, W); t: sigma * 1000 (B,); y: pooled text (B, P) (ignored
    when the config forces zeros); context: text tokens (B, L, C); hint: the control latent
    (B or 1, control_channels, H, W), the control image through the VAE (:mod:`sd35.control.image`).
    The residuals are unscaled: the caller multiplies them by the unit's strength.
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        if cfg.pos_embed_max_size is not None:
            self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, dim))
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.pos_embed_input = PatchEmbed(cfg.control_channels, dim, cfg.patch_size)
        self.t_embedder = MLP2(cfg.timestep_dim, dim)
        self.y_embedder = MLP2(cfg.pooled_dim, dim)
        self.context_embedder = nn.Linear(cfg.context_dim, dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(cfg, i, context_pre_only=False) for i in range(cfg.depth)
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg.depth))
        self.fused_modulation = True  # every adaLN as one matmul where exact, as MMDiTX does
        paths = joint_modulation_paths(cfg.depth)
        self._adaln = FusedLinears([p + ".1" for p in paths], [p + ".0" for p in paths])

    @classmethod
    def from_state_dict(
        cls,
        sd: StateDict,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        what: str = "ControlNet",
        force_zeros_for_pooled: bool = True,
    ) -> ControlNet:
        """Build from official-layout keys (:mod:`sd35.control.files` renames the diffusers layout)."""
        config = ControlNetConfig.from_state_dict(sd, force_zeros_for_pooled)
        with torch.device("meta"):
            model = cls(config)
        return load_weights(model, sd, what=what, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def _apply(self, fn, recurse: bool = True):
        """Moving or casting drops the fused-adaLN cache (as :meth:`MMDiTX._apply`)."""
        self._adaln.clear()
        return super()._apply(fn, recurse)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor,
        hint: torch.Tensor,
    ) -> list[torch.Tensor]:
        cfg = self.config
        height, width = x.shape[-2:]
        if hint.shape[-2:] != x.shape[-2:] or hint.shape[1] != cfg.control_channels:
            raise SD35Error(
                f"the control latent has shape {tuple(hint.shape)}; this ControlNet needs "
                f"{cfg.control_channels} channels at the latent size {height}x{width}."
            )
        p = cfg.patch_size
        h, w = height // p, width // p
        dtype = self.dtype
        tokens = self.x_embedder(x.to(dtype))
        if cfg.pos_embed_max_size is not None:
            if h > cfg.pos_embed_max_size or w > cfg.pos_embed_max_size:
                raise SD35Error(
                    f"the image is larger than this ControlNet's position grid allows (at most "
                    f"{cfg.pos_embed_max_size * p * 8} px a side)."
                )
            tokens = tokens + crop_pos_embed(self.pos_embed, cfg.pos_embed_max_size, h, w)
        tokens = tokens + self.pos_embed_input(hint.to(dtype).expand(x.shape[0], -1, -1, -1))
        if cfg.force_zeros_for_pooled:
            y = torch.zeros_like(y)
        temb = timestep_embedding(t, cfg.timestep_dim).to(dtype)
        c = self.t_embedder(temb) + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))
        mods = self._adaln(self, c, F.silu) if self.fused_modulation else None
        out = []
        for i, (block, head) in enumerate(zip(self.joint_blocks, self.controlnet_blocks, strict=True)):
            ctx, tokens = block(ctx, tokens, c, None if mods is None else (mods[2 * i], mods[2 * i + 1]))
            out.append(head(tokens))
        return out
