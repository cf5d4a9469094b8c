"""Image and latent nodes over tiny random weights: ComfyUI's SD3.5 example graph rebuilt as img2img
(LoadImage -> VAEEncode -> KSampler denoise 0.6), inpainting (an image with alpha through
InpaintModelConditioning, SetLatentNoiseMask or VAEEncodeForInpaint) and a two-pass hires fix (in latent
space and through pixels). The img2img and inpainting images are bit for bit what ``sd35 generate`` makes
with ``--edit-mode comfyui`` (one sampling path); chains equal the pipeline's runs from the latents the
nodes made; KSamplerAdvanced split in two with leftover noise is KSampler's run. Bad image names, paths,
links out of the input folder and mismatched masks fail before anything runs, naming the node and input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd35.errors import WorkflowError
from sd35.imaging import comfy_latent_mask
from sd35.models.vae import latent_to_model, model_to_latent
from sd35.pipeline import LatentStart
from sd35.request import Edit
from sd35.workflows import pixels as px
from sd35.workflows.evaluate import EncodedLatent, LoadedImage, Start
from sd35.workflows.execute import Executor
from sd35.workflows.graph import Source
from sd35.workflows.models import ModelsDir
from sd35.workflows.run import prepare, run_plan
from tests.helpers import pixel_diff, pixels, run_cli
from tests.workflows.conftest import TE_NAMES
from tests.workflows.test_workflows import SEED, SIZE, STEPS, _equivalent, sd35_example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """ComfyUI's input folder: a photo, the photo with a transparent (repaint) half, odd sizes."""
    root = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "photo.png")
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[:, SIZE // 2 :] = 0
    alpha[:, SIZE // 2 - 4 : SIZE // 2] = 128
    Image.fromarray(np.dstack([rgb, alpha])).save(root / "masked.png")
    Image.fromarray(rng.integers(0, 256, (SIZE // 2, SIZE), dtype=np.uint8)).save(root / "wide_mask.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "odd.png")
    (root / "broken.png").write_text("not an image")
    return root


def _plan(workflow, models, inputs):
    return prepare(Source(copy.deepcopy(workflow)), ModelsDir(models), input_dir=inputs)


def _run(workflow, models, inputs, loaded, out):
    source = Source(copy.deepcopy(workflow))
    plan = prepare(source, ModelsDir(models), input_dir=inputs)
    return plan, run_plan(plan, source, out, loaded)


def _saved(result, node="9"):
    return [Image.open(p).convert("RGB") for p in result.files[node]]


def img2img(denoise=0.6, image="photo.png") -> dict:
    workflow = sd35_example()
    del workflow["135"]
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    workflow["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    workflow["3"]["inputs"].update(latent_image=["12", 0], denoise=denoise)
    return workflow


def inpainting(node: str) -> dict:
    """The masked photo (transparent = repaint) through one of ComfyUI's inpainting nodes."""
    workflow = img2img(1.0, "masked.png")
    ks = workflow["3"]["inputs"]
    if node == "InpaintModelConditioning":
        del workflow["12"]
        workflow["20"] = {
            "class_type": node,
            "inputs": {"positive": ["6", 0], "negative": ["69", 0], "vae": ["4", 2], "pixels": ["10", 0]}
            | {"mask": ["10", 1], "noise_mask": True},
        }
        ks.update(positive=["20", 0], negative=["20", 1], latent_image=["20", 2])
    elif node == "SetLatentNoiseMask":
        workflow["20"] = {"class_type": node, "inputs": {"samples": ["12", 0], "mask": ["10", 1]}}
        ks.update(latent_image=["20", 0])
    else:
        del workflow["12"]
        workflow["20"] = {
            "class_type": node,
            "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6},
        }
        ks.update(latent_image=["20", 0])
    return workflow


def hires(through_pixels: bool, method: str = "bicubic") -> dict:
    """ComfyUI's two-pass hires fix: the example's image upscaled 1.5x (in latent space, or decoded,
    scaled and encoded again), then a second KSampler at denoise 0.5."""
    workflow = sd35_example()
    second = copy.deepcopy(workflow["3"])
    second["inputs"].update(seed=SEED + 1, denoise=0.5, latent_image=["30", 0])
    workflow["31"] = second
    if through_pixels:
        workflow["40"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
        workflow["41"] = {
            "class_type": "ImageScale",
            "inputs": {"image": ["40", 0], "upscale_method": "bicubic", "width": 48, "height": 48}
            | {"crop": "disabled"},
        }
        workflow["30"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["41", 0], "vae": ["4", 2]}}
    else:
        workflow["30"] = {
            "class_type": "LatentUpscaleBy",
            "inputs": {"samples": ["3", 0], "upscale_method": method, "scale_by": 1.5},
        }
    workflow["231"]["inputs"]["samples"] = ["31", 0]
    return workflow


def test_img2img_is_sd35_generate_with_comfyui_edit_mode(models, inputs, loaded, tmp_path):
    plan, result = _run(img2img(), models, inputs, loaded, tmp_path)
    sampling = plan.outputs[0].image.sampling
    assert sampling.request == _equivalent()
    photo = LoadedImage(inputs / "photo.png", SIZE, SIZE, 1)
    assert sampling.start == Start(EncodedLatent(photo, sampling.start.latent.vae), denoise=0.6)
    edit = Edit(image=Image.open(inputs / "photo.png"), strength=0.6, mode="comfyui")
    want = loaded(sampling.load).run(_equivalent(edit=edit)).images
    assert np.array_equal(pixels(_saved(result)[0]), pixels(want[0]))
    full = loaded(sampling.load).run(_equivalent(edit=Edit(image=edit.image, strength=1.0)))
    assert pixel_diff(want[0], full.images[0]).max() > 0  # the denoise is not ignored


@pytest.mark.parametrize("node", ["InpaintModelConditioning", "SetLatentNoiseMask"])
def test_inpainting_is_sd35_generate_with_the_alpha_mask(node, models, inputs, loaded, tmp_path):
    plan, result = _run(inpainting(node), models, inputs, loaded, tmp_path)
    sampling = plan.outputs[0].image.sampling
    rgba = Image.open(inputs / "masked.png")
    mask = Image.fromarray(255 - np.asarray(rgba.getchannel("A")))  # LoadImage's mask: 1 - alpha
    edit = Edit(image=rgba.convert("RGB"), mask=mask, mask_blur=0, strength=1.0, mode="comfyui")
    want = loaded(sampling.load).run(_equivalent(edit=edit)).images[0]
    got = _saved(result)[0]
    assert np.array_equal(pixels(got), pixels(want))
    plain = loaded(sampling.load).run(_equivalent()).images[0]
    left = np.s_[:, : SIZE // 2 - 8]  # opaque: kept (through the VAE), unlike a plain txt2img
    assert pixel_diff(got, plain)[left].max() > pixel_diff(got, want)[left].max()


def test_vae_encode_for_inpaint_keeps_the_filled_latent_outside_the_grown_mask(models, inputs, loaded):
    plan = _plan(inpainting("VAEEncodeForInpaint"), models, inputs)
    sampling = plan.outputs[0].image.sampling
    executor = Executor(loaded)
    result = executor.run(sampling).result
    encoded, noise_mask = executor.latent(sampling.start.latent, sampling.load)
    assert noise_mask.unique().tolist() == [0.0, 1.0]  # rounded and grown, as ComfyUI's
    keep = comfy_latent_mask(noise_mask, SIZE // 8, SIZE // 8)[0, 0] == 0
    assert keep.any() and not keep.all()
    final = result.latents[0].cpu()
    assert torch.equal(final[0][:, keep], encoded[0][:, keep])
    other = _plan(inpainting("InpaintModelConditioning"), models, inputs).outputs[0].image.sampling
    assert not torch.equal(executor.latent(other.start.latent, other.load)[0], encoded)  # grey under the mask


@pytest.mark.parametrize(
    "through_pixels, method",
    [(False, "bicubic"), (False, "bislerp"), (True, "bicubic")],
    ids=["latent", "bislerp", "pixels"],
)
def test_hires_fix_is_a_second_sampling_from_the_upscaled_first(
    through_pixels, method, models, loaded, tmp_path
):
    plan, result = _run(hires(through_pixels, method), models, None, loaded, tmp_path)
    sampling = plan.outputs[0].image.sampling
    assert sampling.request == _equivalent(width=48, height=48, seed=SEED + 1)
    pipe = loaded(sampling.load)
    first = pipe.run(_equivalent()).latents[0]
    if through_pixels:
        image = px.upscale(px.from_vae(pipe.decode_pixels(first)).movedim(-1, 1), 48, 48, "bicubic")
        start = pipe.encode_pixels(px.to_vae(image.movedim(1, -1)))
    else:
        start = latent_to_model(px.upscale(model_to_latent(first), 6, 6, method))
    want = pipe.run(sampling.request, start=LatentStart(start, denoise=0.5)).images[0]
    got = _saved(result)[0]
    assert got.size == (48, 48)
    assert np.array_equal(pixels(got), pixels(want))


def test_ksampler_advanced_in_two_stages_is_ksampler(models, inputs, loaded, tmp_path):
    """Stage 1 stops after 2 of 4 steps with its leftover noise; stage 2 adds none and finishes: the
    image is the one-stage KSampler's, up to the rounding of ComfyUI's x / (1 - sigma) hand-over."""
    one = sd35_example()
    one["3"]["inputs"]["sampler_name"] = "euler"
    _, single = _run(one, models, inputs, loaded, tmp_path / "one")
    two = copy.deepcopy(one)
    ks = two["3"]["inputs"]
    ks.pop("denoise")
    common = ks | {"noise_seed": ks.pop("seed")}
    two["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": common | {"add_noise": "enable", "start_at_step": 0, "end_at_step": 2}
        | {"return_with_leftover_noise": "enable"},
    }  # fmt: skip
    two["5"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": common | {"add_noise": "disable", "start_at_step": 2, "end_at_step": 10000}
        | {"return_with_leftover_noise": "disable", "latent_image": ["3", 0]},
    }  # fmt: skip
    two["231"]["inputs"]["samples"] = ["5", 0]
    plan, split = _run(two, models, inputs, loaded, tmp_path / "two")
    start = plan.outputs[0].image.sampling.start
    assert (start.start_step, start.last_step, start.add_noise) == (2, 10000, False)
    assert pixel_diff(_saved(split)[0], _saved(single)[0]).max() <= 1
    leftover = copy.deepcopy(two)
    leftover["231"]["inputs"]["samples"] = ["3", 0]  # stage 1 alone: still noisy
    _, noisy = _run(leftover, models, inputs, loaded, tmp_path / "noisy")
    assert pixel_diff(_saved(noisy)[0], _saved(single)[0]).max() > 8


def _set(node, **values):
    return lambda w: w[node]["inputs"].update(values)


def _link_out(inputs, tmp_path):
    """An image name that is a symlink in the input folder to a file outside it."""
    outside = tmp_path / "secret.png"
    Image.new("RGB", (SIZE, SIZE)).save(outside)
    (inputs / "link.png").unlink(missing_ok=True)
    (inputs / "link.png").symlink_to(outside)
    return _set("10", image="link.png")


def _mismatch(w):
    """A 32x16 mask for the 32x32 image."""
    w["20"] = {"class_type": "LoadImageMask", "inputs": {"image": "wide_mask.png", "channel": "red"}}
    w["21"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["20", 0], "grow_mask_by": 6},
    }
    w["3"]["inputs"]["latent_image"] = ["21", 0]


BAD = {  # case: (workflow, change to it, node, input, error type, words in the message)
    "unknown": (img2img, _set("10", image="nowhere.png"), "10", "image", "value_not_in_list", "not in the input"),
    "parent": (img2img, _set("10", image="../photo.png"), "10", "image", "invalid_image_name", "is a path"),
    "absolute": (img2img, _set("10", image="/etc/photo.png"), "10", "image", "invalid_image_name", "is a path"),
    "output": (img2img, _set("10", image="x.png [output]"), "10", "image", "invalid_image_name", "input folder only"),
    "link": (img2img, _link_out, "10", "image", "invalid_image_name", "outside the input folder"),
    "broken": (img2img, _set("10", image="broken.png"), "10", "image", "invalid_input", "not an image"),
    "mask-size": (img2img, _mismatch, "21", "mask", "invalid_input", "the mask is 32x16"),
    "odd-size": (img2img, _set("10", image="odd.png"), "3", "latent_image", "unsupported", "multiples of 16"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_inputs_name_the_node_and_input(case, models, inputs, tmp_path):
    make, change, node, name, kind, says = BAD[case]
    workflow = make()
    if change is _link_out:
        change = _link_out(inputs, tmp_path)
    change(workflow)
    with pytest.raises(WorkflowError) as info:
        _plan(workflow, models, inputs)
    error = info.value.node_errors[node]["errors"][0]
    assert (error["type"], error["extra_info"]["input_name"]) == (kind, name)
    assert says in error["message"]
    assert info.value.message.startswith(f"workflow: node {node} (")


def test_without_an_input_folder_image_names_are_missing(models):
    with pytest.raises(WorkflowError) as info:
        _plan(img2img(), models, None)
    assert "--input-dir" in info.value.node_errors["10"]["errors"][0]["message"]


def test_sd35_run_reads_input_beside_the_models_folder(capsys, tiny, models, inputs, tmp_path):
    root = tmp_path / "ComfyUI"
    root.mkdir()
    (root / "models").symlink_to(models)
    (root / "input").symlink_to(inputs)
    path = tmp_path / "img2img.json"
    path.write_text(json.dumps(img2img()))
    base = ["--tokenizers", str(tiny["diffusers"]), "--device", "cpu", "--dtype", "fp32"]
    code, stdout, err = run_cli(
        capsys, "run", str(path), "--models-dir", str(root / "models"), *base, "-o", str(tmp_path / "out")
    )
    assert code == 0, err
    te = tiny["text_encoders"]
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny["official"]), "--text-encoders",
        *(str(te / n) for n in TE_NAMES), *base, "--prompt", "a (red:1.2) fox in snow", "--negative-prompt",
        "blurry, lowres", "--steps", str(STEPS), "--cfg", "4.5", "--sampler", "dpmpp_2m", "--scheduler",
        "sgm_uniform", "--shift", "3", "--seed", str(SEED), "--noise", "comfyui", "--batch-noise", "batch",
        "--weighting", "comfy", "--negative-until", "0.1", "--init-image", str(inputs / "photo.png"),
        "--strength", "0.6", "--edit-mode", "comfyui", "-o", str(tmp_path / "generate.png"),
    )  # fmt: skip
    assert code == 0, err
    made = Image.open(tmp_path / "out" / "ComfyUI_00001_.png").convert("RGB")
    assert np.array_equal(pixels(made), pixels(Image.open(tmp_path / "generate.png").convert("RGB")))
    code, _, err = run_cli(
        capsys, "run", str(path), "--models-dir", str(models), "--input-dir", str(tmp_path / "no")
    )
    assert code != 0 and "no such input folder" in err


def test_an_image_graph_without_a_sampler_saves_comfyuis_pixels(models, inputs, loaded, tmp_path):
    """LoadImage -> ImageScaleBy -> SaveImage: SaveImage writes the scaled IMAGE as ComfyUI does (255 x,
    clipped, truncated), and nothing is loaded."""
    workflow = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "11": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["10", 0], "upscale_method": "bicubic", "scale_by": 1.5},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "scaled"}},
    }

    def no_loading(spec):
        raise AssertionError("nothing to load")

    source = Source(copy.deepcopy(workflow))
    result = run_plan(_plan(workflow, models, inputs), source, tmp_path, no_loading)
    (saved,) = _saved(result)
    image = px.load_image(inputs / "photo.png")[0]
    want = px.to_pil(px.upscale(image.movedim(-1, 1), 48, 48, "bicubic").movedim(1, -1))[0]
    assert saved.size == (48, 48) and np.array_equal(pixels(saved), pixels(want))
    assert json.loads(Image.open(result.files["9"][0]).text["prompt"]) == workflow
