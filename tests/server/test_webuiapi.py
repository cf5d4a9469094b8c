"""The real ``webuiapi`` client (what A1111/Forge scripts use) against a real ``sd35 serve``.

webuiapi sends its own defaults (cfg_scale 7, sampler "Euler a", 512x512, 20 steps), so every call here
passes the demo model's size and a few steps; the images are the demo model's 64x64.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image

from sd35.demo.shapes import Scene, render

SMALL = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 4.0}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def mean_abs(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    a = pixels(a) if isinstance(a, Image.Image) else a
    b = pixels(b) if isinstance(b, Image.Image) else b
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


@pytest.fixture(scope="module")
def scenes():
    """Two scenes of the demo model's training set (sd35.demo.shapes): the one to edit, with its caption, and
    an unrelated one to compare edits against. The tiny demo model keeps an in-distribution image's layout
    at strength 0.5 when prompted with its caption; its own outputs drift to red and yellow."""
    edited = Scene("red", "circle", "top left", "blue")
    other = Scene("yellow", "square", "bottom right", "green")
    return render(edited), edited.caption, render(other)


def test_txt2img_euler_a(api):
    result = api.txt2img(prompt="a red circle", seed=5, sampler_name="Euler a", **SMALL)
    assert len(result.images) == 1
    assert result.image.size == (64, 64)
    infotext = result.info["infotexts"][0]
    assert "Sampler: Euler a" in infotext
    assert "Seed: 5" in infotext and "Steps: 3" in infotext
    assert result.info["sampler_name"] == "Euler a"
    assert result.info["all_seeds"] == [5]


def test_batch_and_n_iter_seeds(api):
    """batch_size=2 (and n_iter=2) make seeds s and s+1; the second image is the single image of seed s+1.

    The server runs one request's images one after another (``SD3Pipeline.run`` loops over the seeds, each
    image a batch of one with its own generator seeded s+i); only *different* requests of equal settings
    queued together share a sampling batch. These requests run alone, so image 2 of the batch and the
    single seed-s+1 image are the same computation: they must be equal to the bit, no tolerance.
    "Euler a" draws fresh noise every step, so this also checks each image has its own generator.
    """
    s = 1234
    batch = api.txt2img(prompt="a blue square", seed=s, batch_size=2, sampler_name="Euler a", **SMALL)
    assert batch.info["all_seeds"] == [s, s + 1]
    assert len(batch.images) == 2
    assert [im.size for im in batch.images] == [(64, 64)] * 2
    assert mean_abs(batch.images[0], batch.images[1]) > 1.0  # two seeds, two images
    single = api.txt2img(prompt="a blue square", seed=s + 1, sampler_name="Euler a", **SMALL)
    assert single.info["all_seeds"] == [s + 1]
    assert np.array_equal(pixels(batch.images[1]), pixels(single.image))

    iters = api.txt2img(prompt="a blue square", seed=s, n_iter=2, sampler_name="Euler a", **SMALL)
    assert iters.info["all_seeds"] == [s, s + 1]
    assert iters.info["n_iter"] == 2 and iters.info["batch_size"] == 1
    for a, b in zip(iters.images, batch.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_img2img_stays_close_to_its_input(api, scenes):
    init, caption, unrelated = scenes
    result = api.img2img(
        images=[init], prompt=caption, seed=3, denoising_strength=0.5,
        sampler_name="Euler", **SMALL,
    )  # fmt: skip
    out = result.image
    assert out.size == (64, 64)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    changed = mean_abs(out, init)
    assert changed > 1.0, "img2img at strength 0.5 returned its input unchanged"
    # correlated with its input: much nearer to it than to an unrelated image of the same model
    assert changed < 0.5 * mean_abs(out, unrelated), (changed, mean_abs(out, unrelated))


def _half_mask(left_white: bool) -> Image.Image:
    """64x64 mask, white (repaint) on the left half when ``left_white``."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255
    return Image.fromarray(mask if left_white else 255 - mask, "L")


# Columns at least 16 px from the mask's edge (x = 32): the mask_blur=4 Gaussian does not reach there.
FAR_LEFT, FAR_RIGHT = slice(0, 16), slice(48, 64)


@pytest.mark.parametrize("invert", [0, 1])
def test_inpainting_keeps_the_unmasked_side(api, scenes, invert):
    """The mask's white (left) half is repainted; outside the mask the pipeline composites the init
    image's own pixels back. inpainting_mask_invert=1 swaps the sides.

    Tolerance 1 level: where the blurred mask is exactly 0 the composite copies the original; a mask value
    of a few 1/255 could still move a pixel by one rounding step."""
    init, _, _ = scenes
    result = api.img2img(
        images=[init], mask_image=_half_mask(left_white=True), inpainting_mask_invert=invert, mask_blur=4,
        prompt="a yellow square at the bottom right on a green background", seed=8, denoising_strength=1.0, sampler_name="Euler", **SMALL,
    )  # fmt: skip
    out, before = pixels(result.image), pixels(init)
    kept, painted = (FAR_RIGHT, FAR_LEFT) if not invert else (FAR_LEFT, FAR_RIGHT)
    assert np.abs(out[:, kept] - before[:, kept]).max() <= 1
    assert np.abs(out[:, painted] - before[:, painted]).mean() > 5.0, "the masked side was not repainted"
    assert "Mask blur: 4" in result.info["infotexts"][0]


def test_lora_tag_changes_the_image_and_is_recorded(api):
    plain = api.txt2img(prompt="a red circle", seed=21, sampler_name="Euler", **SMALL)
    styled = api.txt2img(prompt="a red circle <lora:demo_style:0.8>", seed=21, sampler_name="Euler", **SMALL)
    infotext = styled.info["infotexts"][0]
    assert 'LoRA: "demo_style:0.8"' in infotext  # quoted: the value holds a colon, as A1111 writes it
    assert infotext.splitlines()[0] == "a red circle"  # the tag is not part of the prompt the model read
    assert "LoRA" not in plain.info["infotexts"][0]
    assert mean_abs(plain.image, styled.image) > 0.5, "the LoRA did not change the image"
    # A request's LoRA comes off after it: the weights are restored bit for bit, so the same request without
    # the tag gives the first image exactly.
    again = api.txt2img(prompt="a red circle", seed=21, sampler_name="Euler", **SMALL)
    assert np.array_equal(pixels(again.image), pixels(plain.image))


def test_unknown_lora_is_404_naming_it(api):
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(prompt="a red circle <lora:nope>", seed=1, sampler_name="Euler", **SMALL)
    status, text = caught.value.args
    assert status == 404
    assert "nope" in text and "demo_style" in text  # names the missing LoRA and what the server has


def test_progress_then_interrupt(api):
    """A long job reports its steps and a preview through /progress; interrupt stops it (no images) and
    the server goes on serving."""
    done: dict = {}

    def long_job():
        start = time.monotonic()
        try:
            done["result"] = api.txt2img(
                prompt="a red circle",
                seed=2,
                sampler_name="Euler",
                width=64,
                height=64,
                steps=150,
                cfg_scale=4.0,
            )
        except Exception as e:  # reported below
            done["error"] = e
        done["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=long_job, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    progress = None
    while time.monotonic() < deadline and worker.is_alive():
        progress = api.get_progress()
        if progress["progress"] > 0 and progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.05)
    assert progress is not None and progress["progress"] > 0, f"no progress reported: {progress} {done}"
    assert 0 < progress["state"]["sampling_step"] < 150
    assert progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job"]
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    preview.load()
    assert preview.width > 0 and preview.height > 0

    interrupted_at = time.monotonic()
    api.interrupt()
    worker.join(30)
    assert not worker.is_alive(), "txt2img did not return after interrupt"
    assert "error" not in done, done.get("error")
    returned_after = time.monotonic() - interrupted_at
    result = done["result"]
    assert result.images == []  # an uninterrupted run would have returned its one image
    assert result.info.get("interrupted") is True
    assert returned_after < 10, f"txt2img returned {returned_after:.1f} s after the interrupt"
    # nothing runs any more (the worker forgets the job just after it reports the cancel: allow a moment)
    deadline = time.monotonic() + 5
    while api.get_progress()["state"]["job"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get_progress()["state"]["job"] == ""

    after = api.txt2img(prompt="a red circle", seed=2, sampler_name="Euler", **SMALL)
    assert len(after.images) == 1 and after.image.size == (64, 64)


def test_png_info_reads_our_parameters(api):
    made = api.txt2img(prompt="a yellow star", seed=77, sampler_name="Euler", **SMALL)
    info = api.png_info(made.image)  # webuiapi re-encodes the PNG with its text chunks
    assert info.info == made.info["infotexts"][0]
    params = info.json["parameters"]
    assert params["Prompt"] == "a yellow star"
    assert params["Steps"] == "3" and params["Seed"] == "77" and params["Sampler"] == "Euler"
    assert params["Size"] == "64x64" and params["Model"] == "sd35_demo"


def test_listings_and_options(api):
    samplers = [s["name"] for s in api.get_samplers()]
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    assert "sd35_demo" in [m["model_name"] for m in api.get_sd_models()]
    assert "demo_style" in [lora["name"] for lora in api.get_loras()]

    assert api.get_options()["sd_model_checkpoint"] == "sd35_demo"
    api.set_options({"sd_model_checkpoint": "sd35_demo.safetensors [0123abcd]"})  # A1111's title form
    assert api.get_options()["sd_model_checkpoint"] == "sd35_demo"
    refused = api.set_options({"sd_model_checkpoint": "nope"})  # webuiapi returns the error body
    assert refused["error"] == "NotFound" and "nope" in refused["detail"]
    assert api.get_options()["sd_model_checkpoint"] == "sd35_demo"


def test_hires_fix_doubles_the_size(api):
    result = api.txt2img(
        prompt="a red circle", seed=4, sampler_name="Euler", enable_hr=True, hr_scale=2,
        hr_upscaler="Latent", hr_second_pass_steps=2, width=64, height=64, steps=2, cfg_scale=4.0,
    )  # fmt: skip
    assert result.image.size == (128, 128)
    infotext = result.info["infotexts"][0]
    assert "Size: 128x128" in infotext and "Hires steps: 2" in infotext and "Hires upscale: 2" in infotext
