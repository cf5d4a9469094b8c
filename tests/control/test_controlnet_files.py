"""ControlNet files made for other models, and broken ones, are refused with one line naming what they are."""

from __future__ import annotations

import pytest
import torch

from sd35.control.files import load_controlnet
from sd35.errors import CheckpointError, NotFound
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.configs import medium_mmditx_config, tiny_configs
from tests.control.control_helpers import diffusers_controlnet, write_controlnet

MEDIUM = medium_mmditx_config()

FOREIGN = {
    "sd15-diffusers": (
        ["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],
        "an SD 1.5/2.x ControlNet",
    ),
    "sdxl-diffusers": (
        ["controlnet_cond_embedding.conv_in.weight", "add_embedding.linear_1.weight"],
        "an SDXL ControlNet",
    ),
    "sd15-original": (
        ["control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight"],
        "SD 1.5",
    ),
    "sdxl-original": (["zero_convs.0.0.weight", "label_emb.0.0.weight"], "an SDXL ControlNet"),
    "flux-xlabs": (
        ["double_blocks.0.img_attn.norm.key_norm.scale", "controlnet_blocks.0.weight"],
        "a Flux ControlNet",
    ),
    "flux-instantx": (["controlnet_x_embedder.weight", "controlnet_blocks.0.weight"], "a Flux ControlNet"),
    "sd35-large-stability": (
        [
            "transformer_blocks.0.adaLN_modulation.1.bias",
            "pos_embed_input.proj.weight",
            "controlnet_blocks.0.weight",
        ],
        "an SD3.5 Large ControlNet",
    ),
    "sd35-large-diffusers": (
        [
            "transformer_blocks.0.attn.to_q.weight",
            "pos_embed_input.proj.weight",
            "controlnet_blocks.0.weight",
        ],
        "an SD3.5 Large ControlNet",
    ),
    "control-lora": (["lora_controlnet", "input_blocks.0.0.weight"], "a ControlLoRA"),
    "sd35-transformer": (
        ["joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"],
        "not a ControlNet",
    ),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_files_name_what_they_are_for(tmp_path, name):
    keys, says = FOREIGN[name]
    path = save_file_atomic({k: torch.zeros(1) for k in keys}, tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_controlnet(path, MEDIUM)
    message = str(e.value)
    assert says in message and "the loaded model is SD3.5 Medium" in message
    assert f"{name}.safetensors" in message and "\n" not in message


def test_a_controlnet_of_another_width_is_refused(tmp_path):
    wide = tiny_configs().mmditx
    net = diffusers_controlnet(type(wide)(**{**wide.__dict__, "hidden_size": 192}))
    folder = write_controlnet(net, tmp_path / "wide")
    with pytest.raises(
        CheckpointError, match=r"ControlNet for an MMDiT-X of width 192 .*width 192 vs the model's 128"
    ):
        load_controlnet(folder, wide)


def test_truncated_and_missing_files(tmp_path):
    cfg = tiny_configs().mmditx
    folder = write_controlnet(diffusers_controlnet(cfg), tmp_path / "cn")
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_controlnet(cut, cfg)
    with pytest.raises(NotFound, match="no such ControlNet file"):
        load_controlnet(tmp_path / "nope.safetensors", cfg)
