"""One request, five ways in: the CLI, the Python API, the native job API, A1111's txt2img (webuiapi) and
OpenAI's generations (openai) all give the same pixels for the same seed and settings.

Why equality is exact, not within a tolerance: every route maps its fields onto one
:class:`~sd35.request.GenerateRequest` and runs it with ``SD3Pipeline.run`` on the same demo weights, in
fp32 on the CPU. Each request here is sent alone, so the server never batches it with another
(``run_batch`` rows could round differently); a single request's image is a batch of one from a CPU
generator seeded with its seed, whatever the process. The same operations on the same inputs give the
same floats, and the same floats the same 8-bit pixels. All five run torch on one intra-op thread (the
server and the CLI by OMP_NUM_THREADS, this process by ``torch_threads``): the split of a CPU reduction
over threads is part of "the same operations", and one thread is also the fastest on a busy machine.

OpenAI's API has no steps, cfg or sampler fields, so that route runs the demo model's defaults (20 steps,
CFG 4.0, euler, normal schedule, 64x64); the other four send those values explicitly. webuiapi in
particular would otherwise send its own defaults (cfg_scale 7, "Euler a", 512x512).
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from sd35.demo import DEMO_DEFAULTS
from sd35.testing import torch_threads
from tests.server.server_helpers import REPO, ServerProcess

PROMPT = "a green triangle at the top right on a purple background"
SEED = 7
STEPS = DEMO_DEFAULTS.steps  # what OpenAI's route gets; sent explicitly everywhere else
CFG = DEMO_DEFAULTS.cfg
SIZE = DEMO_DEFAULTS.width
assert (DEMO_DEFAULTS.sampler, DEMO_DEFAULTS.scheduler, DEMO_DEFAULTS.height) == ("euler", "normal", SIZE)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's own ``sd35 serve`` on the demo model, on one intra-op thread (see the docstring)."""
    with ServerProcess(tmp_path_factory.mktemp("serve") / "data", env=ONE_THREAD) as proc:
        yield proc


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def from_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def cli_image(tmp_path_factory, server):
    out = tmp_path_factory.mktemp("cli") / "out.png"
    command = [sys.executable, "-m", "sd35.cli", "generate", "--prompt", PROMPT, "--seed", str(SEED),
               "--steps", str(STEPS), "--cfg", str(CFG), "--sampler", "euler", "--scheduler", "normal",
               "--width", str(SIZE), "--height", str(SIZE), "-o", str(out)]  # fmt: skip
    # the server's environment: PYTHONPATH and one intra-op thread
    done = subprocess.run(command, cwd=REPO, env=server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return from_bytes(out.read_bytes())


def python_image() -> Image.Image:
    from sd35.demo import load_demo_pipeline
    from sd35.request import GenerateRequest

    pipe = load_demo_pipeline()
    request = GenerateRequest(prompt=PROMPT, seed=SEED, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal",
                              width=SIZE, height=SIZE)  # fmt: skip
    with torch_threads(1):
        [image] = pipe.run(request).images
    return image


def native_image(server) -> Image.Image:
    body = {"prompt": PROMPT, "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler": "euler",
            "scheduler": "normal", "width": SIZE, "height": SIZE}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=30) as http:
        accepted = http.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        deadline = time.monotonic() + 120
        while True:
            job = http.get(f"/v1/jobs/{accepted.json()['id']}").json()
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert job["status"] == "done", job
        assert job["seeds"] == [SEED]
        download = http.get(job["images"][0])
        assert download.status_code == 200
        return from_bytes(download.content)


def a1111_image(server) -> Image.Image:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, cfg_scale=CFG, sampler_name="Euler",
                         scheduler="Normal", width=SIZE, height=SIZE)  # fmt: skip
    assert result.info["all_seeds"] == [SEED]
    return result.image


def openai_image(server) -> Image.Image:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        response = client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}", extra_body={"seed": SEED})
    return from_bytes(base64.b64decode(response.data[0].b64_json))


def test_five_routes_one_image(server, cli_image):
    images = {
        "cli": cli_image,
        "python": python_image(),
        "native": native_image(server),
        "a1111": a1111_image(server),
        "openai": openai_image(server),
    }
    reference = pixels(images["python"])
    assert reference.shape == (SIZE, SIZE, 3)
    assert reference.std() > 1.0  # a real image, not a blank that every route would agree on
    for route, image in images.items():
        assert image.size == (SIZE, SIZE), route
        difference = np.abs(pixels(image).astype(np.int16) - reference).max()
        assert difference == 0, f"{route} differs from the Python API by up to {difference} levels"
    # and each says so in its own metadata: the same infotext (the settings that make the pixels)
    texts = {route: image.info.get("parameters") for route, image in images.items()}
    assert len(set(texts.values())) == 1, texts
    assert f"Seed: {SEED}" in texts["python"] and f"Steps: {STEPS}" in texts["python"]
