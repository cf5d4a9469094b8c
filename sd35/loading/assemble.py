"""From the files a user names to a ready :class:`~sd35.pipeline.SD3Pipeline`.

The model (an official single file, a ComfyUI all-in-one file or a diffusers folder) and any separate
text-encoder files are scanned by content (:mod:`sd35.loading.components`), checked to fit together
before a weight is read, and built on the device the memory mode wants them on. The model's defaults
(:mod:`sd35.presets`) are chosen here, from the weights and the file's own metadata.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sd35.conditioning.encode import TextConditioner
from sd35.conditioning.tokenize import SD3Tokenizer
from sd35.devices import resolve_device, resolve_dtype, text_encoder_dtype
from sd35.errors import CheckpointError, MissingComponentError, SD35Warning
from sd35.loading.components import (
    CLIP_G,
    CLIP_L,
    KIND_NAMES,
    MMDITX,
    T5XXL,
    USUAL_FILES,
    VAE,
    Component,
    assemble,
    load_component,
    scan,
)
from sd35.loading.safetensors_io import read_metadata
from sd35.memory import check_memory_mode
from sd35.models.clip import CLIPTextConfig
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.pipeline import SD3Pipeline, check_vae_tiling
from sd35.presets import defaults_for

PathLike = str | os.PathLike


def _paths(value: PathLike | Sequence[PathLike] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def find_tokenizer_root(candidates: Sequence[Path]) -> Path | None:
    """The first of ``candidates`` that is a folder with a ``tokenizer/`` sub-folder (the diffusers layout)."""
    for c in candidates:
        if c.is_dir() and (c / "tokenizer").is_dir():
            return c
    return None


def check_compatible(parts: dict[str, Component]) -> None:
    """The text encoders' widths must fit the MMDiT-X (read from shapes, before anything is loaded)."""
    cfg = MMDiTXConfig.from_state_dict(parts[MMDITX].tensors)
    l_width = CLIPTextConfig.from_state_dict(parts[CLIP_L].tensors, "quick_gelu").width
    g_width = CLIPTextConfig.from_state_dict(parts[CLIP_G].tensors, "gelu").projection_dim
    if l_width + g_width != cfg.pooled_dim:
        raise CheckpointError(
            f"the text encoders do not fit this MMDiT-X: CLIP-L ({parts[CLIP_L].source}, pooled {l_width}) + CLIP-G "
            f"({parts[CLIP_G].source}, pooled {g_width}) = {l_width + g_width}, but the MMDiT-X expects {cfg.pooled_dim}.",
            param="text_encoders",
        )
    if T5XXL in parts:
        t5_width = T5Config.from_state_dict(parts[T5XXL].tensors).d_model
        if t5_width != cfg.context_dim:
            raise CheckpointError(
                f"{parts[T5XXL].source}: T5 width {t5_width} does not fit the MMDiT-X's text width "
                f"{cfg.context_dim}; use the T5-XXL encoder.",
                param="text_encoders",
            )


def _model_parts(model: Path) -> list[Component]:
    """The components of ``model``, which must hold the MMDiT-X (a text-encoder file there is a mix-up)."""
    found = scan([model])
    if not any(c.kind == MMDITX for c in found):
        kinds = ", ".join(sorted({KIND_NAMES.get(c.kind, c.name) for c in found}))
        raise MissingComponentError(
            f"{model} holds {kinds} but no MMDiT-X (the diffusion model). Give "
            f"{USUAL_FILES[MMDITX]} as the model, and this as the text encoders.",
            param="model",
        )
    return found


def load_pipeline(
    model: PathLike,
    text_encoders: PathLike | Sequence[PathLike] | None = None,
    tokenizers: PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    memory: str = "high",
    vae_tiling: str = "auto",
) -> SD3Pipeline:
    """Load a pipeline from a single file or diffusers folder, plus text-encoder files or a folder of them.

    Text encoders given in ``text_encoders`` take precedence over any embedded in ``model``. Tokenizer
    files come from ``tokenizers``, else from ``tokenizer*/`` sub-folders of ``model`` or ``text_encoders``.
    ``device`` (default: the best available) and ``dtype`` ("fp32", "fp16", "bf16" or a torch dtype; default
    bf16 on GPUs; on the CPU bf16 where it computes bf16 natively, with the text encoders in fp32, else fp32:
    :func:`sd35.devices.default_dtype`); ``memory`` ("high", "balanced", "low") and ``vae_tiling`` ("auto", "on",
    "off"): see :class:`~sd35.pipeline.SD3Pipeline` and :mod:`sd35.memory`. Weights that a mode keeps off
    the device are loaded into CPU memory directly, never onto the device first.
    """
    check_memory_mode(memory)
    check_vae_tiling(vae_tiling)
    device = resolve_device(device)
    text_dtype = text_encoder_dtype(dtype, device, resolve_dtype(dtype, device))
    dtype = resolve_dtype(dtype, device)
    model = Path(model)
    te_paths = _paths(text_encoders)

    parts = assemble(
        _model_parts(model),
        required=(MMDITX, VAE, CLIP_L, CLIP_G),
        overrides=scan(te_paths) if te_paths else (),
        hint="" if te_paths else " Give the text-encoder files too.",
    )
    check_compatible(parts)
    root = Path(tokenizers) if tokenizers is not None else find_tokenizer_root([model, *te_paths])
    if root is None:
        raise MissingComponentError(
            "tokenizer files are needed: name a folder holding tokenizer/ (vocab.json, merges.txt), "
            "tokenizer_2/ (the same) and tokenizer_3/ (tokenizer.json), as in the diffusers repository "
            "stabilityai/stable-diffusion-3.5-medium.",
            param="tokenizers",
        )
    tokenizer = SD3Tokenizer.from_root(root, t5=T5XXL in parts)
    if T5XXL not in parts:
        warnings.warn(
            "no T5-XXL text encoder given: running with CLIP only, so prompt following and text rendering get worse. "
            f"Add {USUAL_FILES[T5XXL]} to the text encoders.",
            SD35Warning,
            stacklevel=2,
        )

    source = parts[MMDITX].source
    metadata = read_metadata(source) if source.is_file() else {}
    text_device = device if memory == "high" else torch.device("cpu")
    mmditx = load_component(parts[MMDITX], dtype, torch.device("cpu") if memory == "low" else device)
    vae = load_component(parts[VAE], dtype, device)
    text = TextConditioner(
        load_component(parts[CLIP_L], text_dtype, text_device),
        load_component(parts[CLIP_G], text_dtype, text_device),
        load_component(parts[T5XXL], text_dtype, text_device) if T5XXL in parts else None,
        context_dim=mmditx.config.context_dim,
    )
    name = model.stem if model.is_file() else model.name
    return SD3Pipeline(
        mmditx,
        vae,
        text,
        tokenizer,
        model_name=name,
        defaults=defaults_for(mmditx.config, metadata),
        memory=memory,
        vae_tiling=vae_tiling,
        device=device,
    )
