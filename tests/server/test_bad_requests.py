"""One table of bad requests against a real ``sd35 serve`` (with an API key): each is a 4xx with a message
that says what is wrong, in its API family's error shape, never a 5xx or a traceback, and the server goes
on serving afterwards."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image

from tests.server.server_helpers import ServerProcess

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
UPLOAD_LIMIT_MB = 1
HUGE = b'{"prompt": "' + b"x" * int(1.5 * 2**20) + b'"}'


def _png(size, color="white", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


IMAGE = _b64(_png((64, 64), "red"))
WIDE_MASK = _b64(_png((64, 32), 255, "L"))
TEXT = _b64(b"this is a text file, not an image\n")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, models_dir):
    """A keyed server with a small body limit, a finished job and a used Idempotency-Key."""
    args = ["--api-key", KEY, "--models-dir", str(models_dir), "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    with ServerProcess(tmp_path_factory.mktemp("bad") / "data", *args) as proc:
        with httpx.Client(base_url=proc.url, headers=AUTH, timeout=60) as client:
            r = client.post("/v1/jobs", json={"prompt": "done", "steps": 2, "seed": 1})
            assert r.status_code == 202, r.text
            done = r.json()["id"]
            deadline = time.monotonic() + 60
            while client.get(f"/v1/jobs/{done}").json()["status"] != "done":
                assert time.monotonic() < deadline, client.get(f"/v1/jobs/{done}").text
                time.sleep(0.05)
            r = client.post(
                "/v1/jobs",
                json={"prompt": "first", "steps": 2, "seed": 1},
                headers={"Idempotency-Key": "used"},
            )
            assert r.status_code == 202, r.text
        proc.done_job = done
        yield proc
        assert "Traceback" not in proc.output()


def native(**body):
    return {"json": {"prompt": "x", "steps": 2, **body}}


def a1111(**body):
    return {"json": {"prompt": "x", "steps": 2, **body}}


# (id, method, path, request kwargs (or a function of the server giving them), status, message fragment, param)
# ``param`` is checked on the native and OpenAI routes (their error body has it); None there: not checked.
ROWS = [
    # wrong JSON types and unreadable bodies
    ("width abc", "POST", "/v1/jobs", native(width="abc"), 400, "width", "width"),
    ("steps 1.5", "POST", "/v1/jobs", native(steps=1.5), 400, "steps", "steps"),
    ("prompt missing", "POST", "/v1/jobs", {"json": {"steps": 2}}, 400, "prompt is required", "prompt"),
    ("prompt a number", "POST", "/v1/jobs", native(prompt=5), 400, "prompt", "prompt"),
    ("body a list", "POST", "/v1/jobs", {"json": ["x"]}, 400, "", None),
    ("invalid JSON", "POST", "/v1/jobs", {"content": b'{"prompt": ', "headers": {"Content-Type": "application/json"}},
     400, "not valid JSON", None),
    ("a1111 width abc", "POST", "/sdapi/v1/txt2img", a1111(width="abc"), 422, "width", None),
    ("a1111 invalid JSON", "POST", "/sdapi/v1/txt2img",
     {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 422, "not valid JSON", None),
    ("openai prompt missing", "POST", "/v1/images/generations", {"json": {"n": 1}}, 400, "prompt is required", "prompt"),
    # sizes, counts and values
    ("width 65", "POST", "/v1/jobs", native(width=65), 400, "multiple of 16", "width"),
    ("a1111 height 100", "POST", "/sdapi/v1/txt2img", a1111(height=100), 400, "multiple of 16", None),
    ("over the grid", "POST", "/v1/jobs", native(width=512), 400, "position grid", "width"),
    ("hires over the grid", "POST", "/v1/jobs", native(width=192, hires={"scale": 2}), 400, "position grid",
     "hires.scale"),
    ("openai over the grid", "POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "1024x1024"}}, 400,
     "position grid", "width"),
    ("steps 0", "POST", "/v1/jobs", native(steps=0), 400, "steps must be a positive integer", "steps"),
    ("a1111 steps 0", "POST", "/sdapi/v1/txt2img", a1111(steps=0), 400, "steps must be a positive integer", None),
    ("cfg negative", "POST", "/v1/jobs", native(cfg=-1), 400, "cfg", "cfg"),
    ("a1111 cfg negative", "POST", "/sdapi/v1/txt2img", a1111(cfg_scale=-2.5), 400, "cfg", None),
    ("unknown sampler", "POST", "/v1/jobs", native(sampler="euler_a"), 400, "unknown sampler 'euler_a'", "sampler"),
    ("a1111 unknown sampler", "POST", "/sdapi/v1/txt2img", a1111(sampler_name="Euler b"), 400,
     "unknown sampler 'Euler b'", None),
    ("unknown scheduler", "POST", "/v1/jobs", native(scheduler="cosine"), 400, "unknown scheduler", "scheduler"),
    ("a1111 unknown scheduler", "POST", "/sdapi/v1/txt2img", a1111(scheduler="Cosine"), 400,
     "unknown scheduler 'Cosine'", None),
    ("seed too large", "POST", "/v1/jobs", native(seed=2**64), 400, "seed", "seed"),
    ("seed -2", "POST", "/v1/jobs", native(seed=-2), 400, "seed", "seed"),
    ("num_images 0", "POST", "/v1/jobs", native(num_images=0), 400, "num_images", "num_images"),
    ("num_images over the limit", "POST", "/v1/jobs", native(num_images=9), 400, "at most 8", "num_images"),
    ("a1111 batch_size 0", "POST", "/sdapi/v1/txt2img", a1111(batch_size=0), 400, "batch_size", None),
    ("strength 1.5", "POST", "/v1/jobs", native(edit={"image": IMAGE, "strength": 1.5}), 400, "strength",
     "edit.strength"),
    ("a1111 strength 1.5", "POST", "/sdapi/v1/img2img", a1111(init_images=[IMAGE], denoising_strength=1.5), 400,
     "strength", None),
    ("hires with a mask", "POST", "/v1/jobs", native(edit={"image": IMAGE, "mask": IMAGE}, hires={}), 400,
     "hires fix and inpainting", "hires"),
    ("slg layer out of range", "POST", "/v1/jobs", native(slg={"layers": [9]}), 400, "do not exist", "slg.layers"),
    ("slg layer negative", "POST", "/v1/jobs", native(slg={"layers": [-1]}), 400, "block indices", "slg.layers"),
    ("unknown field", "POST", "/v1/jobs", native(stepz=3), 400, "stepz", "stepz"),
    ("unknown nested field", "POST", "/v1/jobs", native(hires={"denoise": 0.5}), 400, "denoise", "hires.denoise"),
    ("unknown hr_upscaler", "POST", "/sdapi/v1/txt2img", a1111(enable_hr=True, hr_upscaler="ESRGAN_4x"), 400,
     "hires upscaler", None),
    ("script_name", "POST", "/sdapi/v1/txt2img", a1111(script_name="x/y/z plot"), 400, "scripts", None),
    # names the server does not have
    ("openai unknown model", "POST", "/v1/images/generations", {"json": {"prompt": "x", "model": "dall-e-3"}},
     404, "no model named 'dall-e-3'", "model"),
    ("native unknown model", "POST", "/v1/jobs", native(model="nope"), 404, "no model named 'nope'", "model"),
    ("a1111 unknown model", "POST", "/sdapi/v1/txt2img",
     a1111(override_settings={"sd_model_checkpoint": "nope [abc123]"}), 404, "no model named 'nope'", None),
    ("unknown lora", "POST", "/v1/jobs", native(loras=[{"name": "nope", "strength": 1}]), 404,
     "no LoRA named 'nope'", "loras"),
    ("unknown lora tag", "POST", "/sdapi/v1/txt2img", a1111(prompt="a cat <lora:nope:0.5>"), 404,
     "no LoRA named 'nope'", None),
    ("lora tag weight", "POST", "/sdapi/v1/txt2img", a1111(prompt="a cat <lora:demo_style:lots>"), 400,
     "must be a number", None),
    # images
    ("bad base64", "POST", "/v1/jobs", native(edit={"image": "%%% not base64"}), 400, "not valid base64",
     "edit.image"),
    ("a1111 bad base64", "POST", "/sdapi/v1/img2img", a1111(init_images=["%%%"]), 400, "not valid base64", None),
    ("base64 of text", "POST", "/v1/jobs", native(edit={"image": TEXT}), 400, "edit.image", "edit.image"),
    ("a1111 base64 of text", "POST", "/sdapi/v1/img2img", a1111(init_images=[TEXT]), 400, "init_images", None),
    ("mask of another shape", "POST", "/sdapi/v1/img2img", a1111(init_images=[IMAGE], mask=WIDE_MASK), 400,
     "another shape", None),
    ("native mask of another shape", "POST", "/v1/jobs", native(edit={"image": IMAGE, "mask": WIDE_MASK}), 400,
     "another shape", "edit.mask"),
    ("img2img without init_images", "POST", "/sdapi/v1/img2img", a1111(), 422, "init_images is required", None),
    ("img2img empty init_images", "POST", "/sdapi/v1/img2img", a1111(init_images=[]), 400, "init_images", None),
    ("png-info of text", "POST", "/sdapi/v1/png-info", {"json": {"image": TEXT}}, 400, "cannot be read", None),
    # OpenAI
    ("openai n 0", "POST", "/v1/images/generations", {"json": {"prompt": "x", "n": 0}}, 400, "n must be", "n"),
    ("openai n 11", "POST", "/v1/images/generations", {"json": {"prompt": "x", "n": 11}}, 400, "n must be", "n"),
    ("openai size big", "POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "big"}}, 400,
     "size must be WIDTHxHEIGHT", "size"),
    ("openai size 65", "POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "65x64"}}, 400,
     "multiple of 16", "width"),
    ("openai response_format", "POST", "/v1/images/generations",
     {"json": {"prompt": "x", "response_format": "gif"}}, 400, "response_format", "response_format"),
    ("edits without image", "POST", "/v1/images/edits", {"data": {"prompt": "x"}, "files": {"other": b"x"}}, 400,
     "image is required", "image"),
    ("edits with a text file", "POST", "/v1/images/edits",
     {"data": {"prompt": "x"}, "files": {"image": ("image.png", b"not an image", "image/png")}}, 400, "image",
     "image"),
    ("edits with an empty file", "POST", "/v1/images/edits",
     {"data": {"prompt": "x"}, "files": {"image": ("image.png", b"", "image/png")}}, 400, "empty", "image"),
    ("edits n 11", "POST", "/v1/images/edits",
     {"data": {"prompt": "x", "n": "11"}, "files": {"image": ("a.png", _png((64, 64)), "image/png")}}, 400,
     "n must be", "n"),
    # body size
    ("huge body", "POST", "/v1/jobs", {"content": HUGE, "headers": {"Content-Type": "application/json"}}, 413,
     "larger than this server takes", None),
    ("huge body streamed", "POST", "/v1/jobs",
     lambda: {"content": iter([HUGE[i : i + 2**16] for i in range(0, len(HUGE), 2**16)]),
              "headers": {"Content-Type": "application/json"}}, 413, "larger than this server takes", None),
    ("a1111 huge body streamed", "POST", "/sdapi/v1/txt2img",
     lambda: {"content": iter([HUGE[i : i + 2**16] for i in range(0, len(HUGE), 2**16)]),
              "headers": {"Content-Type": "application/json"}}, 413, "larger than this server takes", None),
    ("edits huge upload streamed", "POST", "/v1/images/edits",
     lambda: {"content": iter([b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b\r\n"
                              b"Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"]
                             + [b"x" * 2**16] * 24 + [b"\r\n--b--\r\n"]),
              "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 413, "larger than this server takes",
     None),
    ("a1111 huge body", "POST", "/sdapi/v1/txt2img", {"content": HUGE, "headers": {"Content-Type": "application/json"}},
     413, "larger than this server takes", None),
    # credentials
    ("no key", "GET", "/v1/jobs", {"headers": {"Authorization": ""}}, 401, "API key", None),
    ("wrong key", "POST", "/v1/images/generations", {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer nope"}},
     401, "API key", None),
    ("key without Bearer", "GET", "/v1/models", {"headers": {"Authorization": KEY}}, 401, "API key", None),
    ("a1111 no key", "GET", "/sdapi/v1/sd-models", {"headers": {"Authorization": ""}}, 401, "API key", None),
    ("a1111 basic auth not enabled", "GET", "/sdapi/v1/options",
     {"headers": {"Authorization": "Basic " + _b64(b"user:" + KEY.encode())}}, 401, "API key", None),
    # paths, ids and methods
    ("traversal", "GET", "/v1/images/..%2Fjobs.sqlite3", {}, 404, "", None),
    ("traversal backslash", "GET", "/v1/images/..%5Cjobs.sqlite3", {}, 404, "no image", "name"),
    ("not an image name", "GET", "/v1/images/jobs.sqlite3", {}, 404, "no image", "name"),
    ("missing image", "GET", "/v1/images/0123456789abcdef01234567-0.png", {}, 404, "no image", "name"),
    ("unknown job", "GET", "/v1/jobs/nope", {}, 404, "no job 'nope'", "id"),
    ("cancel unknown job", "DELETE", "/v1/jobs/nope", {}, 404, "no job 'nope'", "id"),
    ("events of unknown job", "GET", "/v1/jobs/nope/events", {}, 404, "no job 'nope'", "id"),
    ("cancel a finished job", "DELETE", lambda server: f"/v1/jobs/{server.done_job}", {}, 409, "already ended", "id"),
    ("idempotency key reused", "POST", "/v1/jobs",
     {"json": {"prompt": "second", "steps": 2, "seed": 1}, "headers": {"Idempotency-Key": "used"}}, 409,
     "Idempotency-Key", "Idempotency-Key"),
    ("idempotency key too long", "POST", "/v1/jobs", {**native(), "headers": {"Idempotency-Key": "k" * 300}}, 400,
     "Idempotency-Key", "Idempotency-Key"),
    ("list limit 0", "GET", "/v1/jobs?limit=0", {}, 400, "limit", "limit"),
    ("unknown route", "GET", "/v1/nothing", {}, 404, "no such endpoint", None),
    ("a1111 unknown route", "GET", "/sdapi/v1/nothing", {}, 404, "no such endpoint", None),
    ("wrong method", "DELETE", "/v1/images/generations", {}, 405, "not allowed", None),
    ("wrong method on jobs", "PUT", "/v1/jobs", native(), 405, "not allowed", None),
    ("a1111 wrong method", "GET", "/sdapi/v1/txt2img", {}, 405, "not allowed", None),
    ("options checkpoint not a name", "POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": 3}}, 400,
     "model name", None),
    ("options unknown checkpoint", "POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "nope"}}, 404,
     "no model named 'nope'", None),
]  # fmt: skip

assert len({row[0] for row in ROWS}) == len(ROWS)

NATIVE_KEYS = {"message", "type", "param", "code"}
A1111_KEYS = {"error", "detail", "body", "errors"}
ERROR_TYPES = {401: "authentication_error"}


@pytest.mark.parametrize(
    "name, method, path, kwargs, status, fragment, param", ROWS, ids=[r[0] for r in ROWS]
)
def test_bad_request(keyed, name, method, path, kwargs, status, fragment, param):
    if callable(path):
        path = path(keyed)
    kwargs = kwargs() if callable(kwargs) else dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}  # an empty Authorization: none sent
    r = httpx.request(method, keyed.url + path, headers=headers, timeout=60, **kwargs)
    assert r.status_code < 500 and "Traceback" not in r.text, f"{r.status_code}: {r.text}"
    assert r.status_code == status, r.text
    body = r.json()
    if path.startswith("/sdapi/"):
        assert set(body) == A1111_KEYS, body
        assert isinstance(body["error"], str) and body["error"]
        message = body["detail"]
        assert body["errors"] == message
    else:
        assert set(body) == {"error"} and set(body["error"]) == NATIVE_KEYS, body
        error = body["error"]
        message = error["message"]
        assert error["type"] == ERROR_TYPES.get(status, "invalid_request_error")
        if param is not None:
            assert error["param"] == param, error
        if status == 404 and param == "model":
            assert error["code"] == "model_not_found"
    assert isinstance(message, str) and len(message) > 10
    assert fragment in message, message
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_the_server_still_serves_after_the_bad_requests(keyed):
    assert httpx.get(keyed.url + "/health").json()["status"] == "ok"  # open without a key
    r = httpx.post(
        keyed.url + "/v1/images/generations",
        json={"prompt": "a red circle", "size": "64x64", "seed": 3},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    jobs = httpx.get(keyed.url + "/v1/jobs?limit=500", headers=AUTH).json()["jobs"]
    # the bad requests left no job behind: the two of the fixture and this one
    assert len(jobs) == 3 and all(job["status"] in ("done", "queued", "running") for job in jobs)
