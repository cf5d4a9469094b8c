"""ControlNet through every way in: the CLI, the Python API, the native jobs API and the real ``webuiapi`` client's
``ControlNetUnit`` against ``sd35 serve``, all giving the same pixels; the extension's model and module lists;
names, never paths; foreign files refused with a 4xx.

Equality is exact for the reason tests/server/test_same_image.py gives (one request type, one thread, fp32)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from sd35.control.unit import ControlUnit
from sd35.demo import DEMO_DEFAULTS, load_demo_pipeline
from sd35.demo.shapes import Scene, render
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.configs import demo_mmditx_config
from sd35.request import GenerateRequest
from sd35.testing import torch_threads
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.server.server_helpers import REPO, ServerProcess

PROMPT = "a red circle at the top left on a blue background"
SEED, STEPS, SIZE = 3, 4, DEMO_DEFAULTS.width
NAME = "canny-demo"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder with a diffusers ControlNet folder for the demo model and a foreign (SD 1.5) file."""
    root = tmp_path_factory.mktemp("models")
    write_controlnet(diffusers_controlnet(demo_mmditx_config(), seed=4), root / "controlnet" / NAME)
    save_file_atomic(
        {"controlnet_cond_embedding.conv_in.weight": torch.zeros(1), "down_blocks.0.x": torch.zeros(1)},
        root / "controlnet" / "sd15-canny.safetensors",
    )
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    data = tmp_path_factory.mktemp("serve") / "data"
    with ServerProcess(data, "--models-dir", str(models), env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def control_image():
    return render(Scene("yellow", "square", "bottom right", "green"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def python_image(models, control_image, strength=0.8) -> Image.Image:
    pipe = load_demo_pipeline()
    unit = ControlUnit(model=str(models / "controlnet" / NAME), image=control_image, strength=strength,
                       preprocess="canny", resize_mode="just_resize", end=0.75)  # fmt: skip
    request = GenerateRequest(prompt=PROMPT, seed=SEED, steps=STEPS, cfg=4.0, sampler="euler", scheduler="normal",
                              width=SIZE, height=SIZE, controls=(unit,))  # fmt: skip
    with torch_threads(1):
        return pipe.run(request).images[0]


def cli_image(server, models, control_image, tmp_path) -> Image.Image:
    png = tmp_path / "control.png"
    control_image.save(png)
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "sd35.cli", "generate", "--prompt", PROMPT, "--seed", str(SEED),
               "--steps", str(STEPS), "--cfg", "4.0", "--sampler", "euler", "--scheduler", "normal",
               "--width", str(SIZE), "--height", str(SIZE), "-o", str(out),
               "--control", str(models / "controlnet" / NAME), "--control-image", str(png),
               "--control-strength", "0.8", "--control-preprocess", "canny", "--control-resize-mode", "just_resize",
               "--control-end", "0.75"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return Image.open(out)


def a1111_image(api, control_image) -> Image.Image:
    unit = webuiapi.ControlNetUnit(image=control_image, module="canny", model=NAME, weight=0.8,
                                   resize_mode="Just Resize", threshold_a=100, threshold_b=200, guidance_end=0.75)  # fmt: skip
    result = api.txt2img(
        prompt=PROMPT,
        seed=SEED,
        steps=STEPS,
        cfg_scale=4.0,
        sampler_name="Euler",
        scheduler="Normal",
        width=SIZE,
        height=SIZE,
        controlnet_units=[unit],
        alwayson_scripts={},
    )  # fmt: skip (a fresh dict: webuiapi's default one keeps the units)
    return result.image


def native_image(server, control_image) -> Image.Image:
    buffer = io.BytesIO()
    control_image.save(buffer, format="PNG")
    unit = {"model": NAME, "image": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.8,
            "preprocess": "canny", "resize_mode": "just_resize", "end": 0.75}  # fmt: skip
    body = {"prompt": PROMPT, "seed": SEED, "steps": STEPS, "cfg": 4.0, "sampler": "euler", "scheduler": "normal",
            "width": SIZE, "height": SIZE, "controls": [unit]}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=30) as http:
        accepted = http.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        deadline = time.monotonic() + 120
        while (job := http.get(f"/v1/jobs/{accepted.json()['id']}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "done", job
        assert (
            job["settings"]["controls"][0]["model"] == NAME and "image" not in job["settings"]["controls"][0]
        )
        return Image.open(io.BytesIO(http.get(job["images"][0]).content))


def test_lists(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert api.controlnet_model_list() == [NAME, "sd15-canny"]
    assert {"none", "canny", "blur_gaussian", "tile_resample"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 2
    assert httpx.get(server.url + "/v1/controlnets").json() == {"controlnets": [NAME, "sd15-canny"]}


def test_four_routes_one_image(server, models, control_image, tmp_path):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    images = {
        "python": python_image(models, control_image),
        "cli": cli_image(server, models, control_image, tmp_path),
        "a1111": a1111_image(api, control_image),
        "native": native_image(server, control_image),
    }
    reference = pixels(images["python"])
    assert reference.std() > 1.0
    for route, image in images.items():
        assert image.size == (SIZE, SIZE), route
        assert np.abs(pixels(image) - reference).max() == 0, route
    without = api.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=4.0, sampler_name="Euler",
                          scheduler="Normal", width=SIZE, height=SIZE, alwayson_scripts={}).image  # fmt: skip
    assert np.abs(pixels(without) - reference).mean() > 1.0  # the ControlNet changed the image


def test_names_not_paths_and_foreign_files(server, models, control_image):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    buffer = io.BytesIO()
    control_image.save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    base = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE}
    for model, status, says in [
        (str(models / "controlnet" / NAME), 404, "no ControlNet named"),
        ("nope", 404, "no ControlNet named"),
        ("sd15-canny", 400, "an SD 1.5/2.x ControlNet"),
    ]:
        unit = {"model": model, "image": image, "module": "none"}
        r = httpx.post(
            server.url + "/sdapi/v1/txt2img",
            json={**base, "alwayson_scripts": {"ControlNet": {"args": [unit]}}},
            timeout=60,
        )
        assert r.status_code == status, r.text
        assert says in r.text
    r = httpx.post(
        server.url + "/sdapi/v1/txt2img",
        json={
            **base,
            "alwayson_scripts": {
                "controlnet": {"args": [{"model": NAME, "image": image, "module": "depth_midas"}]}
            },
        },
        timeout=60,
    )
    assert r.status_code == 400 and "unknown ControlNet module 'depth_midas'" in r.text
    assert api  # the client connected
