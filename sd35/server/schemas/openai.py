"""OpenAI's Images API bodies (``/v1/images/generations``, ``/v1/images/edits``) mapped onto
:class:`~sd35.request.GenerateRequest`, and the response they expect.

``size`` "WxH" becomes width and height ("auto" or left out: the model's), ``n`` the number of images. The
DALL-E and gpt-image options we have no use for (``quality``, ``style``, ``background``, ``moderation``,
``user``) are accepted and ignored, as clients send them by default. sd35 adds ``negative_prompt`` and
``seed`` for clients that can send extra fields. An edit's mask follows OpenAI: its transparent pixels are
the ones repainted (:func:`sd35.image_io.read_mask`).
"""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sd35.errors import InvalidRequest
from sd35.image_io import read_image
from sd35.request import Edit, GenerateRequest

OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["b64_json", "url"]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"1024x1024"`` -> (1024, 1024); ``"auto"`` or None -> (None, None): the model's size."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not match:
        raise InvalidRequest(
            f"size must be WIDTHxHEIGHT, e.g. 1024x1024, or auto; got {size!r}.", param="size"
        )
    return int(match.group(1)), int(match.group(2))


class _ImagesOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = Field(None, description="a name from GET /v1/models (default: the server's current)")
    n: int | None = Field(None, description="images to make (1-10)")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto"')
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    negative_prompt: str | None = Field(None, description="sd35 extension")
    seed: int | None = Field(None, description="sd35 extension; image i uses seed + i")

    def _fields(self) -> dict[str, Any]:
        if self.n is not None and not 1 <= self.n <= 10:
            raise InvalidRequest(f"n must be between 1 and 10, got {self.n}.", param="n")
        width, height = parse_size(self.size)
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "width": width,
            "height": height,
            "num_images": self.n or 1,
            "seed": self.seed,
        }
        if self.negative_prompt is not None:
            fields["negative_prompt"] = self.negative_prompt
        return fields


class ImagesGenerateBody(_ImagesOptions):
    """``POST /v1/images/generations``."""

    def to_request(self) -> GenerateRequest:
        return GenerateRequest(**self._fields())


class ImagesEditForm(_ImagesOptions):
    """``POST /v1/images/edits`` (multipart): the form fields; the image and mask arrive as decoded images."""

    def to_request(self, image: Image.Image, mask: Image.Image | None) -> GenerateRequest:
        return GenerateRequest(**self._fields(), edit=Edit(image=image, mask=mask))


def encode(png: Path, output_format: OutputFormat) -> bytes:
    """One stored output PNG as the client asked for it: the file itself for PNG (it carries the
    ``parameters`` chunk), else decoded and written as JPEG or WebP."""
    if output_format == "png":
        return png.read_bytes()
    buffer = io.BytesIO()
    read_image(png).convert("RGB").save(buffer, format=output_format.upper(), quality=95)
    return buffer.getvalue()


def images_response(
    body: _ImagesOptions, images: list[tuple[bytes | None, str]], size: tuple[int, int], prompt: str
) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse``; ``images`` are (file bytes, URL) pairs (no bytes when URLs are asked for)."""
    if body.response_format == "url":
        data = [{"url": url, "revised_prompt": prompt} for _, url in images]
    else:
        data = [
            {"b64_json": base64.b64encode(b).decode("ascii"), "revised_prompt": prompt} for b, _ in images
        ]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": body.output_format or "png",
        "size": f"{size[0]}x{size[1]}",
    }
