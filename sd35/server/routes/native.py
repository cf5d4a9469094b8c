"""The native job API: ``POST /v1/jobs`` -> 202, then poll, stream (Server-Sent Events) or cancel.

The body is the request itself (:class:`~sd35.server.schemas.native.JobCreate`); the job is stored before
the 202 goes out, so an accepted job survives a crash. An ``Idempotency-Key`` header makes a retried POST
return the job of the first.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sd35.image_io import png_bytes
from sd35.preview import latent_preview
from sd35.result import Progress
from sd35.server.jobs import Job
from sd35.server.routes.common import engine_of, idempotency_key, image_url
from sd35.server.schemas.native import JobAccepted, JobCreate, JobError, JobList, JobView
from sd35.server.waiting import job_events

router = APIRouter(tags=["jobs"])
PREVIEW_PX = 256  # live previews are at most this many pixels a side


def preview_png(p: Progress) -> str:
    """Base64 PNG of a step's x0 prediction, at most :data:`PREVIEW_PX` a side."""
    h, w = p.denoised.shape[-2:]
    image = latent_preview(p.denoised, upscale=max(1, min(8, PREVIEW_PX // max(h, w))))
    return base64.b64encode(png_bytes(image)).decode("ascii")


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
    job = await run_in_threadpool(engine.store.get, job_id)  # 404 before the stream starts

    def frame(number: int, event: str, data: object) -> str:
        return f"id: {number}\nevent: {event}\ndata: {json.dumps(data)}\n\n"

    async def stream():
        number = 0
        yield frame(number, "status", job_view(request, job).model_dump())
        async for event in job_events(engine, job_id):
            number += 1
            if event is None:
                yield f": keep-alive {time.time():.0f}\n\n"
                continue
            name = event["event"]
            if name == "progress":
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
