"""The web page of ``sd35 serve`` (``GET /``) in a real headless Chromium, driven by Playwright.

Each test does what a person does (types, clicks, paints, drops a file) and checks what the page shows
and what reached the server. Screenshots of every state are written to a folder the tests print (and the
final gallery also to ``docs/serve-page.png``, which the README shows, when it is missing or
``SD35_UPDATE_DOCS=1``). Chromium is the system's
(``apt-get install chromium``); Playwright's own browser download is never used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, PngImagePlugin

from sd35.demo import demo_files
from tests.server.server_helpers import REPO, ServerProcess

CHROMIUM = os.environ.get("SD35_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = (
    "the web page tests need Chromium and Playwright: on Debian/Ubuntu `apt-get install -y chromium` "
    "(or set SD35_CHROMIUM to a Chromium binary) and `pip install playwright` (in the [test] extra); "
    "`playwright install` is not needed"
)
WAIT_MS = 30_000
API_KEY = "page-test-key-0123"
UPLOAD_MB = 0.25  # the server with a key takes small bodies, so an image can be too large for it


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright is not installed; {INSTALL}.", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}; {INSTALL}.", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """The folder of this run's screenshots."""
    folder = tmp_path_factory.mktemp("page-screenshots")
    print(f"\nweb page screenshots: {folder}")
    return folder


class Console:
    """The page's console errors and uncaught exceptions; a test allows the HTTP errors it provokes."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.allowed: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def allow(self, pattern: str) -> None:
        self.allowed.append(pattern)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.allowed)]


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage) at 1280x800; fails the test on a console error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.console = Console(tab)
    yield tab
    errors = tab.console.unexpected()
    context.close()
    assert not errors, f"console errors: {errors}"


def open_page(tab, url: str):
    tab.goto(url + "/")
    tab.wait_for_selector("body[data-ready=true]")
    return tab


def jobs(server, **params) -> list[dict]:
    return httpx.get(server.url + "/v1/jobs", params=params, timeout=10).json()["jobs"]


def wait_text(tab, selector: str, pattern: str) -> None:
    """Wait until the element's text matches the regular expression."""
    tab.wait_for_function(
        "([s, p]) => new RegExp(p).test(document.querySelector(s).textContent)", arg=[selector, pattern]
    )


def png(
    width: int, height: int, left=(220, 40, 40), right=(40, 60, 200), parameters: str | None = None
) -> bytes:
    """A two-colour PNG (left half, right half), with an A1111 ``parameters`` text when given."""
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def drop_file(tab, selector: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """Drop a file onto ``selector`` as a drag and drop from the desktop does (dragenter, dragover, drop)."""
    transfer = tab.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    for event in ("dragenter", "dragover", "drop"):
        tab.dispatch_event(selector, event, {"dataTransfer": transfer})


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


# ------------------------------------------------------------------------------------------ tests


def test_info_gives_the_loaded_models_defaults_and_presets(server):
    from safetensors import safe_open

    from sd35.demo import MODEL_FILE
    from sd35.presets import METADATA_KEY, from_metadata

    with safe_open(MODEL_FILE, "pt") as f:  # the demo model's defaults, read from its own file
        want = from_metadata(f.metadata()[METADATA_KEY])
    info = httpx.get(server.url + "/v1/info").json()
    d = info["defaults"]
    assert (d["width"], d["height"], d["steps"], d["cfg"], d["sampler"], d["scheduler"], d["shift"]) == (
        want.width, want.height, want.steps, want.cfg, want.sampler, want.scheduler, want.shift
    )  # fmt: skip
    assert d["slg"]["layers"] == list(want.slg.layers) and d["trained_size"] == want.trained_size
    assert (
        info["model"] == "sd35_demo" and info["models"] == ["sd35_demo"] and info["loras"] == ["demo_style"]
    )
    a1111 = httpx.get(server.url + "/sdapi/v1/samplers").json()
    assert {(s["name"], s["label"]) for s in info["samplers"]} == {
        (s["aliases"][0], s["name"]) for s in a1111
    }
    presets = info["size_presets"]
    assert presets[0] == {"label": "1:1", "width": want.width, "height": want.height}
    largest = min(d["max_image_size"], info["limits"]["max_size"])
    for p in presets:
        a, b = map(int, p["label"].split()[0].split(":"))
        assert p["width"] % 16 == 0 and p["height"] % 16 == 0 and max(p["width"], p["height"]) <= largest
        assert abs(p["width"] / p["height"] - a / b) <= 0.1 * a / b, p
    assert info["t5_max_tokens"] == 256 and info["clip_max_tokens"] == 75


def test_tokenize_counts_each_encoders_tokens(server):
    def count(prompt: str, **extra) -> dict:
        r = httpx.post(server.url + "/v1/tokenize", json={"prompt": prompt, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    one = count("circle")
    clip1, t5_1 = one["clip"]["tokens"], one["t5"]["tokens"] - 1  # T5 counts its end token
    assert clip1 >= 1 and t5_1 >= 1 and one["clip"]["dropped"] == one["t5"]["dropped"] == 0
    # words are tokenized one by one, so n words are n times one word's tokens; emphasis is not text
    many = count(" ".join(["(circle:1.3)"] * 100))
    seen = 75 // clip1 * clip1  # CLIP keeps whole words while they fit in 75
    assert many["clip"] == {"tokens": 100 * clip1, "limit": 75, "dropped": 100 * clip1 - seen}
    t5 = 100 * t5_1 + 1
    assert many["t5"] == {"tokens": t5, "limit": 256, "dropped": max(0, t5 - 256)}
    assert count(" ".join(["circle"] * 100), t5_max_tokens=512)["t5"]["dropped"] == max(0, t5 - 512)
    bad = httpx.post(server.url + "/v1/tokenize", json={"prompt": "x", "t5_max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "t5_max_tokens"


def test_page_and_its_files_load_without_a_key_but_the_api_does_not(protected):
    for path in ("/", "/static/app.js", "/static/style.css", "/static/favicon.svg", "/health"):
        r = httpx.get(protected.url + path)
        assert r.status_code == 200, path
        if path != "/health":  # revalidated on each load: a new version of the page is seen at once
            assert r.headers["cache-control"] == "no-cache", path
    assert httpx.get(protected.url + "/v1/info").status_code == 401
    # a path under /static/ that climbs out reaches no API route
    assert httpx.get(protected.url + "/static/../v1/jobs").status_code != 200
    assert httpx.get(protected.url + "/static/%2e%2e/v1/jobs").status_code != 200


def test_generate_shows_progress_preview_then_the_gallery(server, page, shots):
    open_page(page, server.url)
    page.fill("#prompt", "a red circle on a blue square")
    wait_text(page, "#prompt-tokens", r"CLIP \d+ / 75 · T5 \d+ / 256")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#steps", "30")
    page.fill("#seed", "11")
    # a job ahead in the queue, so the page's job is still waiting when the page starts following it: every
    # one of its steps is then seen, however busy the machine (a fast demo job could otherwise be steps ahead)
    ahead = httpx.post(server.url + "/v1/jobs", json={"prompt": "ahead", "steps": 40, "seed": 1})
    assert ahead.status_code == 202, ahead.text
    page.click("#generate")
    # mid-run: the bar is part way, the step count and ETA show, the preview is a live PNG
    midway = page.wait_for_function(
        """() => { const v = document.querySelector('#progress').value;
                   const live = v > 0 && v < 1 && document.querySelector('#preview').src.startsWith('data:image/png');
                   return live && [document.querySelector('#progress-text').textContent,
                                   document.querySelector('#cancel').disabled,
                                   document.querySelector('#generate').disabled]; }""",
        polling="raf",
    ).json_value()
    page.screenshot(path=shots / "1-progress.png")
    assert re.match(r"Step \d+ / 30 · ETA \d+ s$", midway[0]), midway
    assert midway[1:] == [False, True]  # cancel enabled, generate disabled while it runs
    wait_text(page, "#progress-text", "^Done")
    trace = page.evaluate("window.sd35page.progress")
    assert [p["step"] for p in trace] == list(range(1, 31))  # every step was drawn, in order
    assert all(a["progress"] < b["progress"] for a, b in zip(trace, trace[1:], strict=False))
    assert trace[-1]["progress"] == 1.0 and page.eval_on_selector("#progress", "e => e.value") == 1

    job = jobs(server, limit=1)[0]
    assert job["status"] == "done" and job["settings"]["steps"] == 30
    first = page.locator("#gallery figure").first
    first.locator("img").wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery figure img'); return i.src.startsWith('blob:') && i.naturalWidth; }"
    )
    assert first.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]
    assert f"seed {job['seeds'][0]}" in first.inner_text()
    assert page.is_enabled("#generate") and page.is_enabled("#seed-reuse")
    page.screenshot(path=shots / "2-done.png")

    # the image, large, with its parameters, seed and actions
    first.locator("button").click()
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#viewer-seed") == str(job["seeds"][0])
    assert page.inner_text("#viewer-params") == job["infotexts"][0]
    download = page.get_attribute("#viewer-download", "href")
    assert download.startswith("blob:") and str(job["seeds"][0]) in page.get_attribute(
        "#viewer-download", "download"
    )
    page.screenshot(path=shots / "3-viewer.png")
    page.click("#viewer-use")
    assert page.input_value("#seed") == str(job["seeds"][0])
    assert page.input_value("#steps") == "30" and page.input_value("#width") == "128"
    # a random seed again, then "reuse last" brings the last image's seed back
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == str(job["seeds"][-1])
    # "send to img2img": the image opens in the editor, the size fitted to the model's trained 64 px
    first.locator("button").click()
    page.click("#viewer-img2img")
    page.wait_for_selector("#editor:not([hidden])")
    assert page.eval_on_selector("#init-canvas", "c => [c.width, c.height]") == [128, 128]
    assert page.inner_text("#edit-badge") == "img2img" and page.is_hidden("#viewer")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"


def test_cancel_a_long_job(server, page, shots):
    open_page(page, server.url)
    page.fill("#prompt", "a long job")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#steps", "150")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # the keyboard shortcut
    page.wait_for_function("window.sd35page.progress.length >= 2")
    page.click("#cancel")
    wait_text(page, "#progress-text", "^Cancelled$")
    page.screenshot(path=shots / "4-cancelled.png")
    job = jobs(server, limit=1)[0]
    assert job["status"] == "cancelled" and job["images"] == []
    assert page.evaluate("window.sd35page.progress.at(-1).step") < 150
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")


def test_img2img_with_a_painted_mask(server, page, shots):
    open_page(page, server.url)
    page.click("#edit-section summary")
    page.set_input_files(
        "#init-file", files=[{"name": "init.png", "mimeType": "image/png", "buffer": png(64, 64)}]
    )
    page.wait_for_selector("#editor:not([hidden])")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()

    def stroke(x: float) -> None:  # a vertical brush stroke at x (a fraction of the width)
        page.mouse.move(box["x"] + x * box["width"], box["y"] + 0.1 * box["height"])
        page.mouse.down()
        for y in (0.3, 0.5, 0.7, 0.9):
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=3)
        page.mouse.up()

    stroke(0.2)
    assert page.inner_text("#edit-badge") == "inpaint"
    page.click("#mask-clear")
    assert page.inner_text("#edit-badge") == "img2img"
    page.fill("#brush-size", "30")
    stroke(0.25)
    page.click("#mask-invert")  # repaint all but the stroke
    page.screenshot(path=shots / "5-mask.png")
    page.fill("#prompt", "a green square")
    page.fill("#steps", "4")
    page.fill("#seed", "5")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    edit = json.loads(sent.value.post_data)["edit"]
    init = Image.open(io.BytesIO(base64.b64decode(edit["image"].partition(",")[2])))
    assert init.size == (64, 64)
    mask = decode_data_url(edit["mask"]).convert("L")
    assert mask.size == (64, 64)  # the image's size
    assert mask.getpixel((16, 32)) == 0  # under the stroke: kept (inverted)
    assert mask.getpixel((56, 32)) == 255 and mask.getpixel((2, 2)) == 255  # elsewhere: repainted
    wait_text(page, "#progress-text", "^Done")
    job = jobs(server, limit=1)[0]
    assert job["status"] == "done"
    assert job["settings"]["edit"]["strength"] == 1.0  # the default with a mask
    assert "Mask blur" in job["infotexts"][0]
    page.wait_for_function("() => document.querySelector('#gallery figure img').src.startsWith('blob:')")
    page.screenshot(path=shots / "6-inpainted.png")


def test_a_bad_setting_shows_its_message_by_the_field(server, page, shots):
    page.console.allow(r"status of 400")  # the browser logs the 400s this test provokes
    open_page(page, server.url)
    before = len(jobs(server))
    # past the model card's 256 T5 tokens, the count warns (and says how many are cut)
    page.fill("#prompt", " ".join(["a red circle at the top left"] * 60))
    wait_text(page, "#prompt-tokens", "T5 reads at most 256 tokens")
    assert page.eval_on_selector("#prompt-tokens", "e => e.classList.contains('warn')")
    page.screenshot(path=shots / "7-long-prompt.png")
    page.fill("#prompt", "a bad size")
    page.wait_for_function("!document.querySelector('#prompt-tokens').classList.contains('warn')")
    page.fill("#width", "100")
    page.click("#generate")
    page.wait_for_selector("#err-width:not([hidden])")
    message = page.inner_text("#err-width")
    assert "width" in message and "multiple of 16" in message
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.is_hidden("#err-general") and page.is_hidden("#err-height")
    page.screenshot(path=shots / "8-bad-size.png")
    page.fill("#width", "64")  # editing the field clears its message
    assert page.is_hidden("#err-width") and page.get_attribute("#width", "aria-invalid") is None

    # a nested field: SLG layers the model does not have; the closed section opens to show it
    page.click("#slg-section summary")
    page.check("#slg-on")
    page.fill("#slg-layers", "9")
    page.click("#slg-section summary")  # closed again
    page.click("#generate")
    page.wait_for_selector("#err-slg-layers:not([hidden])")
    assert "do not exist" in page.inner_text("#err-slg-layers")
    assert page.get_attribute("#slg-section", "open") is not None
    page.screenshot(path=shots / "9-bad-slg.png")
    page.uncheck("#slg-on")
    page.click("#hires-section summary")
    page.check("#hires-on")
    page.fill("#hires-scale", "5")
    page.click("#generate")
    page.wait_for_selector("#err-hires-scale:not([hidden])")
    assert "at most 4" in page.inner_text("#err-hires-scale")
    assert page.get_attribute("#hires-scale", "aria-invalid") == "true"
    assert len(jobs(server)) == before  # no job was made


def test_dropping_a_png_fills_the_form(server, page, shots):
    open_page(page, server.url)
    parameters = (
        "a cat in a hat, (studio light:1.2) <lora:demo_style:0.7>\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 7, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3.5, Seed: 1234, Size: 48x80, "
        'Model: sd35_demo, Shift: 2.0, SLG layers: "1,2", SLG scale: 2.5, SLG start: 0.05, SLG end: 0.4, '
        "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent, Version: v1.10.1"
    )
    drop_file(page, "main", png(48, 80, parameters=parameters), "cat.png")
    wait_text(page, "#toast", "Settings read from cat.png")
    assert page.input_value("#prompt") == "a cat in a hat, (studio light:1.2)"
    assert page.input_value("#negative_prompt") == "blurry, low quality"
    fields = {"#steps": "7", "#cfg": "3.5", "#seed": "1234", "#width": "48", "#height": "80", "#shift": "2"}
    assert {k: page.input_value(k) for k in fields} == fields
    assert page.input_value("#sampler") == "dpmpp_2m" and page.input_value("#scheduler") == "karras"
    assert page.is_checked("#slg-on") and page.input_value("#slg-layers") == "1,2"
    assert [page.input_value("#slg-scale"), page.input_value("#slg-start"), page.input_value("#slg-end")] == [
        "2.5", "0.05", "0.4"
    ]  # fmt: skip
    assert page.text_content("#lora-list .name") == "demo_style" and page.inner_text("#loras-badge") == "1"
    assert page.input_value("#lora-list input") == "0.7"
    assert page.is_checked("#hires-on") and page.input_value("#hires-strength") == "0.6"
    page.screenshot(path=shots / "10-png-dropped.png")
    # generating now runs exactly those settings
    page.click("#generate")
    wait_text(page, "#progress-text", "^Done")
    settings = jobs(server, limit=1)[0]["settings"]
    assert {k: settings[k] for k in ("prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height")} == {
        "prompt": "a cat in a hat, (studio light:1.2)", "negative_prompt": "blurry, low quality", "steps": 7,
        "cfg": 3.5, "seed": 1234, "width": 48, "height": 80,
    }  # fmt: skip
    assert (settings["sampler"], settings["scheduler"], settings["shift"]) == ("dpmpp_2m", "karras", 2.0)
    assert settings["slg"] == {"layers": [1, 2], "scale": 2.5, "start": 0.05, "end": 0.4, "window": "steps"}
    assert settings["hires"] == {"scale": 2.0, "steps": 3, "strength": 0.6, "upscaler": "latent"}
    assert settings["loras"] == [{"name": "demo_style", "strength": 0.7}]

    # a PNG without settings dropped on the page opens for img2img instead
    drop_file(page, "main", png(64, 48), "plain.png")
    page.wait_for_selector("#editor:not([hidden])")
    assert "carries no generation settings" in page.inner_text("#toast")
    assert page.input_value("#prompt") == "a cat in a hat, (studio light:1.2)"  # the form is kept


def test_desktop_and_phone_layouts(server, browser, page, shots):
    """A batch with a LoRA and SLG from the form; the final gallery at 1280x800 (the README's picture) and
    at a phone's 390 px, where nothing overflows sideways."""
    open_page(page, server.url)
    page.fill("#prompt", "a yellow circle at the top left on a blue background")
    page.fill("#seed", "21")
    page.fill("#num_images", "4")
    page.click("#loras-section summary")
    page.select_option("#lora-pick", "demo_style")
    page.click("#lora-add")
    page.fill("#lora-list input", "0.5")
    page.click("#slg-section summary")
    page.check("#slg-on")
    page.click("#generate")
    wait_text(page, "#progress-text", "^Done")
    job = jobs(server, limit=1)[0]
    assert len(job["images"]) == 4 and job["seeds"] == [21, 22, 23, 24]
    assert job["settings"]["loras"] == [{"name": "demo_style", "strength": 0.5}]
    assert job["settings"]["slg"]["layers"] == [2]  # the demo model's own SLG layers
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery figure.new img')].filter(i => i.naturalWidth).length == 4"
    )
    page.click("#loras-section summary")
    page.click("#slg-section summary")
    page.evaluate("document.querySelector('.controls').scrollTop = 0")
    for selector in ("#generate", "#prompt", "#stage", "#gallery"):  # all within the first screen
        box = page.locator(selector).bounding_box()
        assert box["y"] >= 0 and box["y"] + min(box["height"], 40) <= 800, selector
    page.screenshot(path=shots / "11-desktop.png")
    readme_picture = REPO / "docs" / "serve-page.png"
    if os.environ.get("SD35_UPDATE_DOCS") or not readme_picture.exists():  # a test run leaves the tree as is
        shutil.copyfile(shots / "11-desktop.png", readme_picture)

    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        tab = phone.new_page()
        tab.set_default_timeout(WAIT_MS)
        console = Console(tab)
        open_page(tab, server.url)
        tab.wait_for_function("document.querySelectorAll('#gallery figure').length >= 4")
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        generate = tab.locator("#generate").bounding_box()
        assert generate["x"] >= 0 and generate["x"] + generate["width"] <= 390
        tab.screenshot(path=shots / "12-phone.png")
        tab.locator("#gallery").scroll_into_view_if_needed()  # thumbnails load as they come into view
        tab.wait_for_function(
            "[...document.querySelectorAll('#gallery img')].slice(0, 4).every((i) => i.naturalWidth > 0)"
        )
        tab.evaluate("window.scrollTo(0, 0)")
        tab.screenshot(path=shots / "13-phone-full.png", full_page=True)
        assert not console.unexpected(), console.errors
    finally:
        phone.close()


# ------------------------------------------------------------------------ a server with a key


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """A server with --api-key, a copy of the demo model named ``demo_copy`` to pick on the page, and a
    small --max-upload-mb."""
    model, tokenizers = demo_files()
    models = tmp_path_factory.mktemp("page-models")
    shutil.copy(model, models / "demo_copy.safetensors")
    data = tmp_path_factory.mktemp("serve-key") / "data"
    args = ("--api-key", API_KEY, "--models-dir", str(models), "--tokenizers", str(tokenizers),
            "--max-upload-mb", str(UPLOAD_MB))  # fmt: skip
    with ServerProcess(data, *args) as proc:
        yield proc


def test_the_key_is_asked_once_and_a_lost_connection_reconnects(protected, browser, page, shots):
    """With --api-key: the page asks for the key (and keeps it for the tab). A server killed mid-job shows
    "connection lost"; after its restart the page follows the same job (requeued, run again) to its end."""
    page.console.allow(r"status of 401")  # the page's first calls, before it has the key
    page.console.allow(r"net::ERR_|Failed to fetch|network")  # the server is gone for a while
    page.goto(protected.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.screenshot(path=shots / "14-key.png")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("sessionStorage.getItem('sd35.apiKey')") == API_KEY
    page.reload()  # the same tab keeps the key: no question this time
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_hidden("#key-dialog")

    page.fill("#prompt", "a job that outlives its server")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#steps", "40")
    page.click("#generate")
    page.wait_for_function("window.sd35page.progress.length >= 2")
    protected.kill()
    page.wait_for_selector("#connection:not([hidden])")
    assert "reconnecting" in page.inner_text("#connection")
    page.screenshot(path=shots / "15-connection-lost.png")
    started = time.monotonic()
    protected.start()
    wait_text(page, "#progress-text", "^Done")
    assert page.is_hidden("#connection")
    assert time.monotonic() - started < 60
    headers = {"Authorization": f"Bearer {API_KEY}"}
    job = httpx.get(protected.url + "/v1/jobs", params={"limit": 1}, headers=headers).json()["jobs"][0]
    assert job["status"] == "done" and job["settings"]["steps"] == 40
    page.wait_for_function("() => document.querySelector('#gallery figure img').src.startsWith('blob:')")
    page.screenshot(path=shots / "16-reconnected.png")


def test_picking_another_model_leaves_its_settings_to_its_defaults(protected, page, shots):
    """A model not loaded yet: its settings are left empty (the server fills its defaults), and once it
    is loaded the page shows them."""
    page.context.add_init_script(f"sessionStorage.setItem('sd35.apiKey', {API_KEY!r})")  # a key given before
    page.console.allow(r"status of 429")  # a token count asked while the model loads is "busy, retry"
    open_page(page, protected.url)
    assert page.is_hidden("#key-dialog")
    assert page.eval_on_selector_all("#model option", "os => os.map((o) => o.value)") == [
        "sd35_demo",
        "demo_copy",
    ]
    page.select_option("#model", "demo_copy")
    assert [page.input_value(f"#{k}") for k in ("width", "height", "steps", "cfg", "sampler")] == [""] * 5
    page.fill("#prompt", "a red circle at the top left on a blue background")
    page.fill("#seed", "3")
    page.click("#generate")
    wait_text(page, "#progress-text", "^Done")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    job = httpx.get(protected.url + "/v1/jobs", params={"limit": 1}, headers=headers).json()["jobs"][0]
    info = httpx.get(protected.url + "/v1/info", headers=headers).json()
    assert job["model"] == info["model"] == "demo_copy"
    defaults = info["defaults"]
    assert [job["settings"][k] for k in ("width", "steps", "sampler")] == [
        defaults["width"], defaults["steps"], defaults["sampler"]
    ]  # fmt: skip
    page.wait_for_function("document.title.endsWith('demo_copy')")  # the page read the new model's facts
    assert (
        page.input_value("#steps") == str(defaults["steps"])
        and page.input_value("#sampler") == defaults["sampler"]
    )
    page.screenshot(path=shots / "17-other-model.png")


def test_an_image_too_large_for_the_server_is_said_so_by_the_image(protected, page):
    page.context.add_init_script(f"sessionStorage.setItem('sd35.apiKey', {API_KEY!r})")
    page.console.allow(r"status of 413")
    open_page(page, protected.url)
    noise = Image.frombytes("RGB", (384, 384), os.urandom(384 * 384 * 3))  # does not compress
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert len(buffer.getvalue()) > UPLOAD_MB * 2**20
    page.click("#edit-section summary")
    page.set_input_files(
        "#init-file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
    )
    page.wait_for_selector("#editor:not([hidden])")
    page.fill("#prompt", "too large")
    page.click("#generate")
    page.wait_for_selector("#err-edit-image:not([hidden])")
    assert f"too large for this server (at most {UPLOAD_MB} MB)" in page.inner_text("#err-edit-image")
    assert page.is_hidden("#err-general")
    assert page.is_enabled("#generate")
