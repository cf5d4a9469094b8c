"""``sd35 generate --control ...``: repeatable units, their infotext, and one line with exit code 2 for bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.configs import tiny_configs
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.helpers import noise_image, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cncli")
    cn = write_controlnet(diffusers_controlnet(tiny_configs().mmditx, seed=2), root / "canny-tiny")
    png = root / "control.png"
    noise_image(32, 32, seed=1).save(png)
    foreign = save_file_atomic(
        {
            "controlnet_cond_embedding.conv_in.weight": torch.zeros(1),
            "add_embedding.linear_1.weight": torch.zeros(1),
        },
        root / "sdxl-canny.safetensors",
    )
    return cn, png, foreign


def _gen(capsys, tiny, out, *extra):
    args = ["generate", "--model", str(tiny["diffusers"]), "--prompt", "a cat", "--width", "32", "--height", "32",
            "--steps", "2", "--seed", "4", "-o", str(out), *extra]  # fmt: skip
    return run_cli(capsys, *args)


def test_two_units_from_the_cli(capsys, tiny, tmp_path, files):
    cn, png, _ = files
    out = tmp_path / "cn.png"
    code, stdout, err = _gen(capsys, tiny, out, "--control", str(cn), "--control-image", str(png),
                             "--control-preprocess", "canny", "--control-strength", "0.6",
                             "--control", str(cn), "--control-image", str(png), "--control-end", "0.5",
                             "--control-resize-mode", "resize_and_fill")  # fmt: skip
    assert code == 0, err
    text = Image.open(out).text["parameters"]
    assert (
        'ControlNet 0: "Module: canny, Model: canny-tiny, Weight: 0.6, Resize Mode: Crop and Resize' in text
    )
    assert 'ControlNet 1: "Module: none, Model: canny-tiny, Weight: 1, Resize Mode: Resize and Fill' in text
    assert "Guidance End: 0.5" in text


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--control-image", "x.png"], "--control-image needs a --control FILE before it"),
        (["--control", "CN"], "needs --control-image IMG"),
        (
            ["--control", "CN", "--control-image", "PNG", "--control-strength", "-1"],
            "--control-strength: ControlNet strength",
        ),
        (
            ["--control", "CN", "--control-image", "PNG", "--control-start", "0.8", "--control-end", "0.2"],
            "--control-start",
        ),
        (["--control", "CN", "--control-image", "missing.png"], "missing.png"),
        (["--control", "nowhere", "--control-image", "PNG"], "no such ControlNet"),
        (["--control", "FOREIGN", "--control-image", "PNG"], "is an SDXL ControlNet"),
    ],
)
def test_bad_control_options_exit_2(capsys, tiny, tmp_path, files, extra, says):
    cn, png, foreign = files
    extra = [{"CN": str(cn), "PNG": str(png), "FOREIGN": str(foreign)}.get(a, a) for a in extra]
    code, _, err = _gen(capsys, tiny, tmp_path / "x.png", *extra)
    assert code == 2 and err.startswith("sd35: error: ") and says in err, err
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_inspect_describes_controlnets_and_the_model_flag_refuses_one(capsys, tiny, tmp_path, files):
    cn, png, foreign = files
    code, out, _ = run_cli(capsys, "inspect", str(cn), str(foreign))
    assert code == 0
    assert f"{cn}  [ControlNet]" in out
    assert (
        "SD3 ControlNet for an MMDiT-X of width 128 (diffusers layout): 2 blocks, hidden 128, dual attention"
        in out
    )
    assert "an SDXL ControlNet: not for SD3-family models" in out
    code, _, err = run_cli(
        capsys, "generate", "--model", str(cn), "--prompt", "x", "-o", str(tmp_path / "x.png")
    )
    assert code == 2 and "a ControlNet (pass it with --control" in err
