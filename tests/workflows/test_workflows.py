"""ComfyUI workflows: the official SD3.5 example graph and one with SkipLayerGuidanceSD3, rebuilt over tiny
random weights, give bit for bit the image ``sd35 generate`` gives with the ComfyUI-named options (one
sampling path); bad workflows fail before anything runs, in ComfyUI's ``node_errors`` shape with the
node and input named; model names fall back to files found by content; ``sd35 run`` writes ComfyUI's
file names with the workflow embedded and never overwrites."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from sd35.errors import WorkflowError
from sd35.loading.components import scan
from sd35.loading.tensors import materialize
from sd35.request import GenerateRequest, TextOptions
from sd35.sampling.guidance import SkipLayerGuidance
from sd35.workflows.graph import Source, read_source
from sd35.workflows.models import ModelsDir
from sd35.workflows.run import prepare, run_plan
from tests.helpers import pixels, run_cli
from tests.workflows.conftest import TE_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, STEPS, SEED = 32, 4, 7


def sd35_example() -> dict:
    """ComfyUI's SD3 example workflow in API format: TripleCLIPLoader, ModelSamplingSD3, the negative as
    ConditioningZeroOut over 0.1-1 combined with the negative text over 0-0.1, KSampler, SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
        "11": {
            "class_type": "TripleCLIPLoader",
            "inputs": {"clip_name1": TE_NAMES[0], "clip_name2": TE_NAMES[1], "clip_name3": TE_NAMES[2]},
        },
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 3.0}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a (red:1.2) fox in snow", "clip": ["11", 0]},
        },
        "71": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["11", 0]}},
        "67": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["71", 0]}},
        "68": {
            "class_type": "ConditioningSetTimestepRange",
            "inputs": {"conditioning": ["67", 0], "start": 0.1, "end": 1.0},
        },
        "70": {
            "class_type": "ConditioningSetTimestepRange",
            "inputs": {"conditioning": ["71", 0], "start": 0.0, "end": 0.1},
        },
        "69": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["68", 0], "conditioning_2": ["70", 0]},
        },
        "135": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["13", 0],
                "seed": SEED,
                "steps": STEPS,
                "cfg": 4.5,
                "sampler_name": "dpmpp_2m",
                "scheduler": "sgm_uniform",
                "positive": ["6", 0],
                "negative": ["69", 0],
                "latent_image": ["135", 0],
                "denoise": 1.0,
            },
        },
        "231": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["231", 0], "filename_prefix": "ComfyUI"}},
    }


def with_slg(workflow: dict) -> dict:
    """The example with SkipLayerGuidanceSD3 between ModelSamplingSD3 and the KSampler, a batch of two and
    euler_ancestral (a stochastic sampler: ComfyUI's step noise is used)."""
    workflow = copy.deepcopy(workflow)
    workflow["14"] = {
        "class_type": "SkipLayerGuidanceSD3",
        "inputs": {
            "model": ["13", 0],
            "layers": "1",
            "scale": 3.0,
            "start_percent": 0.01,
            "end_percent": 0.5,
        },
    }
    workflow["3"]["inputs"].update(model=["14", 0], sampler_name="euler_ancestral", scheduler="simple")
    workflow["135"]["inputs"]["batch_size"] = 2
    return workflow


def _equivalent(**more) -> GenerateRequest:
    """What `sd35 generate` runs for the example with ComfyUI's names."""
    fields = dict(
        prompt="a (red:1.2) fox in snow",
        negative_prompt="blurry, lowres",
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        cfg=4.5,
        sampler="dpmpp_2m",
        scheduler="sgm_uniform",
        shift=3.0,
        seed=SEED,
        noise="comfyui",
        batch_noise="batch",
        negative_until=0.1,
        text=TextOptions(weighting="comfy"),
    )
    return GenerateRequest(**(fields | more))


def _run(workflow, models, loaded, out):
    source = Source(copy.deepcopy(workflow))
    plan = prepare(source, ModelsDir(models))
    return plan, run_plan(plan, source, out, loaded)


@pytest.mark.parametrize(
    "workflow, request_fields",
    [
        (sd35_example(), {}),
        (
            with_slg(sd35_example()),
            dict(
                sampler="euler_ancestral",
                scheduler="simple",
                num_images=2,
                slg=SkipLayerGuidance((1,), 3.0, 0.01, 0.5, window="sigma"),
            ),
        ),
    ],
    ids=["sd35_example", "slg"],
)
def test_workflow_gives_the_image_of_the_equivalent_request(
    workflow, request_fields, models, loaded, tmp_path
):
    plan, result = _run(workflow, models, loaded, tmp_path)
    (sampling,) = {o.image.sampling for o in plan.outputs}
    expected = _equivalent(**request_fields)
    assert sampling.request == expected
    assert sampling.load.model.name == "sd3.5_medium.safetensors" and sampling.load.vae is None
    assert [p.name for p in sampling.load.text_encoders] == list(TE_NAMES)
    reference = loaded(sampling.load).run(expected).images
    written = [Image.open(p) for p in result.files["9"]]
    assert [p.name for p in result.files["9"]] == [
        f"ComfyUI_{i:05}_.png" for i in range(1, len(reference) + 1)
    ]
    for got, want in zip(written, reference, strict=True):
        assert np.array_equal(pixels(got.convert("RGB")), pixels(want))
        assert json.loads(got.text["prompt"]) == workflow


def test_the_zeroed_negative_changes_the_image(models, loaded, tmp_path):
    """ConditioningZeroOut is not ignored: the plain-negative graph gives another image."""
    plain = sd35_example()
    plain["3"]["inputs"]["negative"] = ["71", 0]
    plan, result = _run(plain, models, loaded, tmp_path / "plain")
    assert plan.outputs[0].image.sampling.request == _equivalent(negative_until=None)
    _, zeroed = _run(sd35_example(), models, loaded, tmp_path / "zeroed")
    a, b = (pixels(Image.open(r.files["9"][0]).convert("RGB")) for r in (result, zeroed))
    assert np.abs(a - b).max() > 0


def test_missing_names_fall_back_to_files_found_by_content(models):
    workflow = sd35_example()
    workflow["4"]["inputs"]["ckpt_name"] = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    workflow["11"]["inputs"]["clip_name3"] = "t5xxl_fp8_e4m3fn.safetensors"
    plan = prepare(Source(workflow), ModelsDir(models))
    load = plan.outputs[0].image.sampling.load
    assert load.model == models / "checkpoints" / "sd3.5_medium.safetensors"
    assert load.text_encoders[2] == models / "text_encoders" / "t5xxl_fp16.safetensors"
    assert len(plan.notes) == 2
    assert "node 4 (CheckpointLoaderSimple) ckpt_name" in plan.notes[0]
    assert "using checkpoints/sd3.5_medium.safetensors" in plan.notes[0]
    assert "using text_encoders/t5xxl_fp16.safetensors" in plan.notes[1]


def _lora_only(workflow):
    workflow["20"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["13", 0], "lora_name": "not_there.safetensors", "strength_model": 1.0},
    }
    workflow["3"]["inputs"]["model"] = ["20", 0]


BAD = {
    "unknown node": (
        lambda w: w.update({"99": {"class_type": "FancyUpscaler", "inputs": {}}}),
        "99",
        None,
        "missing_node_type",
    ),
    "missing input": (lambda w: w["3"]["inputs"].pop("steps"), "3", "steps", "required_input_missing"),
    "link to a missing node": (
        lambda w: w["3"]["inputs"].update(model=["77", 0]),
        "3",
        "model",
        "bad_linked_input",
    ),
    "link to a missing output": (
        lambda w: w["3"]["inputs"].update(model=["4", 5]),
        "3",
        "model",
        "bad_linked_input",
    ),
    "type mismatch": (
        lambda w: w["3"]["inputs"].update(model=["4", 1]),
        "3",
        "model",
        "return_type_mismatch",
    ),
    "widget not a link": (
        lambda w: w["3"]["inputs"].update(positive="a cat"),
        "3",
        "positive",
        "bad_linked_input",
    ),
    "bad widget value": (
        lambda w: w["3"]["inputs"].update(sampler_name="warp_drive"),
        "3",
        "sampler_name",
        "value_not_in_list",
    ),
    "value below min": (lambda w: w["3"]["inputs"].update(steps=0), "3", "steps", "value_smaller_than_min"),
    "cycle": (lambda w: w["13"]["inputs"].update(model=["13", 0]), "13", None, "dependency_cycle"),
    "unknown model, no fallback": (_lora_only, "20", "lora_name", "value_not_in_list"),
    "absolute path as a name": (
        lambda w: w["4"]["inputs"].update(ckpt_name="/etc/passwd"),
        "4",
        "ckpt_name",
        "invalid_model_name",
    ),
    "climbing path as a name": (
        lambda w: w["11"]["inputs"].update(clip_name1="../../x.safetensors"),
        "11",
        "clip_name1",
        "invalid_model_name",
    ),
    "unsupported: positive with a range": (
        lambda w: w["3"]["inputs"].update(positive=["70", 0]),
        "3",
        "positive",
        "unsupported",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_workflows_name_the_node_and_input_before_anything_runs(case, models):
    change, node, name, kind = BAD[case]
    workflow = sd35_example()
    change(workflow)
    with pytest.raises(WorkflowError) as info:
        prepare(Source(workflow), ModelsDir(models))
    entry = info.value.node_errors[node]
    assert entry["class_type"] == workflow[node]["class_type"]
    error = entry["errors"][0]
    assert error["type"] == kind and error["message"]
    assert error["extra_info"].get("input_name") == name
    assert info.value.message.startswith(f"workflow: node {node} (")
    json.dumps(info.value.node_errors)  # an HTTP body as it is


def test_sd35_run_writes_what_sd35_generate_writes(capsys, tiny, models, tmp_path):
    path = tmp_path / "example.json"
    path.write_text(json.dumps(sd35_example()))
    out = tmp_path / "out"
    base = [
        "--models-dir",
        str(models),
        "--tokenizers",
        str(tiny["diffusers"]),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ]
    code, stdout, err = run_cli(capsys, "run", str(path), *base, "-o", str(out), "--set", "6.text=a cat")
    assert code == 0, err
    first = out / "ComfyUI_00001_.png"
    assert stdout.strip() == f"node 9: {first}"
    te = tiny["text_encoders"]
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny["official"]), "--text-encoders",
        *(str(te / n) for n in TE_NAMES), "--tokenizers", str(tiny["diffusers"]), "--device", "cpu",
        "--dtype", "fp32", "--prompt", "a cat", "--negative-prompt", "blurry, lowres", "--width", str(SIZE),
        "--height", str(SIZE), "--steps", str(STEPS), "--cfg", "4.5", "--sampler", "dpmpp_2m", "--scheduler",
        "sgm_uniform", "--shift", "3", "--seed", str(SEED), "--noise", "comfyui", "--batch-noise", "batch",
        "--weighting", "comfy", "--negative-until", "0.1", "-o", str(tmp_path / "generate.png"),
    )  # fmt: skip
    assert code == 0, err
    made = Image.open(first)
    assert np.array_equal(
        pixels(made.convert("RGB")), pixels(Image.open(tmp_path / "generate.png").convert("RGB"))
    )
    embedded = json.loads(made.text["prompt"])
    assert embedded["6"]["inputs"]["text"] == "a cat"  # the graph as run, --set applied

    # the PNG runs again as the workflow it carries, into the next free name
    code, stdout, err = run_cli(capsys, "run", str(first), *base, "-o", str(out))
    assert code == 0, err
    second = out / "ComfyUI_00002_.png"
    assert stdout.strip() == f"node 9: {second}"
    assert np.array_equal(pixels(Image.open(second).convert("RGB")), pixels(made.convert("RGB")))
    assert read_source(second).prompt == embedded


def test_sd35_run_bad_input_is_one_line(capsys, models, tmp_path):
    workflow = sd35_example()
    workflow["3"]["inputs"].pop("cfg")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workflow))
    code, _, err = run_cli(capsys, "run", str(path), "--models-dir", str(models), "-o", str(tmp_path / "o"))
    assert code == 2
    assert err.strip().splitlines() == [
        "sd35: error: workflow: node 3 (KSampler) input 'cfg': required input 'cfg' is missing."
    ]
    assert not (tmp_path / "o").exists()
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    code, _, err = run_cli(capsys, "run", str(ui), "--models-dir", str(models))
    assert code == 2 and "Export (API)" in err


def _advanced(workflow: dict, **inputs) -> dict:
    """The example's KSampler as a KSamplerAdvanced."""
    ks = workflow["3"]["inputs"]
    ks.pop("denoise")
    workflow["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": ks
        | {"noise_seed": ks.pop("seed"), "add_noise": "enable", "start_at_step": 0, "end_at_step": 10000}
        | {"return_with_leftover_noise": "disable"}
        | inputs,
    }
    return workflow


def test_ksampler_advanced_over_all_steps_is_ksampler(models):
    plain = prepare(Source(sd35_example()), ModelsDir(models)).outputs[0].image.sampling
    advanced = prepare(Source(_advanced(sd35_example())), ModelsDir(models)).outputs[0].image.sampling
    assert advanced.request == plain.request and advanced.load == plain.load


def test_unet_and_vae_loaders_name_the_files_to_load(tiny, tmp_path):
    root = tmp_path / "models"
    for folder in ("unet", "vae", "clip"):
        (root / folder).mkdir(parents=True)
    (root / "unet" / "sd3.5_medium.safetensors").symlink_to(tiny["official"])
    for name in TE_NAMES:
        (root / "clip" / name).symlink_to(tiny["text_encoders"] / name)
    vae = next(c for c in scan([tiny["official"]]) if c.kind == "vae")
    save_file({k: materialize(t) for k, t in vae.tensors.items()}, root / "vae" / "ae.safetensors")
    workflow = sd35_example()
    workflow["4"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "sd3.5_medium.safetensors", "weight_dtype": "default"},
    }
    workflow["5"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}}
    workflow["231"]["inputs"]["vae"] = ["5", 0]
    plan = prepare(Source(workflow), ModelsDir(root))
    load = plan.outputs[0].image.sampling.load
    assert load.model == root / "unet" / "sd3.5_medium.safetensors"
    assert load.vae == root / "vae" / "ae.safetensors"  # found by content: the only VAE-only file
    assert [p.parent.name for p in load.text_encoders] == ["clip"] * 3
    assert plan.notes == [
        "node 5 (VAELoader) vae_name: 'sdxl_vae.safetensors' is not in vae/; using vae/ae.safetensors, a VAE "
        "found by content."
    ]
    workflow["4"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    with pytest.raises(WorkflowError, match=r"node 4 \(UNETLoader\) input 'weight_dtype'"):
        prepare(Source(workflow), ModelsDir(root))


def test_sd3_text_encode_with_one_text_is_clip_text_encode(models):
    plain = prepare(Source(sd35_example()), ModelsDir(models)).outputs[0].image.sampling.request
    workflow = sd35_example()
    text = workflow["6"]["inputs"]["text"]
    workflow["6"] = {
        "class_type": "CLIPTextEncodeSD3",
        "inputs": {"clip": ["11", 0], "clip_l": text, "clip_g": text, "t5xxl": text, "empty_padding": "none"},
    }
    assert (
        prepare(Source(copy.deepcopy(workflow)), ModelsDir(models)).outputs[0].image.sampling.request == plain
    )
    workflow["6"]["inputs"]["t5xxl"] = "something else"
    with pytest.raises(WorkflowError, match=r"node 6 \(CLIPTextEncodeSD3\) input 't5xxl'"):
        prepare(Source(workflow), ModelsDir(models))


def test_inputs_a_node_does_not_declare_are_ignored_as_in_comfyui(models):
    workflow = sd35_example()
    workflow["3"]["inputs"]["stale_widget"] = ["404", 0]  # left by an older version of the node
    request = prepare(Source(workflow), ModelsDir(models)).outputs[0].image.sampling.request
    assert request == _equivalent()
