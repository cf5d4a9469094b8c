"""Property-based fuzzing of the server's own OpenAPI schema (schemathesis) against a real ``sd35 serve``.

Every operation the schema lists is called with generated inputs, valid and invalid (schemathesis'
examples, coverage and fuzzing phases, positive and negative modes). Whatever arrives, the server must:

* never answer 5xx (an input the code did not expect is a 4xx naming the field, not a crash);
* answer every 4xx in its API family's error shape: ``/sdapi/`` and ``/controlnet/`` routes A1111's
  ``{"error": str, "detail": str, ...}``, ComfyUI's ``POST /prompt`` a refused prompt as ComfyUI does
  (``{"error": {"type", "message", "details", "extra_info"}, "node_errors"}``), all others OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``;
* never show a Python traceback.

Nothing is excluded: ``POST /sdapi/v1/interrupt`` and ``/skip`` only stop a running job (the fuzzer's own),
``POST /sdapi/v1/options`` can only switch to a model in the catalog (the demo model is the only one), and
the generation routes are kept fast by the server's limits (``--max-steps 4 --max-size 128 --max-batch
2``: a generated body asking for more is refused with a 400, and the demo model's own default of 20
steps is over the limit too, so only bodies that ask for few steps run). Image fields are sometimes
replaced by a real PNG so that the img2img, inpainting and png-info paths behind the image decoder are
fuzzed too, not only the decoder's refusals. Two limits of this setup: the OpenAI routes have no steps field,
so their requests are refused by the step limit after every other check; and schemathesis sends the upload
fields of ``/v1/images/edits`` (OpenAPI 3.1 ``contentMediaType``) as plain form fields, not files, so that
route is fuzzed up to its upload checks.

``SD35_FUZZ_SEED`` picks another seed (the default is fixed, so a run is reproducible) and
``SD35_FUZZ_EXAMPLES`` a longer run (e.g. 400: about two minutes).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.config import SchemathesisConfig

from tests.server.server_helpers import ServerProcess

LIMITS = ("--max-steps", "4", "--max-size", "128", "--max-batch", "2")
MAX_EXAMPLES = int(
    os.environ.get("SD35_FUZZ_EXAMPLES", "30")
)  # per operation in the fuzzing phase (both modes)
SEED = int(os.environ.get("SD35_FUZZ_SEED", "20250613"))
REQUEST_TIMEOUT_S = 60


def _png(size: tuple[int, int], mode: str = "RGB", parameters: str | None = None) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 40, 40)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


IMAGE = _png((64, 64))
MASK = _png((64, 64), "L")
INFOTEXT = "a red circle\nNegative prompt: blur\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64"
PNG_WITH_INFO = _png((16, 16), parameters=INFOTEXT)


FAST_STEPS = st.integers(1, 4)  # within --max-steps, so the body can run if the rest of it is valid


def _real_images(body: dict) -> dict | None:
    """``body`` with real images in its image fields, or None if it has none."""
    real = dict(body)
    if isinstance(real.get("init_images"), list):  # A1111 img2img
        real["init_images"] = [IMAGE, *real["init_images"][1:]]
        if real.get("mask") is not None:
            real["mask"] = MASK
    elif isinstance(real.get("edit"), dict):  # a native job
        real["edit"] = {**real["edit"], "image": IMAGE}
        if real["edit"].get("mask") is not None:
            real["edit"]["mask"] = MASK
    elif "image" in real and "prompt" not in real:  # png-info
        real["image"] = PNG_WITH_INFO
    else:
        return None
    return real


GENERATION_ROUTES = ("/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def _variants(context, body):
    """The generated body, and variants of it that get past the first refusals so that what lies behind
    them is fuzzed too: real images in the image fields (the decoder refuses random base64), and, for the
    generation routes, a body of the prompt, a few steps and one to three generated fields (a generated body
    rarely has every field valid at once, and the demo model's default of 20 steps is over --max-steps),
    so that the generated values also reach the sampler. The body as generated stays a candidate, so the
    refusals are still fuzzed as well."""
    if not isinstance(body, dict):
        return st.just(body)
    real = _real_images(body)
    choices = st.sampled_from([body] if real is None else [body, real])
    if context.operation.path not in GENERATION_ROUTES:
        return choices
    base = body if real is None else real
    required = {k: base[k] for k in ("prompt", "init_images") if k in base}
    others = sorted(set(base) - set(required) - {"steps"})
    if not others:
        return st.one_of(FAST_STEPS.map(lambda steps: {**required, "steps": steps}), choices)
    kept = st.lists(st.sampled_from(others), min_size=1, max_size=3, unique=True)

    def fast(keys_steps: tuple[list[str], int]) -> dict:
        keys, steps = keys_steps
        return {**required, **{k: base[k] for k in keys}, "steps": steps}

    return st.one_of(st.tuples(kept, FAST_STEPS).map(fast), choices)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, models_dir):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    with ServerProcess(data, "--models-dir", str(models_dir), *LIMITS) as proc:
        yield proc


@pytest.fixture
def api_schema(request, fuzz_server):
    # schemathesis 4.32's pytest plugin names each operation's subtest by rewriting the node's ``_nodeid``,
    # which pytest 9.2 no longer has; give it one to read (the names are cosmetic)
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": REQUEST_TIMEOUT_S,
        }
    )
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=config)
    schema.config.update(base_url=fuzz_server.url)
    schema.hook("flatmap_body")(_variants)
    return schema


CALLS = []
PH = []


def check_response(method: str, path: str, response) -> None:
    """The three rules of the module docstring (``path`` is the operation's, to pick its API family)."""
    where = f"{method} {path}: {response.status_code} {response.text[:500]}"
    assert response.status_code < 500, where
    assert "Traceback" not in response.text, where
    if response.status_code < 400:
        return
    body = response.json()
    if path.startswith(("/sdapi/", "/controlnet/")):
        assert isinstance(body.get("error"), str) and isinstance(body.get("detail"), str), where
    elif path == "/prompt" and "node_errors" in body:  # ComfyUI's refusal of a prompt
        assert {"type", "message", "details", "extra_info"} <= set(body["error"]), where
    else:
        error = body.get("error")
        assert isinstance(error, dict), where
        assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), where
        assert "param" in error and "code" in error, where


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_survives_generated_input(case):
    check_response(case.method, case.operation.path, case.call())


# Inputs that crashed the server (a 500, or a job that failed with InternalError) when probed by hand beside
# the fuzzer, which does not reach them in its budget: each is now a 4xx that says what is wrong.
# (method, path, JSON body, status, a part of the message)
CRASHERS = [
    pytest.param(
        "GET", "/v1/images/" + "a" * 300 + ".png", None, 404, "no image",
        id="long image name",  # os.stat: OSError File name too long
    ),
    pytest.param(
        "POST", "/v1/jobs", {"prompt": "x", "steps": 2, "edit": {"image": IMAGE, "mask": MASK, "mask_blur": 1e20}},
        400, "edit.mask_blur",
        id="huge mask blur",  # PIL GaussianBlur: ValueError radius must be >= 0
    ),
    pytest.param(
        "POST", "/sdapi/v1/img2img",
        {"prompt": "x", "steps": 2, "init_images": [IMAGE], "mask": MASK, "mask_blur": 1e20},
        400, "mask blur must be",
        id="huge A1111 mask blur",
    ),
    pytest.param(
        "POST", "/v1/jobs",
        {"prompt": "x", "steps": 2, "width": 64, "height": 64, "edit": {"image": IMAGE, "outpaint": [0, 0, 10**20, 0]}},
        400, "edit.outpaint",
        id="huge outpaint border",  # np.pad: TypeError (a smaller one: a canvas that fills the memory)
    ),
    pytest.param(
        "POST", "/v1/jobs", {"prompt": "x", "steps": 2, "hires": {"scale": 1.5, "strength": 1e-9}},
        400, "hires.strength",
        id="tiny hires strength",  # a schedule of steps / strength sigmas: 1e-300 overflowed, 1e-9 fills memory
    ),
    pytest.param(
        "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "enable_hr": True, "denoising_strength": 1e-300},
        400, "hires strength must be",
        id="tiny A1111 hires denoise",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), CRASHERS)
def test_inputs_that_crashed_the_server_are_refused(fuzz_server, method, path, body, status, says):
    response = httpx.request(method, fuzz_server.url + path, json=body, timeout=REQUEST_TIMEOUT_S)
    check_response(method, path, response)
    assert response.status_code == status, response.text
    assert says in response.text, response.text


def test_the_fuzzed_server_ran_jobs_and_never_crashed(fuzz_server):
    """After the tests above (pytest runs them first): the fuzzer's inputs reached the sampler (some jobs
    are done), no job failed inside the server (a request refused after it was queued fails with its own
    error kind, never InternalError), and the server logged no traceback."""
    deadline = time.monotonic() + 60
    while True:
        jobs = httpx.get(fuzz_server.url + "/v1/jobs", params={"limit": 500}, timeout=30).json()["jobs"]
        if all(j["status"] not in ("queued", "running") for j in jobs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(j["status"] == "done" for j in jobs), "no generated request ran; run the whole module"
    internal = [j for j in jobs if j["error"] and j["error"]["type"] == "InternalError"]
    assert not internal, json.dumps(internal, indent=1)[:2000]
    assert "Traceback" not in fuzz_server.output(), fuzz_server.output()[-4000:]
