"""The official ``openai`` client against a real ``sd35 serve``, changing nothing but ``base_url``.

OpenAI's Images API has no steps field, so these requests run the demo model's 20 steps (64x64: fast).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sd35.demo.shapes import Scene, render


def decode(b64: str) -> tuple[bytes, Image.Image]:
    data = base64.b64decode(b64)
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_file(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_generate_two_distinct_pngs(client):
    response = client.images.generate(prompt="a red circle", n=2, size="64x64")
    assert len(response.data) == 2
    files = [decode(item.b64_json) for item in response.data]
    for data, image in files:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert image.format == "PNG" and image.size == (64, 64)
        assert "Seed: " in image.info["parameters"]  # our infotext travels in the PNG
    (_, a), (_, b) = files
    assert np.abs(pixels(a) - pixels(b)).mean() > 1.0  # seeds s and s+1: two different images
    assert response.size == "64x64"


def test_response_format_url_downloads_the_png(client, server):
    response = client.images.generate(prompt="a blue square", size="64x64", response_format="url")
    assert len(response.data) == 1 and response.data[0].b64_json is None
    url = response.data[0].url
    assert url.startswith(server.url + "/v1/images/")
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(download.content))
    assert image.format == "PNG" and image.size == (64, 64)


def test_output_format_jpeg(client):
    response = client.images.generate(prompt="a blue square", size="64x64", output_format="jpeg")
    data, image = decode(response.data[0].b64_json)
    assert data.startswith(b"\xff\xd8\xff")  # the JPEG start-of-image marker
    assert image.format == "JPEG" and image.size == (64, 64)
    assert response.output_format == "jpeg"


def test_edit_with_rgba_mask_repaints_the_transparent_half(client):
    """OpenAI's mask convention: transparent pixels are repainted, opaque ones kept.

    The pipeline composites the original pixels back where the (blurred, 8 px by default) mask is 0: the
    columns 20 px or more from the mask's edge keep the init image within 1 level (a mask value of a few
    1/255 may move a pixel by one rounding step)."""
    init = render(Scene("red", "circle", "top left", "blue"))
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:, 32:] = 0  # the right half is transparent: repaint it
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.putalpha(Image.fromarray(alpha, "L"))
    response = client.images.edit(
        image=("init.png", png_file(init), "image/png"),
        mask=("mask.png", png_file(mask), "image/png"),
        prompt="a yellow square at the bottom right on a green background",
        size="64x64",
        extra_body={"seed": 5},
    )
    _, out = decode(response.data[0].b64_json)
    assert out.size == (64, 64)
    after, before = pixels(out), pixels(init)
    kept, repainted = slice(0, 12), slice(52, 64)
    assert np.abs(after[:, kept] - before[:, kept]).max() <= 1
    assert np.abs(after[:, repainted] - before[:, repainted]).mean() > 5.0, "the transparent half was kept"
    assert "Seed: 5" in out.info["parameters"]


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "sd35_demo" in ids


def test_bad_size_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", size="65x64")
    error = caught.value
    assert error.status_code == 400
    # the client keeps the body's "error" object as .body and its fields as attributes
    assert error.body["type"] == "invalid_request_error" and error.type == "invalid_request_error"
    assert error.body["param"] in ("width", "size") and error.param == error.body["param"]
    assert "65" in error.body["message"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="a red circle", model="dall-e-3", size="64x64")
    error = caught.value
    assert error.status_code == 404
    assert error.code == "model_not_found" and error.body["code"] == "model_not_found"
    assert error.param == "model" and "dall-e-3" in error.body["message"]
