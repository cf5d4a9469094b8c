"""Models and LoRAs are picked by the names the list endpoints return: switching the default model
(A1111's options), one request's model (override_settings, OpenAI's ``model``), and rescanning the folder."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from sd35.demo import demo_files
from tests.server.server_helpers import ServerProcess

BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory):
    """A server started on the demo model, with a copy of it named ``demo_copy`` in its models folder."""
    model, tokenizers = demo_files()
    models = tmp_path_factory.mktemp("two-models")
    shutil.copy(model, models / "demo_copy.safetensors")
    data = tmp_path_factory.mktemp("serve-models") / "data"
    with ServerProcess(data, "--models-dir", str(models), "--tokenizers", str(tokenizers)) as proc:
        proc.models = models
        yield proc


def _model_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["sd_model_name"]


def test_models_are_listed_by_name(two_model_server):
    url = two_model_server.url
    titles = [m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()]
    assert titles == ["sd35_demo", "demo_copy"]
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == titles
    assert all("/" not in m["filename"] for m in httpx.get(url + "/sdapi/v1/sd-models").json())


def test_a_request_picks_its_model_and_the_default_can_be_switched(two_model_server):
    url = two_model_server.url
    post = lambda body: httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)  # noqa: E731
    assert _model_of(post(BODY)) == "sd35_demo"
    override = {**BODY, "override_settings": {"sd_model_checkpoint": "demo_copy [0123abcd]"}}
    assert _model_of(post(override)) == "demo_copy"

    r = httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "demo_copy"}, timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo_copy"
    assert _model_of(post(BODY)) == "demo_copy"
    # the same weights under another name: the same image, and the infotext names the model it came from
    job = httpx.post(url + "/v1/jobs", json={**BODY, "model": "sd35_demo"}).json()
    for _ in range(600):
        view = httpx.get(job["url"]).json()
        if view["status"] not in ("queued", "running"):
            break
    assert view["status"] == "done" and "Model: sd35_demo" in view["infotexts"][0]
    httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sd35_demo"}, timeout=120)


@pytest.mark.parametrize("name", ["nope", "../demo_copy", "/etc/passwd", "demo_copy.safetensors/.."])
def test_unknown_model_names_are_404(two_model_server, name):
    url = two_model_server.url
    r = httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=60)
    assert r.status_code == 404 and "no model named" in r.json()["detail"]
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "model": name, "size": "64x64"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_refresh_finds_new_files(two_model_server):
    url = two_model_server.url
    (two_model_server.models / "loras").mkdir(exist_ok=True)
    assert httpx.get(url + "/sdapi/v1/loras").json() == []
    shutil.copy(
        two_model_server.models / "demo_copy.safetensors", two_model_server.models / "third.safetensors"
    )
    assert "third" not in [m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()]
    assert httpx.post(url + "/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "third" in [m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()]
