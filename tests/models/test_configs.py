"""sd35.models.configs: the named configurations build networks whose parts fit together."""

from __future__ import annotations

from sd35.models.configs import (
    CLIP_VOCAB,
    medium_configs,
    medium_mmditx_config,
    scaled_mmditx_config,
    tiny_configs,
)
from sd35.models.family import mmditx_family


def _fits(c) -> bool:
    """The MMDiT-X reads what the text encoders give: pooled CLIP-L + CLIP-G, features as wide as T5's."""
    return (
        c.mmditx.pooled_dim == c.clip_l.width + c.clip_g.projection_dim
        and c.mmditx.context_dim == c.t5.d_model
    )


def test_medium_is_sd35_medium_and_its_parts_fit():
    c = medium_configs()
    assert c.mmditx == medium_mmditx_config() and mmditx_family(c.mmditx) == "SD3.5 Medium"
    assert _fits(c) and c.clip_l.vocab_size == CLIP_VOCAB and c.clip_l.eos_token_id == CLIP_VOCAB - 1
    small_vocab = medium_configs(clip_vocab=1000)  # for the tiny tokenizer files: EOS still the last id
    assert small_vocab.clip_g.eos_token_id == 999 and small_vocab.clip_g.width == c.clip_g.width


def test_tiny_parts_fit_and_scaled_keeps_the_architecture():
    assert _fits(tiny_configs())
    scaled, medium = scaled_mmditx_config(), medium_mmditx_config()
    assert scaled.qk_norm and scaled.attn2_layers and scaled.context_dim != medium.context_dim
