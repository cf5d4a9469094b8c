"""The page's ControlNet panel in a real headless Chromium: pick a ControlNet by name, give an image, add the unit,
generate; the job carries the unit and the image changed. (Fixtures from tests/server/test_page_browser.py.)"""

from __future__ import annotations

import json

import pytest

from sd35.models.configs import demo_mmditx_config
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.server.server_helpers import ServerProcess
from tests.server.test_page_browser import browser, jobs, open_page, page, png, wait_text  # noqa: F401

NAME = "canny-demo"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_controlnet(diffusers_controlnet(demo_mmditx_config(), seed=4), models / "controlnet" / NAME)
    with ServerProcess(tmp_path_factory.mktemp("serve") / "data", "--models-dir", str(models)) as proc:
        yield proc


def test_controlnet_panel(server, page):  # noqa: F811
    open_page(page, server.url)
    page.click("#controls-section summary")
    assert page.input_value("#control-pick") == NAME
    assert page.is_hidden("#control-empty")
    page.select_option("#control-preprocess", "canny")
    page.set_input_files(
        "#control-file", files=[{"name": "c.png", "mimeType": "image/png", "buffer": png(64, 64)}]
    )
    page.click("#control-add")
    page.wait_for_selector("#control-list li")
    assert page.inner_text("#controls-badge") == "1"
    page.fill(f"[aria-label='{NAME} strength']", "0.7")
    page.fill(f"[aria-label='{NAME} end']", "0.8")
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "3")
    page.fill("#seed", "5")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    [unit] = json.loads(sent.value.post_data)["controls"]
    assert (
        unit["model"] == NAME and unit["preprocess"] == "canny" and unit["image"].startswith("data:image/png")
    )
    assert (unit["strength"], unit["start"], unit["end"]) == (0.7, 0, 0.8)
    wait_text(page, "#progress-text", "^Done")
    job = jobs(server, limit=1)[0]
    assert job["status"] == "done"
    assert job["settings"]["controls"][0]["model"] == NAME
    assert 'ControlNet 0: "Module: canny, Model: canny-demo, Weight: 0.7' in job["infotexts"][0]
