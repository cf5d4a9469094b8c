"""From the files a user names to a ready :class:`~sd35.pipeline.SD3Pipeline`.

The model (an official single file, a ComfyUI all-in-one file or a diffusers folder) and any separate
text-encoder files are scanned by content (:mod:`sd35.loading.components`), checked to fit together
before a weight is read, and built on the device the memory mode wants them on. The model's defaults
(:mod:`sd35.presets`) are chosen here, from the release the weights are (:mod:`sd35.models.family`) and the
file's own metadata.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sd35.conditioning.bundled import bundled_tokenizer
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
from sd35.memory import check_memory_mode
from sd35.models.clip import CLIPTextConfig
from sd35.models.family import identify
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAEConfig
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
    """The VAE's latent channels and the text encoders' widths must fit the MMDiT-X (read from shapes, before
    anything is loaded)."""
    cfg = MMDiTXConfig.from_state_dict(parts[MMDITX].tensors)
    latent = VAEConfig.from_state_dict(parts[VAE].tensors).z_channels
    if latent != cfg.in_channels:
        raise CheckpointError(
            f"{parts[VAE].source}: this VAE has {latent} latent channels but the MMDiT-X works on "
            f"{cfg.in_channels}; use the SD3 VAE (16 channels).",
            param="vae",
        )
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


def check_tokenizer_fits(tokenizer: SD3Tokenizer, parts: dict[str, Component], what: str) -> None:
    """Every id the tokenizers can make must have a row in its encoder's embedding table (read from shapes).

    Otherwise the first prompt fails deep inside an embedding lookup; a text encoder that is not SD3's
    (a toy or a fine-tune with another vocabulary) needs its own tokenizer folder.
    """
    pairs = [
        (
            "CLIP-L",
            tokenizer.clip_l.vocab_size,
            CLIPTextConfig.from_state_dict(parts[CLIP_L].tensors, "quick_gelu"),
        ),
        (
            "CLIP-G",
            tokenizer.clip_g.vocab_size,
            CLIPTextConfig.from_state_dict(parts[CLIP_G].tensors, "gelu"),
        ),
    ]
    if tokenizer.t5 is not None and T5XXL in parts:
        pairs.append(("T5", tokenizer.t5.vocab_size, T5Config.from_state_dict(parts[T5XXL].tensors)))
    for name, ids, config in pairs:
        if ids > config.vocab_size:
            kind = {"CLIP-L": CLIP_L, "CLIP-G": CLIP_G, "T5": T5XXL}[name]
            raise MissingComponentError(
                f"{parts[kind].source}: this {name} encoder has {config.vocab_size} token embeddings, but "
                f"{what} make {ids} token ids, so they do not belong together. Name the tokenizer folder "
                "made for these encoders with --tokenizers (tokenizer/, tokenizer_2/, tokenizer_3/, as in "
                "a diffusers folder).",
                param="tokenizers",
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


def _vae_parts(vae: Path) -> list[Component]:
    """The standalone VAE named by ``vae`` (a file or a diffusers ``vae/`` folder), and nothing else."""
    found = scan([vae])
    others = sorted({KIND_NAMES.get(c.kind, c.name) for c in found if c.kind != VAE})
    if others or not found:
        raise MissingComponentError(
            f"{vae} holds {', '.join(others) or 'no weights'}, not a VAE alone. Give the SD3 VAE file "
            "(ComfyUI's models/vae/, or a diffusers folder's vae/) as the VAE.",
            param="vae",
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
    vae: PathLike | None = None,
    variant: str | None = None,
) -> SD3Pipeline:
    """Load a pipeline from a single file or diffusers folder, plus text-encoder files or a folder of them.

    Text encoders given in ``text_encoders`` and a VAE given in ``vae`` (a standalone SD3 VAE file or a
    diffusers ``vae/`` folder, for model files that carry none) take precedence over any in ``model``. Tokenizer
    files come from ``tokenizers``, else from ``tokenizer*/`` sub-folders of ``model`` or ``text_encoders``,
    else from the package itself (SD3's real tokenizers, :mod:`sd35.conditioning.bundled`).
    ``device`` (default: the best available) and ``dtype`` ("fp32", "fp16", "bf16" or a torch dtype; default
    bf16 on GPUs; on the CPU bf16 where it computes bf16 natively, with the text encoders in fp32, else fp32:
    :func:`sd35.devices.default_dtype`); ``memory`` ("high", "balanced", "low") and ``vae_tiling`` ("auto", "on",
    "off"): see :class:`~sd35.pipeline.SD3Pipeline` and :mod:`sd35.memory`. Weights that a mode keeps off
    the device are loaded into CPU memory directly, never onto the device first. ``variant`` ("medium",
    "large", "large-turbo", "sd3-medium") says which release the model is, for a file that does not say
    it itself (a renamed Large Turbo file): by default :func:`sd35.models.family.identify` reads it from the
    weights, the file's metadata and its name, and the release's defaults apply.
    """
    check_memory_mode(memory)
    check_vae_tiling(vae_tiling)
    device = resolve_device(device)
    text_dtype = text_encoder_dtype(dtype, device, resolve_dtype(dtype, device))
    dtype = resolve_dtype(dtype, device)
    model = Path(model)
    te_paths = _paths(text_encoders)

    overrides = scan(te_paths) if te_paths else []
    if vae is not None:
        overrides += _vae_parts(Path(vae))
    found = _model_parts(model)
    hint = "" if te_paths else " Give the text-encoder files too."
    if vae is None and not any(c.kind == VAE for c in [*found, *overrides]):
        hint += " This model file carries no VAE: name the SD3 VAE file with --vae."
    parts = assemble(found, required=(MMDITX, VAE, CLIP_L, CLIP_G), overrides=overrides, hint=hint)
    check_compatible(parts)
    name = model.stem if model.is_file() else model.name
    metadata = parts[MMDITX].metadata
    config = MMDiTXConfig.from_state_dict(parts[MMDITX].tensors)
    identity = identify(config, metadata, name, override=variant)
    # an explicit variant means its release's defaults, over any the file carries
    defaults = defaults_for(config, None if variant else metadata, identity.variant)
    root = Path(tokenizers) if tokenizers is not None else find_tokenizer_root([model, *te_paths])
    if root is None:
        tokenizer = bundled_tokenizer(t5=T5XXL in parts)
        check_tokenizer_fits(tokenizer, parts, "SD3's tokenizers that ship with sd35")
    else:
        tokenizer = SD3Tokenizer.from_root(root, t5=T5XXL in parts)
        check_tokenizer_fits(tokenizer, parts, f"the tokenizers in {root}")
    if T5XXL not in parts:
        warnings.warn(
            "no T5-XXL text encoder given: running with CLIP only, so prompt following and text rendering get worse. "
            f"Add {USUAL_FILES[T5XXL]} to the text encoders.",
            SD35Warning,
            stacklevel=2,
        )

    text_device = device if memory == "high" else torch.device("cpu")
    mmditx = load_component(parts[MMDITX], dtype, torch.device("cpu") if memory == "low" else device)
    vae = load_component(parts[VAE], dtype, device)
    text = TextConditioner(
        load_component(parts[CLIP_L], text_dtype, text_device),
        load_component(parts[CLIP_G], text_dtype, text_device),
        load_component(parts[T5XXL], text_dtype, text_device) if T5XXL in parts else None,
        context_dim=mmditx.config.context_dim,
    )
    return SD3Pipeline(
        mmditx,
        vae,
        text,
        tokenizer,
        model_name=name,
        defaults=defaults,
        identity=identity,
        memory=memory,
        vae_tiling=vae_tiling,
        device=device,
    )
