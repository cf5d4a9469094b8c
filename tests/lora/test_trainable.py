"""Trainable LoRA/DoRA (add_lora), baking (merge_lora), and saving in the kohya and diffusers layouts."""

from __future__ import annotations

import json

import pytest
import torch

from sd35.errors import SD35Error
from sd35.lora import (
    DEFAULT_TARGETS,
    add_lora,
    export_lora,
    export_metadata,
    load_lora,
    loaded_loras,
    merge_lora,
    parse_lora,
    read_lora,
    save_lora,
    unload_lora,
)
from sd35.lora.patching import iter_patches
from sd35.models.modulation import has_hooks
from tests.helpers import rel_err
from tests.lora.lora_helpers import assert_same, inputs, make_models, outputs, snapshot

ALL = (*DEFAULT_TARGETS, "adaLN_modulation.1", "final_layer.linear", "context_embedder", "x_embedder.proj")


def _train(models, dora=False, seed=0, comps=("mmditx",), targets=ALL, rank=4, alpha=2.0):
    """add_lora, then give every parameter random values as if trained."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for c in comps:
        t = (
            targets
            if c == "mmditx"
            else ("self_attn.q_proj", "mlp.fc1", "SelfAttention.v", "DenseReluDense.wo")
        )
        params += add_lora(models[c], rank, alpha, targets=t, dora=dora, generator=g)
    with torch.no_grad():
        for p in params:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)) if p.abs().sum() else p.normal_(
                0, 0.05, generator=g
            )
    return params


@pytest.mark.parametrize("dora", [False, True])
def test_new_lora_leaves_output_unchanged_and_trains(dora):
    models = make_models()
    # a runtime LoRA on an adaLN layer forces the per-layer adaLN path (the fused one would bypass its hook);
    # take it for the base output too, so that both sides run the same kernels and bit-equality says that a
    # new LoRA adds exactly zero
    models["mmditx"].fused_modulation = False
    snap, base = snapshot(models), outputs(models)
    params = {}
    for c, targets in [("mmditx", ALL), ("clip_l", ("q_proj", "fc2")), ("t5", ("SelfAttention.k",))]:
        params[c] = add_lora(models[c], 4, 8.0, targets=targets, dora=dora)
    for x, y in zip(outputs(models), base, strict=True):
        assert torch.equal(x, y)  # up is zero: each hook adds exactly 0 (DoRA: m / ||W|| is exactly 1)
    assert all(p.requires_grad for ps in params.values() for p in ps)
    assert not any(p.requires_grad for m in models.values() if m is not None for p in m.parameters())
    assert_same(models, snap)
    # one backward pass: every up (zero at first) of the MMDiT-X gets a gradient, the frozen base none
    x, t, y, ctx = inputs()
    models["mmditx"](x, t, y, ctx).square().mean().backward()
    ups = [adapter.up for _, _, p, _ in iter_patches(models["mmditx"]) for adapter in [p.adapter]]
    assert len(ups) == len(params["mmditx"]) // (3 if dora else 2) == 35
    assert all(u.grad is not None and u.grad.abs().sum() > 0 for u in ups)
    assert all(p.grad is None for p in models["mmditx"].parameters())


def test_targets_and_blocks():
    models = make_models()
    params = add_lora(models["mmditx"], 2, targets=("attn.qkv",), blocks=[1])
    names = [n for n, _, _, _ in iter_patches(models["mmditx"])]
    assert names == ["joint_blocks.1.context_block.attn.qkv", "joint_blocks.1.x_block.attn.qkv"]
    assert len(params) == 4
    with pytest.raises(SD35Error, match="already applied"):
        add_lora(models["mmditx"], 2, targets=("attn2.qkv",))
    add_lora(models["mmditx"], 2, targets=("attn2.qkv", "context_embedder"), blocks=[0], name="b")
    names = [n for n, _, p, _ in iter_patches(models["mmditx"]) if p.name == "b"]
    assert names == ["context_embedder", "joint_blocks.0.x_block.attn2.qkv"]
    with pytest.raises(SD35Error, match="no layer matches"):
        add_lora(models["mmditx"], 2, targets=("nonexistent",), name="c")


@pytest.mark.parametrize("dora", [False, True])
def test_merge_lora_bakes_in(dora):
    models = make_models()
    _train(models, dora=dora, comps=("mmditx", "clip_g"))
    trained = outputs(models)
    for c in ("mmditx", "clip_g"):
        merge_lora(models[c], "train")
    assert loaded_loras(models) == []
    assert not any(has_hooks(m) for m in models["mmditx"].modules())  # no runtime hook left
    for x, y in zip(outputs(models), trained, strict=True):
        assert rel_err(x, y) <= 1e-5
    with pytest.raises(SD35Error, match="no LoRA named"):
        merge_lora(models["mmditx"], "train")


def test_merge_lora_under_a_merged_lora():
    """Baking a trained LoRA into layers that also carry a loaded, merged LoRA: unloading that one keeps the bake."""
    a, ref = make_models(), make_models()
    _train(a, seed=1)
    _train(ref, seed=1)
    tensors = export_lora(a["mmditx"])
    load_lora(a, tensors, name="other", strength=0.5)
    merge_lora(a["mmditx"], "train")
    unload_lora(a, "other")
    merge_lora(ref["mmditx"], "train")
    for x, y in zip(outputs(a), outputs(ref), strict=True):
        assert rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("dora", [False, True])
def test_kohya_file_round_trips_exactly(tmp_path, dora):
    trained = make_models()
    comps = ("mmditx", "clip_l", "clip_g", "t5")
    _train(trained, dora=dora, comps=comps)
    want = outputs(trained)
    tensors = export_lora(trained)
    assert (
        "lora_unet_joint_blocks_2_context_block_attn_qkv.lora_up.weight" in tensors
    )  # pre-only block, fused qkv
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (384, 4)
    assert "lora_unet_joint_blocks_1_x_block_attn2_qkv.lora_down.weight" in tensors
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te3_") for k in tensors)
    assert ("lora_unet_final_layer_adaLN_modulation_1.dora_scale" in tensors) == dora
    meta = export_metadata(trained)
    assert (
        meta["ss_network_dim"] == "4"
        and meta["ss_network_alpha"] == "2.0"
        and meta["sd35_dora"] == str(dora).lower()
    )
    path = save_lora(tmp_path / "trained.safetensors", tensors, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.safetensors"]

    sd, file_meta = read_lora(path)
    assert file_meta == meta and sd.keys() == tensors.keys()
    assert all(torch.equal(sd[k], v) for k, v in tensors.items())
    fresh = make_models()
    parsed = parse_lora(sd, fresh, file_meta)
    for (comp, name), adapter in parsed.adapters.items():
        original = next(p.adapter for n, _, p, _ in iter_patches(trained[comp]) if n == name)
        assert adapter.alpha == original.alpha and torch.equal(adapter.up, original.up)
        assert torch.equal(adapter.down, original.down)
    report = load_lora(fresh, path)
    assert report.name == "trained" and report.formats == ["kohya"] and report.unmatched == []
    for x, y in zip(outputs(fresh), want, strict=True):
        assert rel_err(x, y) <= 1e-5
    # merging via the file equals baking the trained adapters in. The adapters above are bit-identical, but
    # the file's tensors sit at the file's offsets and a CPU matmul (up @ down) may sum in another order at
    # another alignment: equal up to the float32 rounding of W + delta (a wrong scale, 1%, is ~1e-4 off)
    for c in comps:
        merge_lora(trained[c])
    baked = snapshot(trained)
    for k, v in snapshot(fresh).items():
        torch.testing.assert_close(v, baked[k], rtol=1e-6, atol=1e-8, msg=k)


def test_diffusers_export_round_trips_through_our_loader(tmp_path):
    trained = make_models()
    _train(trained, comps=("mmditx", "clip_l", "clip_g", "t5"))
    want = outputs(trained)
    tensors = export_lora(trained, format="diffusers")
    meta = export_metadata(trained, format="diffusers")
    t = "transformer.transformer_blocks"
    for key in (
        f"{t}.0.attn.to_q.lora_A.weight",
        f"{t}.0.attn.add_v_proj.lora_B.weight",
        f"{t}.1.attn2.to_k.lora_B.weight",
        f"{t}.2.norm1_context.linear.lora_B.weight",
        "transformer.norm_out.linear.lora_A.weight",
        "transformer.pos_embed.proj.lora_A.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wo.lora_B.weight",
    ):
        assert key in tensors, key
    assert not any("add_out" in k and ".2." in k for k in tensors)  # the last block has no context output
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 2.0
    assert f"{t[len('transformer.') :]}.0.attn.to_q" in config["transformer.target_modules"]
    path = save_lora(tmp_path / "d.safetensors", tensors, meta)
    fresh = make_models()
    report = load_lora(fresh, path)
    assert report.formats == ["diffusers"] and report.unmatched == []
    for x, y in zip(outputs(fresh), want, strict=True):
        assert rel_err(x, y) <= 1e-5


def test_export_errors_and_no_overwrite(tmp_path):
    models = make_models()
    _train(models, dora=True)
    with pytest.raises(SD35Error, match="kohya format"):
        export_lora(models["mmditx"], format="diffusers")
    with pytest.raises(SD35Error, match="unknown LoRA format"):
        export_lora(models["mmditx"], format="comfy")
    with pytest.raises(SD35Error, match="no LoRA named 'x'"):
        export_lora(models["mmditx"], name="x")
    path = save_lora(tmp_path / "a.safetensors", export_lora(models["mmditx"]))
    before = path.read_bytes()
    with pytest.raises(SD35Error, match="already exists"):
        save_lora(path, {"x": torch.zeros(1)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(SD35Error, match="no such folder"):
        save_lora(tmp_path / "missing" / "b.safetensors", {"x": torch.zeros(1)})
