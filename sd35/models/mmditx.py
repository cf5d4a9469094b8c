"""MMDiT-X: the joint text-image diffusion transformer of SD3 / SD3.5.

Module and parameter names mirror the official checkpoint keys (``joint_blocks.N.x_block.attn.qkv``
and so on), so the official file loads without renaming. Facts, and the classes and functions
named, refer to Stability-AI/sd3.5 ``mmditx.py`` (``MMDiTX``, ``JointBlock``, ``DismantledBlock``) at
commit ``fbf8f483``.

Every size is read from the weights (:meth:`MMDiTXConfig.from_state_dict`): SD3 Medium, SD3.5
Medium and SD3.5 Large files all load with the same code (which release a file is:
:mod:`sd35.models.family`).

Inference computes every adaLN modulation in one matmul per forward (:mod:`sd35.models.modulation`;
the same numbers as the block-by-block reading of the reference, up to float summation order; switch it
off with ``model.fused_modulation = False``). Attention keeps q, k, v token-major, as views of the fused
qkv output: the layout with the fewest copies (see :func:`attention`). The opt-in accelerations
(compile, CUDA graphs, fp8) are in :mod:`sd35.accel`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from sd35.errors import CheckpointError, SD35Error
from sd35.loading.tensors import StateDict, shape_of
from sd35.loading.weights import load_weights
from sd35.models.gguf_linear import keep_quantized
from sd35.models.modulation import FusedLinears
from sd35.models.step_cache import FirstBlockCache

PREFIX = "model.diffusion_model."
HEAD_DIM = 64  # the reference sets hidden = 64 * depth and heads = depth (``MMDiTX.__init__``)


@dataclass(frozen=True)
class MMDiTXConfig:
    hidden_size: int
    depth: int
    patch_size: int
    in_channels: int
    out_channels: int
    pos_embed_max_size: int
    pooled_dim: int  # adm_in_channels: CLIP-L pooled + CLIP-G pooled
    context_dim: int  # the text features' width (4096, T5-XXL's)
    mlp_hidden: int
    qk_norm: bool
    attn2_layers: tuple[int, ...]  # blocks whose x stream has the second self-attention (MMDiT-X)
    timestep_dim: int = 256

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> MMDiTXConfig:
        """Infer the configuration from key names and shapes only (sd3_impls.py ``BaseModel.__init__``)."""
        sd = strip_prefix(sd)
        for key in (
            "x_embedder.proj.weight",
            "pos_embed",
            "final_layer.linear.weight",
            "t_embedder.mlp.0.weight",
        ):
            if key not in sd:
                raise CheckpointError(
                    f"MMDiT-X weights: required tensor '{key}' is missing; this is not an SD3-family model."
                )
        hidden, in_ch, patch, _ = shape_of(sd["x_embedder.proj.weight"])
        if hidden % HEAD_DIM:
            raise CheckpointError(
                f"MMDiT-X weights: hidden size {hidden} is not a multiple of the head width {HEAD_DIM}."
            )
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError(
                "MMDiT-X weights: no 'joint_blocks.N' tensors; this is not an SD3-family model."
            )
        depth = max(blocks) + 1
        if blocks != set(range(depth)):
            missing = sorted(set(range(depth)) - blocks)
            raise CheckpointError(
                f"MMDiT-X weights: joint blocks {missing} are missing (the file is incomplete)."
            )
        num_patches = shape_of(sd["pos_embed"])[1]
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise CheckpointError(
                f"MMDiT-X weights: pos_embed has {num_patches} positions, not a square grid."
            )
        out_dim = shape_of(sd["final_layer.linear.weight"])[0]
        return cls(
            hidden_size=hidden,
            depth=depth,
            patch_size=patch,
            in_channels=in_ch,
            out_channels=out_dim // (patch * patch),
            pos_embed_max_size=grid,
            **embedding_and_block_sizes(sd),
        )

    @property
    def max_image_size(self) -> int:
        """The largest image side in pixels the positional-embedding grid covers (8x VAE downsampling)."""
        return self.pos_embed_max_size * self.patch_size * 8


def embedding_and_block_sizes(sd: StateDict) -> dict:
    """The sizes an MMDiT-X and its ControlNet read alike from official-layout keys: the pooled-text and text
    widths, the MLP width, qk-norm, the blocks with a second attention, the timestep embedding's width."""
    return dict(
        pooled_dim=shape_of(sd["y_embedder.mlp.0.weight"])[1],
        context_dim=shape_of(sd["context_embedder.weight"])[1],
        mlp_hidden=shape_of(sd["joint_blocks.0.x_block.mlp.fc1.weight"])[0],
        qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in sd,
        attn2_layers=tuple(
            sorted(
                int(m.group(1))
                for k in sd
                if (m := re.fullmatch(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight", k))
            )
        ),
        timestep_dim=shape_of(sd["t_embedder.mlp.0.weight"])[1],
    )


def strip_prefix(sd: StateDict, prefix: str = PREFIX) -> StateDict:
    """Keys with the official ``model.diffusion_model.`` prefix, if any key carries it, are taken without it."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` per sample, as one fused multiply-add (one pass over x, no temporary)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(
    x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """``x + gate * update`` per sample, as one fused multiply-add.

    ``in_place`` (for an ``x`` the caller made itself) writes into ``x`` when autograd is not recording:
    inference then allocates no new residual stream, which measured faster on the CPU.
    """
    if in_place and not (torch.is_grad_enabled() and (x.requires_grad or update.requires_grad)):
        return x.addcmul_(gate.unsqueeze(1), update)
    return torch.addcmul(x, gate.unsqueeze(1), update)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (norm1, norm2, norm_final in the reference)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked multi-head attention on token-major (B, L, H, Dh) tensors, returning (B, L, H*Dh).

    The (B, H, L, Dh) views handed to ``scaled_dot_product_attention`` are transposes, not copies: its
    kernels (CPU flash, CUDA flash and cuDNN) take any strides with a unit last stride and write the
    output in q's memory layout, so the output comes back token-major and the final reshape is a view.
    Laying q, k, v out head-major instead (one permute of the qkv output) was measured to cost copies,
    not save them: the RMS norm then makes each strided q and k contiguous, and the head-major output
    needs a copy to become tokens again (5 extra copies per joint attention, same speed on the CPU).
    """
    b, n, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, n, h * d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t = sigma*1000, laid out as [cos | sin] (cos first).

    As the reference's ``TimestepEmbedder.timestep_embedding``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def crop_pos_embed(
    pos_embed: torch.Tensor, grid: int, h: int, w: int, offset: tuple[int, int] | None = None
) -> torch.Tensor:
    """The (1, h*w, D) crop at ``offset`` (top, left) of a (1, grid*grid, D) positional table; by default the
    centred crop (floor division, the reference's ``MMDiTX.cropped_pos_embed``, diffusers ``PatchEmbed``)."""
    top, left = offset if offset is not None else ((grid - h) // 2, (grid - w) // 2)
    if not (0 <= top <= grid - h and 0 <= left <= grid - w):
        raise SD35Error(
            f"pos-embed crop at {(top, left)} of size {h}x{w} does not fit the {grid}x{grid} grid."
        )
    pe = pos_embed.reshape(1, grid, grid, -1)[:, top : top + h, left : left + w, :]
    return pe.reshape(1, h * w, -1)


class RMSNorm(nn.Module):
    """QK normalisation over the head dimension: x * rsqrt(mean(x^2) + 1e-6) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class MLP2(nn.Module):
    """Linear -> SiLU -> Linear, the timestep and pooled-text embedders (keys ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # tokens in row-major (h, w) order


class SelfAttention(nn.Module):
    """Fused qkv projection ([q; k; v] along the output dim), optional RMS qk-norm, output projection.

    ``pre_only`` attention (the last context block) has no output projection (``SelfAttention.__init__``).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.ln_k = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the tokens ``x`` (B, L, D), each (B, L, H, Dh) (views of the one qkv output), q and k normalised."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)
        return self.ln_q(q), self.ln_k(k), v


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled() and hidden.requires_grad:
            return self.fc2(F.gelu(hidden, approximate="tanh"))
        return self.fc2(
            torch.ops.aten.gelu_(hidden, approximate="tanh")
        )  # inference: no second buffer (faster)


class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block.

    adaLN chunks (``DismantledBlock.__init__``): 6 = (shift, scale, gate) for attention and MLP; 9 adds
    (shift, scale, gate) for the second self-attention ``attn2``; 2 = (shift, scale) for the
    ``pre_only`` last context block, which has no projection, MLP or second norm.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        qk_norm: bool,
        pre_only: bool = False,
        attn2: bool = False,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.has_attn2 = attn2
        self.n_mod = n_mod = 2 if pre_only else (9 if attn2 else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim))
        self.attn = SelfAttention(dim, heads, qk_norm, pre_only)
        if attn2:
            self.attn2 = SelfAttention(dim, heads, qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, mlp_hidden)

    def finish(
        self, x: torch.Tensor, attn_out: torch.Tensor, mods: tuple[torch.Tensor, ...], attn2_out=None
    ) -> torch.Tensor:
        """Residual updates after attention (``DismantledBlock.post_attention`` / ``post_attention_x``)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2], mods[3], mods[4], mods[5]
        x = gated_residual(x, gate_msa, self.attn.proj(attn_out))  # a new tensor: the block's input is kept
        if attn2_out is not None:  # after attn1's residual, before norm2
            x = gated_residual(x, mods[8], self.attn2.proj(attn2_out), in_place=True)
        update = self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return gated_residual(x, gate_mlp, update, in_place=True)


class JointBlock(nn.Module):
    """Joint attention over [context tokens ; image tokens] (context first, ``block_mixing``)."""

    def __init__(self, cfg: MMDiTXConfig, index: int, context_pre_only: bool | None = None):
        """``context_pre_only``: whether the context stream stops after attention; by default only in the
        last block (the transformer's). A ControlNet's blocks all keep the full context stream
        (diffusers ``SD3ControlNetModel``: ``context_pre_only=False``), so it passes False."""
        super().__init__()
        dim, heads = cfg.hidden_size, cfg.num_heads
        last = index == cfg.depth - 1 if context_pre_only is None else context_pre_only
        self.context_block = DismantledBlock(dim, heads, cfg.mlp_hidden, cfg.qk_norm, pre_only=last)
        self.x_block = DismantledBlock(
            dim, heads, cfg.mlp_hidden, cfg.qk_norm, attn2=index in cfg.attn2_layers
        )

    def forward(
        self,
        context: torch.Tensor,
        x: torch.Tensor,
        c: torch.Tensor,
        mods: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``mods``: the (context, image) adaLN outputs already computed from ``c`` (the fused path), or None."""
        cb, xb = self.context_block, self.x_block
        if mods is None:
            mods = cb.adaLN_modulation(c), xb.adaLN_modulation(c)
        c_mods = mods[0].chunk(cb.n_mod, dim=1)
        x_mods = mods[1].chunk(xb.n_mod, dim=1)

        cq, ck, cv = cb.attn.pre_attention(modulate(layer_norm(context), c_mods[0], c_mods[1]))
        x_norm = layer_norm(x)
        xq, xk, xv = xb.attn.pre_attention(modulate(x_norm, x_mods[0], x_mods[1]))
        n_ctx = context.shape[1]
        joint = attention(torch.cat([cq, xq], 1), torch.cat([ck, xk], 1), torch.cat([cv, xv], 1))
        ctx_out, x_out = joint[:, :n_ctx], joint[:, n_ctx:]

        attn2_out = None
        if xb.has_attn2:  # the second self-attention reads the same norm1(x), with its own modulation
            attn2_out = attention(*xb.attn2.pre_attention(modulate(x_norm, x_mods[6], x_mods[7])))

        context = None if cb.pre_only else cb.finish(context, ctx_out, c_mods)
        return context, xb.finish(x, x_out, x_mods, attn2_out)


ControlResiduals = Sequence[Sequence[torch.Tensor]]
"""One sequence per ControlNet: its block outputs (B, L, hidden), already scaled by its strength."""


def control_residual(control: ControlResiduals, index: int, depth: int) -> torch.Tensor | None:
    """The ControlNet residual added to the image tokens after joint block ``index`` of ``depth``, or None.

    As diffusers ``SD3Transformer2DModel.forward``: every block but the last (whose context stream is
    pre-only) gets residual ``int(index / (depth / n))`` of a ControlNet with ``n`` blocks, so a 12-block
    ControlNet on 24 blocks feeds each of its outputs to two consecutive blocks. Several ControlNets'
    residuals are summed first (diffusers ``SD3MultiControlNetModel``), each by its own interval.
    """
    if index == depth - 1:
        return None
    total = None
    for residuals in control:
        r = residuals[int(index / (depth / len(residuals)))]
        total = r if total is None else total + r
    return total


class FinalLayer(nn.Module):
    """adaLN (shift, scale: shift first, ``FinalLayer.forward``) then a linear map to patch pixels."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
        """``mod``: the adaLN output already computed from ``c`` (the fused path), or None."""
        shift, scale = (self.adaLN_modulation(c) if mod is None else mod).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))


def joint_modulation_paths(depth: int) -> list[str]:
    """The adaLN modules of ``depth`` joint blocks, per block (context, image): what
    :class:`~sd35.models.modulation.FusedLinears` fuses in the MMDiT-X and in an SD3 ControlNet alike."""
    return [
        f"joint_blocks.{i}.{s}.adaLN_modulation" for i in range(depth) for s in ("context_block", "x_block")
    ]


class MMDiTX(nn.Module):
    """The SD3-family transformer: ``forward(x, t, y, context, skip_layers=())`` predicts the flow velocity.

    x: latents (B, C, H, W) with even H, W; t: sigma * 1000, shape (B,); y: pooled text (B, pooled_dim);
    context: text tokens (B, L, context_dim). Returns (B, C, H, W) in x's dtype.
    ``skip_layers`` bypasses whole joint blocks (Skip Layer Guidance, ``MMDiTX.forward_core_with_concat``).

    ``fused_modulation`` (default True) computes every adaLN modulation in one matmul where that is
    exact and safe (see :class:`sd35.models.modulation.FusedLinears`: inference or frozen adaLN weights,
    plain linears without hooks or runtime LoRAs, all on one device); it costs a second copy of the adaLN
    weights (about 0.77 B parameters for SD3.5 Medium). Set it False to keep the block-by-block reading.
    """

    def __init__(self, config: MMDiTXConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, dim))
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.t_embedder = MLP2(cfg.timestep_dim, dim)
        self.y_embedder = MLP2(cfg.pooled_dim, dim)
        self.context_embedder = nn.Linear(cfg.context_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(dim, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False  # recompute each joint block in the backward pass (training)
        self.fused_modulation = True  # all adaLN linears as one matmul, where exact (see the class doc)
        # the cache behind it: a plain attribute, never in the state dict
        self._adaln = FusedLinears(self.modulation_paths(), self.modulation_paths(".0"))

    @classmethod
    def from_state_dict(
        cls,
        sd: StateDict,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        what: str = "MMDiT-X",
        quantized: bool = False,
    ) -> MMDiTX:
        """Build from official keys, with or without the ``model.diffusion_model.`` prefix.

        ``quantized``: linears whose weights are quantized GGUF tensors keep them so (:mod:`sd35.models.gguf_linear`).
        """
        sd = strip_prefix(sd)
        config = MMDiTXConfig.from_state_dict(sd)
        with torch.device("meta"):
            model = cls(config)
        if quantized:
            sd = keep_quantized(model, sd)
        return load_weights(model, sd, what=what, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype  # a float buffer whatever the linears store (GGUF bytes, fp8)

    def _apply(self, fn, recurse: bool = True):
        """Moving or casting the model drops the fused-adaLN cache (it would otherwise stay behind on the old device)."""
        self._adaln.clear()
        return super()._apply(fn, recurse)

    def release_caches(self) -> None:
        """Free the fused-adaLN copy (1.5 GB in bf16 for SD3.5 Medium) until the next forward rebuilds it.

        The pipeline calls this before the VAE decode on GPUs, so the copy never adds to the decode's peak.
        """
        self._adaln.clear()

    def modulation_paths(self, layer: str = ".1") -> list[str]:
        """Module names of every adaLN linear (``layer=".0"``: their SiLUs), in the order of :meth:`modulations`:
        per block (context, image), then the final layer's."""
        streams = joint_modulation_paths(self.config.depth)
        return [p + layer for p in (*streams, "final_layer.adaLN_modulation")]

    def modulation_layers(self) -> list[nn.Module]:
        """The modules at :meth:`modulation_paths`."""
        return [self.get_submodule(p) for p in self.modulation_paths()]

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor] | None:
        """All adaLN outputs from one ``silu(c) @ W_all.T + b_all``, or None where the fused path does not apply.

        One entry per :meth:`modulation_paths` layer, each (B, n_mod * hidden): the same numbers as the
        per-block ``adaLN_modulation(c)`` calls (same dot products, one bigger matmul).
        """
        if not self.fused_modulation:
            return None
        return self._adaln(self, c, F.silu)

    def check_latent_size(self, height: int, width: int) -> None:
        cfg = self.config
        p = cfg.patch_size
        if height % p or width % p:
            raise SD35Error(
                f"latent size {height}x{width} must be a multiple of the patch size {p} "
                f"(image sides must be multiples of {8 * p} pixels)."
            )
        if height // p > cfg.pos_embed_max_size or width // p > cfg.pos_embed_max_size:
            raise SD35Error(
                f"latent size {height}x{width} is larger than this model's position grid allows "
                f"(at most {cfg.max_image_size}x{cfg.max_image_size} pixels)."
            )

    def cropped_pos_embed(self, h: int, w: int, offset: tuple[int, int] | None = None) -> torch.Tensor:
        """A crop of the stored positional grid for an h x w token grid.

        By default the centred crop (floor division, ``MMDiTX.cropped_pos_embed``). Training may pass
        ``offset`` = (top, left) to take random crops, an augmentation that keeps the model robust across
        sizes.
        """
        return crop_pos_embed(self.pos_embed, self.config.pos_embed_max_size, h, w, offset)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) with channel fastest -> (B, C, h*p, w*p) (``MMDiTX.unpatchify``)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(sinusoid(t)) + y_embedder(y), the vector every adaLN reads."""
        temb = timestep_embedding(t, self.config.timestep_dim).to(self.dtype)
        return self.t_embedder(temb) + self.y_embedder(y.to(self.dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor,
        skip_layers: Iterable[int] = (),
        pos_offset: tuple[int, int] | None = None,
        step_cache: FirstBlockCache | None = None,
        control: ControlResiduals = (),
    ) -> torch.Tensor:
        """``pos_offset`` (top, left) picks a non-centred crop of the position grid (training augmentation);
        ``step_cache`` (:mod:`sd35.models.step_cache`) may replace the blocks after the first by the residual
        they added on an earlier call; ``control``: ControlNet residuals added after the blocks
        (:func:`control_residual`)."""
        out_dtype = x.dtype
        height, width = x.shape[-2:]
        self.check_latent_size(height, width)
        p = self.config.patch_size
        h, w = height // p, width // p
        skip = set(skip_layers)

        tokens = self.x_embedder(x.to(self.dtype)) + self.cropped_pos_embed(h, w, pos_offset)
        c = self.conditioning(t, y)
        ctx = self.context_embedder(context.to(self.dtype))
        mods = self.modulations(c)
        key = (tuple(sorted(skip)), tuple(x.shape), tuple(context.shape))
        probe: torch.Tensor | None = None  # the tokens after the first block run, when caching
        for i, block in enumerate(self.joint_blocks):
            # a skipped block still gets its ControlNet residual, as in diffusers
            add = control_residual(control, i, self.config.depth) if control else None
            if i in skip:
                tokens = tokens if add is None else tokens + add
                continue
            m = None if mods is None else (mods[2 * i], mods[2 * i + 1])
            before = tokens
            if self.gradient_checkpointing and torch.is_grad_enabled():
                ctx, tokens = torch.utils.checkpoint.checkpoint(block, ctx, tokens, c, m, use_reentrant=False)
            else:
                ctx, tokens = block(ctx, tokens, c, m)
            if add is not None:
                tokens = tokens + add
            if step_cache is not None and probe is None:
                probe, first_residual = tokens, tokens - before
                cached = step_cache.reusable(key, first_residual)
                if cached is not None:
                    tokens = tokens + cached
                    break
        else:
            if step_cache is not None and probe is not None:
                step_cache.store(key, first_residual, tokens - probe)
        out = self.final_layer(tokens, c, None if mods is None else mods[-1])
        return self.unpatchify(out, h, w).to(out_dtype)
