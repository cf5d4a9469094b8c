"""Tiny random SD3-family checkpoints written in every layout users have.

Used by our tests, and by anyone who wants to smoke-test an integration without downloading
10 GB: ``python -m sd35.testing OUT_DIR`` writes

- ``sd3.5_tiny.safetensors``: the official single-file layout (``model.diffusion_model.*`` + ``first_stage_model.*``);
- ``sd3.5_tiny_incl_clips_t5.safetensors``: a ComfyUI-style all-in-one file (``text_encoders.*`` too);
- ``text_encoders/``: ``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` (HF layouts);
- ``diffusers/``: a diffusers folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``,
  the T5 sharded with an index json).

The networks have the real architectures at toy widths: MMDiT-X with attn2 and qk-norm, the 8x
16-channel VAE, CLIP-L (quick-GELU) and CLIP-G (GELU, projected) and a T5 encoder. Every tensor is
random (see :mod:`sd35.testing.random_weights`), so no mapping error can hide.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.loading.diffusers_mmditx import mmditx_to_diffusers
from sd35.loading.diffusers_vae import vae_to_diffusers
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.clip import CLIPTextConfig, CLIPTextEncoder
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config, T5Encoder
from sd35.models.vae import VAE, VAEConfig
from sd35.testing.random_weights import random_state_dict
from sd35.testing.tokenizers import write_tiny_tokenizers


@dataclass(frozen=True)
class TinyConfigs:
    mmditx: MMDiTXConfig
    vae: VAEConfig
    clip_l: CLIPTextConfig
    clip_g: CLIPTextConfig
    t5: T5Config


def tiny_configs(
    *,
    attn2_layers: tuple[int, ...] = (0, 1),
    qk_norm: bool = True,
    depth: int = 3,
    clip_vocab: int = 1000,
    t5_vocab: int = 500,
) -> TinyConfigs:
    """Consistent toy sizes: pooled 64 + 128 = 192, CLIP features 192 zero-padded to the T5 width 256."""
    clip_l = CLIPTextConfig(
        vocab_size=clip_vocab, max_positions=77, width=64, layers=3, mlp_width=128, activation="quick_gelu"
    )
    clip_g = CLIPTextConfig(
        vocab_size=clip_vocab,
        max_positions=77,
        width=128,
        layers=3,
        mlp_width=256,
        activation="gelu",
        has_projection=True,
        projection_dim=128,
    )
    t5 = T5Config(vocab_size=t5_vocab, d_model=256, heads=2, d_kv=64, d_ff=256, layers=2)
    mmditx = MMDiTXConfig(
        hidden_size=128,
        depth=depth,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=32,
        pooled_dim=clip_l.width + clip_g.projection_dim,
        context_dim=t5.d_model,
        mlp_hidden=512,
        qk_norm=qk_norm,
        attn2_layers=attn2_layers,
    )
    vae = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
    return TinyConfigs(mmditx, vae, clip_l, clip_g, t5)


@dataclass
class TinyWeights:
    """State dicts in our layouts: official keys (no prefix) for MMDiT-X and VAE, HF keys for CLIP and T5."""

    configs: TinyConfigs
    mmditx: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    clip_l: dict[str, torch.Tensor]
    clip_g: dict[str, torch.Tensor]
    t5: dict[str, torch.Tensor]


def tiny_weights(seed: int = 0, configs: TinyConfigs | None = None) -> TinyWeights:
    c = configs or tiny_configs()
    return TinyWeights(
        configs=c,
        mmditx=random_state_dict(MMDiTX(c.mmditx), seed),
        vae=random_state_dict(VAE(c.vae), seed + 1),
        clip_l=random_state_dict(CLIPTextEncoder(c.clip_l), seed + 2),
        clip_g=random_state_dict(CLIPTextEncoder(c.clip_g), seed + 3),
        t5=random_state_dict(T5Encoder(c.t5), seed + 4),
    )


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
    path: Path, w: TinyWeights, *, prefixed: bool = True, dtype: torch.dtype | None = None
) -> Path:
    """The official single file: MMDiT-X + VAE (``prefixed=False``: MMDiT-X alone, bare keys)."""
    if prefixed:
        tensors = {**_prefixed("model.diffusion_model.", w.mmditx), **_prefixed("first_stage_model.", w.vae)}
    else:
        tensors = dict(w.mmditx)
    save_file_atomic(_cast(tensors, dtype), path)
    return path


def write_all_in_one(
    path: Path, w: TinyWeights, *, dtype: torch.dtype | None = None, t5_dtype: torch.dtype | None = None
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


def scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "fp8 scaled" storage: each matrix as fp8 e4m3fn plus a per-tensor ``scale_weight``."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and "embed" not in k and "shared" not in k:
            scale = v.abs().max().float() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


def write_text_encoders(
    folder: Path,
    w: TinyWeights,
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


def diffusers_configs(c: TinyConfigs) -> dict[str, dict]:
    """The ``config.json`` of each diffusers/transformers sub-folder for these sizes."""
    m = c.mmditx
    return {
        "transformer": {
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
        },
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


def write_diffusers(folder: Path, w: TinyWeights, *, dtype: torch.dtype | None = None) -> Path:
    """A diffusers folder with tokenizers; CLIP-L gets an identity ``text_projection`` (diffusers' text_encoder has one)."""
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
    write_tiny_tokenizers(folder, clip_vocab=w.configs.clip_l.vocab_size, t5_vocab=w.configs.t5.vocab_size)
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
