"""What every route family shares: the engine of the app, a job turned into its images or its error."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from sd35 import errors
from sd35.errors import SD35Error
from sd35.request import GenerateRequest
from sd35.server.engine import Engine
from sd35.server.jobs import Job
from sd35.server.waiting import wait_for


class JobFailed(Exception):
    """A job that ended without images, raised by a route that waited for it (rendered by the app)."""

    def __init__(self, job: Job):
        super().__init__(job.error["message"] if job.error else job.status)
        self.job = job


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 255):
        raise errors.InvalidRequest(
            "the Idempotency-Key header must be 1 to 255 characters.", param="Idempotency-Key"
        )
    return key


def job_error(job: Job) -> SD35Error | None:
    """The error a failed or cancelled job ended with, as the exception that would have said so (None for
    an internal failure, which is a 500)."""
    record = job.error or {"type": "Cancelled", "message": "the job was cancelled.", "param": None}
    kind = getattr(errors, record["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, SD35Error)):
        return None
    return kind(record["message"], param=record.get("param"))


async def run_job(
    request: Request, build: Callable[[], GenerateRequest], api: str, model: str | None = None
) -> Job:
    """Build the request (decoding images off the event loop), submit it and wait for it to end; raises
    the job's error if it did not finish."""
    engine = engine_of(request)
    req = await run_in_threadpool(build)
    job = await run_in_threadpool(engine.submit, req, api, model, idempotency_key(request), True)
    job = await wait_for(engine, job.id)
    if job.status != "done":
        raise JobFailed(job)
    return job


def image_url(request: Request, name: str) -> str:
    return str(request.url_for("get_image", name=name))
