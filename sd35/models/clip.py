"""The CLIP text encoders as SD3 uses them (CLIP-L and OpenCLIP bigG), in the HF-transformers key layout.

Keys carry no prefix: ``text_model.embeddings.*``, ``text_model.encoder.layers.{i}.*``,
``text_model.final_layer_norm.*`` and, for CLIP-G, ``text_projection.weight``.

SD3 takes two things from each encoder (Stability-AI/sd3.5 ``sd3_infer.py`` ``ClipL`` and ``ClipG``, built on
``other_impls.py`` ``SDClipModel`` and ``SDXLClipG``):

- ``hidden``: the penultimate layer's output, *without* the final LayerNorm (HF ``hidden_states[-2]``);
- ``pooled``: the final LayerNorm of the last layer's output at the first EOS token, unprojected for
  CLIP-L and projected by ``text_projection`` for CLIP-G.

Layers are pre-LN with a causal mask and no padding mask; LayerNorm eps is 1e-5.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import CheckpointError
from sd35.loading.tensors import StateDict, shape_of
from sd35.loading.weights import load_weights
from sd35.models.embedding import embedding

_PREFIX = "text_model."
_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
_ACTIVATIONS = ("quick_gelu", "gelu")
# kind -> (activation, pooled output projected, name in messages)
_KINDS = {"clip_l": ("quick_gelu", False, "CLIP-L"), "clip_g": ("gelu", True, "CLIP-G")}
# Keys some files carry that the encoder does not use.
_IGNORE = (r"text_model\.embeddings\.position_ids", r"logit_scale")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shapes and choices of a CLIP text transformer. ``heads`` defaults to ``width // 64`` (L: 12, G: 20)."""

    vocab_size: int
    max_positions: int
    width: int
    layers: int
    mlp_width: int
    activation: str
    heads: int | None = None
    has_projection: bool = False
    projection_dim: int | None = None
    # Pooling is at the first occurrence of this id; vocab_size - 1 (49407 for the real vocab) matches the
    # reference's argmax pooling, since EOS is the largest id.
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.heads is None:
            object.__setattr__(self, "heads", self.width // 64)
        if self.projection_dim is None:
            object.__setattr__(self, "projection_dim", self.width)
        if self.eos_token_id is None:
            object.__setattr__(self, "eos_token_id", self.vocab_size - 1)
        if not self.heads or self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible into {self.heads} heads")

    @classmethod
    def from_state_dict(cls, sd: StateDict, activation: str, what: str = "CLIP") -> CLIPTextConfig:
        """Infer the config from tensor shapes alone (values may be lazy) and the key set."""
        need = (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        )
        absent = [k for k in need if k not in sd]
        if absent:
            raise CheckpointError(
                f"{what}: the weights lack '{absent[0]}'; they are not a CLIP text encoder in the "
                "HF-transformers layout (keys 'text_model.…')."
            )
        vocab, width = shape_of(sd[need[0]])
        positions = shape_of(sd[need[1]])[0]
        mlp_width = shape_of(sd[need[2]])[0]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k)))
        proj = sd.get("text_projection.weight")
        if width % 64:
            raise CheckpointError(f"{what}: width {width} is not a multiple of the 64-wide attention heads.")
        return cls(
            vocab_size=vocab,
            max_positions=positions,
            width=width,
            layers=layers,
            mlp_width=mlp_width,
            activation=activation,
            has_projection=proj is not None,
            projection_dim=shape_of(proj)[0] if proj is not None else None,
        )


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class _Layer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = _Attention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = _MLP(cfg.width, cfg.mlp_width, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class _TextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer returning SD3's (penultimate hidden states, pooled EOS vector)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = _TextModel(config)
        if config.has_projection:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    @classmethod
    def from_state_dict(
        cls,
        sd: StateDict,
        kind: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        what: str | None = None,
    ) -> CLIPTextEncoder:
        """Build the encoder for ``kind`` ("clip_l" or "clip_g") from an HF-layout state dict.

        CLIP-L's pooled output is unprojected, so a ``text_projection.weight`` in its file is ignored.
        CLIP-G's pooled output is projected; its file must hold ``text_projection.weight``.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
        activation, projected, name = _KINDS[kind]
        what = what or name
        config = CLIPTextConfig.from_state_dict(sd, activation, what)
        ignore = list(_IGNORE)
        if projected and not config.has_projection:
            raise CheckpointError(
                f"{what}: the weights lack 'text_projection.weight', which CLIP-G needs to project its "
                "pooled output. Use the full CLIP-G text encoder file (e.g. SD3's clip_g.safetensors)."
            )
        if not projected:
            config = dataclasses.replace(config, has_projection=False, projection_dim=None)
            ignore.append(r"text_projection\.weight")
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, sd, what=what, dtype=dtype, device=device, ignore=ignore)
        return model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` [B, T] (T <= max_positions) -> (hidden [B, T, width], pooled [B, width or projection_dim]).

        The pooled vector is taken at the first ``eos_token_id`` in each row (row start if there is none).
        """
        tm = self.text_model
        x = tm.embeddings(tokens)
        layers = tm.encoder.layers
        hidden = x
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                hidden = x
            x = layer(x)
        eos = (tokens == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = tm.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])
        if self.config.has_projection:
            pooled = self.text_projection(pooled)
        return hidden, pooled
