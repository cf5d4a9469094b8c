"""Running a workflow: check it, evaluate it, load each distinct set of files once, run each sampler node
once (:class:`~sd35.workflows.execute.Executor`), and save what the output nodes show.

Images that LoadImage and LoadImageMask name are read from ``input_dir``, ComfyUI's ``input/`` folder
(:class:`~sd35.workflows.inputs.InputDir`: nothing outside it).

SaveImage writes ``OUTDIR/{filename_prefix}_{counter:05}_.png`` as ComfyUI does (the counter one past the
highest already there; a name taken meanwhile gets the next free ``-N`` name, never overwritten), with
the workflow embedded as ComfyUI embeds it: the API graph in the ``prompt`` text chunk and, when the
source carried one, the UI graph in ``workflow``; our A1111 ``parameters`` chunk is there too.
PreviewImage writes the same way under ``OUTDIR/preview/`` (ComfyUI's temporary previews).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from sd35.errors import InvalidRequest
from sd35.files import check_writable_folder
from sd35.image_io import save_png
from sd35.loading.assemble import load_pipeline
from sd35.pipeline import SD3Pipeline
from sd35.workflows.evaluate import LoadSpec, Plan, evaluate
from sd35.workflows.execute import Executor, Loader, RunHooks
from sd35.workflows.graph import Source, check, set_input
from sd35.workflows.inputs import InputDir
from sd35.workflows.models import ModelsDir


@dataclass
class RunResult:
    """What a run made: the files written per output node, and the notes (model names found by content,
    the pipeline's warnings)."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def prepare(
    source: Source, models: ModelsDir, assignments: Sequence[str] = (), input_dir: Path | None = None
) -> Plan:
    """``source`` with the ``NODE.INPUT=VALUE`` assignments applied, checked and evaluated (nothing runs;
    every problem raises a :class:`~sd35.errors.WorkflowError`); image names resolve in ``input_dir``."""
    for assignment in assignments:
        set_input(source.prompt, assignment)
    return evaluate(check(source.prompt, models, InputDir(input_dir)))


def _prefix(prefix: Any, node: str) -> PurePosixPath:
    text = str(prefix) if prefix else "ComfyUI"
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise InvalidRequest(
            f"node {node} (SaveImage) filename_prefix {text!r} leaves the output folder; use a plain name.",
            param="workflow",
        )
    return path


def next_name(folder: Path, stem: str) -> Path:
    """ComfyUI's ``{stem}_{counter:05}_.png`` with the counter one past the highest in ``folder``."""
    pattern = re.compile(re.escape(stem) + r"_(\d+)_\.png$")
    taken = [int(m.group(1)) for p in folder.glob(f"{stem}_*_.png") if (m := pattern.match(p.name))]
    return folder / f"{stem}_{max(taken, default=0) + 1:05}_.png"


def save_output(image: Image.Image, out_dir: Path, prefix: PurePosixPath, chunks: dict[str, str]) -> Path:
    """Write one image of an output node, never over an existing file."""
    folder = out_dir.joinpath(*prefix.parts[:-1])
    folder.mkdir(parents=True, exist_ok=True)
    check_writable_folder(folder)
    return save_png(image, next_name(folder, prefix.name), image.info.get("parameters"), text=chunks)


def run_plan(
    plan: Plan,
    source: Source,
    out_dir: Path,
    loader: Loader,
    on_note: Callable[[str], None] | None = None,
    hooks: RunHooks | None = None,
) -> RunResult:
    """Run every sampling of ``plan`` once (one pipeline per distinct :class:`LoadSpec`) and save the
    output nodes' images under ``out_dir``; ``hooks`` follow the run."""
    hooks = hooks or RunHooks()
    result = RunResult(notes=list(plan.notes))
    chunks = {"prompt": json.dumps(source.prompt)}
    if source.ui is not None:
        chunks["workflow"] = json.dumps(source.ui)
    prefixes = {o.node: _prefix(o.prefix, o.node) for o in plan.outputs if o.prefix is not None}
    executor = Executor(loader, on_note, hooks)
    for output in plan.outputs:
        prefix = prefixes.get(output.node, PurePosixPath("preview", "ComfyUI_preview"))
        images = executor.images(output.image)
        result.files[output.node] = [save_output(im, out_dir, prefix, chunks) for im in images]
        if hooks.on_output is not None:
            hooks.on_output(output.node, result.files[output.node])
    result.notes += executor.notes
    return result


def default_loader(
    device: str | None = None, dtype: str | None = None, tokenizers: Path | None = None
) -> Loader:
    """Load a :class:`LoadSpec` with :func:`sd35.loading.assemble.load_pipeline` (``tokenizers``: a folder
    of tokenizer files, for text encoders that are not SD3's; by default SD3's own, as in ComfyUI)."""

    def load(spec: LoadSpec) -> SD3Pipeline:
        return load_pipeline(
            spec.model,
            text_encoders=list(spec.text_encoders) if spec.text_encoders else None,
            vae=spec.vae,
            tokenizers=tokenizers,
            device=device,
            dtype=dtype,
        )

    return load
