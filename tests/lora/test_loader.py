"""Merge vs runtime application, several LoRAs with strengths, exact unloading, reporting of unmatched keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import SD35Error, SD35Warning
from sd35.lora import load_lora, loaded_loras, set_lora_strength, unload_lora
from sd35.models.modulation import has_hooks
from tests.helpers import rel_err
from tests.lora.lora_helpers import (
    D,
    Rand,
    assert_same,
    make_models,
    mixed_lora,
    outputs,
    snapshot,
    weight,
)


def _no_hooks(models) -> bool:
    """No module does anything besides its forward: no hook, no LoRA state (sd35.models.modulation.has_hooks)."""
    return not any(has_hooks(m) for model in models.values() if model is not None for m in model.modules())


def test_runtime_equals_merge():
    a, b = make_models(), make_models()
    base = outputs(a)
    sd = mixed_lora(a)
    ra = load_lora(a, sd, strength=0.8, mode="merge", name="x")
    snap_b = snapshot(b)
    rb = load_lora(b, sd, strength=0.8, mode="runtime", name="x")
    n = sum(ra.layers.values())
    assert ra.modes == {"merge": n} and rb.modes == {"runtime": n} and ra.layers == rb.layers
    assert {"lora", "lora+dora", "loha", "lokr", "diff"} <= {
        k for kind in ra.kinds for k in kind.split("+")
    } | {"lora+dora"}
    assert_same(b, snap_b)  # runtime never touches a weight
    for merged, runtime, before in zip(outputs(a), outputs(b), base, strict=True):
        assert rel_err(runtime, merged) <= 1e-5
        assert rel_err(merged, before) > 1e-3  # the LoRA really changes every model


def test_strengths_add_up():
    m0 = make_models()
    sd1, sd2 = mixed_lora(m0, 0), mixed_lora(m0, 1)
    w0 = snapshot(m0)
    single = []
    for sd in (sd1, sd2):
        m = make_models()
        load_lora(m, sd, name="one")
        single.append(snapshot(m))
    both = make_models()
    load_lora(both, sd1, strength=0.7, name="a")
    load_lora(both, sd2, strength=-0.4, name="b")
    now = snapshot(both)
    for k, w in w0.items():
        want = w + 0.7 * (single[0][k] - w) - 0.4 * (single[1][k] - w)
        torch.testing.assert_close(now[k], want, atol=1e-5, rtol=1e-5, msg=k)
    rt = make_models()
    load_lora(rt, sd1, strength=0.7, mode="runtime", name="a")
    load_lora(rt, sd2, strength=-0.4, mode="runtime", name="b")
    for x, y in zip(outputs(both), outputs(rt), strict=True):
        assert rel_err(y, x) <= 1e-5


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_unload_is_bit_exact(mode):
    models = make_models()
    snap, base = snapshot(models), outputs(models)
    sd_a, sd_b = mixed_lora(models, 0), mixed_lora(models, 1)
    load_lora(models, sd_a, strength=0.9, mode=mode, name="a")
    load_lora(models, sd_b, strength=-0.5, mode=mode, name="b")
    assert loaded_loras(models) == ["a", "b"]
    assert unload_lora(models, "a") == ["a"]
    only_b = make_models()
    load_lora(only_b, sd_b, strength=-0.5, mode=mode, name="b")
    assert_same(models, snapshot(only_b))  # the remaining LoRA is exactly as if loaded alone
    for x, y in zip(outputs(models), outputs(only_b), strict=True):
        assert torch.equal(x, y)
    assert unload_lora(models) == ["b"]
    assert_same(models, snap)
    assert _no_hooks(models) and loaded_loras(models) == []
    for x, y in zip(outputs(models), base, strict=True):
        assert torch.equal(x, y)


def test_set_strength_recomputes_from_original():
    a, b = make_models(), make_models()
    sd = mixed_lora(a)
    load_lora(a, sd, name="x")
    set_lora_strength(a, "x", 0.25)
    load_lora(b, sd, strength=0.25, name="x")
    assert_same(a, snapshot(b))
    with pytest.raises(SD35Error, match="no LoRA named 'y'"):
        set_lora_strength(a, "y", 1.0)


class FP8Linear(nn.Linear):
    """A stand-in for a quantized layer: fp8 weight, dequantized on the fly."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def _with_fp8_qkv(models):
    old = models["mmditx"].joint_blocks[0].x_block.attn.qkv
    new = FP8Linear(D, 3 * D)
    new.weight = nn.Parameter(old.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    new.bias = old.bias
    models["mmditx"].joint_blocks[0].x_block.attn.qkv = new
    return new


def test_auto_mode_uses_runtime_for_fp8_layers():
    models, ref = make_models(), make_models()
    fp8 = _with_fp8_qkv(models)
    ref["mmditx"].joint_blocks[0].x_block.attn.qkv.weight.data = fp8.weight.float()  # same numbers, as float
    sd = mixed_lora(ref)
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"  # DoRA on the fp8 layer needs its dequantized weight
    sd[f"{key}.dora_scale"] = fp8.weight.float().norm(dim=0, keepdim=True) * (1 + Rand(5)(1, D))
    snap = snapshot(models)
    report = load_lora(models, sd, name="q")
    n = sum(report.layers.values())
    assert report.modes == {"merge": n - 1, "runtime": 1}
    assert torch.equal(
        fp8.weight.view(torch.uint8), snap["mmditx.joint_blocks.0.x_block.attn.qkv.weight"].view(torch.uint8)
    )
    load_lora(ref, sd, name="q", mode="merge")
    for x, y in zip(outputs(models), outputs(ref), strict=True):
        assert rel_err(x, y) <= 1e-5
    unload_lora(models)
    assert_same(models, snap)


def test_unmatched_keys_are_reported_and_warned(models):
    r = Rand(3)
    sd = {
        "lora_unet_joint_blocks_0_x_block_mlp_fc2.lora_up.weight": r(D, 2),
        "lora_unet_joint_blocks_0_x_block_mlp_fc2.lora_down.weight": r(2, 512),
        "lora_unet_joint_blocks_0_x_block_attn_nonexistent.lora_up.weight": r(D, 2),
        "lora_unet_joint_blocks_0_x_block_attn_nonexistent.lora_down.weight": r(2, D),
        "lora_unet_joint_blocks_1_x_block_mlp_fc1.lora_up.weight": r(512, 2),  # no lora_down: incomplete
        "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": r(2, 64),  # a norm, not a linear layer
        "something_else_entirely": r(3),
    }
    with pytest.warns(SD35Warning, match="5 tensor") as rec:
        report = load_lora(models, sd, name="u")
    assert "something_else_entirely" in str(rec[0].message)
    assert sorted(report.unmatched) == sorted(k for k in sd if "fc2" not in k)
    assert report.layers == {"mmditx": 1}


def test_missing_text_encoder_keys_are_skipped():
    models = make_models(t5=False)
    r = Rand(4)
    sd = {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": r(128, 2),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": r(2, 256),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(64, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(2, 64),
    }
    with pytest.warns(SD35Warning, match="not loaded"):
        report = load_lora(models, sd, name="s")
    assert len(report.skipped) == 2 and report.unmatched == [] and report.layers == {"clip_l": 1}


def test_name_and_argument_errors(models, tmp_path):
    sd = mixed_lora(models)
    load_lora(models, sd, name="x")
    with pytest.raises(SD35Error, match="already loaded"):
        load_lora(models, sd, name="x")
    with pytest.raises(SD35Error, match="unknown LoRA mode"):
        load_lora(models, sd, name="y", mode="fuse")
    with pytest.raises(SD35Error, match="no LoRA named 'nope'"):
        unload_lora(models, "nope")
    with pytest.raises(SD35Error, match="no such file"):
        load_lora(models, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("<html>not found</html>")
    with pytest.raises(SD35Error, match="text file"):
        load_lora(models, bad)


def test_failed_load_leaves_models_untouched(models):
    snap = snapshot(models)
    sd = mixed_lora(models)
    sd["lora_unet_joint_blocks_2_x_block_mlp_fc2.lora_up.weight"] = torch.zeros(D, 2)
    sd["lora_unet_joint_blocks_2_x_block_mlp_fc2.lora_down.weight"] = torch.zeros(2, 77)  # wrong width
    with pytest.raises(SD35Error, match="fc2"):
        load_lora(models, sd, name="bad")
    assert_same(models, snap)
    assert _no_hooks(models)
    assert weight(models, "mmditx", "joint_blocks.2.x_block.mlp.fc2").shape == (D, 512)
