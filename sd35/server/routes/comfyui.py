"""ComfyUI's HTTP API and websocket on ``sd35 serve``: bots, Open WebUI's ComfyUI image engine and ComfyUI
client libraries queue workflows here unchanged.

A ``POST /prompt`` is checked whole (:func:`sd35.workflows.graph.check`; a bad graph is a 400 with
ComfyUI's ``{"error", "node_errors"}`` and nothing is queued), then stored as a durable job of kind
``comfyui`` in the server's one queue (it survives a crash as every job does) and run by the engine's
worker. ``/queue``, ``/history`` and ``/interrupt`` read and change that queue in ComfyUI's shapes (a
prompt's ``number`` is its place in the queue, the job's sequence number); ``/ws`` streams the run
(:mod:`sd35.server.comfy_events`). Files are in :mod:`~sd35.server.routes.comfyui_files`, node and
server information in :mod:`~sd35.server.routes.comfyui_info`. Every route is also under ``/api/``, as
ComfyUI's newer front ends call them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sd35.errors import Conflict, InvalidRequest, WorkflowError
from sd35.server.auth import TOKEN_PARAM, authorized
from sd35.server.comfy_events import ComfyHub
from sd35.server.jobs import FINAL, Job
from sd35.server.routes.common import engine_of
from sd35.server.workflow_jobs import WORKFLOW_API, graph_of
from sd35.workflows.nodes import NODES

router = APIRouter(tags=["comfyui"])
PROMPT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a client's own prompt_id (ComfyUI's clients send UUIDs)


def hub_of(request: Request | WebSocket) -> ComfyHub:
    return request.app.state.comfy


def _error(kind: str, message: str, details: str = "", node_errors: Any = None) -> JSONResponse:
    """ComfyUI's 400 for a prompt it will not queue."""
    body = {
        "error": {"type": kind, "message": message, "details": details or message, "extra_info": {}},
        "node_errors": node_errors if node_errors is not None else {},
    }
    return JSONResponse(body, status_code=400)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON ({e}).", param="body") from None


# ------------------------------------------------------------------------------------------ the queue


def _outputs(graph: dict[str, Any]) -> list[str]:
    """A graph's output nodes (ComfyUI's ``outputs_to_execute``)."""
    return [
        node_id
        for node_id, node in graph.items()
        if isinstance(node, dict) and (kind := NODES.get(node.get("class_type"))) and kind.output_node
    ]


def queue_item(job: Job) -> list[Any]:
    """ComfyUI's queue entry: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
    graph = graph_of(job.request)
    return [number(job), job.id, graph, job.request.get("extra_data") or {}, _outputs(graph)]


def number(job: Job) -> int:
    """ComfyUI's ``number`` of a prompt, by which its front ends sort the queue: the job's sequence number,
    negative for one queued at the front (as ComfyUI numbers them)."""
    return -job.seq if job.front else job.seq


@router.post("/prompt")
async def post_prompt(request: Request) -> JSONResponse:
    """Queue a workflow: ``{"prompt": graph, "client_id", "extra_data", "prompt_id"}`` -> ``{"prompt_id",
    "number", "node_errors"}`` (``prompt_id``: the client's own, else one is drawn); a bad graph is a 400
    naming the nodes, and nothing is queued. ``front``: true queues it before every waiting prompt and job
    (the latest such first, as ComfyUI); a client's own ``number`` is accepted and not used."""
    body = await _json_body(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return _error("no_prompt", "No prompt provided", 'the body must be {"prompt": {node_id: {...}}}')
    extra = body.get("extra_data") or {}
    if not isinstance(extra, dict):
        return _error("invalid_prompt", "extra_data must be an object")
    if body.get("client_id") is not None:
        extra = {**extra, "client_id": str(body["client_id"])}
    entry = {"prompt": body["prompt"], "extra_data": extra}
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not (isinstance(prompt_id, str) and PROMPT_ID.fullmatch(prompt_id)):
        return _error("invalid_prompt", "prompt_id must be 1 to 64 letters, digits, '-' or '_'")
    engine = engine_of(request)
    try:
        job = await run_in_threadpool(engine.submit_workflow, entry, prompt_id, body.get("front") is True)
    except WorkflowError as e:
        if not e.node_errors:
            return _error("prompt_no_outputs", "Prompt has no outputs", e.message)
        return _error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", e.message, e.node_errors
        )
    except (InvalidRequest, Conflict) as e:
        return _error("invalid_prompt", f"Cannot execute because the prompt is not valid: {e.message}")
    await run_in_threadpool(hub_of(request).queue_changed)
    return JSONResponse({"prompt_id": job.id, "number": number(job), "node_errors": {}})


@router.get("/prompt")
async def get_prompt(request: Request) -> dict:
    """ComfyUI's queue summary."""
    return {"exec_info": {"queue_remaining": await run_in_threadpool(engine_of(request).store.waiting)}}


@router.get("/queue")
async def get_queue(request: Request) -> dict:
    store = engine_of(request).store
    running = await run_in_threadpool(store.of_api, WORKFLOW_API, ("running",))
    pending = await run_in_threadpool(store.of_api, WORKFLOW_API, ("queued",), queue_order=True)
    return {
        "queue_running": [queue_item(j) for j in running],
        "queue_pending": [queue_item(j) for j in pending],
    }


def _cancel_pending(request: Request, ids: list[str] | None) -> None:
    """Cancel queued workflow jobs (these ids, or all); running ones are /interrupt's."""
    engine = engine_of(request)
    for job in engine.store.of_api(WORKFLOW_API, ("queued",)):
        if ids is None or job.id in ids:
            with contextlib.suppress(Conflict):  # it ended meanwhile: no longer pending
                engine.cancel(job.id)


def _ids(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of prompt ids.", param=name)
    return value


@router.post("/queue")
async def post_queue(request: Request) -> JSONResponse:
    """``{"clear": true}`` cancels every pending prompt, ``{"delete": [ids]}`` those."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be {"clear": true} or {"delete": [prompt ids]}.', param="body")
    delete = _ids(body, "delete")
    if body.get("clear"):
        await run_in_threadpool(_cancel_pending, request, None)
    if delete:
        await run_in_threadpool(_cancel_pending, request, delete)
    return JSONResponse({})


@router.post("/interrupt")
async def interrupt(request: Request) -> JSONResponse:
    """Stop what runs now at its next step (``{"prompt_id"}``: only if that prompt is what runs)."""
    body = await _json_body(request)
    engine = engine_of(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    if prompt_id is None:
        engine.interrupt()
    elif engine.live(str(prompt_id)) is not None:
        await run_in_threadpool(engine.cancel, str(prompt_id))
    return JSONResponse({})


# ------------------------------------------------------------------------------------------ history


def history_item(job: Job) -> dict[str, Any]:
    """ComfyUI's history entry of a workflow job that ran."""
    started = int((job.started or job.created) * 1000)
    finished = int((job.finished or job.started or job.created) * 1000)
    messages: list[list[Any]] = [
        ["execution_start", {"prompt_id": job.id, "timestamp": started}],
        ["execution_cached", {"nodes": [], "prompt_id": job.id, "timestamp": started}],
    ]
    if job.status == "done":
        messages.append(["execution_success", {"prompt_id": job.id, "timestamp": finished}])
    elif job.status == "cancelled":
        messages.append(["execution_interrupted", {"prompt_id": job.id, "timestamp": finished}])
    else:
        error = job.error or {}
        messages.append(
            [
                "execution_error",
                {
                    "prompt_id": job.id,
                    "exception_message": error.get("message", ""),
                    "exception_type": error.get("type", ""),
                    "traceback": [],
                    "timestamp": finished,
                },
            ]
        )
    outputs = job.result.get("outputs", {})
    return {
        "prompt": queue_item(job),
        "outputs": outputs,
        "status": {
            "status_str": "success" if job.status == "done" else "error",
            "completed": job.status == "done",
            "messages": messages,
        },
        "meta": {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
            for node in outputs
        },
    }


def _ran(store, limit: int = 10_000) -> list[Job]:
    return [j for j in store.of_api(WORKFLOW_API, FINAL, limit) if j.started is not None]


@router.get("/history")
async def get_history(request: Request, max_items: int | None = None) -> dict:
    """Every workflow that ran, oldest first (``max_items``: the newest that many)."""
    jobs = await run_in_threadpool(_ran, engine_of(request).store)
    if max_items is not None:
        jobs = jobs[-max_items:] if max_items > 0 else []
    return {job.id: history_item(job) for job in jobs}


@router.get("/history/{prompt_id}")
async def get_history_of(prompt_id: str, request: Request) -> dict:
    """One prompt's entry (``{}`` while it is queued or running, or for an id the server does not have)."""
    jobs = await run_in_threadpool(_ran, engine_of(request).store)
    return {job.id: history_item(job) for job in jobs if job.id == prompt_id}


@router.post("/history")
async def post_history(request: Request) -> JSONResponse:
    """``{"clear": true}`` forgets every finished prompt, ``{"delete": [ids]}`` those (their images stay)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be {"clear": true} or {"delete": [prompt ids]}.', param="body")
    store = engine_of(request).store
    delete = _ids(body, "delete")
    if body.get("clear"):
        await run_in_threadpool(store.forget, WORKFLOW_API, None)
    if delete:
        await run_in_threadpool(store.forget, WORKFLOW_API, delete)
    return JSONResponse({})


# ------------------------------------------------------------------------------------------ websocket


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    """ComfyUI's event stream for ``?clientId=`` (a new id when absent): ``status`` with ``sid`` first,
    then the messages of that client's prompts and every queue change. On a server with a key, the key
    comes as the other routes take it (``Authorization: Bearer``, ``X-API-Key``, basic credentials) or as
    ``?token=KEY``; without it the handshake is refused (403)."""
    settings = ws.app.state.settings
    if settings.protected and not authorized(settings, ws.headers, ws.query_params.get(TOKEN_PARAM)):
        await ws.close(code=1008, reason="this server needs an API key (?token=KEY or a header)")
        return
    await ws.accept()
    hub = hub_of(ws)
    sid = ws.query_params.get("clientId") or uuid.uuid4().hex
    queue = hub.connect(sid)

    async def pump() -> None:
        while True:
            item = await queue.get()
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_text(item)

    sender = None
    try:  # the status is read after connecting: every later change reaches this socket
        status = await run_in_threadpool(hub.status, sid)
        await ws.send_text(json.dumps({"type": "status", "data": status}))
        sender = asyncio.create_task(pump())
        while True:
            received = await ws.receive()
            if received["type"] == "websocket.disconnect":
                break
    except WebSocketDisconnect:
        pass
    finally:
        if sender is not None:
            sender.cancel()
        hub.disconnect(sid, queue)
