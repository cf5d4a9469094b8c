"""``sd35 inspect``: every model layout (what it holds, what a pipeline still lacks), one clear line with exit code 2
for a bad file, and LoRA files: what sd35 train writes (kohya and diffusers), DoRA, LyCORIS, text-encoder and
foreign LoRAs, and a LoRA next to model files (it is described, never counted as a pipeline part)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sd35.loading.writers import write_official
from sd35.lora import add_lora, export_lora, export_metadata, save_lora
from sd35.lora.summary import family_from_name, summarize_lora
from sd35.models.configs import tiny_configs
from sd35.testing import scaled_fp8, tiny_weights
from sd35.train.config import TrainConfig
from sd35.train.trainer import Trainer, final_paths
from tests.helpers import run_cli, subprocess_env, tiny_models


def _inspect(capsys, *paths) -> tuple[int, str]:
    """``sd35 inspect PATHS``: (exit code, stdout)."""
    code, out, _ = run_cli(capsys, "inspect", *map(str, paths))
    return code, out


def _describe(capsys, path: Path, header: str) -> list[str]:
    """The lines ``sd35 inspect path`` prints, after checking its exit code and the file's header line."""
    code, out = _inspect(capsys, path)
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"{path}  [{header}]"
    return lines


# --- model files ------------------------------------------------------------------------------


def test_inspect_official_file_names_layout_and_missing_parts(capsys, tiny):
    code, out, _ = run_cli(capsys, "inspect", str(tiny["official"]))
    assert code == 0
    assert "[official single file]" in out
    assert "MMDiT-X" in out and "attn2 in blocks 0-1" in out and "VAE" in out
    missing = out.split("still lacks:")[1]
    assert "CLIP-L" in missing and "clip_l.safetensors" in missing
    assert "CLIP-G" in missing and "T5-XXL" in missing and "t5xxl_fp16" in missing
    assert "MMDiT-X" not in missing


@pytest.mark.parametrize(
    "layout,expect",
    [
        ("all_in_one", "[all-in-one (MMDiT + VAE + text encoders)]"),
        ("diffusers", "[diffusers folder]"),
    ],
)
def test_inspect_complete_layouts(capsys, tiny, layout, expect):
    code, out, _ = run_cli(capsys, "inspect", str(tiny[layout]))
    assert code == 0
    assert expect in out
    for name in ("MMDiT-X", "VAE", "CLIP-L", "CLIP-G", "T5-XXL"):
        assert f"  {name}" in out
    assert "Complete" in out


def test_inspect_text_encoder_folder_and_combination(capsys, tiny):
    code, out, _ = run_cli(capsys, "inspect", str(tiny["text_encoders"]))
    assert code == 0 and "HF transformers CLIP" in out and "HF transformers T5 encoder" in out
    lacks = out.split("still lacks:")[1]
    assert "MMDiT-X" in lacks and "VAE" in lacks and "CLIP" not in lacks
    code, out, _ = run_cli(capsys, "inspect", str(tiny["official"]), str(tiny["text_encoders"]))
    assert code == 0 and "Complete" in out


def test_inspect_reports_dtype_and_parameters(capsys, tiny):
    _, out, _ = run_cli(capsys, "inspect", str(tiny["official"]))
    assert "fp32" in out and "M parameters" in out


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"<html>Access denied</html>")
    code, out, err = run_cli(capsys, "inspect", str(bad))
    assert code == 2
    assert err.startswith("sd35: error: ") and str(bad) in err and "text file" in err
    assert len(err.strip().splitlines()) == 1


def test_console_script_never_shows_a_traceback(tmp_path):
    missing = tmp_path / "nope.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "sd35.cli", "inspect", str(missing)],
        capture_output=True,
        text=True,
        env=subprocess_env(),  # the child imports the sd35 this test imported
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such file" in proc.stderr


def _weights_of(structure: dict, seed: int = 0):
    return tiny_weights(seed, tiny_configs(**structure))


LARGE = dict(attn2_layers=(), qk_norm=True)
SD3_MEDIUM = dict(attn2_layers=(), qk_norm=False)


@pytest.mark.parametrize(
    "structure,name,metadata,title,evidence,defaults",
    [
        (
            LARGE,
            "sd3.5_large",
            None,
            "SD3.5 Large",
            "the name 'sd3.5_large'",
            "40 steps, CFG 4.5, dpmpp_2m, shift 3.0",
        ),
        (
            LARGE,
            "model",
            {"modelspec.architecture": "stable-diffusion-v3.5-large", "modelspec.title": "SD3.5 Large Turbo"},
            "SD3.5 Large Turbo",
            "modelspec.title 'SD3.5 Large Turbo'",
            "4 steps, CFG 1.0, euler, shift 3.0",
        ),
        (
            SD3_MEDIUM,
            "model",
            {"modelspec.architecture": "stable-diffusion-v3-medium"},
            "SD3 Medium",
            "modelspec.architecture 'stable-diffusion-v3-medium'",
            "50 steps, CFG 5.0, dpmpp_2m, shift 1.0",
        ),
        (dict(), "sd3.5_medium", None, "SD3.5 Medium", "the name", "50 steps, CFG 5.0, dpmpp_2m, shift 3.0"),
        # a name of a release the network is not built like is no evidence
        (dict(), "sd3.5_large", None, "an MMDiT-X of another configuration", None, "50 steps"),
    ],
)
def test_inspect_names_each_release_and_its_defaults(
    capsys, tmp_path, structure, name, metadata, title, evidence, defaults
):
    path = write_official(tmp_path / f"{name}.safetensors", _weights_of(structure), metadata=metadata)
    lines = _describe(capsys, path, "official single file")
    head = f"  MMDiT-X  {title}" + (f" (by {evidence}" if evidence else ":")
    assert lines[1].startswith(head), lines[1]
    assert lines[2].startswith(f"  defaults {defaults}")


def test_inspect_gguf_shows_its_quantization_and_release(capsys, tmp_path):
    from tests.loading.test_gguf_models import write_gguf

    gguf = pytest.importorskip("gguf")
    w = _weights_of(LARGE, seed=4)
    named = tmp_path / "sd3.5_large_turbo-Q8_0.gguf"
    write_gguf(named, w.mmditx, "Q8_0")
    counts = Counter(
        t.tensor_type.name for t in gguf.GGUFReader(str(named)).tensors
    )  # the gguf package's count
    assert set(counts) == {"Q8_0", "F32"}
    (q8, f32) = counts["Q8_0"], counts["F32"]
    lines = _describe(capsys, named, "GGUF")
    assert "SD3.5 Large Turbo (by the name 'sd3.5_large_turbo-Q8_0')" in lines[1]
    order = [f"Q8_0: {q8} tensors", f"F32: {f32}"] if q8 >= f32 else [f"F32: {f32} tensors", f"Q8_0: {q8}"]
    assert f"| {', '.join(order)} |" in lines[1] and "kept quantized" in lines[1]
    assert lines[2].startswith("  defaults 4 steps, CFG 1.0, euler")
    # general.name says it as well as a file name does
    other = tmp_path / "model-Q4_0.gguf"
    write_gguf(other, w.mmditx, "Q4_0", name="SD3.5 Large Turbo")
    lines = _describe(capsys, other, "GGUF")
    assert "SD3.5 Large Turbo (by general.name 'SD3.5 Large Turbo')" in lines[1] and "Q4_0: " in lines[1]


def test_inspect_shows_scaled_fp8_and_dtypes(capsys, tmp_path):
    w = _weights_of(SD3_MEDIUM, seed=5)
    path = tmp_path / "sd3_medium_fp8_scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in scaled_fp8(w.mmditx).items()}, str(path))
    lines = _describe(capsys, path, "official single file")
    assert lines[1].startswith("  MMDiT-X  SD3 Medium (by the name")
    assert "| fp8_e4m3fn " in lines[1] and "% / fp32 " in lines[1] and "fp8 scaled weights" in lines[1]


# --- LoRA files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[Path]:
    """The two files a LoRA run writes, made as sd35/train/trainer.py ``_save_final`` makes them."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="/models/sd3.5_medium.safetensors", output_dir=str(out), max_steps=100)
    models = tiny_models(3, "mmditx")
    add_lora(models["mmditx"], rank=4, alpha=2.0, generator=torch.Generator().manual_seed(0))
    # what every final file records about the run (the trainer's own private method: no public reader of it)
    run_meta = Trainer._metadata(SimpleNamespace(cfg=cfg))
    paths = final_paths(cfg)
    for path, fmt in zip(paths, ("kohya", "diffusers"), strict=True):
        tensors = export_lora(models["mmditx"], "train", format=fmt, dtype=torch.bfloat16)
        save_lora(path, tensors, {**run_meta, **export_metadata(models["mmditx"], "train", format=fmt)})
    return paths


# 3 blocks: blocks 0-1 change 6 x-stream + 4 context layers, pre-only block 2 changes 4 + 1 (no attn2 there)
TRAINED_LAYERS = "25 layers in joint blocks 0-2: attn.qkv, attn.proj, mlp.fc1, mlp.fc2, attn2.qkv, attn2.proj"


@pytest.mark.parametrize("which,layout", [(0, "kohya"), (1, "diffusers")])
def test_trained_lora_is_described(capsys, trained, which, layout):
    lines = _describe(capsys, trained[which], f"LoRA: {layout} layout")
    assert {
        "  kind      LoRA",
        "  rank      4",
        "  alpha     2 (scale alpha/rank = 0.5)",
        f"  MMDiT-X   {TRAINED_LAYERS}",
        "  made for  an MMDiT-X of another configuration (sd35_base_model)",
    } <= set(lines)
    stored = next(line for line in lines if line.startswith("  stored"))
    assert stored.startswith("  stored    bf16 | ") and stored.endswith(" K parameters")
    training = next(line for line in lines if line.startswith("  training"))
    assert "mode lora" in training and "steps 100" in training and "EMA off" in training
    assert "base file sd3.5_medium.safetensors" in training and "learning rate 0.0001" in training
    assert not any("still lacks" in line or "Complete" in line for line in lines)  # no pipeline summary


def test_both_layouts_name_the_same_layers(trained):
    kohya, diffusers = (summarize_lora(p) for p in trained)
    assert kohya.components == diffusers.components
    assert kohya.rank == diffusers.rank == 4 and set(kohya.alphas) == set(diffusers.alphas) == {2.0}
    assert kohya.layouts == ["kohya"] and diffusers.layouts == ["diffusers"]
    assert kohya.components["mmditx"].blocks == [0, 1, 2] and kohya.components["mmditx"].layers == 25
    # diffusers stores the shared down [4, 128] of each of the 8 fused qkv layers once per q, k and v
    assert diffusers.parameters - kohya.parameters == 8 * 2 * 4 * 128
    assert kohya.training["steps"] == "100" and kohya.training["mode"] == "lora"
    assert json.loads(kohya.metadata["sd35_training"])["max_steps"] == 100  # the raw metadata stays available


def test_reads_only_the_header_and_the_alphas(trained, monkeypatch):
    from sd35.loading import safetensors_io

    # every tensor read goes through SafetensorsFile._get (private, and no public counter of reads): spy on it
    read: list[str] = []
    original = safetensors_io.SafetensorsFile._get
    monkeypatch.setattr(
        safetensors_io.SafetensorsFile, "_get", lambda self, k: read.append(k) or original(self, k)
    )
    summarize_lora(trained[0])
    assert read and all(k.endswith(".alpha") for k in read)
    read.clear()
    summarize_lora(trained[1])
    assert read == []  # diffusers keeps alpha in the metadata


def test_dora(capsys, tmp_path):
    models = tiny_models(3, "mmditx")
    add_lora(models["mmditx"], 8, targets=("attn.qkv", "attn.proj"), blocks=[1], dora=True)
    path = save_lora(tmp_path / "dora.safetensors", export_lora(models), export_metadata(models))
    assert {
        "  kind      DoRA (LoRA with magnitude vectors)",
        "  rank      8",
        "  alpha     8 (scale alpha/rank = 1)",
        "  MMDiT-X   4 layers in joint block 1: attn.qkv, attn.proj",
    } <= set(_describe(capsys, path, "DoRA: kohya layout"))


def test_peft_dora_magnitude_counts_as_dora(tmp_path):
    d = 128
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, d),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(d, 2),
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(d),
    }
    s = summarize_lora(save_lora(tmp_path / "peft.safetensors", sd))
    assert s.kind == "DoRA" and s.dora == 1 and s.layouts == ["diffusers"]
    assert s.components["mmditx"].kinds == ["x_block.attn.qkv"] and s.alphas == [None]


def test_lycoris_loha_and_lokr(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    loha = "lycoris_transformer_blocks_0_ff_net_2"
    lokr = "lycoris_transformer_blocks_1_attn2_to_v"
    sd = {
        f"{loha}.hada_w1_a": torch.randn(128, 2, generator=g),
        f"{loha}.hada_w1_b": torch.randn(2, 512, generator=g),
        f"{loha}.hada_w2_a": torch.randn(128, 2, generator=g),
        f"{loha}.hada_w2_b": torch.randn(2, 512, generator=g),
        f"{loha}.alpha": torch.tensor(1.0),
        f"{lokr}.lokr_w1": torch.randn(8, 8, generator=g),
        f"{lokr}.lokr_w2_a": torch.randn(16, 4, generator=g),
        f"{lokr}.lokr_w2_b": torch.randn(4, 16, generator=g),
        f"{lokr}.alpha": torch.tensor(4.0),
    }
    path = save_lora(tmp_path / "lyco.safetensors", sd)
    assert {
        "  kind      adapters: LoHa (1), LoKr (1)",
        "  rank      2-4",
        "  alpha     1-4",
        "  MMDiT-X   2 layers in joint blocks 0-1: x_block.mlp.fc2, attn2.qkv",
        "  made for  SD3.5 Medium (attn2 layers, which only SD3.5 Medium's MMDiT-X has)",
    } <= set(_describe(capsys, path, "LoHa + LoKr: LyCORIS layout"))

    only_lokr = {k: v for k, v in sd.items() if k.startswith(lokr)}
    s = summarize_lora(save_lora(tmp_path / "lokr.safetensors", only_lokr))
    assert s.kind == "LoKr" and s.rank == 4 and s.layouts == ["LyCORIS"]


def test_text_encoder_lora(capsys, tmp_path):
    models = tiny_models(3, "clip_l", "clip_g", "t5")
    add_lora(models["clip_l"], 2, targets=("self_attn.q_proj", "mlp.fc1"))
    add_lora(models["clip_g"], 2, targets=("mlp.fc2",))
    add_lora(models["t5"], 2, targets=("SelfAttention.v",))
    path = save_lora(tmp_path / "te.safetensors", export_lora(models), export_metadata(models))
    lines = _describe(capsys, path, "LoRA: kohya layout")
    assert {
        "  CLIP-L    6 layers in layers 0-2: self_attn.q_proj, mlp.fc1",
        "  CLIP-G    3 layers in layers 0-2: mlp.fc2",
        "  T5-XXL    2 layers in blocks 0-1: SelfAttention.v",
        "  made for  unknown (it changes only text encoders, which SD3 and SD3.5 share)",
    } <= set(lines)
    assert not any("MMDiT-X" in line for line in lines)


@pytest.mark.parametrize(
    "keys,family",
    [
        (["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "SDXL"),
        (["lora_unet_double_blocks_0_img_attn_qkv"], "Flux"),
    ],
)  # fmt: skip
def test_foreign_lora_is_described_not_refused(capsys, tmp_path, keys, family):
    sd = {}
    for key in keys:
        sd |= {f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4)}
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    lines = _describe(capsys, save_lora(tmp_path / "other.safetensors", sd), f"LoRA for {family}")
    assert lines[1].startswith(f"  made for  {family} (its keys name")
    assert lines[1].endswith("; sd35 cannot apply it")
    assert {"  kind      LoRA", "  rank      4"} <= set(lines)
    assert not any("MMDiT-X" in line or "unmatched" in line for line in lines)


def test_foreign_by_metadata(tmp_path):
    key = "lora_unet_something_new"
    sd = {f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2)}
    s = summarize_lora(save_lora(tmp_path / "x.safetensors", sd, {"ss_base_model_version": "sdxl_base_v1-0"}))
    assert s.foreign == "SDXL" and "ss_base_model_version = sdxl_base_v1-0" in s.foreign_evidence
    assert s.kind == "LoRA" and s.rank == 2


def test_base_model_from_shapes_and_kohya_metadata(tmp_path):
    """The hidden width names the release when no metadata does; kohya's modelspec.architecture wins over it."""
    h = 1536
    key = "lora_unet_joint_blocks_0_x_block_attn2_qkv"
    sd = {f"{key}.lora_down.weight": torch.zeros(1, h), f"{key}.lora_up.weight": torch.zeros(3 * h, 1)}
    s = summarize_lora(save_lora(tmp_path / "medium.safetensors", sd))
    assert (s.base, s.base_evidence) == ("SD3.5 Medium", "hidden size 1536 and attn2 layers")
    meta = {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}
    s = summarize_lora(save_lora(tmp_path / "tagged.safetensors", sd, meta))
    assert (
        s.base == "SD3.5 Large"
        and s.base_evidence == "modelspec.architecture = stable-diffusion-3-5-large/lora"
    )
    key = "lora_unet_joint_blocks_30_x_block_attn_proj"
    sd = {f"{key}.lora_down.weight": torch.zeros(1, 64), f"{key}.lora_up.weight": torch.zeros(64, 1)}
    assert summarize_lora(save_lora(tmp_path / "large.safetensors", sd)).base == "SD3.5 Large"


@pytest.mark.parametrize(
    "value,family",
    [
        ("stable-diffusion-3-5-medium/lora", "SD3.5 Medium"),
        ("stable-diffusion-3-5-large/lora", "SD3.5 Large"),
        ("stable-diffusion-3-medium/lora", "SD3 Medium"),
        ("sd3_m", "SD3 / SD3.5 Medium"),
        ("stable-diffusion-xl-v1-base/lora", "SDXL"),
        ("flux-1-dev/lora", "Flux"),
        ("sd_v1", "SD1.x/SD2.x"),
        ("5-medium", "SD3.5 Medium"),
        ("lumina-2/lora", None),
    ],
)
def test_family_from_name(value, family):
    assert family_from_name(value) == family


def test_unmatched_keys_are_counted(capsys, tmp_path):
    sd = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 128),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(384, 2),
        "lora_unet_joint_blocks_0_x_block_no_such_layer.lora_down.weight": torch.zeros(2, 128),
        "lora_unet_joint_blocks_0_x_block_no_such_layer.lora_up.weight": torch.zeros(128, 2),
    }
    lines = _describe(capsys, save_lora(tmp_path / "odd.safetensors", sd), "LoRA: kohya layout")
    assert "  MMDiT-X   1 layer in joint block 0: x_block.attn.qkv" in lines
    odd = "lora_unet_joint_blocks_0_x_block_no_such_layer"
    assert (
        f"  unmatched 2 tensors fit no SD3-family layer (first: '{odd}.lora_down.weight', '{odd}" in lines[-1]
    )


def test_lora_next_to_models_is_no_pipeline_part(capsys, tiny, trained, tmp_path):
    models = tiny_models(3, "clip_l")
    add_lora(models["clip_l"], 2, targets=("q_proj",))
    te_lora = save_lora(tmp_path / "clip.safetensors", export_lora(models), export_metadata(models))
    code, out = _inspect(capsys, tiny["official"], trained[0], te_lora)
    assert code == 0
    assert "[official single file]" in out and f"{trained[0]}  [LoRA: kohya layout]" in out
    assert f"{te_lora}  [LoRA: kohya layout]" in out and "  CLIP-L    3 layers" in out
    missing = out.split("still lacks:")[1]
    assert "CLIP-L" in missing and "CLIP-G" in missing and "T5-XXL" in missing  # a CLIP LoRA is no CLIP
    assert "LoRA" not in missing
    code, out = _inspect(capsys, trained[1], tiny["all_in_one"])  # blocks in the order of the paths
    assert code == 0 and "Complete" in out
    assert out.index("[LoRA: diffusers layout]") < out.index("[all-in-one")
