"""Who may call a server and how much one request may ask: an open address needs a key (refused before
anything loads), every route but /health checks the key (or A1111's basic credentials), a taken port is
one clear line, and bodies and requests past the limits are 413s and 400s that leave the server serving."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import webuiapi

from tests.server.http_helpers import open_png, wait_final
from tests.server.server_helpers import REPO, ServerProcess, free_port

KEY = "secret-key-123"
BEARER = {"Authorization": f"Bearer {KEY}"}
USER, PASSWORD = "user", "pass"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--api-key", KEY, "--api-auth", f"{USER}:{PASSWORD}", "--max-upload-mb", "1"]
    args += ["--max-size", "128", "--max-steps", "10", "--max-batch", "2"]
    with ServerProcess(tmp_path_factory.mktemp("secure") / "data", *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=BEARER) as c:
        yield c


def refused_start(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``sd35 serve`` that should refuse to start. Its model file does not exist, so an error about
    anything else shows the refusal came before loading."""
    env = {k: v for k, v in os.environ.items() if k != "SD35_API_KEY"}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "sd35.cli", "serve", "--model", str(tmp_path / "missing.safetensors")]
    command += ["--data-dir", str(tmp_path / "data"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    output = (done.stdout + done.stderr).strip()
    assert "Traceback" not in output and "missing.safetensors" not in output, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("sd35: error: ")
    return output


def test_refusals_at_start(tmp_path):
    """An open address without a key, and a port in use: one line each, before the model or data folder."""
    with socket.socket() as taken, ThreadPoolExecutor(2) as pool:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        open_address = pool.submit(
            refused_start, tmp_path / "a", "--host", "0.0.0.0", "--port", str(free_port())
        )
        busy_port = pool.submit(refused_start, tmp_path / "b", "--port", str(port))
        line = assert_one_line_error(open_address.result())
        assert "0.0.0.0" in line and "--api-key" in line
        assert not (tmp_path / "a" / "data").exists()
        line = assert_one_line_error(busy_port.result())
        assert f"127.0.0.1:{port}" in line and "--port" in line
        assert not (tmp_path / "b" / "data").exists()


def test_a_data_folder_serves_one_server(server, tmp_path):
    """A second server on a running server's data folder would run every job twice: refused."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sd35.cli", "serve", "--data-dir", str(server.data_dir)]
    command += ["--port", str(free_port()), "--api-key", KEY]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"sd35: error: another sd35 server is using {server.data_dir}; give each server its own data folder."
    )
    assert httpx.get(server.url + "/health").status_code == 200


# every family's routes, each with a body it would accept
ROUTES = [
    ("GET", "/v1/jobs", None, "native"),
    ("POST", "/v1/jobs", {"prompt": "x", "steps": 2}, "native"),
    ("GET", "/v1/loras", None, "native"),
    ("GET", "/openapi.json", None, "native"),
    ("GET", "/docs", None, "native"),
    ("POST", "/v1/images/generations", {"prompt": "x", "size": "64x64"}, "openai"),
    ("GET", "/v1/models", None, "openai"),
    ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64}, "a1111"),
    ("GET", "/sdapi/v1/sd-models", None, "a1111"),
    ("GET", "/sdapi/v1/progress", None, "a1111"),
]


def assert_unauthorized(r: httpx.Response, family: str) -> None:
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    if family == "a1111":
        assert body["error"] == "Unauthorized" and "Authorization: Bearer" in body["detail"]
    else:
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in body["error"]["message"]


def test_every_route_but_health_needs_the_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        wrong = [
            {},
            {"Authorization": "Bearer wrong-key-456"},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": KEY},
            {"Authorization": f"Token {KEY}"},
            {"Authorization": "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()},
            {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()},
            {"Authorization": "Basic not-base64!"},
        ]
        for method, path, body, family in ROUTES:
            for headers in wrong:
                assert_unauthorized(anonymous.request(method, path, json=body, headers=headers), family)
        jobs = anonymous.get("/v1/jobs", headers=BEARER).json()["jobs"]
        assert jobs == [], "a refused call made a job"


def test_the_key_opens_every_route(client):
    assert client.get("/v1/jobs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/models").json()["data"]
    assert client.get("/sdapi/v1/sd-models").status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    open_png(base64.b64decode(r.json()["images"][0]))
    r = client.post("/v1/jobs", json={"prompt": "x", "steps": 2})
    assert r.status_code == 202, r.text
    job = wait_final(client, r.json()["id"])
    assert job["status"] == "done"
    assert open_png(client.get(job["images"][0]).content).size == (64, 64)
    # the OpenAI route is reached (the demo model's default 20 steps are over this server's --max-steps 10)
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps", r.text


def test_a1111_basic_credentials(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="a red circle", steps=2, width=64, height=64, seed=3)
    assert refused.value.args[0] == 401
    api.set_auth(USER, PASSWORD)
    result = api.txt2img(prompt="a red circle", steps=2, width=64, height=64, seed=3)
    assert result.image.size == (64, 64) and result.info["seed"] == 3
    with httpx.Client(base_url=server.url, timeout=30, auth=(USER, PASSWORD)) as basic:
        assert basic.get("/v1/jobs").status_code == 200  # the same credentials on every route
    api.set_auth(USER, "wrong")
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="a red circle", steps=2, width=64, height=64, seed=3)
    assert refused.value.args[0] == 401
    assert api.get_sd_models()["error"] == "Unauthorized"  # (webuiapi returns the body of a GET as it is)


def assert_too_large(r: httpx.Response, family: str) -> None:
    assert r.status_code == 413, (r.request.url, r.status_code, r.text[:300])
    body = r.json()
    if family == "a1111":
        assert body["error"] == "TooLarge" and "larger than" in body["detail"]
    else:
        assert body["error"]["code"] == "payload_too_large" and "larger than" in body["error"]["message"]


def test_bodies_over_the_upload_limit_are_413(client):
    big = "A" * (3 * 2**19)  # 1.5 MiB, over --max-upload-mb 1

    def chunked(data: bytes):
        for i in range(0, len(data), 64 * 1024):
            yield data[i : i + 64 * 1024]

    json_body = ('{"prompt": "x", "steps": 2, "negative_prompt": "' + big + '"}').encode()
    a1111_body = ('{"prompt": "x", "steps": 2, "init_images": ["' + big + '"]}').encode()
    headers = {"Content-Type": "application/json"}
    for path, body, family in [("/v1/jobs", json_body, "native"), ("/sdapi/v1/img2img", a1111_body, "a1111")]:
        assert_too_large(client.post(path, content=body, headers=headers), family)  # by Content-Length
        r = client.post(path, content=chunked(body), headers=headers)  # no length: counted as it arrives
        assert "content-length" not in r.request.headers
        assert_too_large(r, family)
    files = {"image": ("big.png", b"\x89PNG" + big.encode(), "image/png")}
    assert_too_large(client.post("/v1/images/edits", data={"prompt": "x"}, files=files), "openai")
    # ... and the server goes on serving
    r = client.post("/v1/jobs", json={"prompt": "after the big ones", "steps": 2})
    assert r.status_code == 202, r.text
    assert wait_final(client, r.json()["id"])["status"] == "done"


def test_requests_over_the_limits_are_400_naming_the_field(client):
    for body, param in [
        ({"width": 256}, "width"),
        ({"height": 192}, "height"),
        ({"steps": 11}, "steps"),
        ({"num_images": 3}, "num_images"),
    ]:
        r = client.post("/v1/jobs", json={"prompt": "too much", "steps": 2, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    r = client.post("/v1/images/generations", json={"prompt": "too big", "size": "256x256"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "width", r.text
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "too many", "steps": 2, "batch_size": 3})
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest", r.text
    assert "at most 2" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "too long", "steps": 11, "width": 64, "height": 64})
    assert r.status_code == 400 and "at most 10" in r.json()["detail"], r.text
    # within the limits, it serves
    r = client.post("/v1/jobs", json={"prompt": "just right", "steps": 10, "num_images": 2, "width": 128})
    assert r.status_code == 202, r.text
    job = wait_final(client, r.json()["id"])
    assert job["status"] == "done" and len(job["images"]) == 2
    assert open_png(client.get(job["images"][0]).content).size == (128, 64)
