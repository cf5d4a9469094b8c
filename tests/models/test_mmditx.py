"""MMDiT-X against diffusers' SD3Transformer2DModel, loaded through diffusers' own single-file converter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sd35.errors import CheckpointError, SD35Error
from sd35.models.configs import medium_mmditx_config, tiny_configs
from sd35.models.family import mmditx_family
from sd35.models.mmditx import MMDiTX, MMDiTXConfig, timestep_embedding
from sd35.models.random_init import random_state_dict
from tests.helpers import rel_err
from tests.models.models_helpers import CONFIGS, diffusers_pair, inputs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("hw", [(8, 8), (12, 6)])
def test_matches_diffusers(name, hw):
    cfg, ours, ref = diffusers_pair(name)
    assert ours.config == cfg
    x, t, y, ctx = inputs(cfg, *hw)
    with torch.no_grad():
        a = ours(x, t, y, ctx)
        b = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert a.shape == x.shape
    assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("skip", [[1], [0, 2]])
def test_skip_layers_match_diffusers(skip):
    cfg, ours, ref = diffusers_pair("sd35m-like")
    x, t, y, ctx = inputs(cfg, 8, 10)
    with torch.no_grad():
        a = ours(x, t, y, ctx, skip_layers=skip)
        b = ref(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t, skip_layers=skip
        ).sample
        full = ours(x, t, y, ctx)
    assert rel_err(a, b) <= 1e-5
    assert rel_err(a, full) > 1e-3  # skipping really changes the result


def test_config_inferred_from_weights():
    cfg = tiny_configs(attn2_layers=(1, 3), qk_norm=True, depth=4).mmditx
    sd = random_state_dict(MMDiTX(cfg))
    assert MMDiTXConfig.from_state_dict(sd) == cfg
    assert sd["joint_blocks.1.x_block.adaLN_modulation.1.weight"].shape[0] == 9 * cfg.hidden_size
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape[0] == 6 * cfg.hidden_size
    assert sd["joint_blocks.3.context_block.adaLN_modulation.1.weight"].shape[0] == 2 * cfg.hidden_size
    assert "joint_blocks.3.context_block.mlp.fc1.weight" not in sd  # the last context block is pre-only


def test_prefix_and_bare_keys_load_identically():
    cfg = tiny_configs().mmditx
    sd = random_state_dict(MMDiTX(cfg), 3)
    a = MMDiTX.from_state_dict(sd).state_dict()
    b = MMDiTX.from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()}).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timestep_embedding_is_cos_first():
    emb = timestep_embedding(torch.tensor([0.0]), 8)
    assert torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(4))


def test_pos_embed_crop_is_centred():
    cfg = tiny_configs().mmditx
    model = MMDiTX.from_state_dict(random_state_dict(MMDiTX(cfg)))
    grid = model.pos_embed.reshape(cfg.pos_embed_max_size, cfg.pos_embed_max_size, -1)
    crop = model.cropped_pos_embed(3, 4).reshape(3, 4, -1)
    top, left = (cfg.pos_embed_max_size - 3) // 2, (cfg.pos_embed_max_size - 4) // 2
    assert torch.equal(crop, grid[top : top + 3, left : left + 4])


def test_bad_sizes_and_shapes_are_clear_errors():
    cfg = tiny_configs().mmditx
    sd = random_state_dict(MMDiTX(cfg))
    model = MMDiTX.from_state_dict(sd)
    x, t, y, ctx = inputs(cfg, 7, 8)
    with pytest.raises(SD35Error, match="multiple of"):
        model(x, t, y, ctx)
    big = cfg.pos_embed_max_size * cfg.patch_size + 2
    x, t, y, ctx = inputs(cfg, big, 8)
    with pytest.raises(SD35Error, match="at most 512x512"):
        model(x, t, y, ctx)
    bad = dict(sd)
    bad["joint_blocks.1.x_block.mlp.fc2.weight"] = torch.zeros(cfg.hidden_size, 7)
    with pytest.raises(
        CheckpointError, match=r"joint_blocks\.1\.x_block\.mlp\.fc2\.weight.*\[128, 7\].*\[128, 512\]"
    ):
        MMDiTX.from_state_dict(bad)
    del bad["joint_blocks.1.x_block.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match="lack"):
        MMDiTX.from_state_dict(bad)


def test_bf16_close_to_fp32():
    cfg = tiny_configs().mmditx
    sd = random_state_dict(MMDiTX(cfg))
    x, t, y, ctx = inputs(cfg, 8, 8)
    with torch.no_grad():
        a = MMDiTX.from_state_dict(sd)(x, t, y, ctx)
        b = MMDiTX.from_state_dict(sd, dtype=torch.bfloat16)(x, t, y, ctx)
    assert b.dtype == torch.float32  # returned in the input's dtype
    assert rel_err(b, a) < 0.05


def test_pos_offset_crop_and_gradient_checkpointing():
    cfg = tiny_configs().mmditx
    model = MMDiTX.from_state_dict(random_state_dict(MMDiTX(cfg)))
    grid = model.pos_embed.reshape(cfg.pos_embed_max_size, cfg.pos_embed_max_size, -1)
    assert torch.equal(model.cropped_pos_embed(2, 3, (0, 5)).reshape(2, 3, -1), grid[0:2, 5:8])
    with pytest.raises(SD35Error, match="does not fit"):
        model.cropped_pos_embed(4, 4, (cfg.pos_embed_max_size - 3, 0))
    x, t, y, ctx = inputs(cfg, 8, 8)
    centred = (cfg.pos_embed_max_size - 4) // 2
    with torch.no_grad():
        assert torch.equal(model(x, t, y, ctx), model(x, t, y, ctx, pos_offset=(centred, centred)))
        assert not torch.equal(model(x, t, y, ctx), model(x, t, y, ctx, pos_offset=(0, 0)))
    for p in model.parameters():
        p.requires_grad_(True)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, t, y, ctx).square().mean().backward()
        grads.append(model.joint_blocks[0].x_block.attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_family_names_of_the_real_configs():
    sd35m = medium_mmditx_config()
    sd3m = dataclasses.replace(sd35m, pos_embed_max_size=192, qk_norm=False, attn2_layers=())
    sd35l = dataclasses.replace(
        sd35m, hidden_size=2432, depth=38, pos_embed_max_size=192, mlp_hidden=9728, attn2_layers=()
    )
    assert mmditx_family(sd35m) == "SD3.5 Medium" and sd35m.max_image_size == 6144
    assert mmditx_family(sd3m) == "SD3 Medium"
    assert mmditx_family(sd35l).startswith("SD3.5 Large")
