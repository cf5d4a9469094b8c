"""A separate VAE (``--vae FILE``, ``load_pipeline(vae=...)``) for model files that carry none, or to replace theirs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd35 import load_pipeline
from sd35.errors import CheckpointError, MissingComponentError
from sd35.loading.writers import write_diffusers, write_official, write_text_encoders
from sd35.testing import tiny_weights
from tests.helpers import pixel_diff, run_cli

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=21)


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("vae")
    root = write_diffusers(d / "diffusers", weights)
    bare = write_official(d / "sd3.5_medium_mmditx_only.safetensors", weights, prefixed=False)
    vae = d / "sd3_vae.safetensors"
    save_file(weights.vae, vae)  # ComfyUI's models/vae/: the official keys, no prefix
    te = write_text_encoders(d / "te", weights)
    return {"root": root, "bare": bare, "vae": vae, "te": te, "dir": d}


def _image(pipe):
    return pipe.generate(PROMPT, width=32, height=32, steps=2, seed=3)[0]


@pytest.mark.parametrize("which", ["file", "diffusers vae folder"])
def test_bare_mmditx_with_a_separate_vae_equals_the_whole_model(files, which):
    vae = files["vae"] if which == "file" else files["root"] / "vae"
    pipe = load_pipeline(files["bare"], files["te"], tokenizers=files["root"], vae=vae, device="cpu")
    whole = load_pipeline(files["root"], device="cpu")
    for name, value in whole.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    # same weights; the layouts put tensors at other file offsets, which can move a CPU sum by one rounding
    diff = pixel_diff(_image(pipe), _image(whole))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_given_vae_replaces_the_models_own(files, tmp_path):
    other = tiny_weights(seed=22).vae
    path = tmp_path / "other_vae.safetensors"
    save_file(other, path)
    model = write_official(tmp_path / "sd3.5_medium.safetensors", tiny_weights(seed=21))
    pipe = load_pipeline(model, files["te"], tokenizers=files["root"], vae=path, device="cpu")
    ours = pipe.vae.state_dict()
    assert torch.equal(ours["decoder.conv_in.weight"], other["decoder.conv_in.weight"])


def test_a_model_without_vae_asks_for_one(files):
    with pytest.raises(MissingComponentError, match="carries no VAE.*--vae"):
        load_pipeline(files["bare"], files["te"], tokenizers=files["root"], device="cpu")


def test_wrong_vae_files_are_refused(files, weights, tmp_path):
    te_file = files["te"][0]
    with pytest.raises(MissingComponentError, match="CLIP-L.*not a VAE alone"):
        load_pipeline(files["bare"], files["te"], tokenizers=files["root"], vae=te_file, device="cpu")
    with pytest.raises(MissingComponentError, match="MMDiT-X.*not a VAE alone"):
        load_pipeline(files["bare"], files["te"], tokenizers=files["root"], vae=files["root"], device="cpu")
    four = dict(weights.vae)  # a VAE of 4 latent channels (the SD1/SDXL count) without quant convs
    four["encoder.conv_out.weight"] = four["encoder.conv_out.weight"][:8].clone()
    four["encoder.conv_out.bias"] = four["encoder.conv_out.bias"][:8].clone()
    four["decoder.conv_in.weight"] = four["decoder.conv_in.weight"][:, :4].clone()
    save_file(four, tmp_path / "sd1_vae.safetensors")
    with pytest.raises(CheckpointError, match="4 latent channels.*16"):
        load_pipeline(
            files["bare"],
            files["te"],
            tokenizers=files["root"],
            vae=tmp_path / "sd1_vae.safetensors",
            device="cpu",
        )
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline(
            files["bare"], files["te"], tokenizers=files["root"], vae=tmp_path / "absent", device="cpu"
        )


def test_cli_vae_option(files, tmp_path, capsys):
    base = ["generate", "--model", str(files["bare"]), "--text-encoders", *map(str, files["te"])]
    base += ["--tokenizers", str(files["root"]), "--prompt", "x", "--width", "32", "--height", "32"]
    base += ["--steps", "1", "--device", "cpu"]
    code, _, err = run_cli(capsys, *base, "--vae", str(files["vae"]), "-o", str(tmp_path / "a.png"))
    assert code == 0, err
    assert (tmp_path / "a.png").is_file()
    code, _, err = run_cli(capsys, *base, "--vae", str(files["te"][2]), "-o", str(tmp_path / "b.png"))
    assert code == 2 and "--vae" in err and "T5-XXL" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.png").exists()
