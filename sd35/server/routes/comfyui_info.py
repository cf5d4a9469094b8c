"""What ComfyUI clients ask before they queue: ``/object_info`` (the nodes sd35 runs, in ComfyUI's shape,
with the models folder's files as the choices of each model-name input), ``/models``, ``/system_stats``,
``/embeddings`` and ``/extensions`` (sd35 has neither: empty lists)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sd35._version import __version__
from sd35.errors import NotFound
from sd35.server.routes.comfyui_files import runner_of
from sd35.workflows.inputs import InputDir
from sd35.workflows.models import FOLDERS, ModelsDir
from sd35.workflows.nodes import NODES, Input, NodeType

router = APIRouter(tags=["comfyui"])

CATEGORIES = {
    "LATENT": "latent",
    "CONDITIONING": "conditioning",
    "IMAGE": "image",
    "MODEL": "advanced/model",
}


def input_spec(spec: Input, models: ModelsDir, images: list[str]) -> list[Any]:
    """One input as ComfyUI lists it: ``[TYPE, options]``, a combo's choices as a list in place of TYPE
    (an image name's: the input folder's ``images``, with the front end's upload button)."""
    if spec.type == "MODEL_NAME":
        return [models.names(spec.folder or ""), {}]
    if spec.type == "IMAGE_NAME":
        return [images, {"image_upload": True}]
    if spec.type == "COMBO":
        return [list(spec.choices), {}]
    if spec.type == "STRING":
        return ["STRING", {"multiline": True}]
    options: dict[str, Any] = {}
    if spec.min is not None:
        options["min"] = spec.min
    if spec.max is not None:
        options["max"] = spec.max
    if spec.type == "FLOAT":
        options["step"] = 0.01
    return [spec.type, options]


def node_info(name: str, node: NodeType, models: ModelsDir, images: list[str]) -> dict[str, Any]:
    """ComfyUI's ``/object_info`` entry of one node type (its optional inputs apart, as ComfyUI lists them)."""
    loader = any(i.type == "MODEL_NAME" for i in node.inputs.values())
    category = (
        "loaders" if loader else CATEGORIES.get(node.outputs[0] if node.outputs else "IMAGE", "sampling")
    )
    groups: dict[str, dict[str, list[Any]]] = {"required": {}, "optional": {}}
    for n, i in node.inputs.items():
        groups["optional" if i.optional else "required"][n] = input_spec(i, models, images)
    return {
        "input": groups,
        "input_order": {k: list(v) for k, v in groups.items() if v},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.outputs),
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": "nodes",
        "category": "sampling" if name.startswith("KSampler") else category,
        "output_node": node.output_node,
        "deprecated": False,
        "experimental": False,
    }


@router.get("/object_info")
async def object_info(request: Request) -> dict:
    runner = runner_of(request)

    def listing() -> dict:
        images = InputDir(runner.folder("input")).names()
        return {n: node_info(n, node, runner.models, images) for n, node in NODES.items()}

    return await run_in_threadpool(listing)


@router.get("/object_info/{node_class}")
async def object_info_of(node_class: str, request: Request) -> dict:
    """One node type (``{}`` for a type sd35 does not run, as ComfyUI answers)."""
    runner = runner_of(request)
    node = NODES.get(node_class)
    if node is None:
        return {}

    def entry() -> dict:
        return node_info(node_class, node, runner.models, InputDir(runner.folder("input")).names())

    return {node_class: await run_in_threadpool(entry)}


@router.get("/models")
async def model_folders(request: Request) -> list[str]:
    runner_of(request)
    return list(FOLDERS)


@router.get("/models/{folder}")
async def models_in(folder: str, request: Request) -> list[str]:
    models = runner_of(request).models
    if folder not in FOLDERS:
        raise NotFound(f"no model folder {folder!r}; the folders are {', '.join(FOLDERS)}.", param="folder")
    return await run_in_threadpool(models.names, folder)


@router.get("/embeddings")
async def embeddings() -> list[str]:
    return []


@router.get("/extensions")
async def extensions() -> list[str]:
    return []


def _ram() -> tuple[int, int]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.total, memory.available
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


@router.get("/system_stats")
async def system_stats(request: Request) -> dict:
    """ComfyUI's ``system_stats``: this process, and the device the loaded model runs on."""
    ram_total, ram_free = _ram()
    pipe = request.app.state.engine.pipe
    device = torch.device(pipe.device) if pipe is not None else torch.device("cpu")
    total = free = 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "system": {
            "os": os.name,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": f"sd35 {__version__}",
            "python_version": sys.version,
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": ["sd35", "serve"],
        },
        "devices": [
            {
                "name": f"{device} {name}",
                "type": device.type,
                "index": device.index,
                "vram_total": total or ram_total,
                "vram_free": free or ram_free,
                "torch_vram_total": total,
                "torch_vram_free": free,
            }
        ],
    }
