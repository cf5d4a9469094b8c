"""ComfyUI workflows as server jobs: checked at admission, stored as a job of kind ``comfyui``, run by the
engine's worker through :func:`sd35.workflows.run.run_plan` (the path ``sd35 run`` takes, so a queued
workflow writes the file ``sd35 run`` writes), into ComfyUI's ``output/`` folder.

A workflow names files; the server has one pipeline loaded. A workflow whose files are the server's own
(the same model, text encoders and VAE) reuses that pipeline; other files are loaded once and kept as the
engine's one loaded model until a job needs another (one model in memory at a time).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35.errors import SD35Error, WorkflowError
from sd35.pipeline import SD3Pipeline
from sd35.workflows.evaluate import LoadSpec, Plan
from sd35.workflows.graph import Source, as_workflow, error_entry
from sd35.workflows.models import ModelsDir
from sd35.workflows.run import RunHooks, prepare, run_plan

WORKFLOW_API = "comfyui"
"""The ``api`` column of a workflow job (its ``model`` column is :data:`WORKFLOW_MODEL`)."""
WORKFLOW_MODEL = "workflow"
FOLDER_TYPES = ("output", "input", "temp")
"""ComfyUI's folder types, as ``/view`` and the uploads name them."""

Use = Callable[[str, Callable[[], SD3Pipeline]], SD3Pipeline]
"""The engine's ``use(name, load)``: the pipeline known as ``name``, loaded with ``load()`` if it is not
the one in memory (which it then replaces)."""


def comfy_root(data_dir: Path) -> Path:
    """Where ComfyUI's ``output/``, ``input/`` and ``temp/`` folders live in a server's data folder."""
    return Path(data_dir) / "comfyui"


def _key(spec: LoadSpec) -> tuple[Path, frozenset[Path] | None, Path | None]:
    """A file set compared by what the files are (links resolved, text-encoder order ignored)."""
    tes = None if spec.text_encoders is None else frozenset(Path(p).resolve() for p in spec.text_encoders)
    return Path(spec.model).resolve(), tes, None if spec.vae is None else Path(spec.vae).resolve()


@dataclass
class WorkflowRunner:
    """What a server needs to check and run workflows.

    ``models``: ComfyUI's models folder (the server's ``--models-dir``); ``root``: the folder of
    ``output/``, ``input/``, ``temp/``; ``load``: how a file set is loaded (as ``sd35 run`` loads it);
    ``own``: the server's own file set and its model name (its pipeline is reused for it).
    """

    models: ModelsDir
    root: Path
    load: Callable[[LoadSpec], SD3Pipeline]
    own: tuple[LoadSpec, str] | None = None

    def folder(self, kind: str) -> Path:
        """ComfyUI's folder of ``kind`` (output, input or temp), made if missing."""
        path = self.root / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check(self, prompt: Any) -> Plan:
        """The plan of a posted graph; every problem raises (a WorkflowError names the node)."""
        source = Source(as_workflow(prompt, "prompt"))
        return self._prepare(source)

    def _prepare(self, source: Source) -> Plan:
        """The plan of ``source``, its image names resolved in ComfyUI's ``input/`` (where uploads go)."""
        return prepare(source, self.models, input_dir=self.folder("input"))

    def model_name(self, spec: LoadSpec) -> str:
        """The engine's name for the pipeline of ``spec``: the server's model for its own files."""
        if self.own is not None and _key(spec) == _key(self.own[0]):
            return self.own[1]
        model, tes, vae = _key(spec)
        return "workflow:" + "|".join(str(p) for p in (model, *sorted(tes or ()), vae) if p is not None)

    def run(self, body: dict[str, Any], use: Use, hooks: RunHooks) -> dict[str, Any]:
        """Run a stored workflow job; its result: ComfyUI's ``outputs`` per node and the notes."""
        prompt, extra = graph_of(body), body.get("extra_data") or {}
        ui = (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra, dict) else None
        source = Source(as_workflow(prompt, "prompt"), ui)
        plan = self._prepare(source)
        output = self.folder("output")

        def loader(spec: LoadSpec) -> SD3Pipeline:
            name = self.model_name(spec)
            return use(name, lambda: self.load(spec))

        result = run_plan(plan, source, output, loader, hooks=hooks)
        return {
            "outputs": {node: {"images": images_of(files, output)} for node, files in result.files.items()},
            "notes": result.notes,
        }


def stored_body(body: dict[str, Any]) -> dict[str, Any]:
    """A ``/prompt`` body as a job stores it: the graph as JSON text, so that its node and input order
    (which the saved PNG's ``prompt`` chunk keeps, as ``sd35 run`` keeps the file's) survives the store."""
    return {**body, "prompt": json.dumps(body["prompt"])}


def graph_of(body: dict[str, Any]) -> dict[str, Any]:
    """The graph of a stored job body."""
    return json.loads(body["prompt"])


def images_of(files: list[Path], folder: Path, kind: str = "output") -> list[dict[str, str]]:
    """ComfyUI's ``{"filename", "subfolder", "type"}`` of files in ``folder``."""
    out = []
    for path in files:
        relative = path.relative_to(folder)
        subfolder = relative.parent.as_posix()
        out.append(
            {"filename": relative.name, "subfolder": "" if subfolder == "." else subfolder, "type": kind}
        )
    return out


def limit_error(node: str, class_type: str, e: SD35Error) -> WorkflowError:
    """A deployment limit that a sampler node's request exceeds, as that node's error."""
    return WorkflowError(
        f"workflow: node {node} ({class_type}): {e.message}",
        param="workflow",
        node_errors={
            node: {
                "errors": [error_entry("value_bigger_than_max", e.message, e.param)],
                "dependent_outputs": [],
                "class_type": class_type,
            }
        },
    )
