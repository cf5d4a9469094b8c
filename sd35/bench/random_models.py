"""The models and inputs under test: our random MMDiT-X, diffusers' twin holding the same weights, and a
diffusers-layout folder of a whole random pipeline that both engines load.

Random weights (:func:`sd35.models.random_init.build_random`, drawn on the device per tensor name) let the
benchmark run anywhere without a 10 GB download, and one seed gives every model the same weights, so the
two engines are compared on identical numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd35.bench.options import BATCH, TEXT_TOKENS, BenchOptions
from sd35.bench.report import log
from sd35.loading.writers import diffusers_transformer_config, write_diffusers
from sd35.models.configs import TINY_CLIP_VOCAB, medium_configs, tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_pipeline_weights


def diffusers_transformer(ours: MMDiTX) -> nn.Module:
    """diffusers' ``SD3Transformer2DModel`` holding a copy of ``ours``' weights, converted by our key table.

    Built on the meta device and filled with ``assign=True``: no second random init, no float32 copy, and the
    copy owns its memory (so ``ours`` can be freed and each model's peak memory measured alone).
    """
    from diffusers import SD3Transformer2DModel

    from sd35.loading.diffusers_mmditx import mmditx_to_diffusers

    kwargs = {k: v for k, v in diffusers_transformer_config(ours.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    state = {k: v.detach().clone() for k, v in mmditx_to_diffusers(ours.state_dict()).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass
class StepInputs:
    """One CFG step's inputs: latents, t = sigma * 1000, pooled text, text tokens (batch 2)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    context: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.t, self.y, self.context


def step_inputs(
    cfg: MMDiTXConfig,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    text_tokens: int = TEXT_TOKENS,
) -> StepInputs:
    """Random normal inputs drawn on the CPU (the same numbers on every device), t uniform in [0, 1000].
    ``text_tokens``: diffusers' 77 + 256 by default; 77 + 77 to match stable-diffusion.cpp's."""
    g = torch.Generator().manual_seed(seed * 7919 + size)
    lat = size // 8
    x = torch.randn(BATCH, cfg.in_channels, lat, lat, generator=g)
    context = torch.randn(BATCH, text_tokens, cfg.context_dim, generator=g)
    y = torch.randn(BATCH, cfg.pooled_dim, generator=g)
    t = torch.rand(BATCH, generator=g) * 1000.0
    return StepInputs(x.to(device, dtype), t.to(device), y.to(device, dtype), context.to(device, dtype))


def call_diffusers(model: nn.Module, inp: StepInputs) -> torch.Tensor:
    """diffusers' transformer on our inputs (its keyword names, its tuple output)."""
    return model(
        hidden_states=inp.x,
        encoder_hidden_states=inp.context,
        pooled_projections=inp.y,
        timestep=inp.t,
        return_dict=False,
    )[0]


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs and relative L2 difference (NaN if either side is not finite, so it can never pass)."""
    a, b = out.detach().float().cpu(), ref.detach().float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"max_abs_diff": math.nan, "rel_l2_diff": math.nan, "ref_max_abs": b.abs().max().item()}
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "rel_l2_diff": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
        "ref_max_abs": b.abs().max().item(),
    }


def write_random_pipeline(folder: Path, opts: BenchOptions) -> Path:
    """One diffusers-layout folder both pipelines load: full-size random parts (made on the device) or tiny ones.

    The full-size CLIP keeps the tiny tokenizers' vocabulary (:func:`sd35.models.configs.medium_configs`).
    """
    if not opts.full:
        return write_diffusers(folder, random_pipeline_weights(tiny_configs(), opts.seed))
    weights = random_pipeline_weights(
        medium_configs(clip_vocab=TINY_CLIP_VOCAB),
        opts.seed,
        scheme="per_tensor",
        device=opts.device,
        dtype=opts.dtype,
        on_part=lambda name: log(f"making a random full-size {name} on {opts.device}"),
    )
    return write_diffusers(folder, weights, dtype=opts.dtype)
