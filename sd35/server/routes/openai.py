"""OpenAI's Images API: what the official ``openai`` client (with ``base_url`` set to this server) sends."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from sd35.errors import InvalidRequest
from sd35.image_io import read_image, read_mask
from sd35.server.jobs import Job
from sd35.server.routes.common import engine_of, image_url, run_job
from sd35.server.schemas.openai import (
    ImagesEditForm,
    ImagesGenerateBody,
    OutputFormat,
    ResponseFormat,
    encode,
    images_response,
)

router = APIRouter(tags=["openai"])


async def _respond(request: Request, body, job: Job) -> dict:
    store = engine_of(request).store
    names = job.result["images"]
    settings = job.result["settings"]

    def files() -> list[tuple[bytes | None, str]]:
        # a URL response sends no bytes, so the files are read only for base64
        wanted = body.response_format != "url"
        fmt = body.output_format or "png"
        return [(encode(store.image_file(n), fmt) if wanted else None, image_url(request, n)) for n in names]

    images = await run_in_threadpool(files)
    return images_response(body, images, (settings["width"], settings["height"]), settings["prompt"])


@router.post("/v1/images/generations")
async def images_generations(body: ImagesGenerateBody, request: Request) -> dict:
    """Text to image; ``response_format`` ``b64_json`` (default) or ``url`` (served by ``/v1/images/...``)."""
    job = await run_job(request, body.to_request, "openai", body.model)
    return await _respond(request, body, job)


async def _read_upload(upload: UploadFile, param: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"{param} is larger than this server takes ({limit} bytes).", param=param)
    if not data:
        raise InvalidRequest(f"{param} is empty.", param=param)
    return data


@router.post("/v1/images/edits")
async def images_edits(
    request: Request,
    prompt: Annotated[str, Form()],
    image: Annotated[
        list[UploadFile] | None, File(description="the image to edit (PNG, JPEG or WebP)")
    ] = None,
    image_array: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
    mask: Annotated[UploadFile | None, File(description="transparent pixels are repainted")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int | None, Form()] = None,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat | None, Form()] = None,
    output_format: Annotated[OutputFormat | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
) -> dict:
    """Edit an image: with ``mask`` its transparent area is repainted (inpainting), else the whole image
    is redrawn from it (img2img)."""
    uploads = (image or []) + (image_array or [])
    if not uploads:
        raise InvalidRequest("image is required: the image to edit, as a file upload.", param="image")
    limit = engine_of(request).settings.limits.max_body_bytes
    image_bytes = await _read_upload(uploads[0], "image", limit)
    mask_bytes = await _read_upload(mask, "mask", limit) if mask is not None else None
    body = ImagesEditForm(
        prompt=prompt, model=model, n=n, size=size, response_format=response_format,
        output_format=output_format, negative_prompt=negative_prompt, seed=seed,
    )  # fmt: skip

    def build():
        picture = read_image(image_bytes, "image", param="image")
        hole = read_mask(mask_bytes, "mask", param="mask") if mask_bytes is not None else None
        return body.to_request(picture, hole)

    job = await run_job(request, build, "openai", model)
    return await _respond(request, body, job)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The models a request may name."""
    engine = engine_of(request)
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "sd35"}
            for name in engine.catalog.checkpoints
        ],
    }
