"""How an async HTTP handler follows a job that the worker thread runs: wait for its end, or stream its
events. The engine calls listeners from its thread; these hand each event to the event loop in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from sd35.server.engine import Engine, Event
from sd35.server.jobs import Job

POLL_S = 5.0  # the store is read again this often, in case an event was missed (a job ended meanwhile)
FINAL_EVENTS = ("done", "failed", "cancelled")


async def job_events(engine: Engine, job_id: str, heartbeat: float = POLL_S) -> AsyncIterator[Event | None]:
    """The job's events as they happen, ending after its final one; None now and then while nothing
    happens (a chance to send a heartbeat). The first event is ``status`` with the job as it is
    (``"job"``), read after listening started, so no event after it is lost."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    stop = engine.listen(job_id, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    try:
        job = await run_in_threadpool(engine.store.get, job_id)
        yield {"event": "status", "job": job}
        if job.is_final:
            yield {"event": job.status}
            return
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=heartbeat)
            except asyncio.TimeoutError:
                job = await run_in_threadpool(engine.store.get, job_id)
                if job.is_final:
                    yield {"event": job.status}
                    return
                yield None
                continue
            yield event
            if event["event"] in FINAL_EVENTS:
                return
    finally:
        stop()


async def wait_for(engine: Engine, job_id: str) -> Job:
    """The job once it has ended."""
    async for _ in job_events(engine, job_id):
        pass
    return await run_in_threadpool(engine.store.get, job_id)
