"""Every LoRA layout, with the exact key names its producer writes: merged weights = the formula, computed here.

The expected weights are computed independently of sd35.lora: the q/k/v rows, swapped adaLN halves
and LoHa / LoKr / Tucker / DoRA formulas are written out in this file (lora_helpers).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sd35.lora import load_lora
from tests.lora.lora_helpers import (
    D,
    Rand,
    dora,
    kron,
    loha_delta,
    lora_delta,
    snapshot,
    swap,
    tucker,
    weight,
)

QKV = {"q": slice(0, D), "k": slice(D, 2 * D), "v": slice(2 * D, 3 * D)}


def _check(models, before, expected: dict, bias: dict | None = None) -> None:
    """Every changed weight (and bias) equals ``expected``; every other tensor is bit-identical to ``before``."""
    bias = bias or {}
    seen = set()
    for comp, model in models.items():
        if model is None:
            continue
        for key, value in model.state_dict().items():
            mod, _, leaf = key.rpartition(".")
            want = (expected if leaf == "weight" else bias if leaf == "bias" else {}).get((comp, mod))
            if want is None:
                assert torch.equal(value, before[f"{comp}.{key}"]), f"{comp}.{key} changed"
            else:
                torch.testing.assert_close(value, want, atol=2e-6, rtol=1e-5, msg=f"{comp}.{key}")
                seen.add((comp, mod, leaf))
    assert len(seen) == len(expected) + len(bias)


class Expect:
    """Accumulates expected new weights: W + delta on rows (optionally diffusers-swapped)."""

    def __init__(self, models):
        self.models, self.w = models, {}

    def add(self, comp, name, delta, rows=slice(None), swapped=False):
        w = self.w.setdefault((comp, name), weight(self.models, comp, name).clone())
        delta = delta.reshape(w[rows].shape)
        w[rows] += swap(delta) if swapped else delta


def _lora(r, out, inp, rank, kernel=()):
    return r(out, rank, *([1] * len(kernel))), r(rank, inp, *kernel)


def test_kohya(models):
    r, sd, exp = Rand(1), {}, Expect(models)
    before = snapshot(models)
    cases = [
        ("mmditx", "joint_blocks.0.x_block.attn.qkv", 4, 8.0),
        ("mmditx", "joint_blocks.0.x_block.attn2.qkv", 2, None),
        ("mmditx", "joint_blocks.1.x_block.attn2.proj", 3, 1.5),
        ("mmditx", "joint_blocks.2.context_block.attn.qkv", 4, 2.0),  # last block: pre-only context
        ("mmditx", "joint_blocks.2.context_block.adaLN_modulation.1", 2, 2.0),
        ("mmditx", "joint_blocks.1.context_block.mlp.fc2", 5, 5.0),
        ("mmditx", "joint_blocks.2.x_block.adaLN_modulation.1", 2, 1.0),
        ("mmditx", "final_layer.adaLN_modulation.1", 3, 3.0),
        ("mmditx", "context_embedder", 4, 4.0),
        ("mmditx", "t_embedder.mlp.0", 2, 1.0),
        ("clip_l", "text_model.encoder.layers.0.self_attn.q_proj", 4, 4.0),
        ("clip_g", "text_model.encoder.layers.1.mlp.fc1", 3, 6.0),
        ("clip_g", "text_projection", 2, 2.0),
        ("t5", "encoder.block.0.layer.0.SelfAttention.q", 4, 2.0),
        ("t5", "encoder.block.1.layer.1.DenseReluDense.wi_1", 2, 4.0),
    ]
    prefix = {"mmditx": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5": "lora_te3_"}
    for comp, name, rank, alpha in cases:
        out, inp = weight(models, comp, name).shape
        up, down = _lora(r, out, inp, rank)
        key = prefix[comp] + name.replace(".", "_")
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        exp.add(comp, name, lora_delta(up, down, alpha))
    # the patch embedder is a 2x2 convolution (sd-scripts emb_dims "x_embedder")
    up, down = _lora(r, D, 16, 3, kernel=(2, 2))
    sd["lora_unet_x_embedder_proj.lora_up.weight"], sd["lora_unet_x_embedder_proj.lora_down.weight"] = (
        up,
        down,
    )
    sd["lora_unet_x_embedder_proj.alpha"] = torch.tensor(6.0)
    exp.add("mmditx", "x_embedder.proj", lora_delta(up, down, 6.0))

    report = load_lora(models, sd, name="k")
    assert (
        report.formats == ["kohya"] and report.unmatched == [] and report.modes == {"merge": len(cases) + 1}
    )
    assert report.layers == {"mmditx": 11, "clip_l": 1, "clip_g": 2, "t5": 2}
    _check(models, before, exp.w)


def _diffusers_cases():
    """(diffusers module, our component, our module, rows, swapped)."""
    t = "transformer_blocks"
    cases = [(f"{t}.0.attn.to_{c}", "joint_blocks.0.x_block.attn.qkv", QKV[c], False) for c in "qkv"]
    cases += [
        (f"{t}.2.attn.add_{c}_proj", "joint_blocks.2.context_block.attn.qkv", QKV[c], False) for c in "qv"
    ]
    cases += [
        (f"{t}.1.attn2.to_v", "joint_blocks.1.x_block.attn2.qkv", QKV["v"], False),
        (f"{t}.0.attn2.to_out.0", "joint_blocks.0.x_block.attn2.proj", slice(None), False),
        (f"{t}.0.attn.to_out.0", "joint_blocks.0.x_block.attn.proj", slice(None), False),
        (f"{t}.1.attn.to_add_out", "joint_blocks.1.context_block.attn.proj", slice(None), False),
        (f"{t}.0.ff.net.0.proj", "joint_blocks.0.x_block.mlp.fc1", slice(None), False),
        (f"{t}.1.ff_context.net.2", "joint_blocks.1.context_block.mlp.fc2", slice(None), False),
        (f"{t}.0.norm1.linear", "joint_blocks.0.x_block.adaLN_modulation.1", slice(None), False),
        (
            f"{t}.1.norm1_context.linear",
            "joint_blocks.1.context_block.adaLN_modulation.1",
            slice(None),
            False,
        ),
        (f"{t}.2.norm1_context.linear", "joint_blocks.2.context_block.adaLN_modulation.1", slice(None), True),
        ("norm_out.linear", "final_layer.adaLN_modulation.1", slice(None), True),
        ("proj_out", "final_layer.linear", slice(None), False),
        ("context_embedder", "context_embedder", slice(None), False),
        ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", slice(None), False),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", slice(None), False),
    ]
    return [(d, "mmditx", o, rows, sw) for d, o, rows, sw in cases]


@pytest.mark.parametrize("alpha_source", ["metadata", "alpha_keys", "absent"])
def test_diffusers(models, alpha_source):
    r, sd, exp = Rand(2), {}, Expect(models)
    before = snapshot(models)
    te = [
        ("text_encoder", "clip_l", "text_model.encoder.layers.0.self_attn.k_proj"),
        ("text_encoder_2", "clip_g", "text_model.encoder.layers.2.self_attn.out_proj"),
        ("text_encoder_3", "t5", "encoder.block.0.layer.0.SelfAttention.o"),
    ]
    cases = [("transformer", d, c, o, rows, sw) for d, c, o, rows, sw in _diffusers_cases()]
    cases += [(p, name, comp, name, slice(None), False) for p, comp, name in te]
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8.0, "transformer.alpha_pattern": {}}
    meta["transformer.alpha_pattern"]["transformer_blocks.0.attn.to_k"] = 2.0
    meta.update({"text_encoder.r": 4, "text_encoder.lora_alpha": 1.0})
    for i, (prefix, dname, comp, name, rows, swapped) in enumerate(cases):
        w = weight(models, comp, name)[rows]
        rank = 2 + i % 3
        up, down = _lora(r, w.shape[0], w.shape[1], rank)
        key = f"{prefix}.{dname}"
        sd[f"{key}.lora_B.weight"], sd[f"{key}.lora_A.weight"] = up, down
        alpha = None
        if alpha_source == "metadata" and f"{prefix}.lora_alpha" in meta:
            alpha = meta["transformer.alpha_pattern"].get(dname, meta[f"{prefix}.lora_alpha"])
        elif alpha_source == "alpha_keys":
            alpha = 1.0 + i
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        exp.add(comp, name, lora_delta(up, down, alpha), rows, swapped)
    # the patch embedder convolution: PEFT's Conv2d LoRA shapes
    up, down = _lora(r, D, 16, 2, kernel=(2, 2))
    sd["transformer.pos_embed.proj.lora_B.weight"], sd["transformer.pos_embed.proj.lora_A.weight"] = up, down
    exp.add("mmditx", "x_embedder.proj", lora_delta(up, down, 8.0 if alpha_source == "metadata" else None))

    metadata = {"lora_adapter_metadata": json.dumps(meta)} if alpha_source == "metadata" else None
    report = load_lora(models, sd, name="d", metadata=metadata)
    assert report.formats == ["diffusers"] and report.unmatched == []
    _check(models, before, exp.w)


def test_diffusers_rslora_metadata(models):
    r = Rand(3)
    name = "joint_blocks.1.x_block.attn.proj"
    w0 = weight(models, "mmditx", name)
    up, down = _lora(r, D, D, 4)
    sd = {"transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight": up}
    sd["transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight"] = down
    meta = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": 4, "transformer.lora_alpha": 3.0, "transformer.use_rslora": True}
        )
    }
    load_lora(models, sd, name="rs", metadata=meta)
    want = w0 + 3.0 / math.sqrt(4) * up @ down
    torch.testing.assert_close(weight(models, "mmditx", name), want, atol=2e-6, rtol=1e-5)


def test_raw_peft(models):
    r, sd, exp = Rand(4), {}, Expect(models)
    before = snapshot(models)
    for c in "kv":
        up, down = _lora(r, D, D, 3)
        sd[f"base_model.model.transformer_blocks.1.attn.to_{c}.lora_B.weight"] = up
        sd[f"base_model.model.transformer_blocks.1.attn.to_{c}.lora_A.weight"] = down
        exp.add("mmditx", "joint_blocks.1.x_block.attn.qkv", lora_delta(up, down), QKV[c])
    up, down = _lora(r, D, 512, 2)
    sd["base_model.model.transformer_blocks.1.ff.net.2.lora_B.weight"] = up
    sd["base_model.model.transformer_blocks.1.ff.net.2.lora_A.weight"] = down
    exp.add("mmditx", "joint_blocks.1.x_block.mlp.fc2", lora_delta(up, down))
    report = load_lora(models, sd, name="p")
    assert report.formats == ["PEFT"]
    _check(models, before, exp.w)


def test_onetrainer(models):
    r, sd, exp = Rand(5), {}, Expect(models)
    before = snapshot(models)
    for i, c in enumerate("qkv"):
        up, down = _lora(r, D, D, 2 + i)
        key = f"lora_transformer_transformer_blocks_0_attn_to_{c}"
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
        sd[f"{key}.alpha"] = torch.tensor(1.0 + i)
        exp.add("mmditx", "joint_blocks.0.x_block.attn.qkv", lora_delta(up, down, 1.0 + i), QKV[c])
    cases = [
        ("lora_transformer_transformer_blocks_2_norm1_context_linear", "mmditx",
         "joint_blocks.2.context_block.adaLN_modulation.1", True),
        ("lora_transformer_transformer_blocks_1_attn2_to_out_0", "mmditx", "joint_blocks.1.x_block.attn2.proj", False),
        ("lora_transformer_proj_out", "mmditx", "final_layer.linear", False),
        ("lora_te1_text_model_encoder_layers_2_mlp_fc2", "clip_l", "text_model.encoder.layers.2.mlp.fc2", False),
        ("lora_te2_text_projection", "clip_g", "text_projection", False),
        ("lora_te3_encoder_block_1_layer_0_SelfAttention_v", "t5", "encoder.block.1.layer.0.SelfAttention.v", False),
    ]  # fmt: skip
    for key, comp, name, swapped in cases:
        out, inp = weight(models, comp, name).shape
        up, down = _lora(r, out, inp, 3)
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
        sd[f"{key}.alpha"] = torch.tensor(1.5)
        exp.add(comp, name, lora_delta(up, down, 1.5), swapped=swapped)
    # OneTrainer also writes CLIP-L's text projection, which SD3's CLIP-L does not have: reported, not dropped
    sd["lora_te1_text_projection.lora_up.weight"] = r(64, 2)
    sd["lora_te1_text_projection.lora_down.weight"] = r(2, 64)
    with pytest.warns(UserWarning, match="lora_te1_text_projection"):
        report = load_lora(models, sd, name="ot")
    assert set(report.formats) == {"OneTrainer", "kohya"}
    assert sorted(report.unmatched) == [
        "lora_te1_text_projection.lora_down.weight",
        "lora_te1_text_projection.lora_up.weight",
    ]
    _check(models, before, exp.w)


def test_lycoris_loha_lokr_tucker(models):
    r, sd, exp = Rand(6), {}, Expect(models)
    before = snapshot(models)
    # LoKr, both factors full (SimpleTuner's attn2 case, ComfyUI#5417): alpha ignored, scale 1
    key = "lycoris_transformer_blocks_0_attn2_to_q"
    w1, w2 = r(8, 8, scale=0.3), r(16, 16, scale=0.3)
    sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(4.0)})
    exp.add("mmditx", "joint_blocks.0.x_block.attn2.qkv", kron(w1, w2), QKV["q"])
    # LoKr, w2 low-rank: scale = alpha / rank(w2)
    key = "lycoris_transformer_blocks_1_attn_to_out_0"
    w1, w2a, w2b = r(4, 4, scale=0.3), r(32, 2, scale=0.3), r(2, 32, scale=0.3)
    sd.update(
        {
            f"{key}.lokr_w1": w1,
            f"{key}.lokr_w2_a": w2a,
            f"{key}.lokr_w2_b": w2b,
            f"{key}.alpha": torch.tensor(1.0),
        }
    )
    exp.add("mmditx", "joint_blocks.1.x_block.attn.proj", 0.5 * kron(w1, w2a @ w2b))
    # LoKr, w1 low-rank and w2 full: scale = alpha / rank(w1)
    key = "lycoris_transformer_blocks_0_ff_net_0_proj"
    w1a, w1b, w2 = r(8, 2, scale=0.3), r(2, 4, scale=0.3), r(64, 32, scale=0.3)
    sd.update(
        {
            f"{key}.lokr_w1_a": w1a,
            f"{key}.lokr_w1_b": w1b,
            f"{key}.lokr_w2": w2,
            f"{key}.alpha": torch.tensor(3.0),
        }
    )
    exp.add("mmditx", "joint_blocks.0.x_block.mlp.fc1", 1.5 * kron(w1a @ w1b, w2))
    # LoHa
    key = "lycoris_transformer_blocks_1_ff_context_net_2"
    h = [r(D, 4, scale=0.3), r(4, 512, scale=0.3), r(D, 4, scale=0.3), r(4, 512, scale=0.3)]
    sd.update(
        {
            f"{key}.hada_w1_a": h[0],
            f"{key}.hada_w1_b": h[1],
            f"{key}.hada_w2_a": h[2],
            f"{key}.hada_w2_b": h[3],
        }
    )
    sd[f"{key}.alpha"] = torch.tensor(2.0)
    exp.add("mmditx", "joint_blocks.1.context_block.mlp.fc2", loha_delta(*h, alpha=2.0))
    # LoHa with Tucker cores on the patch-embedding convolution [128, 16, 2, 2]
    key = "lycoris_pos_embed_proj"
    t1, t2 = r(3, 3, 2, 2, scale=0.5), r(3, 3, 2, 2, scale=0.5)
    a1, b1, a2, b2 = r(3, D, scale=0.5), r(3, 16, scale=0.5), r(3, D, scale=0.5), r(3, 16, scale=0.5)
    sd.update({f"{key}.hada_t1": t1, f"{key}.hada_w1_a": a1, f"{key}.hada_w1_b": b1})
    sd.update(
        {
            f"{key}.hada_t2": t2,
            f"{key}.hada_w2_a": a2,
            f"{key}.hada_w2_b": b2,
            f"{key}.alpha": torch.tensor(1.5),
        }
    )
    exp.add("mmditx", "x_embedder.proj", 0.5 * tucker(t1, a1, b1) * tucker(t2, a2, b2))

    report = load_lora(models, sd, name="ly")
    assert report.formats == ["LyCORIS"] and report.unmatched == []
    assert set(report.kinds) == {"lokr", "loha"}
    _check(models, before, exp.w)


def test_generic_and_suffix_variants(models):
    r, sd, exp = Rand(7), {}, Expect(models)
    before = snapshot(models)
    cases = [
        ("diffusion_model.joint_blocks.1.x_block.mlp.fc2", ".lora_up.weight", ".lora_down.weight", "mmditx",
         "joint_blocks.1.x_block.mlp.fc2"),
        ("model.diffusion_model.joint_blocks.0.context_block.attn.proj", ".lora_B.weight", ".lora_A.weight",
         "mmditx", "joint_blocks.0.context_block.attn.proj"),
        ("joint_blocks.1.x_block.attn.qkv", "_lora.up.weight", "_lora.down.weight", "mmditx",
         "joint_blocks.1.x_block.attn.qkv"),
        ("diffusion_model.y_embedder.mlp.2", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
         "mmditx", "y_embedder.mlp.2"),
        ("diffusion_model.final_layer.linear", ".lora.up.weight", ".lora.down.weight", "mmditx", "final_layer.linear"),
        ("diffusion_model.joint_blocks.0.x_block.adaLN_modulation.1", ".lora_B", ".lora_A", "mmditx",
         "joint_blocks.0.x_block.adaLN_modulation.1"),
        ("transformer.transformer_blocks.1.ff.net.0.proj", ".lora_B.default.weight", ".lora_A.default.weight",
         "mmditx", "joint_blocks.1.x_block.mlp.fc1"),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj", ".lora_up.weight",
         ".lora_down.weight", "clip_l", "text_model.encoder.layers.1.self_attn.v_proj"),
        ("text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo", ".lora_up.weight",
         ".lora_down.weight", "t5", "encoder.block.0.layer.1.DenseReluDense.wo"),
    ]  # fmt: skip
    for stem, up_sfx, down_sfx, comp, name in cases:
        out, inp = weight(models, comp, name).shape
        up, down = _lora(r, out, inp, 2)
        sd[stem + up_sfx], sd[stem + down_sfx] = up, down
        exp.add(comp, name, lora_delta(up, down))
    # LoCon with a Tucker core on the patch-embedding convolution
    up, down, mid = r(D, 3, 1, 1), r(3, 16, 1, 1), r(3, 3, 2, 2)
    sd["diffusion_model.x_embedder.proj.lora_up.weight"] = up
    sd["diffusion_model.x_embedder.proj.lora_down.weight"] = down
    sd["diffusion_model.x_embedder.proj.lora_mid.weight"] = mid
    sd["diffusion_model.x_embedder.proj.alpha"] = torch.tensor(1.5)
    full = torch.einsum("mnkl,om,ni->oikl", mid, up[:, :, 0, 0], down[:, :, 0, 0])
    exp.add("mmditx", "x_embedder.proj", 0.5 * full)
    # full weight and bias difference
    diff, diff_b = r(512, D), r(512)
    sd["diffusion_model.joint_blocks.2.x_block.mlp.fc1.diff"] = diff
    sd["diffusion_model.joint_blocks.2.x_block.mlp.fc1.diff_b"] = diff_b
    exp.add("mmditx", "joint_blocks.2.x_block.mlp.fc1", diff)
    b = models["mmditx"].get_submodule("joint_blocks.2.x_block.mlp.fc1").bias.detach() + diff_b

    report = load_lora(models, sd, name="g")
    assert report.unmatched == [] and set(report.formats) == {"generic", "diffusers"}
    _check(models, before, exp.w, {("mmditx", "joint_blocks.2.x_block.mlp.fc1"): b})


def test_dora_variants(models):
    r, sd, exp = Rand(8), {}, Expect(models)
    before = snapshot(models)
    # kohya-style DoRA: magnitude per input column [1, in] (ComfyUI weight_decompose, LyCORIS wd_on_out=False)
    name = "joint_blocks.1.x_block.attn.proj"
    w = weight(models, "mmditx", name)
    up, down, m = r(D, 4), r(4, D), w.norm(dim=0, keepdim=True) * (1 + r(1, D))
    key = "lora_unet_joint_blocks_1_x_block_attn_proj"
    sd.update(
        {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}
    )
    sd[f"{key}.dora_scale"] = m
    exp.add("mmditx", name, dora(w, lora_delta(up, down, 2.0), m, axis=1) - w)
    # PEFT DoRA on split q/v: magnitude per output row of each projection (lora_magnitude_vector [out])
    name = "joint_blocks.1.x_block.attn.qkv"
    w = weight(models, "mmditx", name)
    for c in "qv":
        wc = w[QKV[c]]
        up, down = r(D, 3), r(3, D)
        m = wc.norm(dim=1) * (1 + r(D))
        key = f"transformer.transformer_blocks.1.attn.to_{c}"
        sd.update(
            {f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down, f"{key}.lora_magnitude_vector": m}
        )
        exp.add("mmditx", name, dora(wc, lora_delta(up, down), m, axis=0) - wc, QKV[c])
    # LyCORIS LoKr DoRA on split k: the column norm is over the k rows only (ComfyUI applies it to the slice)
    name = "joint_blocks.0.x_block.attn.qkv"
    wk = weight(models, "mmditx", name)[QKV["k"]]
    w1, w2 = r(4, 4, scale=0.3), r(32, 32, scale=0.3)
    m = wk.norm(dim=0, keepdim=True) * (1 + r(1, D))
    key = "lycoris_transformer_blocks_0_attn_to_k"
    sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.dora_scale": m})
    exp.add("mmditx", name, dora(wk, kron(w1, w2), m, axis=1) - wk, QKV["k"])

    report = load_lora(models, sd, name="dora")
    assert report.unmatched == [] and {"lora+dora", "lokr+dora"} <= set(report.kinds)
    _check(models, before, exp.w)


def test_dora_strength_blends_towards_original(models):
    r = Rand(9)
    name = "joint_blocks.0.context_block.mlp.fc1"
    w = weight(models, "mmditx", name)
    up, down = r(512, 4), r(4, D)
    m = w.norm(dim=0, keepdim=True) * (1 + r(1, D))
    key = "lora_unet_joint_blocks_0_context_block_mlp_fc1"
    sd = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.dora_scale": m}
    load_lora(models, sd, strength=0.6, name="d")
    want = w + 0.6 * (dora(w, lora_delta(up, down), m, axis=1) - w)
    torch.testing.assert_close(weight(models, "mmditx", name), want, atol=2e-6, rtol=1e-5)
