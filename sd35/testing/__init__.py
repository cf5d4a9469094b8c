"""Tiny random SD3-family checkpoints written in every layout users have: fixtures for tests and smoke tests.

Used by our tests, and by anyone who wants to smoke-test an integration without downloading
10 GB: ``python -m sd35.testing OUT_DIR`` writes

- ``sd3.5_tiny.safetensors``: the official single-file layout (``model.diffusion_model.*`` + ``first_stage_model.*``);
- ``sd3.5_tiny_incl_clips_t5.safetensors``: a ComfyUI-style all-in-one file (``text_encoders.*`` too);
- ``text_encoders/``: ``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` (HF layouts);
- ``diffusers/``: a diffusers folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``,
  the T5 sharded with an index json).

The networks have the real architectures at toy widths (:func:`sd35.models.configs.tiny_configs`): MMDiT-X
with attn2 and qk-norm, the 8x 16-channel VAE, CLIP-L (quick-GELU) and CLIP-G (GELU, projected) and a T5
encoder. Every tensor is random (:mod:`sd35.models.random_init`), so no mapping error can hide. The configs,
random weights, writers (:mod:`sd35.loading.writers`) and tokenizer files
(:mod:`sd35.conditioning.tiny_tokenizers`) are production code, which ``sd35 bench`` and the demo build use
too; this package only puts them together for tests. Production code never imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sd35.loading.convert import scaled_fp8 as convert_scaled_fp8
from sd35.loading.writers import write_all_in_one, write_diffusers, write_official, write_text_encoders
from sd35.models.configs import PipelineConfigs, PipelineWeights, tiny_configs
from sd35.models.random_init import random_pipeline_weights


def tiny_weights(seed: int = 0, configs: PipelineConfigs | None = None) -> PipelineWeights:
    """Random weights for every part of ``configs`` (default :func:`tiny_configs`), on the CPU in float32."""
    return random_pipeline_weights(configs or tiny_configs(), seed)


def scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "fp8 scaled" storage of one network's state dict, as ``sd35 convert --to scaled_fp8`` writes it
    (:func:`sd35.loading.convert.scaled_fp8`: each linear weight in fp8 e4m3fn with a per-tensor
    ``scale_weight``, and the ``scaled_fp8`` marker)."""
    return convert_scaled_fp8(sd)


def write_tiny_set(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every layout into ``folder`` and return their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w = tiny_weights(seed)
    return {
        "official": write_official(folder / "sd3.5_tiny.safetensors", w),
        "all_in_one": write_all_in_one(folder / "sd3.5_tiny_incl_clips_t5.safetensors", w),
        "text_encoders": write_text_encoders(folder / "text_encoders", w)[0].parent,
        "diffusers": write_diffusers(folder / "diffusers", w),
    }


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block. Tests of tiny models use 1: they gain nothing from
    threads, and spinning threads crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
