"""The native job API: ``POST /v1/jobs`` -> 202, then poll, stream (Server-Sent Events) or cancel.

The body is the request itself (:class:`~sd35.server.schemas.native.JobCreate`); the job is stored before
the 202 goes out, so an accepted job survives a crash. An ``Idempotency-Key`` header makes a retried POST
return the job of the first.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, get_args

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sd35._version import __version__
from sd35.a1111 import SAMPLER_NAMES, SCHEDULER_NAMES
from sd35.conditioning.prompt import prompt_words
from sd35.conditioning.tokenize import CLIP_LENGTH, T5_MAX_TOKENS
from sd35.errors import Busy, InvalidRequest
from sd35.image_io import png_bytes
from sd35.presets import ModelDefaults
from sd35.preview import preview_within
from sd35.request import SIZE_MULTIPLE, Upscaler
from sd35.result import Progress
from sd35.sampling import SAMPLERS, SCHEDULERS
from sd35.server.jobs import Job
from sd35.server.routes.common import engine_of, idempotency_key, image_url
from sd35.server.schemas.native import (
    JobAccepted,
    JobCreate,
    JobError,
    JobList,
    JobView,
    LimitsView,
    ModelDefaultsView,
    NamedChoice,
    ServerInfo,
    SizePreset,
    SLGDefaults,
    TokenCount,
    TokenCounts,
    TokenizeBody,
)
from sd35.server.waiting import job_events

router = APIRouter(tags=["jobs"])
PREVIEW_PX = 256  # live previews are at most this many pixels a side


def preview_png(p: Progress) -> str:
    """Base64 PNG of a step's x0 prediction, at most :data:`PREVIEW_PX` a side."""
    return base64.b64encode(png_bytes(preview_within(p.denoised, PREVIEW_PX))).decode("ascii")


def job_view(request: Request, job: Job) -> JobView:
    engine = engine_of(request)
    live = engine.live(job.id) if job.status == "running" else None
    progress = 1.0 if job.status == "done" else live.fraction if live is not None else 0.0
    result = job.result
    return JobView(
        id=job.id,
        status=job.status,
        model=job.model,
        progress=progress,
        queue_position=engine.store.position(job) if job.status == "queued" else None,
        images=[image_url(request, name) for name in result.get("images", [])],
        seeds=result.get("seeds", []),
        infotexts=result.get("infotexts", []),
        warnings=result.get("warnings", []),
        settings=result.get("settings"),
        error=JobError(**job.error) if job.error else None,
        created=job.created,
        started=job.started,
        finished=job.finished,
    )


@router.post("/v1/jobs", status_code=202, response_model=JobAccepted)
async def create_job(
    body: JobCreate,
    request: Request,
    idempotency_key_header: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Queue a generation; 202 with the job's id (the same job again for a repeated Idempotency-Key)."""
    engine = engine_of(request)
    req = await run_in_threadpool(body.to_request)
    job = await run_in_threadpool(engine.submit, req, "native", body.model, idempotency_key(request))
    url = str(request.url_for("get_job", job_id=job.id))
    accepted = JobAccepted(id=job.id, status=job.status, url=url)
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})


@router.get("/v1/jobs", response_model=JobList)
async def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> JobList:
    """The most recent jobs, newest first."""
    jobs = await run_in_threadpool(engine_of(request).store.recent, limit)
    return JobList(jobs=[job_view(request, job) for job in jobs])


@router.get("/v1/jobs/{job_id}", response_model=JobView)
async def get_job(job_id: str, request: Request) -> JobView:
    job = await run_in_threadpool(engine_of(request).store.get, job_id)
    return job_view(request, job)


@router.delete("/v1/jobs/{job_id}", response_model=JobView)
async def cancel_job(job_id: str, request: Request) -> JobView:
    """Cancel: a queued job at once, a running one at its next step (its status says when)."""
    job = await run_in_threadpool(engine_of(request).cancel, job_id)
    return job_view(request, job)


@router.get("/v1/jobs/{job_id}/events")
async def job_event_stream(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: ``status`` (the job now), ``running``, ``progress`` per step (with a base64 PNG
    ``preview``), then one of ``done``, ``failed``, ``cancelled`` carrying the job as ``GET`` shows it."""
    engine = engine_of(request)
    await run_in_threadpool(engine.store.get, job_id)  # 404 before the stream starts

    def frame(number: int, event: str, data: object) -> str:
        return f"id: {number}\nevent: {event}\ndata: {json.dumps(data)}\n\n"

    async def stream():
        number = -1
        async for event in job_events(engine, job_id):
            if event is None:
                yield f": keep-alive {time.time():.0f}\n\n"
                continue
            number += 1
            name = event["event"]
            if name == "status":
                data = job_view(request, event["job"]).model_dump()
            elif name == "progress":
                p: Progress = event["progress"]
                data = {
                    "step": p.step + 1,
                    "steps": p.steps,
                    "stage": p.stage,
                    "image": p.image,
                    "images": p.images,
                    "progress": p.fraction,
                    "preview": await run_in_threadpool(preview_png, p),
                }
            else:
                current = await run_in_threadpool(engine.store.get, job_id)
                data = job_view(request, current).model_dump()
            yield frame(number, name, data)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/v1/images/{name}", name="get_image", response_class=FileResponse)
async def get_image(name: str, request: Request) -> FileResponse:
    """An output PNG by the name a job lists (never a path)."""
    path = engine_of(request).store.image_file(name)
    return FileResponse(path, media_type="image/png")


@router.get("/v1/loras")
async def list_loras(request: Request) -> dict:
    """The LoRA names a request may use."""
    return {"loras": engine_of(request).catalog.loras}


@router.get("/v1/controlnets")
async def list_controlnets(request: Request) -> dict:
    """The ControlNet names a request's ``controls`` may use."""
    return {"controlnets": engine_of(request).catalog.controlnets}


ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (21, 9), (9, 21))
"""The aspect ratios offered as size presets (SD3.5 Medium's training buckets are these at about 1 MP)."""
TRAINING_SIDES = (512, 768, 1024, 1440)
"""Square sizes of SD3.5 Medium's progressive training stages (the model card: up to 1440 px)."""


def size_presets(defaults: ModelDefaults, largest: int) -> list[SizePreset]:
    """Sizes at the model's default pixel area for each of :data:`ASPECT_RATIOS` (multiples of 64 for
    a model of 512 px or more, else of 16; kept where the rounding leaves the ratio within 10%), then
    squares of the training stages up to its trained size; only those with both sides at most ``largest``."""
    area = defaults.width * defaults.height
    step = 64 if min(defaults.width, defaults.height) >= 512 else SIZE_MULTIPLE
    sizes: list[SizePreset] = []
    for a, b in ASPECT_RATIOS:
        w = max(step, round((area * a / b) ** 0.5 / step) * step)
        h = max(step, round((area * b / a) ** 0.5 / step) * step)
        if abs(w / h - a / b) > 0.1 * a / b:
            continue
        sizes.append(SizePreset(label=f"{a}:{b}", width=w, height=h))
    for side in TRAINING_SIDES:
        if side <= defaults.trained_size:
            sizes.append(SizePreset(label=f"1:1 ({side})", width=side, height=side))
    seen: set[tuple[int, int]] = set()
    presets = []
    for p in sizes:
        if (p.width, p.height) not in seen and max(p.width, p.height) <= largest:
            seen.add((p.width, p.height))
            presets.append(p)
    return presets


def _pipe(request: Request):
    pipe = engine_of(request).pipe
    if pipe is None:
        raise Busy("the server is loading a model; try again in a moment.")
    return pipe


@router.get("/v1/info", response_model=ServerInfo, tags=["server"])
async def info(request: Request) -> ServerInfo:
    """The loaded model, its defaults, the sampler/scheduler names, this server's limits and size presets
    (what a client needs to build a form; the web page at ``/`` reads it)."""
    engine = engine_of(request)
    settings = request.app.state.settings
    model, pipe = engine.model, _pipe(request)
    d: ModelDefaults = pipe.defaults
    grid = pipe.mmditx.config.max_image_size
    limits = settings.limits
    largest = min(grid, limits.max_size)
    return ServerInfo(
        version=__version__,
        model=model,
        variant=pipe.identity.title,
        default_model=engine.default_model,
        models=engine.catalog.checkpoints,
        loras=engine.catalog.loras,
        controlnets=engine.catalog.controlnets,
        defaults=ModelDefaultsView(
            preset=d.name,
            width=d.width,
            height=d.height,
            steps=d.steps,
            cfg=d.cfg,
            sampler=d.sampler,
            scheduler=d.scheduler,
            shift=d.shift,
            slg=SLGDefaults(layers=list(d.slg.layers), scale=d.slg.scale, start=d.slg.start, end=d.slg.end),
            trained_size=d.trained_size,
            max_image_size=grid,
            depth=pipe.mmditx.config.depth,
            img2img=pipe.vae.config.has_encoder,
        ),
        samplers=[NamedChoice(name=n, label=SAMPLER_NAMES[n]) for n in SAMPLERS],
        schedulers=[NamedChoice(name=n, label=SCHEDULER_NAMES[n]) for n in SCHEDULERS],
        upscalers=list(get_args(Upscaler)),
        limits=LimitsView(
            max_size=limits.max_size,
            max_steps=limits.max_steps,
            max_batch=limits.max_batch,
            max_prompt_chars=limits.max_prompt_chars,
            max_body_bytes=limits.max_body_bytes,
        ),
        size_presets=size_presets(d, largest),
        clip_max_tokens=CLIP_LENGTH - 2,
        t5_max_tokens=T5_MAX_TOKENS,
        protected=settings.protected,
    )


@router.post("/v1/tokenize", response_model=TokenCounts, tags=["server"])
async def tokenize(body: TokenizeBody, request: Request) -> TokenCounts:
    """How many tokens CLIP and T5 get from ``prompt`` (as the model tokenizes it: emphasis brackets
    removed, each word on its own), and how many fall past each limit: CLIP reads 75, T5 ``t5_max_tokens``
    (the model card's 256 unless given)."""
    limit_chars = request.app.state.settings.limits.max_prompt_chars
    if len(body.prompt) > limit_chars:
        raise InvalidRequest(
            f"prompt is {len(body.prompt)} characters long; this server takes at most {limit_chars}.",
            param="prompt",
        )
    tokenizer = _pipe(request).tokenizer
    t5_limit = body.t5_max_tokens or T5_MAX_TOKENS

    def count() -> TokenCounts:
        words = [w for w, _ in prompt_words(body.prompt)]
        clip = max(sum(map(len, t.encode_words(words))) for t in (tokenizer.clip_l, tokenizer.clip_g))
        tokens = tokenizer([body.prompt], t5_max_tokens=t5_limit)
        clip_count = TokenCount(tokens=clip, limit=CLIP_LENGTH - 2, dropped=tokens.clip_dropped[0])
        if tokenizer.t5 is None:
            return TokenCounts(clip=clip_count)
        t5 = sum(map(len, tokenizer.t5.encode_words(words))) + 1  # + its end token
        return TokenCounts(
            clip=clip_count, t5=TokenCount(tokens=t5, limit=t5_limit, dropped=tokens.t5_dropped[0])
        )

    return await run_in_threadpool(count)
