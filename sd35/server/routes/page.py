"""The web page at ``/``: plain HTML, CSS and JavaScript files shipped in the package (no build step, no
CDN, so it works offline), on top of the native job API.

The page and its files load without credentials (a browser cannot send a header when it first opens a
page; ``/`` and ``/static/`` are open paths of :mod:`sd35.server.app`). The page asks for the API key
when a call answers 401 and sends it as ``Authorization: Bearer KEY`` on every API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
STATIC_PREFIX = "/static"

router = APIRouter(tags=["page"])
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidated (ETag) on each load, so an upgrade is seen at once


class _StaticFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The generation page."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)


def mount(app) -> None:
    """The page's route and its files under ``/static``."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, _StaticFiles(directory=STATIC), name="static")
