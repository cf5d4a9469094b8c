"""``sd35 generate`` as a newcomer uses it: the built-in demo model, its own defaults, and one clear line for every
mistake, found before any weight is read."""

from __future__ import annotations

import os
import re

import pytest
from PIL import Image

from sd35 import __version__
from sd35.demo import DEMO_DEFAULTS, MODEL_FILE, WEIGHTS, load_demo_pipeline
from sd35.presets import SD35_MEDIUM
from tests.helpers import noise_image, run_cli


def _demo(capsys, tmp_path, *extra, name="out.png"):
    return run_cli(capsys, "generate", "--demo", "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                   "-o", str(tmp_path / name), *extra)  # fmt: skip


def _params(path: str) -> str:
    return Image.open(path.strip()).text["parameters"]


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"sd35 {__version__}"


def test_help_names_each_models_defaults(capsys):
    code, out, _ = run_cli(capsys, "generate", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert (
        f"default: the model's: SD3.5 Medium {SD35_MEDIUM.steps}, SD3.5 Large 40, SD3.5 Large Turbo 4, "
        f"SD3 Medium 50, demo {DEMO_DEFAULTS.steps}" in text
    )
    assert "SD3.5 Large Turbo 1.0, SD3 Medium 5.0" in text  # --cfg
    assert "SD3.5 Medium 7,8,9, SD3.5 Large 7,8,9, SD3.5 Large Turbo 7,8,9, SD3 Medium 7,8,9, demo 2" in text
    assert "--init-image" in text and "--hires-scale" in text and "--t5-max-tokens" in text


def test_demo_from_python_uses_its_own_defaults():
    image = load_demo_pipeline().generate("a red circle", steps=2, seed=1)[0]
    assert image.size == (DEMO_DEFAULTS.width, DEMO_DEFAULTS.height)
    assert "Sampler: Euler," in image.info["parameters"] and "CFG scale: 4.0" in image.info["parameters"]


def test_demo_file_carries_its_defaults():
    from sd35 import load_pipeline

    assert load_pipeline(MODEL_FILE, tokenizers=WEIGHTS, device="cpu").defaults == DEMO_DEFAULTS


def test_demo_slg_alone_takes_the_models_layers(capsys, tmp_path):
    code, out, err = _demo(capsys, tmp_path, "--slg")
    assert code == 0, err
    params = _params(out)
    assert "SLG layers: 2," in params and "SLG scale: 2.0" in params and "SLG end: 0.3" in params


def test_demo_beyond_its_trained_size_warns(capsys, tmp_path):
    code, out, err = _demo(capsys, tmp_path, "--width", "128")
    assert code == 0 and Image.open(out.strip()).size == (128, 64)
    assert "sd35: warning: 128x64 is beyond the 64 px this model (sd35_demo) was trained at" in err
    code, out, err = _demo(capsys, tmp_path, "--hires", name="h.png")
    assert code == 0 and Image.open(out.strip()).size == (128, 128) and "128x128 is beyond" in err


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    noise_image(72, 48, seed=2, high=255).save(path)
    return path


def test_demo_img2img_keeps_the_init_images_size(capsys, tmp_path, photo):
    code, out, err = _demo(capsys, tmp_path, "--init-image", str(photo), "--strength", "0.5")
    assert code == 0 and Image.open(out.strip()).size == (64, 48)  # 72x48 rounded down to multiples of 16
    assert "the init image is 72x48; it is resized to 64x48" in err


def test_demo_outpaint_makes_the_wider_canvas(capsys, tmp_path, photo):
    code, out, err = _demo(capsys, tmp_path, "--init-image", str(photo), "--outpaint", "32,0,24,16")
    assert code == 0 and Image.open(out.strip()).size == (128, 64)  # 72+32+24 = 128, 48+16 = 64
    assert "beyond the 64 px" in err and 'Outpaint: "32,0,24,16"' in _params(out)


def test_seed_minus_one_is_random(capsys, tmp_path):
    seeds = set()
    for i in range(2):
        code, out, _ = run_cli(capsys, "generate", "--demo", "--prompt", "x", "--steps", "1", "--seed", "-1",
                               "-o", str(tmp_path / f"r{i}.png"))  # fmt: skip
        assert code == 0
        seeds.add(re.search(r"Seed: (\d+)", _params(out)).group(1))
    assert len(seeds) == 2


def test_png_mode_follows_the_umask(capsys, tmp_path):
    old = os.umask(0o022)
    try:
        code, out, _ = _demo(capsys, tmp_path)
    finally:
        os.umask(old)
    assert code == 0 and os.stat(out.strip()).st_mode & 0o777 == 0o644


def test_infotext_records_what_changes_pixels(capsys, tmp_path):
    code, out, _ = _demo(capsys, tmp_path, "--weighting", "comfy", "--long-clip", "--t5-max-tokens", "77")
    params = _params(out)
    assert code == 0
    assert (
        "Prompt weighting: comfy" in params and "Long CLIP: True" in params and "T5 max tokens: 77" in params
    )


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--init-image", "{photo}", "--steps", "0"], "--steps: steps must be a positive integer"),
        (["--lora", "{tmp}/missing.safetensors"], "--lora: {tmp}/missing.safetensors: no such LoRA file"),
        (["--width", "0"], "--width: width must be a positive multiple of 16"),
        (["-o", "/proc/out.png"], "cannot write files in this folder"),
    ],
)
def test_request_mistakes_are_found_before_loading(capsys, tmp_path, photo, extra, says):
    """The model path does not exist: an error about the request proves nothing was loaded first."""
    extra = [e.format(photo=photo, tmp=tmp_path) for e in extra]
    args = [
        "generate",
        "--model",
        str(tmp_path / "no-such-model"),
        "--prompt",
        "x",
        "-o",
        str(tmp_path / "a.png"),
    ]
    code, _, err = run_cli(capsys, *args, *extra)
    assert code == 2 and err.startswith("sd35: error: ") and says.format(tmp=tmp_path) in err
    assert len(err.strip().splitlines()) == 1


def test_text_encoder_folder_as_model_is_named_as_such(capsys, tiny, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny["text_encoders"]), "--prompt", "x",
                           "-o", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and "--model: " in err and "holds CLIP-G, CLIP-L, T5-XXL but no MMDiT-X" in err
    assert "as the text encoders" in err
