"""ComfyUI's websocket messages: the engine's job events turned into what ComfyUI's ``/ws`` sends.

For a workflow job, in ComfyUI's order (its ``execution.py`` and ``main.py``): ``execution_start``,
``execution_cached``, per sampler node ``executing`` then ``progress`` per step (and, when the prompt asked
for previews, a binary frame per step), per output node ``executing`` then ``executed`` with its images,
then ``execution_success`` (or ``execution_error`` / ``execution_interrupted``) and ``executing`` with
``node: null``; a ``status`` with the queue's length goes to every client whenever a job is queued or ends.

A prompt's messages go to the websocket clients of its ``client_id``, or to every client when it has none
(ComfyUI's ``send_sync`` with no sid). Previews are off unless the prompt's ``extra_data`` has
``"preview_method"`` set to ``"auto"``, ``"latent2rgb"`` or ``"taesd"`` (ComfyUI's server-wide
``--preview-method`` defaults to none, and clients such as comfy-api-simplified take every binary frame
for an output image); the frame is ComfyUI's: 4-byte big-endian event type 1 (PREVIEW_IMAGE), 4-byte
image format 1 (JPEG), the JPEG.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from sd35.preview import preview_within
from sd35.result import Progress
from sd35.server.engine import EVERY_JOB, Engine, Event
from sd35.server.jobs import FINAL
from sd35.server.workflow_jobs import WORKFLOW_API, graph_of

log = logging.getLogger("sd35.server")

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
JPEG = 1  # its image format numbers: 1 JPEG, 2 PNG
PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")
PREVIEW_PX = 512

Message = str | bytes


def now_ms() -> int:
    return int(time.time() * 1000)


def message(kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": kind, "data": data})


def preview_frame(p: Progress) -> bytes:
    """ComfyUI's binary preview frame of a step's x0 prediction."""
    buffer = io.BytesIO()
    preview_within(p.denoised, PREVIEW_PX).save(buffer, format="JPEG", quality=95)
    return struct.pack(">II", PREVIEW_IMAGE, JPEG) + buffer.getvalue()


@dataclass
class _Prompt:
    """What the hub remembers of a workflow job while it runs."""

    client_id: str | None
    graph: dict[str, Any]
    previews: bool
    node: str | None = None
    started: bool = False
    executed: tuple[str, ...] = ()


class ComfyHub:
    """Websocket clients by ``client_id``, fed from the engine's events (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._clients: dict[str, set[asyncio.Queue[Message]]] = {}
        self._prompts: dict[str, _Prompt | None] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unlisten = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._unlisten = self.engine.listen(EVERY_JOB, self._on_event)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()

    # ------------------------------------------------------------------------------ clients

    def connect(self, client_id: str) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        with self._lock:
            self._clients.setdefault(client_id, set()).add(queue)
        return queue

    def disconnect(self, client_id: str, queue: asyncio.Queue[Message]) -> None:
        with self._lock:
            queues = self._clients.get(client_id, set())
            queues.discard(queue)
            if not queues:
                self._clients.pop(client_id, None)

    def status(self, sid: str | None = None) -> dict[str, Any]:
        """ComfyUI's ``status`` data: the jobs waiting or running (all kinds: they share the GPU)."""
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.engine.store.waiting()}}}
        if sid is not None:
            data["sid"] = sid
        return data

    def send(self, client_id: str | None, *messages: Message) -> None:
        """Queue ``messages`` for ``client_id``'s sockets (every socket for None); from any thread."""
        if self._loop is None or not messages:
            return
        with self._lock:
            if client_id is None:
                queues = [q for qs in self._clients.values() for q in qs]
            else:
                queues = list(self._clients.get(client_id, ()))
        for queue in queues:
            for m in messages:
                self._loop.call_soon_threadsafe(queue.put_nowait, m)

    def queue_changed(self) -> None:
        try:
            self.send(None, message("status", self.status()))
        except Exception:  # a database hiccup loses one status message, never the job
            log.exception("reading the queue length failed")

    # ------------------------------------------------------------------------------ events

    def _prompt(self, job_id: str) -> _Prompt | None:
        """The job's client and graph, read once (None for a job that is not a workflow)."""
        with self._lock:
            if job_id in self._prompts:
                return self._prompts[job_id]
        job = self.engine.store.get(job_id)
        info = None
        if job.api == WORKFLOW_API:
            extra = job.request.get("extra_data") or {}
            info = _Prompt(
                client_id=extra.get("client_id"),
                graph=graph_of(job.request),
                previews=extra.get("preview_method") in PREVIEW_METHODS,
            )
        with self._lock:
            self._prompts[job_id] = info
        return info

    def _on_event(self, event: Event) -> None:
        job_id, name = event["job_id"], event["event"]
        try:
            info = self._prompt(job_id)
        except Exception:
            log.exception("reading job %s for its websocket messages failed", job_id)
            return
        if info is not None:
            self.send(info.client_id, *self._messages(job_id, info, event))
        if name in FINAL:
            with self._lock:
                self._prompts.pop(job_id, None)
            self.queue_changed()

    def _messages(self, prompt_id: str, info: _Prompt, event: Event) -> list[Message]:
        """ComfyUI's messages for one engine event of a workflow job."""
        name = event["event"]
        if name == "running":
            info.started = True
            return [
                message("execution_start", {"prompt_id": prompt_id, "timestamp": now_ms()}),
                message("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": now_ms()}),
            ]
        if name == "node":
            info.node = event["node"]
            return [_executing(info.node, prompt_id)]
        if name == "progress":
            p: Progress = event["progress"]
            node = event.get("node", info.node)
            out: list[Message] = [
                message(
                    "progress", {"value": p.step + 1, "max": p.steps, "prompt_id": prompt_id, "node": node}
                )
            ]
            if info.previews:
                out.append(preview_frame(p))
            return out
        if name == "output":
            node = event["node"]
            info.node, info.executed = node, (*info.executed, node)
            output = {"images": event["images"]}
            executed = {"node": node, "display_node": node, "output": output, "prompt_id": prompt_id}
            return [_executing(node, prompt_id), message("executed", executed)]
        if name not in FINAL or not info.started:
            return []  # a queued prompt that was deleted: ComfyUI says nothing but the new status
        node = info.node
        where = {
            "prompt_id": prompt_id,
            "node_id": node,
            "node_type": info.graph.get(node, {}).get("class_type") if node else None,
            "executed": list(info.executed),
        }
        if name == "done":
            end = message("execution_success", {"prompt_id": prompt_id, "timestamp": now_ms()})
        elif name == "cancelled":
            end = message("execution_interrupted", {**where, "timestamp": now_ms()})
        else:
            error = (self.engine.store.get(prompt_id).error or {}) if name == "failed" else {}
            end = message(
                "execution_error",
                {
                    **where,
                    "exception_message": error.get("message", "the job failed"),
                    "exception_type": error.get("type", "InternalError"),
                    "traceback": [],
                    "current_inputs": {},
                    "current_outputs": {},
                    "timestamp": now_ms(),
                },
            )
        return [end, _executing(None, prompt_id)]


def _executing(node: str | None, prompt_id: str) -> str:
    return message("executing", {"node": node, "display_node": node, "prompt_id": prompt_id})
