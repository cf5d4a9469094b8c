"""``sd35 convert`` round trips: each target written from a tiny random checkpoint, read back through our loader,
and checked against an independent reading (the ``gguf`` package for GGUF, ComfyUI's ``W * scale_weight`` rule for
scaled fp8). Lossless targets are bit-equal; quantized ones equal their dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd35.loading.components import Component, load_component, scan
from sd35.loading.convert import convert
from sd35.loading.safetensors_io import read_metadata, save_file_atomic
from sd35.loading.tensors import materialize
from sd35.models.clip import CLIPTextEncoder
from sd35.models.gguf_linear import GGUFLinear
from sd35.models.mmditx import MMDiTX
from sd35.models.t5 import T5Encoder
from tests.helpers import mmditx_inputs, rel_err
from tests.loading.test_gguf_models import _llama_name

gguf = pytest.importorskip("gguf")  # in the [test] extra

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_kind(paths) -> dict[str, Component]:
    return {c.kind: c for c in scan(paths)}


def _values(c: Component) -> dict[str, torch.Tensor]:
    """A component's tensors, with the parts that layouts legitimately differ in made alike."""
    sd = {k: materialize(t) for k, t in c.tensors.items()}
    shared = sd.pop("shared.weight", None)  # T5 files carry the embedding as shared, embed_tokens or both
    if shared is not None:
        sd.setdefault("encoder.embed_tokens.weight", shared)
    if (
        c.kind == "clip_l"
    ):  # diffusers' CLIP-L has an identity projection, SD3's clip_l file none (never used)
        sd.pop("text_projection.weight", None)
    return sd


def _assert_same_weights(a: Component, b: Component, dtype: torch.dtype | None = None) -> None:
    x, y = _values(a), _values(b)
    assert sorted(x) == sorted(y), a.kind
    for k in x:
        want = x[k].to(dtype) if dtype is not None and x[k].is_floating_point() else x[k]
        assert y[k].dtype == want.dtype and torch.equal(y[k], want), f"{a.kind}: {k}"


def _mmditx_out(m: MMDiTX) -> torch.Tensor:
    with torch.no_grad():
        return m(*mmditx_inputs(m.config, torch.tensor([0.3, 0.8])))


@pytest.mark.parametrize(
    "source,out,dtype",
    [
        (("diffusers",), "all.safetensors", None),
        (("official", "text_encoders"), "diffusers_out", None),
        (("all_in_one",), "half.safetensors", "fp16"),
        (("official",), "official.safetensors", None),
    ],
)
def test_lossless_targets_are_bit_equal(tmp_path, tiny, source, out, dtype):
    inputs = [tiny[s] for s in source]
    lines = convert(inputs, tmp_path / out, dtype=dtype)
    assert len(lines) == 1 and str(tmp_path / out) in lines[0]
    before, after = _by_kind(inputs), _by_kind([tmp_path / out])
    assert sorted(before) == sorted(after)
    for kind in before:
        _assert_same_weights(before[kind], after[kind], {"fp16": torch.float16}.get(dtype))
    assert not list(tmp_path.glob(".*partial"))  # the temporary output was renamed or removed


def test_lone_text_encoder_and_vae_are_written_bare(tmp_path, tiny):
    convert([tiny["text_encoders"] / "t5xxl_fp16.safetensors"], tmp_path / "t5.safetensors")
    with safe_open(tmp_path / "t5.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" in keys  # as t5xxl_fp16.safetensors
    assert all(not k.startswith("text_encoders.") for k in keys)
    vae = {
        k.removeprefix("first_stage_model."): materialize(t)
        for k, t in _by_kind([tiny["official"]])["vae"].tensors.items()
    }
    save_file_atomic({f"first_stage_model.{k}": v for k, v in vae.items()}, tmp_path / "vae_in.safetensors")
    convert([tmp_path / "vae_in.safetensors"], tmp_path / "vae.safetensors")
    with safe_open(tmp_path / "vae.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(vae)  # ComfyUI's models/vae/ layout: bare keys


def test_official_output_keeps_the_source_metadata(tmp_path, tiny):
    src = {k: materialize(t) for k, t in _by_kind([tiny["official"]])["mmditx"].tensors.items()}
    meta = {"modelspec.title": "SD3.5 Large Turbo test"}
    save_file_atomic(
        {f"model.diffusion_model.{k}": v for k, v in src.items()}, tmp_path / "in.safetensors", meta
    )
    convert([tmp_path / "in.safetensors"], tmp_path / "out.safetensors", dtype="bf16")
    assert read_metadata(tmp_path / "out.safetensors") == meta


# ComfyUI-GGUF's llama.cpp patch (tools/lcpp.patch) keeps SD3's first and last layers unquantized
UNQUANTIZED = ("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "final_layer.", "pos_embed")


def _gguf_reference(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as the gguf package reads and dequantizes it (float32, torch shape)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        out[t.name] = torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        )
    return out


@pytest.mark.parametrize(
    "quant", ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "BF16", "F16", "F32"]
)
def test_gguf_mmditx_round_trip(tmp_path, tiny, quant):
    path = tmp_path / f"sd3.5_tiny-{quant}.gguf"  # the type comes from the name
    lines = convert([tiny["official"]], path)
    assert f"GGUF {quant}" in lines[0] and "not written: VAE" in lines[1]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "sd3"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    source = {k: materialize(t) for k, t in _by_kind([tiny["official"]])["mmditx"].tensors.items()}
    assert sorted(types) == sorted(source)  # ComfyUI-GGUF's layout: the official keys without their prefix
    for name, value in source.items():
        if value.dim() <= 1 or value.numel() <= 1024:
            assert types[name] == "F32", name
        elif quant.startswith("Q") and name.startswith(UNQUANTIZED):
            assert types[name] == "F16", name
        elif value.dim() == 2:  # a row that fills no whole block (256 values for a K-quant) stays F16
            block = 256 if quant.endswith("_K") else 32
            assert types[name] == (quant if value.shape[1] % block == 0 else "F16"), name
    assert quant in types.values()
    # the gguf package's own quantizer gives the same bytes for every quantized tensor (it has no K-quant one;
    # tests/loading/test_gguf_writer.py checks those against ggml's C reference)
    for t in reader.tensors:
        if t.tensor_type.name == quant and quant.startswith("Q") and not quant.endswith("_K"):
            expected = gguf.quants.quantize(source[t.name].numpy(), t.tensor_type)
            assert np.array_equal(np.asarray(t.data).reshape(-1), expected.reshape(-1)), t.name
    reference = _gguf_reference(path)
    (comp,) = scan([path])
    ours = load_component(comp, torch.float32)
    assert any(isinstance(m, GGUFLinear) for m in ours.modules()) == quant.startswith("Q")
    for k, v in ours.state_dict().items():  # what our loader holds equals what the gguf package reads
        if v.dtype != torch.uint8:
            assert torch.equal(v.float(), reference[k]), k
    theirs = MMDiTX.from_state_dict(reference)
    out, ref = _mmditx_out(ours), _mmditx_out(theirs)
    assert rel_err(out, ref) <= 1e-5
    if quant == "F32":  # lossless: the same model as the source, bit for bit
        assert torch.equal(out, _mmditx_out(MMDiTX.from_state_dict(source)))


def test_gguf_t5_round_trip_in_llama_names(tmp_path, tiny):
    path = tmp_path / "t5xxl-Q8_0.gguf"
    convert([tiny["text_encoders"] / "t5xxl_fp16.safetensors"], path)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "t5encoder"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["enc.blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["enc.blk.0.attn_rel_b.weight"] == "F32" and types["enc.output_norm.weight"] == "F32"
    (comp,) = scan([path])
    assert comp.kind == "t5xxl"
    ours = load_component(comp, torch.float32)
    assert any(isinstance(m, GGUFLinear) for m in ours.modules())
    source = _values(_by_kind([tiny["text_encoders"] / "t5xxl_fp16.safetensors"])["t5xxl"])
    back = {_llama_name(k): k for k in source}  # HF names from llama.cpp's, independently of the loader's map
    reference = {back[k]: v for k, v in _gguf_reference(path).items()}
    assert sorted(reference) == sorted(source)
    theirs = T5Encoder.from_state_dict(reference)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens)) <= 1e-5


def test_gguf_clip_round_trip_in_hf_names(tmp_path, tiny):
    path = tmp_path / "clip_l-Q5_0.gguf"
    convert([tiny["text_encoders"] / "clip_l.safetensors"], path)
    reference = _gguf_reference(path)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in reference  # stable-diffusion.cpp's naming
    (comp,) = scan([path])
    assert (
        comp.kind == "clip_l" and comp.layout == "GGUF"
    )  # the role from the file's name, as for safetensors
    ours = load_component(comp, torch.float32)
    theirs = CLIPTextEncoder.from_state_dict(reference, "clip_l")
    tokens = torch.randint(0, ours.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(ours(tokens), theirs(tokens), strict=True):
            assert rel_err(a, b) <= 1e-5


def test_scaled_fp8_round_trip(tmp_path, tiny):
    path = tmp_path / "sd3.5_tiny_fp8_scaled.safetensors"
    lines = convert([tiny["all_in_one"]], path, to="scaled_fp8")
    assert "fp8 scaled: MMDiT-X, T5-XXL" in lines[0]
    before, after = _by_kind([tiny["all_in_one"]]), _by_kind([path])
    for kind in ("vae", "clip_l", "clip_g"):  # kept as they were
        _assert_same_weights(before[kind], after[kind])
    raw = load_file(path)
    for prefix in ("model.diffusion_model.", "text_encoders.t5xxl.transformer."):
        marker = raw[prefix + "scaled_fp8"]  # ComfyUI reads the fp8 dtype from this marker's dtype
        assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    assert raw[qkv + ".weight"].dtype == torch.float8_e4m3fn and raw[qkv + ".scale_weight"].shape == ()
    assert (
        raw["text_encoders.t5xxl.transformer.shared.weight"].dtype == torch.float32
    )  # an embedding: no scale
    for kind in ("mmditx", "t5xxl"):
        src, got = _values(before[kind]), _values(after[kind])
        for k, w in src.items():
            stored = next(
                (v for n, v in raw.items() if n.endswith("." + k) and v.dtype == torch.float8_e4m3fn), None
            )
            if stored is None:
                assert torch.equal(got[k], w), k
                continue
            scale = raw[next(n for n in raw if n.endswith("." + k))[: -len("weight")] + "scale_weight"]
            assert torch.equal(got[k], stored.float() * scale), k  # what ComfyUI computes: W * scale_weight
            # e4m3 keeps 3 mantissa bits: within 1/16 relative, or half the smallest subnormal step near zero
            assert bool(((got[k] - w).abs() <= w.abs() / 16 + scale * 2**-10 + 1e-12).all()), k


def test_scaled_fp8_with_dtype_casts_only_what_stays_high_precision(tmp_path, tiny):
    path = tmp_path / "fp8_bf16.safetensors"
    convert([tiny["official"]], path, to="scaled_fp8", dtype="bf16")
    raw = load_file(path)
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    assert (
        raw[qkv + ".weight"].dtype == torch.float8_e4m3fn
        and raw[qkv + ".scale_weight"].dtype == torch.float32
    )
    assert (
        raw[qkv + ".bias"].dtype == torch.bfloat16
        and raw["model.diffusion_model.pos_embed"].dtype == torch.bfloat16
    )
    assert raw["first_stage_model.decoder.conv_in.weight"].dtype == torch.bfloat16
    # the fp8 weights come from the stored fp32 weights, not from their bf16 rounding
    convert([tiny["official"]], tmp_path / "fp8.safetensors", to="scaled_fp8")
    plain = load_file(tmp_path / "fp8.safetensors")[qkv + ".weight"]
    assert torch.equal(plain.view(torch.uint8), raw[qkv + ".weight"].view(torch.uint8))


def test_gguf_converts_back_to_safetensors(tmp_path, tiny):
    """A GGUF input converts too: F32 there and back is lossless; from Q8_0 the weights come out dequantized."""
    convert([tiny["official"]], tmp_path / "m-F32.gguf")
    convert([tmp_path / "m-F32.gguf"], tmp_path / "back.safetensors")
    _assert_same_weights(
        _by_kind([tiny["official"]])["mmditx"], _by_kind([tmp_path / "back.safetensors"])["mmditx"]
    )
    convert([tiny["official"]], tmp_path / "m-Q8_0.gguf")
    convert([tmp_path / "m-Q8_0.gguf"], tmp_path / "deq.safetensors", dtype="fp32")
    got = _values(_by_kind([tmp_path / "deq.safetensors"])["mmditx"])
    reference = _gguf_reference(tmp_path / "m-Q8_0.gguf")
    assert sorted(got) == sorted(reference)
    assert all(torch.equal(got[k], reference[k]) for k in got)
