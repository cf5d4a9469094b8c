"""ComfyUI's text-encoder loaders, VAEDecodeTiled and ControlNet nodes in ``sd35 run``, over tiny random
weights: DualCLIPLoader (CLIP-L + CLIP-G) is TripleCLIPLoader without T5, VAEDecodeTiled gives the
untiled image within 1/255, a ControlNetApplyAdvanced workflow gives bit for bit the image of
``sd35 generate --control`` with the same settings, and what sd35 cannot run (a CLIP set without both
CLIPs, another family's ControlNet, union types) fails before anything runs, naming the node."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sd35.control.unit import ControlUnit
from sd35.errors import SD35Warning, WorkflowError
from sd35.loading.components import scan
from sd35.loading.safetensors_io import save_file_atomic
from sd35.loading.tensors import materialize
from sd35.testing import tiny_weights
from sd35.workflows.evaluate import ScaledImage, samplings
from sd35.workflows.execute import Executor
from sd35.workflows.graph import Source
from sd35.workflows.models import ModelsDir
from sd35.workflows.run import prepare, run_plan
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.helpers import pixels, run_cli
from tests.workflows.test_workflows import SIZE, TE_NAMES, _equivalent, _run, sd35_example

pytestmark = pytest.mark.usefixtures("one_thread")

CN_NAME = "sd3.5_medium_canny.safetensors"


@pytest.fixture(scope="module")
def models(models, tiny, tmp_path_factory):
    """The shared models folder with a tiny ControlNet in ``controlnet/`` (a diffusers-layout single file, as
    ComfyUI's folder holds them) and, named to sort after it, an inpainting one, one of another width and an
    SD 1.5 ControlNet; the checkpoint's VAE alone in ``vae/ae.safetensors``."""
    (models / "controlnet").mkdir()
    (models / "vae").mkdir()
    vae = next(comp for comp in scan([tiny["official"]]) if comp.kind == "vae")
    save_file_atomic({k: materialize(t) for k, t in vae.tensors.items()}, models / "vae" / "ae.safetensors")
    cfg = tiny_weights(0).configs.mmditx
    for name, net in (
        (CN_NAME, diffusers_controlnet(cfg, layers=2, dual=(0,), seed=5)),
        ("x_inpaint.safetensors", diffusers_controlnet(cfg, layers=1, dual=(), extra=1)),
        ("x_wide.safetensors", diffusers_controlnet(replace(cfg, hidden_size=192), layers=1, dual=())),
    ):
        folder = write_controlnet(net, tmp_path_factory.mktemp("cn"))
        shutil.copy(folder / "diffusion_pytorch_model.safetensors", models / "controlnet" / name)
    sd15 = ("controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight")
    save_file_atomic(
        {k: torch.zeros(1) for k in sd15}, models / "controlnet" / "control_v11p_sd15_canny.safetensors"
    )
    return models


def _prepare(workflow, models):
    return prepare(Source(copy.deepcopy(workflow)), ModelsDir(models))


def _rgb(path) -> np.ndarray:
    return pixels(Image.open(path).convert("RGB"))


def _fails(workflow, models, node, name):
    with pytest.raises(WorkflowError) as info:
        _prepare(workflow, models)
    error = info.value.node_errors[node]["errors"][0]
    assert error["extra_info"].get("input_name") == name
    assert info.value.message.startswith(f"workflow: node {node} ({workflow[node]['class_type']})")
    return info.value.message


# --------------------------------------------------------------------------------- text encoders


def _dual(workflow, *names, kind="sd3", **more):
    workflow["11"] = {
        "class_type": "DualCLIPLoader",
        "inputs": {"clip_name1": names[0], "clip_name2": names[1], "type": kind, **more},
    }
    return workflow


def test_dual_clip_loader_is_triple_without_t5(models, loaded, tmp_path):
    workflow = _dual(sd35_example(), TE_NAMES[0], TE_NAMES[1], device="cpu")
    with pytest.warns(SD35Warning, match="no T5-XXL"):
        plan, result = _run(workflow, models, loaded, tmp_path)
    sampling = plan.outputs[0].image.sampling
    assert sampling.request == _equivalent()
    assert [p.name for p in sampling.load.text_encoders] == list(TE_NAMES[:2])
    pipe = loaded(sampling.load)
    assert pipe.text.t5 is None  # ComfyUI's sd3 CLIP without T5: the CLIP tokens alone
    reference = pipe.run(_equivalent()).images[0]
    assert np.array_equal(_rgb(result.files["9"][0]), pixels(reference))
    _, triple = _run(sd35_example(), models, loaded, tmp_path / "triple")
    assert np.abs(_rgb(triple.files["9"][0]) - _rgb(result.files["9"][0])).max() > 0


@pytest.mark.parametrize(
    "change, node, name, says",
    [
        (lambda w: _dual(w, TE_NAMES[0], TE_NAMES[2]), "11", "clip_name2", "fewer than two CLIP encoders"),
        # a missing name falls back to the encoder it names (T5 here), not to any unused encoder (CLIP-G)
        (
            lambda w: _dual(w, TE_NAMES[0], "t5xxl_fp8_e4m3fn.safetensors"),
            "11",
            "clip_name2",
            "t5xxl_fp16.safetensors hold fewer than two CLIP encoders",
        ),
        (lambda w: _dual(w, TE_NAMES[0], TE_NAMES[1], kind="sdxl"), "11", "type", "use 'sd3'"),
        (
            lambda w: w.update(
                {"11": {"class_type": "CLIPLoader", "inputs": {"clip_name": TE_NAMES[2], "type": "sd3"}}}
            ),
            "11",
            "clip_name",
            "DualCLIPLoader",
        ),
    ],
    ids=["clip_l+t5", "clip_l+missing t5", "sdxl type", "one encoder"],
)
def test_clip_sets_without_both_clips_are_refused(models, change, node, name, says):
    workflow = sd35_example()
    change(workflow)
    assert says in _fails(workflow, models, node, name)


# ------------------------------------------------------------------------------------- tiled VAE


def test_vae_decode_tiled_is_the_untiled_image_within_one_level(models, loaded, tmp_path):
    """Tiles of 64 px (8 latent cells) over a 96x80 image: sd35's exact tiling, so the image is the
    untiled one up to float rounding (at most 1/255 per channel)."""
    workflow = sd35_example()
    workflow["135"]["inputs"].update(width=96, height=80)
    workflow["232"] = {
        "class_type": "VAEDecodeTiled",
        "inputs": {"samples": ["3", 0], "vae": ["4", 2], "tile_size": 64, "overlap": 32},
    }  # temporal_size and temporal_overlap left out, as older workflows do
    workflow["10"] = {"class_type": "SaveImage", "inputs": {"images": ["232", 0], "filename_prefix": "tiled"}}
    plan, result = _run(workflow, models, loaded, tmp_path)
    tiled = next(o for o in plan.outputs if o.node == "10").image
    assert tiled.tiling is not None and tiled.tiling.tile == 8
    pipe = loaded(tiled.sampling.load)
    assert pipe.vae_tiling == "auto" and pipe.tiling.tile != 8  # set back after the run
    untiled, tiles = _rgb(result.files["9"][0]), _rgb(result.files["10"][0])
    assert untiled.shape == tiles.shape == (80, 96, 3)
    assert np.abs(untiled.astype(int) - tiles.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------ ControlNets


def _controlled(apply="ControlNetApplyAdvanced", **inputs) -> dict:
    """The example's first image as the control image of a second sampling (seed 8) with a ControlNet
    over 0-0.6 of the denoising, at strength 0.8; both images saved."""
    workflow = sd35_example()
    workflow["40"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CN_NAME}}
    workflow["41"] = {
        "class_type": apply,
        "inputs": {
            "positive": ["6", 0],
            "negative": ["69", 0],
            "control_net": ["40", 0],
            "image": ["231", 0],
            "strength": 0.8,
            "start_percent": 0.0,
            "end_percent": 0.6,
            "vae": ["4", 2],
            **inputs,
        },
    }
    second = copy.deepcopy(workflow["3"])
    second["inputs"].update(positive=["41", 0], negative=["41", 1], seed=8)
    workflow["42"] = second
    workflow["43"] = {"class_type": "VAEDecode", "inputs": {"samples": ["42", 0], "vae": ["4", 2]}}
    workflow["44"] = {"class_type": "SaveImage", "inputs": {"images": ["43", 0], "filename_prefix": "cn"}}
    return workflow


def _unit(models, image, **more) -> ControlUnit:
    fields = dict(
        model=str(models / "controlnet" / CN_NAME),
        image=image,
        strength=0.8,
        start=0.0,
        end=0.6,
        window="percent",
    )
    return ControlUnit(**(fields | more))


def test_controlnet_workflow_gives_the_image_of_the_equivalent_request(models, loaded, tmp_path):
    plan, result = _run(_controlled(), models, loaded, tmp_path)
    sampling = next(o for o in plan.outputs if o.node == "44").image.sampling
    assert sampling.request == _equivalent(seed=8)  # the controls join at run time, with their image
    pipe = loaded(sampling.load)
    control = Image.open(result.files["9"][0]).convert("RGB")
    expected = pipe.run(_equivalent(seed=8, controls=(_unit(models, control),))).images[0]
    got = _rgb(result.files["44"][0])
    assert np.array_equal(got, pixels(expected))
    plain = pipe.run(_equivalent(seed=8)).images[0]
    assert np.abs(got.astype(int) - pixels(plain).astype(int)).max() > 0  # the ControlNet acts


def test_controlnet_apply_sd3_is_the_advanced_node(models):
    advanced = _prepare(_controlled(), models).outputs[-1].image.sampling
    sd3 = _prepare(_controlled("ControlNetApplySD3"), models).outputs[-1].image.sampling
    assert sd3 == advanced and len(sd3.controls) == 1
    spec = sd3.controls[0]
    assert (spec.net.name, spec.strength, spec.start, spec.end) == (CN_NAME, 0.8, 0.0, 0.6)


@pytest.mark.parametrize("inputs", [{"strength": 0.0}, {"start_percent": 0.6, "end_percent": 0.6}])
def test_a_controlnet_that_never_acts_is_left_out(models, inputs):
    sampling = _prepare(_controlled(**inputs), models).outputs[-1].image.sampling
    assert sampling.controls == ()


def test_sd35_run_with_a_controlnet_writes_what_sd35_generate_writes(capsys, tiny, models, tmp_path):
    path = tmp_path / "cn.json"
    path.write_text(json.dumps(_controlled()))
    out = tmp_path / "out"
    common = ["--tokenizers", str(tiny["diffusers"]), "--device", "cpu", "--dtype", "fp32"]
    code, _, err = run_cli(capsys, "run", str(path), "--models-dir", str(models), *common, "-o", str(out))
    assert code == 0, err
    te = tiny["text_encoders"]
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny["official"]), "--text-encoders",
        *(str(te / n) for n in TE_NAMES), *common, "--prompt", "a (red:1.2) fox in snow",
        "--negative-prompt", "blurry, lowres", "--width", str(SIZE), "--height", str(SIZE), "--steps", "4",
        "--cfg", "4.5", "--sampler", "dpmpp_2m", "--scheduler", "sgm_uniform", "--shift", "3", "--seed", "8",
        "--noise", "comfyui", "--batch-noise", "batch", "--weighting", "comfy", "--negative-until", "0.1",
        "--control", str(models / "controlnet" / CN_NAME), "--control-image", str(out / "ComfyUI_00001_.png"),
        "--control-strength", "0.8", "--control-end", "0.6", "--control-window", "percent",
        "-o", str(tmp_path / "generate.png"),
    )  # fmt: skip
    assert code == 0, err
    assert np.array_equal(_rgb(out / "cn_00001_.png"), _rgb(tmp_path / "generate.png"))


BAD_CONTROL = {
    "another family's ControlNet": (
        lambda w: w["40"]["inputs"].update(control_net_name="control_v11p_sd15_canny.safetensors"),
        "40",
        "control_net_name",
        "an SD 1.5/2.x ControlNet",
    ),
    "an inpainting ControlNet": (
        lambda w: w["40"]["inputs"].update(control_net_name="x_inpaint.safetensors"),
        "40",
        "control_net_name",
        "reads a mask",
    ),
    "a ControlNet of another width": (
        lambda w: w["40"]["inputs"].update(control_net_name="x_wide.safetensors"),
        "42",
        "positive",
        "x_wide.safetensors is a ControlNet for an MMDiT-X of width 192",
    ),
    "the decoder's VAE is not the ControlNet's": (
        lambda w: w.update(
            {
                "5": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
                "43": w["43"] | {"inputs": w["43"]["inputs"] | {"vae": ["5", 0]}},
            }
        ),
        "43",
        "vae",
        "not the one the ControlNet images are encoded with",
    ),
    "a path as the name": (
        lambda w: w["40"]["inputs"].update(control_net_name="../checkpoints/sd3.5_medium.safetensors"),
        "40",
        "control_net_name",
        "is a path",
    ),
    "no VAE": (lambda w: w["41"]["inputs"].pop("vae"), "41", "vae", "link the VAE"),
    "union type": (
        lambda w: w.update(
            {
                "45": {
                    "class_type": "SetUnionControlNetType",
                    "inputs": {"control_net": ["40", 0], "type": "auto"},
                },
                "41": w["41"] | {"inputs": w["41"]["inputs"] | {"control_net": ["45", 0]}},
            }
        ),
        "45",
        "type",
        "no union types",
    ),
    "ControlNet on the positive only": (
        lambda w: w["42"]["inputs"].update(negative=["69", 0]),
        "42",
        "negative",
        "different ControlNets",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONTROL))
def test_bad_controlnet_workflows_name_the_node(case, models):
    change, node, name, says = BAD_CONTROL[case]
    workflow = _controlled()
    change(workflow)
    assert says in _fails(workflow, models, node, name)


def test_a_missing_controlnet_name_falls_back_to_an_sd3_controlnet(models):
    workflow = _controlled()
    workflow["40"]["inputs"]["control_net_name"] = "SD3.5M-Canny-ControlNet.safetensors"
    plan = _prepare(workflow, models)
    assert plan.outputs[-1].image.sampling.controls[0].net == models / "controlnet" / CN_NAME
    assert plan.notes == [
        "node 40 (ControlNetLoader) control_net_name: 'SD3.5M-Canny-ControlNet.safetensors' is not in "
        f"controlnet/ or t2i_adapter/; using controlnet/{CN_NAME}, an SD3 ControlNet found by content."
    ]


# ------------------------------------------------------------- ControlNets over the image and latent nodes


def test_a_loaded_and_scaled_control_image_is_the_request_with_that_image(models, loaded, tmp_path):
    """The control image may be any IMAGE: here LoadImage -> ImageScale (ComfyUI's lanczos, to the
    generation's size), so the unit's image is those scaled pixels and nothing else runs first."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(inputs / "edges.png")
    workflow = _controlled()
    workflow["50"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    workflow["51"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["50", 0], "upscale_method": "lanczos", "width": SIZE, "height": SIZE,
                   "crop": "center"},
    }  # fmt: skip
    workflow["41"]["inputs"]["image"] = ["51", 0]
    for node in ("3", "231", "9"):  # the first sampler and its image are no longer needed
        del workflow[node]
    source = Source(copy.deepcopy(workflow))
    plan = prepare(source, ModelsDir(models), input_dir=inputs)
    (sampling,) = samplings([o.image for o in plan.outputs])
    assert sampling.node == "42" and isinstance(sampling.controls[0].image, ScaledImage)
    result = run_plan(plan, source, tmp_path / "out", loaded)
    scaled = Executor(loaded).images(sampling.controls[0].image)[0]
    assert scaled.size == (SIZE, SIZE)
    expected = loaded(sampling.load).run(_equivalent(seed=8, controls=(_unit(models, scaled),))).images[0]
    assert np.array_equal(_rgb(result.files["44"][0]), pixels(expected))


def test_tiled_decoding_of_a_controlled_sampler_feeding_a_second_pass(models, loaded, tmp_path, monkeypatch):
    """A ControlNet sampler decoded in tiles for SaveImage while its latent goes on, upscaled, into a
    hires pass: every sampler is listed for the server's limits in the order it runs, each sampler's
    images are decoded once (the tiled one in tiles only), the tiled image is the untiled one within
    1/255, and the hires pass has the upscaled size."""
    workflow = _controlled()
    workflow["43"]["class_type"] = "VAEDecodeTiled"
    workflow["43"]["inputs"].update(tile_size=64, overlap=8, temporal_size=64, temporal_overlap=8)
    workflow["60"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["42", 0], "upscale_method": "bislerp", "scale_by": 1.5},
    }
    second = copy.deepcopy(workflow["3"])
    second["inputs"].update(latent_image=["60", 0], denoise=0.5, seed=9)
    workflow["61"] = second
    workflow["62"] = {"class_type": "VAEDecode", "inputs": {"samples": ["61", 0], "vae": ["4", 2]}}
    workflow["63"] = {"class_type": "SaveImage", "inputs": {"images": ["62", 0], "filename_prefix": "hi"}}
    pipe = loaded(_prepare(workflow, models).outputs[0].image.sampling.load)  # every sampler's pipeline
    decodes, decode = [], pipe.vae.decode

    def counted(z, tiling=None):
        decodes.append((tuple(z.shape[-2:]), tiling is not None))
        return decode(z, tiling=tiling)

    monkeypatch.setattr(pipe.vae, "decode", counted)
    plan, result = _run(workflow, models, loaded, tmp_path)
    monkeypatch.undo()
    cells = SIZE // 8
    assert sorted(decodes) == [
        ((cells, cells), False),
        ((cells, cells), True),
        ((cells * 3 // 2,) * 2, False),
    ]
    assert [s.node for s in samplings([o.image for o in plan.outputs])] == ["3", "42", "61"]
    tiled = next(o for o in plan.outputs if o.node == "44").image
    assert tiled.tiling is not None
    untiled = Executor(loaded).images(replace(tiled, tiling=None))[0]
    diff = np.abs(_rgb(result.files["44"][0]).astype(int) - pixels(untiled).astype(int))
    assert diff.max() <= 1
    hires = Image.open(result.files["63"][0])
    assert hires.size == (SIZE * 3 // 2, SIZE * 3 // 2)
