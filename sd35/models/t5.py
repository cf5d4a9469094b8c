"""The T5 (v1.1) encoder as SD3 uses it (T5-XXL), in the HF-transformers key layout.

Keys: ``encoder.embed_tokens.weight`` and/or ``shared.weight`` (the same embedding; files carry either or
both), ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``, block 0's
``...SelfAttention.relative_attention_bias.weight`` [buckets, heads],
``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``, ``encoder.block.{i}.layer.{0,1}.layer_norm.weight``
and ``encoder.final_layer_norm.weight``.

As Stability-AI/sd3.5 ``other_impls.py`` (``T5Stack``, ``T5Attention``, ``T5LayerNorm``,
``T5DenseGatedActDense``) does: pre-RMS-norm blocks (eps 1e-6, no mean subtraction), attention with no
1/sqrt(d) scaling, a bidirectional relative position bias computed once from block 0 and added in every block,
gated-GELU(tanh) feed-forward, no padding mask, and the final RMS norm at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import CheckpointError
from sd35.loading.tensors import StateDict, shape_of
from sd35.loading.weights import load_weights
from sd35.models.embedding import embedding
from sd35.models.gguf_linear import keep_quantized

_EMBED = "encoder.embed_tokens.weight"
_SHARED = "shared.weight"
_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_BLOCK_RE = re.compile(r"encoder\.block\.(\d+)\.")
# fp16 only: residuals are clamped this far inside the fp16 range so they stay finite (as HF's T5 does).
_FP16_CLAMP = torch.finfo(torch.float16).max - 1000


@dataclass(frozen=True)
class T5Config:
    """T5 encoder shapes. ``max_distance`` is not stored in files; 128 is the value of every T5 v1.1 model."""

    vocab_size: int
    d_model: int
    heads: int
    d_kv: int
    d_ff: int
    layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def from_state_dict(cls, sd: StateDict, what: str = "T5") -> T5Config:
        """Infer the config from tensor shapes alone (values may be lazy) and the key set."""
        embed = sd.get(_EMBED, sd.get(_SHARED))
        if embed is None:
            raise CheckpointError(
                f"{what}: the token embedding is missing (neither '{_EMBED}' nor '{_SHARED}' is in the weights). "
                "The file is incomplete or not a T5 encoder in the HF-transformers layout."
            )
        for key in (
            _BIAS,
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        ):
            if key not in sd:
                raise CheckpointError(
                    f"{what}: the weights lack '{key}'; they are not a gated-GELU T5 (v1.1) encoder in the "
                    "HF-transformers layout."
                )
        vocab, d_model = shape_of(embed)
        buckets, heads = shape_of(sd[_BIAS])
        inner = shape_of(sd["encoder.block.0.layer.0.SelfAttention.q.weight"])[0]
        if inner % heads:
            raise CheckpointError(f"{what}: attention width {inner} is not divisible into {heads} heads.")
        return cls(
            vocab_size=vocab,
            d_model=d_model,
            heads=heads,
            d_kv=inner // heads,
            d_ff=shape_of(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"])[0],
            layers=1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))),
            num_buckets=buckets,
        )


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bucket of (key - query) for every query/key pair, bidirectional: [length, length] int64.

    Half the buckets are for keys after the query. Within a half, the first half of the buckets are exact
    distances, the rest are log-spaced up to ``max_distance`` (beyond which all share the last bucket).
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    out = (rel > 0).long() * half
    dist = rel.abs()
    log_ratio = torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return out + torch.where(dist < exact, dist, large)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.heads, self.d_kv = cfg.heads, cfg.d_kv
        inner = cfg.heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = embedding(cfg.num_buckets, cfg.heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.d_kv).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=bias, scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.d_kv))


class _AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = _SelfAttention(cfg, has_bias)
        self.layer_norm = _RMSNorm(cfg.d_model, cfg.eps)


class _GatedFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _FFLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = _GatedFF(cfg)
        self.layer_norm = _RMSNorm(cfg.d_model, cfg.eps)


def _fp16_safe(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_FP16_CLAMP, _FP16_CLAMP) if x.dtype == torch.float16 else x


class _Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([_AttentionLayer(cfg, has_bias), _FFLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = _fp16_safe(x + attn.SelfAttention(attn.layer_norm(x), bias))
        return _fp16_safe(x + ff.DenseReluDense(ff.layer_norm(x)))


class _Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList(_Block(cfg, has_bias=i == 0) for i in range(cfg.layers))
        self.final_layer_norm = _RMSNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: ``tokens`` [B, L] -> hidden states [B, L, d_model] (after the final norm).

    In float16, residuals are clamped to +-(fp16 max - 1000) after every sub-layer, like HF's T5, to keep
    them finite; in float32/bfloat16 nothing is clamped.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.encoder = _Stack(config)

    @classmethod
    def from_state_dict(
        cls,
        sd: StateDict,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        what: str = "T5",
        quantized: bool = False,
    ) -> T5Encoder:
        """Build from an HF-layout state dict holding the embedding as ``encoder.embed_tokens.weight``,
        ``shared.weight`` or both (then identical; ``shared.weight`` is ignored). ``quantized``: linears whose
        weights are quantized GGUF tensors keep them so (:mod:`sd35.models.gguf_linear`)."""
        config = T5Config.from_state_dict(sd, what)
        if _EMBED not in sd:
            sd = {**sd, _EMBED: sd[_SHARED]}
        with torch.device("meta"):
            model = cls(config)
        if quantized:
            sd = keep_quantized(model, sd)
        load_weights(model, sd, what=what, dtype=dtype, device=device, ignore=[re.escape(_SHARED)])
        return model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        stack = self.encoder
        x = stack.embed_tokens(tokens)
        cfg = self.config
        buckets = relative_position_buckets(tokens.shape[1], cfg.num_buckets, cfg.max_distance, tokens.device)
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1).unsqueeze(0).to(x.dtype)  # [1, heads, L, L]
        for block in stack.block:
            x = block(x, bias)
        return stack.final_layer_norm(x)
