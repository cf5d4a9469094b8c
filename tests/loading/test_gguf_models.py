"""GGUF MMDiT-X files (ComfyUI-GGUF's SD3 layout) load with their linears kept quantized, and compute what the
same weights dequantized by the ``gguf`` package compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd35 import load_pipeline
from sd35.errors import CheckpointError
from sd35.loading.components import load_component, scan
from sd35.loading.writers import write_diffusers, write_official, write_text_encoders
from sd35.models.gguf_linear import GGUFLinear
from sd35.models.mmditx import MMDiTX
from sd35.testing import tiny_weights
from tests.helpers import pixel_diff, rel_err

gguf = pytest.importorskip("gguf")  # in the [test] extra
Q = gguf.GGMLQuantizationType
TYPES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16"]


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=31)


def write_gguf(path, sd, type_name, arch="sd3", prefix="", name=None):
    """ComfyUI-GGUF's layout: 2-D weights in ``type_name`` where their rows fit its blocks, the rest F32, and
    ``general.name`` if given. Returns the state dict as the gguf package dequantizes it (the reference weights)."""
    qtype = Q[type_name]
    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    reference = {}
    for key, value in sd.items():
        arr = value.float().numpy()
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        use = qtype if arr.ndim == 2 and arr.shape[-1] % block == 0 else Q.F32
        raw = gguf.quants.quantize(arr, use)
        w.add_tensor(prefix + key, raw, raw_shape=raw.shape, raw_dtype=use)
        reference[key] = torch.from_numpy(
            gguf.quants.dequantize(raw, use).astype(np.float32).reshape(arr.shape)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def _inputs(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    y = torch.randn(2, c.pooled_dim, generator=g)
    ctx = torch.randn(2, 20, c.context_dim, generator=g)
    return x, t, y, ctx


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_mmditx_equals_its_dequantized_weights(tmp_path, weights, type_name):
    path = tmp_path / f"sd3.5_medium-{type_name}.gguf"
    reference = write_gguf(path, weights.mmditx, type_name)
    (comp,) = scan([path])
    ours = load_component(comp, torch.float32)
    theirs = MMDiTX.from_state_dict(reference)
    quantized = [m for m in ours.modules() if isinstance(m, GGUFLinear)]
    assert bool(quantized) == type_name.startswith("Q")
    with torch.no_grad():
        out, ref = ours(*_inputs(ours)), theirs(*_inputs(theirs))
    assert rel_err(out, ref) <= 1e-5
    if quantized:  # the weights stay packed: a Q4 layer holds ~1/7 of its fp32 bytes
        layer = quantized[0]
        assert layer.weight.dtype == torch.uint8
        assert layer.weight.numel() <= layer.in_features * layer.out_features * 4 * (
            0.3 if "8" in type_name else 0.2
        )


def test_gguf_pipeline_with_separate_vae_matches_dequantized_file(tmp_path, weights):
    root = write_diffusers(tmp_path / "diffusers", weights)
    te = write_text_encoders(tmp_path / "te", weights)
    save_file(weights.vae, tmp_path / "vae.safetensors")
    reference = write_gguf(tmp_path / "m.gguf", weights.mmditx, "Q8_0")
    deq = tiny_weights(seed=31)
    deq.mmditx = reference
    official = write_official(tmp_path / "deq.safetensors", deq)
    ours = load_pipeline(
        tmp_path / "m.gguf", te, tokenizers=root, vae=tmp_path / "vae.safetensors", device="cpu"
    )
    theirs = load_pipeline(official, te, tokenizers=root, device="cpu")
    a = ours.generate("a red circle", width=32, height=32, steps=2, seed=4)[0]
    b = theirs.generate("a red circle", width=32, height=32, steps=2, seed=4)[0]
    assert pixel_diff(a, b).max() <= 1


def test_foreign_gguf_files_are_named(tmp_path, weights):
    llm = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    llm.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    llm.write_header_to_file()
    llm.write_kv_data_to_file()
    llm.write_tensors_to_file()
    llm.close()
    with pytest.raises(CheckpointError, match='architecture "llama"'):
        scan([tmp_path / "llama.gguf"])
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32)}
    write_gguf(tmp_path / "flux.gguf", flux, "Q8_0", arch="flux")
    with pytest.raises(CheckpointError, match="Flux"):
        scan([tmp_path / "flux.gguf"])
    write_gguf(tmp_path / "odd.gguf", {"something.weight": torch.zeros(32, 32)}, "F16")
    with pytest.raises(CheckpointError, match="not an SD3 MMDiT-X"):
        scan([tmp_path / "odd.gguf"])
    data = (tmp_path / "odd.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        scan([tmp_path / "cut.gguf"])


def test_lora_applies_on_top_of_gguf_layers(tmp_path, weights):
    from sd35.lora import load_lora

    reference = write_gguf(tmp_path / "m.gguf", weights.mmditx, "Q4_0")
    ours = load_component(scan([tmp_path / "m.gguf"])[0], torch.float32)
    theirs = MMDiTX.from_state_dict(reference)
    g = torch.Generator().manual_seed(9)
    sd = {}
    for path in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.mlp.fc1"):
        layer, name = ours.get_submodule(path), path.replace(".", "_")
        assert isinstance(layer, GGUFLinear)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.1
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.1
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    report = load_lora({"mmditx": ours}, sd, name="x")
    assert report.modes == {"runtime": 2}  # packed blocks cannot take a merge
    load_lora({"mmditx": theirs}, sd, name="x", mode="merge")
    with torch.no_grad():
        out, ref = ours(*_inputs(ours)), theirs(*_inputs(theirs))
    assert rel_err(out, ref) <= 1e-5


def test_stable_diffusion_cpp_layout_carries_its_vae(tmp_path, weights):
    root = write_diffusers(tmp_path / "diffusers", weights)
    te = write_text_encoders(tmp_path / "te", weights)
    sd = {f"model.diffusion_model.{k}": v for k, v in weights.mmditx.items()}
    sd |= {f"first_stage_model.{k}": v for k, v in weights.vae.items()}
    reference = write_gguf(tmp_path / "sd3.5_medium-q8_0.gguf", sd, "Q8_0")
    kinds = sorted(c.kind for c in scan([tmp_path / "sd3.5_medium-q8_0.gguf"]))
    assert kinds == ["mmditx", "vae"]
    ours = load_pipeline(tmp_path / "sd3.5_medium-q8_0.gguf", te, tokenizers=root, device="cpu")
    deq = tiny_weights(seed=31)
    deq.mmditx = {
        k.removeprefix("model.diffusion_model."): v for k, v in reference.items() if k.startswith("model.")
    }
    deq.vae = {
        k.removeprefix("first_stage_model."): v for k, v in reference.items() if k.startswith("first_")
    }
    theirs = load_pipeline(
        write_official(tmp_path / "deq.safetensors", deq), te, tokenizers=root, device="cpu"
    )
    a = ours.generate("a red circle", width=32, height=32, steps=2, seed=4)[0]
    b = theirs.generate("a red circle", width=32, height=32, steps=2, seed=4)[0]
    assert pixel_diff(a, b).max() <= 1


LLAMA_T5 = {v: k for k, v in {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm", "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}.items()}  # fmt: skip


def _llama_name(key):
    if key == "encoder.embed_tokens.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    _, _, n, rest = key.split(".", 3)
    return f"enc.blk.{n}.{LLAMA_T5[rest.removesuffix('.weight')]}.weight"


def test_t5_gguf_in_llama_names_encodes_as_its_dequantized_weights(tmp_path, weights):
    from sd35.models.t5 import T5Encoder

    named = {_llama_name(k): v for k, v in weights.t5.items()}
    reference = write_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", named, "Q8_0", arch="t5encoder")
    (comp,) = scan([tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"])
    assert comp.kind == "t5xxl"
    ours = load_component(comp, torch.float32)
    assert any(isinstance(m, GGUFLinear) for m in ours.modules())
    back = {v: k for k, v in {k: _llama_name(k) for k in weights.t5}.items()}
    theirs = T5Encoder.from_state_dict({back[k]: v for k, v in reference.items()})
    tokens = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens)) <= 1e-5


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K"])
def test_low_k_quant_mmditx_equals_the_gguf_package(tmp_path, weights, type_name):
    """Q2_K/Q3_K files (``_K_S`` mixes): the gguf package cannot quantize them, so the 2-D weights whose rows fill
    256-value blocks get random blocks; whatever the bytes, our model computes what their dequantization does."""
    from tests.loading.test_gguf_io import random_k_blocks

    qtype = Q[type_name]
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "sd3")
    reference, quantized = {}, 0
    for i, (key, value) in enumerate(weights.mmditx.items()):
        arr = value.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 256 == 0:
            raw = random_k_blocks(type_name, arr.size // 256, seed=i).reshape(arr.shape[0], -1)
            w.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=qtype)
            deq = gguf.quants.dequantize(raw, qtype).astype(np.float32)
            quantized += 1
        else:
            w.add_tensor(key, arr)
            deq = arr
        reference[key] = torch.from_numpy(deq.reshape(arr.shape).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (comp,) = scan([tmp_path / "k.gguf"])
    ours = load_component(comp, torch.float32)
    layers = [m for m in ours.modules() if isinstance(m, GGUFLinear)]
    assert quantized >= 4 and len(layers) == quantized and {m.type_name for m in layers} == {type_name}
    theirs = MMDiTX.from_state_dict(reference)
    with torch.no_grad():
        assert rel_err(ours(*_inputs(ours)), theirs(*_inputs(theirs))) <= 1e-5
