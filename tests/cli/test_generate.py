"""``sd35 generate``: the PNG and its A1111 parameters, never overwriting, the editing toolkit, LoRA files, and one
clear line with exit code 2 for bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.helpers import noise_image, pixels, run_cli

A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's infotext parser


def _gen(capsys, tiny, out, *extra):
    args = [
        "generate",
        "--model",
        str(tiny["diffusers"]),
        "--prompt",
        "a red circle, photo",
        "--negative-prompt",
        "blurry",
        "--width",
        "32",
        "--height",
        "48",
        "--steps",
        "2",
        "--seed",
        "9",
        "-o",
        str(out),
        *extra,
    ]
    return run_cli(capsys, *args)


def test_generate_writes_png_with_a1111_parameters(capsys, tiny, tmp_path):
    out = tmp_path / "cat.png"
    code, stdout, _ = _gen(capsys, tiny, out, "--slg", "--slg-layers", "1")
    assert code == 0 and stdout.strip() == str(out)
    image = Image.open(out)
    assert image.size == (32, 48)
    prompt, negative, settings = image.text["parameters"].split("\n")
    assert prompt == "a red circle, photo" and negative == "Negative prompt: blurry"
    pairs = {k: v.strip('"') for k, v in A1111_PAIR.findall(settings)}
    assert pairs["Steps"] == "2" and pairs["Sampler"] == "DPM++ 2M" and pairs["CFG scale"] == "5.0"
    assert pairs["Seed"] == "9" and pairs["Size"] == "32x48" and pairs["Model"] == "diffusers"
    assert pairs["SLG layers"] == "1" and pairs["SLG scale"] == "2.5" and pairs["SLG end"] == "0.2"


def test_generate_never_overwrites(capsys, tiny, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    code, stdout, _ = _gen(capsys, tiny, out, "--num-images", "2")
    assert code == 0
    assert out.read_bytes() == b"precious"
    assert stdout.split() == [str(tmp_path / "img-1.png"), str(tmp_path / "img-2.png")]
    assert "Seed: 10" in Image.open(tmp_path / "img-2.png").text["parameters"]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--width", "50"], "use 48 or 64"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--slg-start", "0.5", "--slg-end", "0.1"], "start"),
        (["--slg-layers", "seven"], "--slg-layers"),
        (["--device", "cpu", "--fp8"], "--fp8: fp8 needs a CUDA GPU"),
        (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs: cuda_graphs needs a CUDA GPU"),
        (
            ["--device", "cpu", "--compile", "--memory", "low"],
            "--memory: compile and cuda_graphs do not work",
        ),
        (["--width", "0"], "--width: width must be a positive multiple of 16"),
        (["--seed", "99999999999999999999999"], "--seed: seed must be a whole number from 0 to"),
        (["--device", "gpu0"], "--device: 'gpu0' is not a device name"),
        (["--device", "cuda"], "--device: device 'cuda': this machine's torch"),
        (["--device", "mps"], "--device: device 'mps': no Apple GPU"),
        (["-o", "/proc/x.png"], "cannot write files in this folder"),
        (["--sampler", "euler_a"], "argument --sampler: invalid choice"),
    ],
)
def test_generate_bad_arguments_exit_2(capsys, tiny, tmp_path, extra, says):
    code, _, err = _gen(capsys, tiny, tmp_path / "x.png", *extra)
    assert code == 2 and err.startswith("sd35: error: ") and says in err
    assert not list(tmp_path.iterdir())


def test_memory_modes_and_vae_tiling_give_the_same_image(capsys, tiny, tmp_path):
    images = []
    for i, extra in enumerate(
        (
            [],
            ["--memory", "balanced", "--vae-tiling", "on"],
            ["--memory", "low"],
        )
    ):
        out = tmp_path / f"m{i}.png"
        code, _, err = _gen(capsys, tiny, out, "--device", "cpu", *extra)
        assert code == 0, err
        images.append(pixels(Image.open(out)))
    for other in images[1:]:
        assert np.abs(other - images[0]).max() <= 1


def test_generate_missing_parts_exit_2(capsys, tiny, tmp_path):
    base = ["generate", "--prompt", "x", "-o", str(tmp_path / "x.png")]
    code, _, err = run_cli(capsys, *base, "--model", str(tiny["official"]))
    assert code == 2 and "CLIP-L" in err and "--text-encoders" in err
    code, _, err = run_cli(
        capsys, *base, "--model", str(tiny["official"]), "--text-encoders", str(tiny["text_encoders"])
    )
    assert code == 2 and "tokenizer" in err and "--tokenizers" in err
    code, _, err = run_cli(capsys, *base, "--model", str(tiny["diffusers"]), "-o", str(tmp_path / "x.jpg"))
    assert code == 2 and ".png" in err


def test_generate_from_split_files_warns_without_t5(capsys, tiny, tmp_path):
    te = tiny["text_encoders"]
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny["official"]),
        "--text-encoders",
        str(te / "clip_l.safetensors"),
        str(te / "clip_g.safetensors"),
        "--tokenizers",
        str(tiny["diffusers"]),
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "-o",
        str(tmp_path / "x.png"),
    )
    assert code == 0 and "sd35: warning: no T5-XXL" in err


# --- the editing toolkit from the command line ------------------------------------------------


@pytest.fixture()
def init_png(tmp_path):
    path = tmp_path / "init.png"
    noise_image(64, 48, seed=1, high=255).save(path)
    return path


def _edit(capsys, tiny, tmp_path, *extra):
    return run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny["diffusers"]),
        "--prompt",
        "a blue circle",
        "--steps",
        "2",
        "--seed",
        "3",
        "-o",
        str(tmp_path / "out.png"),
        *extra,
    )


def test_img2img_inpaint_outpaint_from_the_cli(capsys, tiny, tmp_path, init_png):
    code, out, _ = _edit(capsys, tiny, tmp_path, "--init-image", str(init_png), "--strength", "0.5")
    assert code == 0 and Image.open(out.strip()).size == (64, 48)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 48), 255).save(mask)
    code, out, _ = _edit(capsys, tiny, tmp_path, "--init-image", str(init_png), "--mask", str(mask))
    assert code == 0 and "Mask blur: 8.0" in Image.open(out.strip()).text["parameters"]
    code, out, _ = _edit(capsys, tiny, tmp_path, "--init-image", str(init_png), "--outpaint", "16,0,16,16")
    assert code == 0 and Image.open(out.strip()).size == (96, 64)


def test_hires_scheduler_sampler_apg_weighting_from_the_cli(capsys, tiny, tmp_path):
    code, out, _ = _edit(
        capsys,
        tiny,
        tmp_path,
        "--width",
        "32",
        "--height",
        "32",
        "--hires-scale",
        "1.5",
        "--hires-upscaler",
        "lanczos",
        "--sampler",
        "euler_ancestral",
        "--scheduler",
        "karras",
        "--apg",
        "--apg-eta",
        "0.5",
        "--weighting",
        "comfy",
        "--long-clip",
        "--prompt",
        "a (blue:1.3) circle",
    )
    assert code == 0
    params = Image.open(out.strip()).text["parameters"]
    assert Image.open(out.strip()).size == (48, 48)
    assert "Sampler: Euler a" in params and "Schedule type: Karras" in params and "APG eta: 0.5" in params


def test_prompt_file_and_preview(capsys, tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red square\n\na green circle\n")
    preview = tmp_path / "preview.png"
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny["diffusers"]),
        "--prompt-file",
        str(prompts),
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "3",
        "--preview",
        str(preview),
        "--preview-every",
        "1",
        "-o",
        str(tmp_path / "batch.png"),
    )
    assert code == 0 and len(out.split()) == 2
    assert Image.open(out.split()[1]).text["parameters"].startswith("a green circle")
    assert Image.open(preview).size == (32, 32)


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--mask", "m.png"], "--mask needs --init-image"),
        (["--strength", "0.3", "--mask-blur", "2"], "--strength, --mask-blur need --init-image"),
        (["--lora", "style.safetensors:abc"], "strength after the last ':' must be a number, got 'abc'"),
        (["--hires-scale", "9"], "at most 4"),
        (["--init-image", "nope.png"], "no such init image"),
        (["--apg-momentum", "2"], "momentum"),
        (["--prompt-file", "nope.txt"], "exactly one"),
    ],
)
def test_editing_bad_input_exit_2(capsys, tiny, tmp_path, extra, says):
    code, _, err = _edit(capsys, tiny, tmp_path, *extra)
    assert code == 2 and says in err and err.startswith("sd35: error:")


def test_generate_with_a_lora_file(capsys, tiny, tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 128, generator=g),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(384, 4, generator=g),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    plain = _edit(capsys, tiny, tmp_path, "--width", "32", "--height", "32")
    code, out, _ = _edit(capsys, tiny, tmp_path, "--width", "32", "--height", "32", "--lora", f"{lora}:0.7")
    assert plain[0] == 0 and code == 0
    image = Image.open(out.strip())
    assert 'LoRA: "style:0.7"' in image.text["parameters"]
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(plain[1].strip())))
    code, _, err = _edit(capsys, tiny, tmp_path, "--lora", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no such LoRA file" in err


def test_generate_compiled_on_the_cpu_matches_eager(capsys, tiny, tmp_path):
    """--compile on the CPU: each joint block compiled by inductor's C++ backend gives the eager image, within
    the rounding of reordered float arithmetic (a fused kernel may sum in another order)."""
    eager, compiled = tmp_path / "eager.png", tmp_path / "compiled.png"
    assert _gen(capsys, tiny, eager, "--device", "cpu")[0] == 0
    code, _, err = _gen(capsys, tiny, compiled, "--device", "cpu", "--compile")
    assert code == 0, err
    diff = np.abs(pixels(Image.open(compiled)) - pixels(Image.open(eager)))
    assert diff.max() <= 2, diff.max()
