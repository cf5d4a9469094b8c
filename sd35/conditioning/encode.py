"""From token ids to what the MMDiT-X reads: the joint text context and the pooled vector.

REFERENCE.md 4.3 (sd3_infer.py 319-338): CLIP-L and CLIP-G penultimate hidden states are joined
along features and zero-padded to the T5 width; the T5 states follow along the sequence. The
pooled vector is CLIP-L's pooled output (unprojected) joined with CLIP-G's (projected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd35.conditioning.tokenize import SD3Tokens


class TextConditioner(nn.Module):
    """Runs the three encoders on :class:`SD3Tokens` and assembles ``(context, pooled)``.

    Without a T5 encoder the context is the 77 CLIP tokens alone (ComfyUI's choice; the reference
    has no T5-less path and diffusers appends zeros instead).
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
        device = self.device
        l_hidden, l_pooled = self.clip_l(tokens.clip_l.to(device))
        g_hidden, g_pooled = self.clip_g(tokens.clip_g.to(device))
        clip = torch.cat([l_hidden, g_hidden], dim=-1).float()
        context = F.pad(clip, (0, self.context_dim - clip.shape[-1]))
        if self.t5 is not None and tokens.t5 is not None:
            context = torch.cat([context, self.t5(tokens.t5.to(device)).float()], dim=-2)
        pooled = torch.cat([l_pooled, g_pooled], dim=-1).float()
        return context, pooled
