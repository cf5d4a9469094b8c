"""Our state dicts written in the layouts SD3-family checkpoints come in, with the files each layout needs.

- :func:`write_official`: the official single file (``model.diffusion_model.*`` + ``first_stage_model.*``);
- :func:`write_all_in_one`: ComfyUI's all-in-one file (``text_encoders.*`` too);
- :func:`write_text_encoders`: separate HF-layout ``clip_l``, ``clip_g`` and ``t5xxl`` files;
- :func:`write_diffusers`: a diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
  ``text_encoder*/``, the T5 sharded with an index json, and tokenizer files) that diffusers'
  ``StableDiffusion3Pipeline.from_pretrained`` loads as well as we do.

The loaders read these layouts; the writers are their inverse, so that a model built here (random weights
for ``sd35 bench``, the trained demo model, the test checkpoints of :mod:`sd35.testing`) can be saved in any
of them. The tokenizer files are the tiny ones of :mod:`sd35.conditioning.tiny_tokenizers` (the real
vocabularies are not shipped), so the text encoders' vocabularies must match theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd35.conditioning.tiny_tokenizers import write_tiny_tokenizers
from sd35.loading.diffusers_mmditx import mmditx_to_diffusers
from sd35.loading.diffusers_vae import vae_to_diffusers
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.clip import CLIPTextConfig
from sd35.models.configs import PipelineConfigs, PipelineWeights
from sd35.models.mmditx import MMDiTXConfig


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def t5_with_embedding(sd: dict[str, torch.Tensor], embedding: str = "both") -> dict[str, torch.Tensor]:
    """T5 keys as files carry them: ``shared.weight``, ``encoder.embed_tokens.weight`` or ``both``."""
    out = dict(sd)
    emb = out.pop("encoder.embed_tokens.weight")
    if embedding in ("both", "embed_tokens"):
        out["encoder.embed_tokens.weight"] = emb
    if embedding in ("both", "shared"):
        out["shared.weight"] = emb.clone()
    return out


def write_official(
    path: Path,
    w: PipelineWeights,
    *,
    prefixed: bool = True,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The official single file: MMDiT-X + VAE (``prefixed=False``: MMDiT-X alone, bare keys), with the
    safetensors ``metadata`` given (Stability's files carry ``modelspec.*`` keys there)."""
    if prefixed:
        tensors = {**_prefixed("model.diffusion_model.", w.mmditx), **_prefixed("first_stage_model.", w.vae)}
    else:
        tensors = dict(w.mmditx)
    save_file_atomic(_cast(tensors, dtype), path, metadata)
    return path


def write_all_in_one(
    path: Path, w: PipelineWeights, *, dtype: torch.dtype | None = None, t5_dtype: torch.dtype | None = None
) -> Path:
    """ComfyUI's all-in-one layout: the official file plus ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``."""
    tensors = {
        **_prefixed("model.diffusion_model.", w.mmditx),
        **_prefixed("first_stage_model.", w.vae),
        **_prefixed("text_encoders.clip_l.transformer.", w.clip_l),
        **_prefixed("text_encoders.clip_g.transformer.", w.clip_g),
    }
    tensors = _cast(tensors, dtype)
    t5 = _cast(t5_with_embedding(w.t5, "shared"), t5_dtype or dtype)
    tensors.update(_prefixed("text_encoders.t5xxl.transformer.", t5))
    save_file_atomic(tensors, path)
    return path


def write_text_encoders(
    folder: Path,
    w: PipelineWeights,
    *,
    names: tuple[str, str, str] = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"),
    t5_embedding: str = "both",
    dtype: torch.dtype | None = None,
    t5_dtype: torch.dtype | None = None,
) -> list[Path]:
    """Separate HF-layout text-encoder files (CLIP-L without ``text_projection``, as SD3's clip_l file)."""
    folder.mkdir(parents=True, exist_ok=True)
    clip_l = {k: v for k, v in w.clip_l.items() if not k.startswith("text_projection")}
    paths = [folder / n for n in names]
    save_file_atomic(_cast(clip_l, dtype), paths[0])
    save_file_atomic(_cast(w.clip_g, dtype), paths[1])
    save_file_atomic(_cast(t5_with_embedding(w.t5, t5_embedding), t5_dtype or dtype), paths[2])
    return paths


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i * per : (i + 1) * per]
        save_file_atomic({k: tensors[k] for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    _write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def diffusers_transformer_config(m: MMDiTXConfig) -> dict:
    """diffusers' ``SD3Transformer2DModel`` config (its ``config.json``) for our MMDiT-X config."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": m.pos_embed_max_size,
        "patch_size": m.patch_size,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "num_layers": m.depth,
        "attention_head_dim": 64,
        "num_attention_heads": m.num_heads,
        "joint_attention_dim": m.context_dim,
        "caption_projection_dim": m.hidden_size,
        "pooled_projection_dim": m.pooled_dim,
        "pos_embed_max_size": m.pos_embed_max_size,
        "dual_attention_layers": list(m.attn2_layers),
        "qk_norm": "rms_norm" if m.qk_norm else None,
    }


def diffusers_configs(c: PipelineConfigs) -> dict[str, dict]:
    """The ``config.json`` of each diffusers/transformers sub-folder for these sizes."""
    return {
        "transformer": diffusers_transformer_config(c.mmditx),
        "vae": {
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": c.vae.z_channels,
            "block_out_channels": [c.vae.ch * k for k in c.vae.ch_mult],
            "layers_per_block": c.vae.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * len(c.vae.ch_mult),
            "up_block_types": ["UpDecoderBlock2D"] * len(c.vae.ch_mult),
            "norm_num_groups": 32,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": True,
            "force_upcast": True,
        },
        "text_encoder": _clip_hf_config(c.clip_l, "quick_gelu"),
        "text_encoder_2": _clip_hf_config(c.clip_g, "gelu"),
        "text_encoder_3": {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": c.t5.vocab_size,
            "d_model": c.t5.d_model,
            "d_kv": c.t5.d_kv,
            "d_ff": c.t5.d_ff,
            "num_layers": c.t5.layers,
            "num_heads": c.t5.heads,
            "relative_attention_num_buckets": c.t5.num_buckets,
            "relative_attention_max_distance": c.t5.max_distance,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
            "dropout_rate": 0.0,
            "is_encoder_decoder": True,
            "tie_word_embeddings": False,
        },
    }


def _clip_hf_config(c: CLIPTextConfig, act: str) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.width,
        "intermediate_size": c.mlp_width,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "max_position_embeddings": c.max_positions,
        "hidden_act": act,
        "projection_dim": c.projection_dim,
        "layer_norm_eps": 1e-5,
        "bos_token_id": c.vocab_size - 2,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }


def write_diffusers(
    folder: Path, w: PipelineWeights, *, dtype: torch.dtype | None = None, tokenizers: bool = True
) -> Path:
    """A diffusers folder with tokenizers; CLIP-L gets an identity ``text_projection`` (diffusers' text_encoder has one).

    ``tokenizers=False`` leaves the tokenizer folders out (the toy BPE trainer is slow at real vocabulary sizes;
    SD3's real tokenizers ship with the package)."""
    configs = diffusers_configs(w.configs)
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusion3Pipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
        },
    )
    if tokenizers:
        write_tiny_tokenizers(
            folder, clip_vocab=w.configs.clip_l.vocab_size, t5_vocab=w.configs.t5.vocab_size
        )
    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    )
    for sub, cfg in configs.items():
        _write_json(folder / sub / "config.json", cfg)
    save_file_atomic(
        _cast(mmditx_to_diffusers(w.mmditx), dtype),
        folder / "transformer" / "diffusion_pytorch_model.safetensors",
    )
    save_file_atomic(
        _cast(vae_to_diffusers(w.vae), dtype), folder / "vae" / "diffusion_pytorch_model.safetensors"
    )
    clip_l = dict(w.clip_l)
    clip_l["text_projection.weight"] = torch.eye(w.configs.clip_l.projection_dim, w.configs.clip_l.width)
    save_file_atomic(_cast(clip_l, dtype), folder / "text_encoder" / "model.safetensors")
    save_file_atomic(_cast(w.clip_g, dtype), folder / "text_encoder_2" / "model.safetensors")
    _write_sharded(
        folder / "text_encoder_3", "model", _cast(t5_with_embedding(w.t5, "shared"), dtype), shards=2
    )
    return folder
