"""The HTTP server: one FastAPI app over one :class:`~sd35.server.engine.Engine`, for every API family.

Each route family (native jobs, OpenAI, A1111) maps its own field names onto one
:class:`~sd35.request.GenerateRequest` and hands it to the engine; nothing here checks a generation
setting. This module adds what every route shares: credentials (``Authorization: Bearer KEY``, or A1111's
HTTP basic ``--api-auth``; ``/health``, the web page ``/`` and its ``/static/`` files are open), a cap on
body size (413), and the error table of :mod:`sd35.server.errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sd35._version import __version__
from sd35.server import errors
from sd35.server.auth import authorized
from sd35.server.comfy_events import ComfyHub
from sd35.server.engine import Engine
from sd35.server.routes import a1111, comfyui, comfyui_files, comfyui_info, native, openai, page
from sd35.server.routes.common import JobFailed, job_error
from sd35.server.settings import ServerSettings

OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = (page.STATIC_PREFIX + "/",)  # the page's files: a browser sends no key when loading them


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413, by Content-Length or while they stream in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        too_large = errors.error_response(
            path,
            413,
            f"the request body is larger than this server takes ({self.limit} bytes).",
            kind="TooLarge",
        )
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(scope, receive, send)
        received = 0
        exceeded = started = False

        async def counting_receive():
            # Past the limit the app is told the client left: an exception raised here would reach the
            # route's body parsing wrapped in an exception group (middleware task groups): a 400.
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body it never got whole: the 413 below replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await too_large(scope, receive, send)


def create_app(
    settings: ServerSettings, engine: Engine, describe: Callable[[], dict[str, Any]] | None = None
) -> FastAPI:
    """The app; its lifespan starts the engine's worker (after requeueing interrupted jobs) and stops it.
    ``describe()`` adds to ``/health``'s body (a Ray replica says which it is and how its peers fare)."""

    comfy = ComfyHub(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        comfy.start(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            comfy.stop()

    app = FastAPI(
        title="sd35",
        version=__version__,
        description="Stable Diffusion 3.5 Medium: native jobs, OpenAI Images, A1111 and ComfyUI APIs.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.comfy = comfy
    errors.install(app)

    @app.exception_handler(JobFailed)
    async def job_failed(request: Request, exc: JobFailed) -> JSONResponse:
        error = job_error(exc.job)
        path = request.url.path
        if error is None:
            return errors.error_response(path, 500, exc.job.error["message"], kind="InternalError")
        return errors.error_response(
            path, errors.status_of(type(error)), error.message, kind=type(error).__name__, param=error.param
        )

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        path = request.url.path
        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if settings.protected and not open_path and not authorized(settings, request.headers):
            return errors.error_response(
                request.url.path,
                401,
                "this server needs an API key: send the header Authorization: Bearer KEY"
                + (" (or HTTP basic credentials)" if settings.api_auth else "")
                + ".",
                kind="Unauthorized",
            )
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes)

    @app.get("/health", tags=["server"])
    async def health() -> JSONResponse:
        """200 once the model is loaded and the worker runs (no key needed)."""
        ready = engine.ready
        body = {"status": "ok" if ready else "starting", "model": engine.model, "version": __version__}
        if describe is not None:
            body.update(await run_in_threadpool(describe))
        return JSONResponse(body, status_code=200 if ready else 503)

    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(a1111.router)
    app.include_router(a1111.controlnet_router)
    for comfy_router in (comfyui.router, comfyui_files.router, comfyui_info.router):
        app.include_router(comfy_router)
        # the same under /api/, the names ComfyUI's newer front ends call (listed once in the schema)
        app.include_router(comfy_router, prefix="/api", include_in_schema=False)
    page.mount(app)
    return app
