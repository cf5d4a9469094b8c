"""The named configurations of every network: SD3.5 Medium's real sizes, a scaled MMDiT-X, tiny ones, the demo's.

One module holds them so that the benchmark, the demo build, the test fixtures and the scripts in
``benchmarks/`` build the same networks by the same name, and a size is changed in one place:

- **medium**: SD3.5 Medium as released (:func:`medium_mmditx_config`, :func:`medium_configs` for every part);
- **scaled**: the MMDiT-X architecture (attn2, qk-norm, a last pre-only block) at a width a CPU runs in
  milliseconds (:func:`scaled_mmditx_config`; ``sd35 bench`` on the CPU);
- **tiny**: every part at toy sizes that fit together (:func:`tiny_configs`; the test checkpoints);
- **demo**: the embedded demo model (:func:`demo_mmditx_config`, :func:`demo_vae_config`; ``sd35.demo``).

:class:`PipelineConfigs` and :class:`PipelineWeights` carry one configuration (and state dict) per part, so
the checkpoint writers of :mod:`sd35.loading.writers` take any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd35.models.clip import CLIPTextConfig
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAEConfig

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary; EOS, the pooling token, is its last id
TINY_CLIP_VOCAB = 1000  # the vocabulary of the tiny tokenizer files (sd35.conditioning.tiny_tokenizers)


@dataclass(frozen=True)
class PipelineConfigs:
    """One configuration per pipeline part (the names are the parts' names in :class:`PipelineWeights`)."""

    mmditx: MMDiTXConfig
    vae: VAEConfig
    clip_l: CLIPTextConfig
    clip_g: CLIPTextConfig
    t5: T5Config


@dataclass
class PipelineWeights:
    """State dicts in our layouts: official keys (no prefix) for MMDiT-X and VAE, HF keys for CLIP and T5."""

    configs: PipelineConfigs
    mmditx: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    clip_l: dict[str, torch.Tensor]
    clip_g: dict[str, torch.Tensor]
    t5: dict[str, torch.Tensor]


def medium_mmditx_config() -> MMDiTXConfig:
    """SD3.5 Medium's MMDiT-X: 24 blocks of 1536, attn2 in blocks 0-12, qk-norm, 384x384 grid.

    What Stability-AI/sd3.5 ``sd3_impls.py`` ``BaseModel.__init__`` reads from the checkpoint's keys and
    shapes; diffusers ``scripts/convert_sd3_to_diffusers.py`` ``main`` notes the same attn2 layers, qk-norm
    and grid.
    """
    return MMDiTXConfig(
        hidden_size=1536,
        depth=24,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=384,
        pooled_dim=2048,
        context_dim=4096,
        mlp_hidden=6144,
        qk_norm=True,
        attn2_layers=tuple(range(13)),
    )


def medium_configs(*, clip_vocab: int = CLIP_VOCAB) -> PipelineConfigs:
    """Every part of SD3.5 Medium at its real size: CLIP-L, CLIP-G (projected), T5-XXL, the 16-channel VAE.

    ``clip_vocab`` other than CLIP's 49408 suits random weights read by the tiny tokenizer files (whose
    EOS, the pooling token, must be the last id): ``sd35 bench --full --whole-image`` passes
    :data:`TINY_CLIP_VOCAB`, leaving out 0.2 GB of embedding rows that cost memory but no compute.
    """
    clip_l = CLIPTextConfig(
        vocab_size=clip_vocab, max_positions=77, width=768, layers=12, mlp_width=3072, activation="quick_gelu"
    )
    clip_g = CLIPTextConfig(
        vocab_size=clip_vocab,
        max_positions=77,
        width=1280,
        layers=32,
        mlp_width=5120,
        activation="gelu",
        has_projection=True,
        projection_dim=1280,
    )
    t5 = T5Config(vocab_size=32128, d_model=4096, heads=64, d_kv=64, d_ff=10240, layers=24)
    return PipelineConfigs(
        mmditx=medium_mmditx_config(), vae=VAEConfig(), clip_l=clip_l, clip_g=clip_g, t5=t5
    )


def scaled_mmditx_config() -> MMDiTXConfig:
    """The same architecture (attn2, qk-norm, a last pre-only block) at a width a CPU runs in milliseconds."""
    return MMDiTXConfig(
        hidden_size=256,
        depth=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=64,
        pooled_dim=128,
        context_dim=256,
        mlp_hidden=1024,
        qk_norm=True,
        attn2_layers=(0, 1),
    )


def tiny_configs(
    *,
    attn2_layers: tuple[int, ...] = (0, 1),
    qk_norm: bool = True,
    depth: int = 3,
    clip_vocab: int = TINY_CLIP_VOCAB,
    t5_vocab: int = 500,
) -> PipelineConfigs:
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
    return PipelineConfigs(mmditx, vae, clip_l, clip_g, t5)


def demo_mmditx_config() -> MMDiTXConfig:
    """The demo's MMDiT-X: hidden 128, 4 blocks, attn2 in blocks 0-1, qk-norm, read by the tiny text encoders."""
    c = tiny_configs()
    return MMDiTXConfig(
        hidden_size=128,
        depth=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=16,
        pooled_dim=c.mmditx.pooled_dim,
        context_dim=c.mmditx.context_dim,
        mlp_hidden=512,
        qk_norm=True,
        attn2_layers=(0, 1),
    )


def demo_vae_config() -> VAEConfig:
    """The demo's VAE: 8x down to 16 latent channels like SD3's, at width 32 throughout."""
    return VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
