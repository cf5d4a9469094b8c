"""LoRAs made for other models are refused with a message naming the model they seem made for."""

from __future__ import annotations

import pytest
import torch

from sd35.errors import SD35Error
from sd35.lora import load_lora
from tests.lora.lora_helpers import D, Rand, assert_same, make_models, snapshot


def _pair(key: str, out: int, inp: int, rank: int = 2, up=".lora_up.weight", down=".lora_down.weight"):
    r = Rand(0)
    return {key + up: r(out, rank), key + down: r(rank, inp)}


def _refused(models, sd, *patterns):
    snap = snapshot(models)
    with pytest.raises(SD35Error) as e:
        load_lora(models, sd, name="f")
    for p in patterns:
        assert p in str(e.value), str(e.value)
    assert_same(models, snap)
    return str(e.value)


def test_sd35_large_by_depth(models):
    sd = _pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * 2432, 2432)
    sd.update(_pair("lora_unet_joint_blocks_37_x_block_attn_qkv", 3 * 2432, 2432))
    _refused(models, sd, "SD3.5 Large", "joint block 37", "3 joint blocks")


def test_sd35_large_by_width(models):
    _refused(
        models, _pair("lora_unet_joint_blocks_1_context_block_mlp_fc1", 4 * 2432, 2432), "SD3.5 Large", "2432"
    )


def test_medium_lora_on_a_smaller_model(models):
    sd = _pair(
        "transformer.transformer_blocks.23.attn.to_q", 1536, 1536, up=".lora_B.weight", down=".lora_A.weight"
    )
    _refused(models, sd, "SD3 / SD3.5 Medium (24 joint blocks)", "joint block 23")
    _refused(models, _pair("lora_unet_joint_blocks_0_x_block_attn_proj", 1536, 1536), "hidden size 1536")


def test_attn2_lora_on_a_model_without_attn2():
    models = make_models(attn2=())  # an SD3-Medium-like MMDiT (no MMDiT-X attn2)
    sd = _pair("lora_unet_joint_blocks_0_x_block_attn2_qkv", 3 * D, D)
    _refused(models, sd, "SD3.5 Medium", "attn2", "block(s) [0]")
    sd = _pair("lycoris_transformer_blocks_1_attn2_to_q", D, D)
    _refused(models, sd, "SD3.5 Medium")


def test_attn2_on_blocks_without_it(models):
    sd = _pair(
        "transformer.transformer_blocks.2.attn2.to_k", D, D, up=".lora_B.weight", down=".lora_A.weight"
    )
    _refused(models, sd, "attn2 only in blocks [0, 1]", "block(s) [2]")


def test_sd3_medium_adaln_on_mmditx(models):
    # SD3 Medium's x-block adaLN has 6 chunks; MMDiT-X blocks with attn2 have 9
    r = Rand(1)
    key = "lycoris_transformer_blocks_0_norm1_linear"
    sd = {f"{key}.lokr_w1": r(6, 4), f"{key}.lokr_w2": r(D, 32)}
    _refused(models, sd, "'lycoris_transformer_blocks_0_norm1_linear.lokr_w1'", "6 adaLN chunks")


@pytest.mark.parametrize(
    ("key", "model"),
    [
        ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "SDXL"),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "SD1.x/SD2.x"),
        ("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "SDXL"),
        ("lora_unet_double_blocks_0_img_attn_qkv", "Flux"),
        ("transformer.single_transformer_blocks.0.attn.to_q", "Flux"),
        ("lora_unet_single_blocks_3_linear1", "Flux"),
    ],
)
def test_other_families(models, key, model):
    sd = _pair(key, 320, 320)
    _refused(models, sd, f"made for {model}")


def test_sdxl_detected_from_second_text_encoder(models):
    sd = _pair("lora_unet_down_blocks_1_attentions_0_proj_in", 640, 640)
    sd.update(_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280))
    _refused(models, sd, "made for SDXL")


def test_shape_mismatch_names_key_found_and_expected(models):
    sd = _pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)
    msg = _refused(models, sd, "'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight'")
    assert "[2, 1280]" in msg and "[2, 128]" in msg and "CLIP-G" in msg
    # q/k/v block of a fused qkv: the expected rows are one third
    sd = _pair(
        "transformer.transformer_blocks.0.attn.to_v", 200, D, up=".lora_B.weight", down=".lora_A.weight"
    )
    msg = _refused(
        models, sd, "'transformer.transformer_blocks.0.attn.to_v.lora_B.weight'", "[200, 2]", "[128, 2]"
    )
    assert "q/k/v block 2" in msg
    sd = {"lora_unet_context_embedder.lora_up.weight": torch.zeros(D, 3)}
    sd["lora_unet_context_embedder.lora_down.weight"] = torch.zeros(2, 256)
    _refused(models, sd, "different ranks")


def test_nothing_matches(models):
    sd = {
        "foo.weight": torch.zeros(3),
        "bar.lora_up.weight": torch.zeros(3, 1),
        "bar.lora_down.weight": torch.zeros(1, 3),
    }
    _refused(models, sd, "none of its 3 tensors fits")
