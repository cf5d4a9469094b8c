"""From token ids to what the MMDiT-X reads: the joint text context and the pooled vector.

As Stability-AI/sd3.5 ``sd3_infer.py`` ``SD3Inferencer.get_cond`` does: CLIP-L and CLIP-G penultimate
hidden states are joined along features and zero-padded to the T5 width; the T5 states follow along
the sequence. The pooled vector is CLIP-L's pooled output (unprojected) joined with CLIP-G's (projected).

Two opt-in extensions, chosen when tokenizing (:meth:`sd35.conditioning.tokenize.SD3Tokenizer.__call__`):

**Prompt weighting** (``tokens.weighting``), applied to the CLIP-L, CLIP-G and T5 hidden states,
never to the pooled vectors; a token of weight exactly 1 keeps its hidden state bit for bit, and a
batch whose weights are all 1 runs exactly the unweighted code:

- ``"comfy"``, ComfyUI's way (``comfy/sd1_clip.py``, ``ClipTokenWeightEncoder.encode_token_weights``):
  each encoder also encodes the empty prompt, of the same length, and every token of weight ``w != 1``
  becomes ``z_empty + (z - z_empty) * w``, position by position. Weight 0 thus gives the empty
  prompt's state at that position, not zeros.
- ``"a1111"``, A1111's "Original" emphasis (stable-diffusion-webui ``modules/sd_hijack_clip.py``,
  ``process_tokens``): ``z * w``, then the whole tensor is rescaled so that its mean is the unweighted
  mean again. A1111 takes that mean over each 77-token chunk of the whole prompt batch; ours encodes
  cond and uncond in one batch, so we take it per prompt (per row) and per chunk (the T5 row as a
  whole). A1111's own SD3 code (``modules/models/sd3/sd3_cond.py``) ignores T5 weights; we weight T5
  too, as ComfyUI does, so that both conventions treat all three encoders alike.

**Long CLIP prompts** (``tokens.clip_chunks > 1``): each 77-token chunk is encoded on its own, the
chunks' hidden states are joined along the sequence (the CLIP part of the context is 77*k tokens, so
the context is 77*k + L long), and the pooled vectors come from the first chunk, as ComfyUI does
(``encode_token_weights`` returns ``pooled[0:1]``; SD3's ``comfy/text_encoders/sd3_clip.py`` joins
CLIP-L and CLIP-G along features, pads to 4096 and appends T5 the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd35.conditioning.tokenize import CLIP_LENGTH, SD3Tokens
from sd35.errors import SD35Error


class TextConditioner(nn.Module):
    """Runs the three encoders on :class:`SD3Tokens` and assembles ``(context, pooled)`` (float32).

    Without a T5 encoder the context is the CLIP tokens alone (ComfyUI's choice; the reference
    has no T5-less path and diffusers appends zeros instead). Weighting and long CLIP prompts: see
    the module docstring; both follow what the tokens were made with.
    """

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module | None, context_dim: int):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.context_dim = context_dim

    @property
    def device(self) -> torch.device:
        return next(self.clip_l.parameters()).device

    @torch.no_grad()
    def forward(self, tokens: SD3Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        mode = tokens.weighting
        l_hidden, l_pooled = self._clip(
            self.clip_l, tokens.clip_l, tokens.clip_l_weights, tokens.clip_l_empty, mode
        )
        g_hidden, g_pooled = self._clip(
            self.clip_g, tokens.clip_g, tokens.clip_g_weights, tokens.clip_g_empty, mode
        )
        clip = torch.cat([l_hidden, g_hidden], dim=-1)
        context = F.pad(clip, (0, self.context_dim - clip.shape[-1]))
        if self.t5 is not None and tokens.t5 is not None:
            t5 = self.t5(tokens.t5.to(self.device)).float()
            if _weighted(mode, tokens.t5_weights):
                empty = tokens.t5_empty
                z_empty = (
                    self.t5(_need(empty, "t5_empty").to(self.device)).float() if mode == "comfy" else None
                )
                t5 = _apply_weights(t5, tokens.t5_weights, z_empty, mode, tokens.t5.shape[1])
            context = torch.cat([context, t5], dim=-2)
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        return context, pooled

    def _clip(
        self,
        encoder: nn.Module,
        ids: torch.Tensor,
        weights: torch.Tensor | None,
        empty: torch.Tensor | None,
        mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, 77*k, W] float32, pooled of the first chunk [B, P] float32)."""
        device = self.device
        if ids.shape[1] > CLIP_LENGTH and ids.shape[1] % CLIP_LENGTH:
            raise SD35Error(f"CLIP token rows must be 77*k long (they are {ids.shape[1]}).")
        hidden, pooled = [], None
        for chunk in ids.split(CLIP_LENGTH, dim=1):
            h, p = encoder(chunk.to(device))
            hidden.append(h)
            pooled = p if pooled is None else pooled
        z = (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=1)).float()
        if _weighted(mode, weights):
            z_empty = None
            if mode == "comfy":
                z_empty = (
                    encoder(_need(empty, "clip_*_empty").to(device))[0].float().repeat(1, len(hidden), 1)
                )
            z = _apply_weights(z, weights, z_empty, mode, min(CLIP_LENGTH, ids.shape[1]))
        return z, pooled.float()


def _weighted(mode: str, weights: torch.Tensor | None) -> bool:
    return mode != "none" and weights is not None and bool((weights != 1).any())


def _need(empty: torch.Tensor | None, name: str) -> torch.Tensor:
    if empty is None:
        raise SD35Error(
            f"comfy weighting needs the empty prompt's ids ({name}); make the tokens with SD3Tokenizer."
        )
    return empty


def _apply_weights(
    z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor | None, mode: str, span: int
) -> torch.Tensor:
    """Weighted hidden states ``z`` [B, T, D] float32; ``span``: the length a1111 takes each mean over."""
    w = weights.to(z.device, torch.float32).unsqueeze(-1)  # [B, T, 1]
    changed = w != 1
    if mode == "comfy":
        return torch.where(changed, (z - z_empty) * w + z_empty, z)
    if mode != "a1111":
        raise SD35Error(f"unknown weighting {mode!r}.")
    b, t, d = z.shape
    pieces = z.reshape(b, t // span, span, d)
    scaled = pieces * w.reshape(b, t // span, span, 1)
    original_mean = pieces.mean(dim=(2, 3), keepdim=True)
    new_mean = scaled.mean(dim=(2, 3), keepdim=True)
    ratio = torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))
    keep = ~changed.reshape(b, t // span, span).any(dim=2)  # chunks with no weight to apply
    out = torch.where(keep[..., None, None], pieces, scaled * ratio)
    return out.reshape(b, t, d)
