"""CLIP-L, CLIP-G and T5 encoders against HF-transformers loaded with the same random weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from sd35.errors import CheckpointError
from sd35.models.clip import CLIPTextConfig, CLIPTextEncoder
from sd35.models.random_init import random_state_dict
from sd35.models.t5 import T5Config, T5Encoder, relative_position_buckets
from tests.helpers import assert_rel_close

VOCAB, WIDTH, LAYERS, MLP, POSITIONS, PROJ = 1000, 128, 3, 256, 77, 96
MATCH = 1e-5  # two float32 implementations of the same maths: rounding only
BF16 = 0.05  # bf16 weights and activations against float32
BOS, EOS = VOCAB - 2, VOCAB - 1
T5_VOCAB, T5_LEN = 500, 80
_EMBED, _SHARED = "encoder.embed_tokens.weight", "shared.weight"


def _clip_tokens(pad: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 40):
        content = torch.randint(1, BOS, (n,), generator=g).tolist()
        row = [BOS, *content, EOS]
        rows.append(row + [pad] * (POSITIONS - len(row)))
    return torch.tensor(rows)


def _clip_sd(kind: str) -> dict[str, torch.Tensor]:
    cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        max_positions=POSITIONS,
        width=WIDTH,
        layers=LAYERS,
        mlp_width=MLP,
        activation="gelu" if kind == "clip_g" else "quick_gelu",
        has_projection=kind == "clip_g",
        projection_dim=PROJ if kind == "clip_g" else None,
    )
    return random_state_dict(CLIPTextEncoder(cfg), seed=3 if kind == "clip_g" else 2)


def _hf_clip_config(act: str) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=WIDTH // 64,
        max_position_embeddings=POSITIONS,
        hidden_act=act,
        projection_dim=PROJ,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def clip_l_sd():
    return _clip_sd("clip_l")


@pytest.fixture(scope="module")
def clip_g_sd():
    return _clip_sd("clip_g")


@pytest.mark.parametrize("pad", [EOS, 0])
@torch.no_grad()
def test_clip_l_matches_transformers(clip_l_sd, pad):
    ours = CLIPTextEncoder.from_state_dict(clip_l_sd, "clip_l")
    assert ours.config.heads == 2 and ours.config.layers == LAYERS and not ours.config.has_projection
    ref = transformers.CLIPTextModel(_hf_clip_config("quick_gelu")).eval()
    # transformers 5's CLIPTextModel is the bare text transformer: its keys lack the file's "text_model." prefix.
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in clip_l_sd.items()}, strict=True)
    tokens = _clip_tokens(pad)
    hidden, pooled = ours(tokens)
    out = ref(input_ids=tokens, output_hidden_states=True)
    assert_rel_close(hidden, out.hidden_states[-2], MATCH)
    assert_rel_close(pooled, out.pooler_output, MATCH)
    assert pooled.shape == (2, WIDTH)


@pytest.mark.parametrize("pad", [0, EOS])
@torch.no_grad()
def test_clip_g_matches_transformers(clip_g_sd, pad):
    ours = CLIPTextEncoder.from_state_dict(clip_g_sd, "clip_g")
    assert ours.config.has_projection and ours.config.projection_dim == PROJ
    ref = transformers.CLIPTextModelWithProjection(_hf_clip_config("gelu")).eval()
    ref.load_state_dict(clip_g_sd, strict=True)
    tokens = _clip_tokens(pad)
    hidden, pooled = ours(tokens)
    out = ref(input_ids=tokens, output_hidden_states=True)
    assert_rel_close(hidden, out.hidden_states[-2], MATCH)
    assert_rel_close(pooled, out.text_embeds, MATCH)
    assert pooled.shape == (2, PROJ)


@torch.no_grad()
def test_clip_l_ignores_projection_and_extra_keys(clip_l_sd, clip_g_sd):
    extra = {
        **clip_l_sd,
        "text_projection.weight": torch.randn(WIDTH, WIDTH),
        "text_model.embeddings.position_ids": torch.arange(POSITIONS)[None],
        "logit_scale": torch.tensor(1.0),
    }
    tokens = _clip_tokens(EOS)
    a = CLIPTextEncoder.from_state_dict(clip_l_sd, "clip_l")(tokens)
    b = CLIPTextEncoder.from_state_dict(extra, "clip_l")(tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_clip_g_without_projection_is_a_clear_error(clip_g_sd):
    sd = {k: v for k, v in clip_g_sd.items() if k != "text_projection.weight"}
    with pytest.raises(CheckpointError, match="text_projection"):
        CLIPTextEncoder.from_state_dict(sd, "clip_g")


def test_clip_wrong_shape_names_the_key(clip_l_sd):
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    sd = {**clip_l_sd, key: torch.zeros(WIDTH + 1)}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        CLIPTextEncoder.from_state_dict(sd, "clip_l")


def test_clip_bf16_close_to_fp32(clip_g_sd):
    tokens = _clip_tokens(0)
    with torch.no_grad():
        h32, p32 = CLIPTextEncoder.from_state_dict(clip_g_sd, "clip_g")(tokens)
        h16, p16 = CLIPTextEncoder.from_state_dict(clip_g_sd, "clip_g", dtype=torch.bfloat16)(tokens)
    assert h16.dtype == torch.bfloat16
    assert_rel_close(h16.float(), h32, BF16)
    assert_rel_close(p16.float(), p32, BF16)


# ---------------------------------------------------------------------------------------------------- T5


@pytest.fixture(scope="module")
def t5_sd():
    cfg = T5Config(vocab_size=T5_VOCAB, d_model=128, heads=2, d_kv=64, d_ff=256, layers=3, num_buckets=32)
    sd = random_state_dict(T5Encoder(cfg), seed=4)
    # T5 has no 1/sqrt(d_kv) in attention; its init puts that scale into q. Without it the random logits
    # (std ~8) give near-one-hot softmaxes that bf16 rounding flips.
    for k in sd:
        if k.endswith("SelfAttention.q.weight"):
            sd[k] = sd[k] / 8
    assert set(k for k in sd if "embed" in k or "shared" in k) == {_EMBED}
    return sd


def _t5_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in (10, 60):
        row = [*torch.randint(2, T5_VOCAB, (n,), generator=g).tolist(), 1]
        rows.append(row + [0] * (T5_LEN - len(row)))
    return torch.tensor(rows)


@torch.no_grad()
def test_t5_matches_transformers(t5_sd):
    ours = T5Encoder.from_state_dict(t5_sd)
    assert ours.config == T5Config(T5_VOCAB, 128, 2, 64, 256, 3, 32, 128, 1e-6)
    hf_cfg = transformers.T5Config(
        vocab_size=T5_VOCAB,
        d_model=128,
        d_kv=64,
        d_ff=256,
        num_layers=3,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        attn_implementation="eager",
    )
    ref = transformers.T5EncoderModel(hf_cfg).eval()
    assert ref.config.is_gated_act
    ref.load_state_dict({**t5_sd, _SHARED: t5_sd[_EMBED]}, strict=True)
    tokens = _t5_tokens()
    expected = ref(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state
    assert_rel_close(ours(tokens), expected, MATCH)


@torch.no_grad()
def test_t5_embedding_under_either_name(t5_sd):
    tokens = _t5_tokens()
    base = T5Encoder.from_state_dict(t5_sd)(tokens)
    shared_only = {(_SHARED if k == _EMBED else k): v for k, v in t5_sd.items()}
    both = {**t5_sd, _SHARED: t5_sd[_EMBED].clone()}
    for sd in (shared_only, both):
        assert torch.equal(T5Encoder.from_state_dict(sd)(tokens), base)
    neither = {k: v for k, v in t5_sd.items() if k != _EMBED}
    with pytest.raises(CheckpointError, match="embedding is missing"):
        T5Encoder.from_state_dict(neither)


def test_t5_wrong_shape_names_the_key(t5_sd):
    key = "encoder.block.2.layer.1.DenseReluDense.wo.weight"
    sd = {**t5_sd, key: torch.zeros(128, 255)}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        T5Encoder.from_state_dict(sd)


def test_t5_bf16_close_to_fp32(t5_sd):
    tokens = _t5_tokens()
    with torch.no_grad():
        out32 = T5Encoder.from_state_dict(t5_sd)(tokens)
        out16 = T5Encoder.from_state_dict(t5_sd, dtype=torch.bfloat16)(tokens)
    assert out16.dtype == torch.bfloat16
    assert_rel_close(out16.float(), out32, BF16)


def test_t5_buckets_match_transformers_beyond_max_distance():
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 300  # past max_distance 128, so the last bucket is shared
    pos = torch.arange(n)
    # transformers keeps its bucket function private; it is the reference all the same
    expected = T5Attention._relative_position_bucket(
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=32, max_distance=128
    )
    assert torch.equal(relative_position_buckets(n, 32, 128), expected)
