"""A1111/Forge's ``/sdapi/v1``: what ``webuiapi``, Open WebUI, SillyTavern and Krita-style clients call."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sd35.a1111 import SAMPLER_NAMES, SCHEDULER_NAMES, parse_infotext
from sd35.errors import InvalidRequest
from sd35.image_io import png_bytes
from sd35.preview import latent_preview
from sd35.server.routes.common import JobFailed, engine_of, run_job
from sd35.server.schemas.a1111 import (
    Img2ImgBody,
    PngInfoBody,
    Txt2ImgBody,
    controlnet_modules,
    info,
    model_name,
)
from sd35.server.schemas.native import decode_base64

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
controlnet_router = APIRouter(prefix="/controlnet", tags=["a1111"])


async def _generate(request: Request, body: Txt2ImgBody | Img2ImgBody, api: str) -> dict[str, Any]:
    engine = engine_of(request)
    model = body.model()
    try:
        job = await run_job(request, body.to_request, api, model)
    except JobFailed as e:
        if e.job.status != "cancelled":
            raise
        # A1111 answers an interrupted generation with what it has; a cancelled job has no images
        return {"images": [], "parameters": body.model_dump(), "info": '{"interrupted": true}'}
    names = job.result["images"]

    def read() -> list[str]:
        return [base64.b64encode(engine.store.image_file(n).read_bytes()).decode("ascii") for n in names]

    return {
        "images": await run_in_threadpool(read),
        "parameters": body.model_dump(),
        "info": info(body, job.result, job.model),
    }


@router.post("/txt2img")
async def txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    """Text to image (with ``enable_hr``: hires fix). ``images`` are base64 PNGs with ``parameters``."""
    return await _generate(request, body, "a1111")


@router.post("/img2img")
async def img2img(body: Img2ImgBody, request: Request) -> dict[str, Any]:
    """img2img from ``init_images[0]``; with ``mask`` (white = repaint) inpainting."""
    return await _generate(request, body, "a1111")


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress (0..1), its ETA and, unless skipped, a live preview."""
    engine = engine_of(request)
    running = engine.running()
    waiting = await run_in_threadpool(engine.store.waiting)
    state = {
        "skipped": False,
        "interrupted": False,
        "job": "",
        "job_count": waiting,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    job_id, live = running[0]
    state.update(job=job_id, job_no=live.image, sampling_step=live.step, sampling_steps=live.steps)
    image = None
    if not skip_current_image and live.progress is not None:
        preview = await run_in_threadpool(latent_preview, live.progress.denoised)
        image = base64.b64encode(png_bytes(preview)).decode("ascii")
    eta = live.eta
    return {
        "progress": live.fraction,
        "eta_relative": eta if eta is not None else 0.0,
        "state": state,
        "current_image": image,
        "textinfo": f"{live.stage} pass, step {live.step} of {live.steps}",
    }


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the running generation at its next step (its client gets no images)."""
    return {"interrupted": engine_of(request).interrupt()}


@router.post("/skip")
async def skip(request: Request) -> dict[str, Any]:
    """As interrupt: sd35 runs a request's images as one job, so skipping one stops the job."""
    return {"skipped": engine_of(request).interrupt()}


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": a1111, "aliases": [ours], "options": {}} for ours, a1111 in SAMPLER_NAMES.items()]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": ours, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for ours, label in SCHEDULER_NAMES.items()
    ]


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    """The hires fix upscalers (``hr_upscaler``)."""
    return [
        {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 2}
        for n in ("Latent", "Lanczos")
    ]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": "Latent"}]


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The checkpoints ``sd_model_checkpoint`` may name (names, never paths), each with its SD3 release
    (``variant``: the loaded model's as it was loaded, the others' as their files say)."""
    engine = engine_of(request)
    pipe = engine.pipe

    def release(name: str) -> str | None:
        if name == engine.model and pipe is not None:
            return pipe.identity.title
        return engine.catalog.release(name)

    names = engine.catalog.checkpoints
    releases = await run_in_threadpool(lambda: [release(n) for n in names])
    return [
        {
            "title": n,
            "model_name": n,
            "hash": None,
            "sha256": None,
            "filename": n,
            "config": None,
            "variant": v,
        }
        for n, v in zip(names, releases, strict=True)
    ]


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRAs ``<lora:name:weight>`` may name."""
    return [{"name": n, "alias": n, "path": n, "metadata": {}} for n in engine_of(request).catalog.loras]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> None:
    await run_in_threadpool(engine_of(request).catalog.refresh)


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    await run_in_threadpool(engine_of(request).catalog.refresh)


def _options(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    return {
        "sd_model_checkpoint": engine.default_model,
        "samples_format": "png",
        "sd_checkpoint_hash": None,
        "CLIP_stop_at_last_layers": 1,
    }


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    return _options(request)


@router.post("/options")
async def set_options(request: Request, options: dict[str, Any]) -> JSONResponse:
    """Set options; ``sd_model_checkpoint`` loads that model (the call returns once it is loaded) and makes
    it the default. Other A1111 options do not apply to sd35 and are ignored."""
    title = options.get("sd_model_checkpoint")
    if title is not None:
        if not isinstance(title, str):
            raise InvalidRequest("sd_model_checkpoint must be a model name.", param="sd_model_checkpoint")
        await run_in_threadpool(engine_of(request).set_model, model_name(title))
    return JSONResponse(None)


@router.post("/png-info")
async def png_info(body: PngInfoBody) -> dict[str, Any]:
    """The generation settings stored in a PNG's ``parameters`` text."""

    def read() -> dict[str, Any]:
        from io import BytesIO

        from PIL import Image

        data = decode_base64(body.image, "image")
        try:
            with Image.open(BytesIO(data)) as im:
                text = im.info.get("parameters")
                items = {k: v for k, v in im.info.items() if isinstance(v, str)}
        except Exception:
            raise InvalidRequest("image cannot be read as an image.", param="image") from None
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, settings = parse_infotext(text)
        return {
            "info": text,
            "items": items,
            "parameters": {"Prompt": prompt, "Negative prompt": negative, **settings},
        }

    return await run_in_threadpool(read)


@controlnet_router.get("/version")
async def controlnet_version() -> dict[str, Any]:
    """The ControlNet extension's API version (2: units as ``alwayson_scripts.controlnet.args``)."""
    return {"version": 2}


@controlnet_router.get("/model_list")
async def controlnet_model_list(request: Request) -> dict[str, Any]:
    """The ControlNets a unit's ``model`` may name (the models folder's ``controlnet/``; names, never paths)."""
    return {"model_list": engine_of(request).catalog.controlnets}


@controlnet_router.get("/module_list")
async def controlnet_module_list() -> dict[str, Any]:
    """The preprocessors a unit's ``module`` may name (those that need no weights)."""
    return {"module_list": controlnet_modules(), "module_detail": {}}
