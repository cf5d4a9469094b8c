"""ComfyUI's file routes: ``GET /view`` and the uploads ``POST /upload/image`` and ``/upload/mask``.

Files live in ComfyUI's three folders under the data folder (``comfyui/output``, ``input``, ``temp``).
A name never reaches outside them: an absolute path, ``..``, a backslash or a NUL is a 400, and a file
whose real path (links followed) leaves its folder is not found (404), as is a missing one. An upload whose
name is taken gets ComfyUI's ``name (1).png`` unless ``overwrite`` is true, or reuses the name when the
file there is the same bytes; a mask upload puts the mask's alpha channel into its ``original_ref`` image
(ComfyUI's mask editor), keeping that image's text chunks.
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, PngImagePlugin
from starlette.concurrency import run_in_threadpool

from sd35.errors import InvalidRequest, NotFound
from sd35.files import write_atomic
from sd35.image_io import read_image
from sd35.server.workflow_jobs import FOLDER_TYPES, WorkflowRunner

router = APIRouter(tags=["comfyui"])


def runner_of(request: Request) -> WorkflowRunner:
    runner = request.app.state.engine.workflows
    if runner is None:
        raise NotFound("this server runs no ComfyUI workflows.")
    return runner


def _clean(value: str, what: str) -> PurePosixPath:
    """A relative name with no way out of its folder, else a 400."""
    if "\\" in value or "\0" in value:
        raise InvalidRequest(f"{what} {value!r} holds a backslash or NUL; use plain names.", param=what)
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidRequest(f"{what} {value!r} leaves the folder; use a name inside it.", param=what)
    return path


def folder_of(runner: WorkflowRunner, kind: str | None) -> tuple[Path, str]:
    kind = kind or "input"
    if kind not in FOLDER_TYPES:
        raise InvalidRequest(f"type {kind!r} is not one of {', '.join(FOLDER_TYPES)}.", param="type")
    return runner.folder(kind), kind


def inside(base: Path, subfolder: str, filename: str) -> Path:
    """``base/subfolder/filename`` checked to stay in ``base`` (links followed); the path is not
    required to exist."""
    if not filename:
        raise InvalidRequest("filename is required.", param="filename")
    path = base.joinpath(*_clean(subfolder, "subfolder").parts, *_clean(filename, "filename").parts)
    missing = NotFound(f"no file {filename!r} in {subfolder or 'the folder'}.", param="filename")
    try:
        if not path.resolve().is_relative_to(base.resolve()):
            raise missing
        path.is_file()  # a name the file system refuses (too long ...) raises here, not later
    except OSError:
        raise missing from None
    return path


def _annotated(name: str) -> tuple[str, str | None]:
    """ComfyUI's ``name.png [output]`` annotation: the name and the folder type it names."""
    for kind in FOLDER_TYPES:
        if name.endswith(f" [{kind}]"):
            return name[: -len(kind) - 3], kind
    return name, None


@router.get("/view")
async def view(
    request: Request, filename: str = "", subfolder: str = "", type: str = "output"
) -> FileResponse:
    """A file of ComfyUI's output, input or temp folder."""
    filename, annotated = _annotated(filename)
    base, _ = folder_of(runner_of(request), annotated or type)
    path = inside(base, subfolder, filename)
    if not path.is_file():
        raise NotFound(f"no file {filename!r} in {type}/{subfolder}.", param="filename")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name, content_disposition_type="inline")


def _free_name(folder: Path, name: str, data: bytes) -> tuple[str, bool]:
    """ComfyUI's upload name: ``name``, or ``stem (i).ext`` past taken ones; True when a file of the same
    bytes already has the name (nothing to write)."""
    stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
    digest = hashlib.sha256(data).digest()
    candidate, i = name, 1
    while (folder / candidate).exists():
        if (folder / candidate).is_file() and hashlib.sha256(
            (folder / candidate).read_bytes()
        ).digest() == digest:
            return candidate, True
        candidate, i = f"{stem} ({i}){suffix}", i + 1
    return candidate, False


def _save_upload(
    runner: WorkflowRunner, name: str, data: bytes, kind: str | None, subfolder: str, overwrite: bool
) -> dict[str, str]:
    base, kind = folder_of(runner, kind)
    target = inside(base, subfolder, PurePosixPath(_clean(name, "filename")).name)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    same = False
    if not overwrite:
        name, same = _free_name(folder, target.name, data)
    if not same:
        write_atomic(folder / name, lambda tmp: tmp.write_bytes(data), "replace")
    return {"name": name, "subfolder": subfolder, "type": kind}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


@router.post("/upload/image")
async def upload_image(
    request: Request,
    image: UploadFile,
    overwrite: str | None = Form(None),
    type: str | None = Form(None),
    subfolder: str = Form(""),
) -> JSONResponse:
    """Store an image in the input (or ``type``) folder -> ``{"name", "subfolder", "type"}``."""
    runner = runner_of(request)
    data = await image.read()
    read_image(data, "image", param="image")
    saved = await run_in_threadpool(
        _save_upload, runner, image.filename or "", data, type, subfolder, _truthy(overwrite)
    )
    return JSONResponse(saved)


def _masked(runner: WorkflowRunner, ref: dict, mask: bytes) -> bytes:
    """The ``original_ref`` image with the mask's alpha as its alpha channel, as a PNG (text kept)."""
    name, annotated = _annotated(str(ref.get("filename") or ""))
    base, _ = folder_of(runner, annotated or ref.get("type") or "output")
    path = inside(base, str(ref.get("subfolder") or ""), name)
    if not path.is_file():
        raise NotFound(f"original_ref: no image {name!r} to mask.", param="original_ref")
    with Image.open(path) as original:
        info = PngImagePlugin.PngInfo()
        for key, value in (getattr(original, "text", None) or {}).items():
            info.add_text(key, value)
        rgba = original.convert("RGBA")
    read_image(mask, "image", param="image")  # a clear 400 for what is not an image
    with Image.open(io.BytesIO(mask)) as decoded:  # as uploaded: read_image drops the alpha
        rgba.putalpha(decoded.convert("RGBA").getchannel("A"))
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    return out.getvalue()


@router.post("/upload/mask")
async def upload_mask(
    request: Request,
    image: UploadFile,
    original_ref: str = Form(...),
    overwrite: str | None = Form(None),
    type: str | None = Form(None),
    subfolder: str = Form(""),
) -> JSONResponse:
    """Store ``original_ref``'s image with the uploaded mask as its alpha -> ``{"name", "subfolder", "type"}``."""
    runner = runner_of(request)
    try:
        ref = json.loads(original_ref)
    except json.JSONDecodeError:
        ref = None
    if not isinstance(ref, dict):
        raise InvalidRequest(
            'original_ref must be JSON like {"filename": "a.png", "subfolder": "", "type": "input"}.',
            param="original_ref",
        )
    data = await run_in_threadpool(_masked, runner, ref, await image.read())
    saved = await run_in_threadpool(
        _save_upload, runner, image.filename or "", data, type, subfolder, _truthy(overwrite)
    )
    return JSONResponse(saved)
