"""Every file layout users have loads to identical tensors; every bad input gets one clear error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sd35.errors import CheckpointError, MissingComponentError
from sd35.loading.components import CLIP_G, CLIP_L, KINDS, MMDITX, T5XXL, VAE, assemble, load_models, scan
from sd35.loading.tensors import materialize
from sd35.loading.writers import (
    t5_with_embedding,
    write_all_in_one,
    write_diffusers,
    write_official,
    write_text_encoders,
)
from sd35.testing import scaled_fp8, tiny_weights
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "official": write_official(root / "sd3.5_medium.safetensors", weights),
        "bare": write_official(root / "mmdit_only.safetensors", weights, prefixed=False),
        "all_in_one": write_all_in_one(root / "sd3.5_medium_incl_clips.safetensors", weights),
        "text_encoders": write_text_encoders(root / "text_encoders", weights)[0].parent,
        "renamed": write_text_encoders(
            root / "renamed",
            weights,
            names=("a.safetensors", "b.safetensors", "c.safetensors"),
            t5_embedding="shared",
        )[0].parent,
        "diffusers": write_diffusers(root / "diffusers", weights),
    }


def _expected(weights, kind):
    if kind == T5XXL:
        return weights.t5
    if kind == CLIP_L:
        return {k: v for k, v in weights.clip_l.items() if not k.startswith("text_projection")}
    return {MMDITX: weights.mmditx, VAE: weights.vae, CLIP_G: weights.clip_g}[kind]


def _assert_same(component, expected):
    got = {k: materialize(v) for k, v in component.tensors.items()}
    if component.kind == CLIP_L:
        got.pop("text_projection.weight", None)
    if component.kind == T5XXL:  # files carry the embedding under either name, or both
        shared = got.pop("shared.weight", None)
        got.setdefault("encoder.embed_tokens.weight", shared)
    assert set(got) == set(expected), set(got) ^ set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    "layout,kinds",
    [
        ("official", {MMDITX, VAE}),
        ("bare", {MMDITX}),
        ("all_in_one", set(KINDS)),
        ("text_encoders", {CLIP_L, CLIP_G, T5XXL}),
        ("renamed", {CLIP_L, CLIP_G, T5XXL}),
        ("diffusers", set(KINDS)),
    ],
)
def test_every_layout_gives_identical_tensors(files, weights, layout, kinds):
    found = assemble(scan([files[layout]]), required=kinds)
    assert set(found) == kinds
    for kind, comp in found.items():
        _assert_same(comp, _expected(weights, kind))


def test_official_plus_text_encoder_folder_is_complete(files):
    found = assemble(scan([files["official"], files["text_encoders"]]))
    assert set(found) == set(KINDS)


def test_models_from_layouts_are_identical(files):
    a = load_models([files["all_in_one"]])
    b = load_models([files["diffusers"]])
    for kind in KINDS:
        sa, sb = a[kind].state_dict(), b[kind].state_dict()
        sa.pop("text_projection.weight", None), sb.pop("text_projection.weight", None)
        assert sa.keys() == sb.keys(), kind
        assert all(torch.equal(sa[k], sb[k]) for k in sa), kind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_cast_on_load(tmp_path, weights, dtype):
    path = write_official(tmp_path / "half.safetensors", weights, dtype=dtype)
    comp = assemble(scan([path]), required=[MMDITX])[MMDITX]
    assert {t.dtype for t in comp.tensors.values()} == {dtype}
    model = load_models([path], kinds=[MMDITX], dtype=torch.float32)[MMDITX]
    w = model.joint_blocks[0].x_block.attn.qkv.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, weights.mmditx["joint_blocks.0.x_block.attn.qkv.weight"].to(dtype).float())


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_text_encoder_file(tmp_path, weights, fp8):
    paths = write_text_encoders(
        tmp_path, weights, names=("l.safetensors", "g.safetensors", "t5xxl_fp8.safetensors"), t5_dtype=fp8
    )
    model = load_models(paths, kinds=[T5XXL], dtype=torch.float32)[T5XXL]
    key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    expected = weights.t5[key].to(fp8).float()
    assert torch.equal(model.state_dict()[key], expected)


def test_scaled_fp8_file_is_dequantized(tmp_path, weights):
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(scaled_fp8(t5_with_embedding(weights.t5, "both")), str(path))
    comp = assemble(scan([path]), required=[T5XXL])[T5XXL]
    key = "encoder.block.1.layer.0.SelfAttention.o.weight"
    got, ref = materialize(comp.tensors[key]), weights.t5[key]
    assert not any(k.endswith("scale_weight") for k in comp.tensors)
    assert rel_err(got, ref) < 0.07  # fp8 e4m3 rounding, not a 448x scale error
    assert "fp8 scaled" in " ".join(comp.notes)


def test_diffusers_folder_loads_in_diffusers_and_transformers(files, weights):
    """Our diffusers-layout writer produces exactly what the real libraries load (strict key sets)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    root = files["diffusers"]
    loaded = {}
    for name, cls, sub in (
        ("t", SD3Transformer2DModel, "transformer"),
        ("v", AutoencoderKL, "vae"),
        ("l", CLIPTextModelWithProjection, "text_encoder"),
        ("g", CLIPTextModelWithProjection, "text_encoder_2"),
        ("t5", T5EncoderModel, "text_encoder_3"),
    ):
        model, info = cls.from_pretrained(root / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
        loaded[name] = model
    t, v, c, t5 = loaded["t"], loaded["v"], loaded["g"], loaded["t5"]
    assert tuple(t.config.dual_attention_layers) == (0, 1)
    assert torch.equal(t.pos_embed.pos_embed, weights.mmditx["pos_embed"])
    assert torch.equal(v.decoder.conv_in.weight, weights.vae["decoder.conv_in.weight"])
    assert torch.equal(c.text_projection.weight, weights.clip_g["text_projection.weight"])
    assert torch.equal(t5.encoder.embed_tokens.weight, weights.t5["encoder.embed_tokens.weight"])


# --- bad input ------------------------------------------------------------------------------


def _write_keys(path, keys):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


@pytest.mark.parametrize(
    "keys,says",
    [
        (
            [
                "conditioner.embedders.1.model.ln_final.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            "XL",
        ),
        (
            ["cond_stage_model.transformer.x.weight", "model.diffusion_model.input_blocks.0.0.weight"],
            "1.x/2.x",
        ),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "LoRA"),
        (["something.else.weight"], "not recognised"),
    ],
)
def test_foreign_files_are_named(tmp_path, keys, says):
    path = _write_keys(tmp_path / "model.safetensors", keys)
    with pytest.raises(CheckpointError, match=says) as e:
        scan([path])
    assert str(path) in str(e.value)


def test_truncated_file(tmp_path, files):
    data = files["official"].read_bytes()
    path = tmp_path / "sd3.5_medium.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        scan([path])


@pytest.mark.parametrize(
    "content,says",
    [
        (b"PK\x03\x04" + b"\0" * 64, "pickle"),
        (b"GGUF" + b"\0" * 64, "GGUF"),
        (b"<html><body>404 Not Found</body></html>", "text file"),
        (b"", "empty"),
    ],
)
def test_non_safetensors_files(tmp_path, content, says):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=says):
        scan([path])


def test_corrupt_header(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="corrupt"):
        scan([path])


def test_missing_parts_are_named_with_usual_files(files):
    with pytest.raises(
        MissingComponentError, match=r"CLIP-L, CLIP-G, T5-XXL.*clip_l\.safetensors.*t5xxl_fp16"
    ):
        assemble(scan([files["official"]]))


def test_duplicate_component(files):
    with pytest.raises(CheckpointError, match="two T5-XXL"):
        assemble(scan([files["text_encoders"], files["renamed"] / "c.safetensors"]))


def test_wrong_adaln_width_names_key_found_expected(tmp_path, weights):
    sd = {"model.diffusion_model." + k: v for k, v in weights.mmditx.items()}
    key = "model.diffusion_model.joint_blocks.0.x_block.adaLN_modulation.1.weight"
    sd[key] = sd[key][: 6 * 128]  # an SD3-Medium-style 6-chunk modulation in an attn2 block
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"adaLN_modulation\.1\.weight' has shape \[768, 128\], expected \[1152, 128\]"
    ):
        load_models([tmp_path / "m.safetensors"], kinds=[MMDITX])


def test_missing_shard_and_bin_only_folders(tmp_path, files):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(files["diffusers"], root)
    next((root / "text_encoder_3").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="not in"):
        scan([root])
    for f in (root / "vae").glob("*.safetensors"):
        f.unlink()
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    (root / "text_encoder_3" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"\.bin"):
        scan([root])


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        scan([tmp_path / "nope.safetensors"])
