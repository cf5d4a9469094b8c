"""``sd35 run``: a ComfyUI workflow (API-format JSON, or a PNG ComfyUI saved) run as ComfyUI runs it.

The graph is checked whole before anything loads (:mod:`sd35.workflows.graph`); model names resolve in
``--models-dir`` by ComfyUI's folder names, or fall back to a file of the right kind found by content,
with a line saying which. Images that LoadImage names are read from ``--input-dir`` (by default the
``input/`` folder beside the models folder, as in a ComfyUI install; nothing outside it). Every SaveImage
output is written under ``-o`` with the workflow embedded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd35.errors import NotFound
from sd35.files import check_writable_folder


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a ComfyUI workflow (API-format .json, or a PNG ComfyUI saved) and save its images",
        description="Runs a ComfyUI workflow's SD3 nodes (see the README: Running ComfyUI workflows). "
        "Model names are looked up in --models-dir as ComfyUI does (checkpoints/, diffusion_models/ or unet/, "
        "text_encoders/ or clip/, vae/, loras/); a missing name falls back to a file of the right kind found by "
        "content. SaveImage writes OUTDIR/PREFIX_00001_.png with the workflow embedded, never over a file.",
    )
    p.add_argument("workflow", type=Path, help="WORKFLOW.json (API format) or IMAGE.png saved by ComfyUI")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="change one input before running, e.g. --set 3.seed=42 --set 6.text='a cat' (repeatable)",
    )
    p.add_argument(
        "--models-dir", type=Path, default=None, help="ComfyUI's models folder (default: ./models)"
    )
    p.add_argument(
        "--input-dir",
        type=Path,
        default=None,
        help="ComfyUI's input folder, where LoadImage's names are (default: input/ beside the models folder)",
    )
    p.add_argument(
        "-o", "--output", type=Path, default=Path("output"), help="output folder (default: ./output)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the device's)")
    p.add_argument(
        "--tokenizers",
        type=Path,
        default=None,
        help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ (default: SD3's, which ship with sd35)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sd35.workflows.graph import read_source
    from sd35.workflows.models import ModelsDir
    from sd35.workflows.run import default_loader, prepare, run_plan

    if args.models_dir is not None and not args.models_dir.is_dir():
        raise NotFound(
            f"{args.models_dir}: no such models folder (ComfyUI's models/, with checkpoints/ ...)."
        )
    models_dir = args.models_dir or Path("models")
    if args.input_dir is not None and not args.input_dir.is_dir():
        raise NotFound(f"{args.input_dir}: no such input folder (ComfyUI's input/, with the images).")
    input_dir = args.input_dir or models_dir.absolute().parent / "input"
    source = read_source(args.workflow)
    models = ModelsDir(models_dir if models_dir.is_dir() else None)
    plan = prepare(source, models, args.set, input_dir if input_dir.is_dir() else None)
    for note in plan.notes:
        print(f"sd35: {note}", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
    check_writable_folder(args.output)
    result = run_plan(
        plan,
        source,
        args.output,
        default_loader(args.device, args.dtype, args.tokenizers),
        on_note=lambda note: print(f"sd35: warning: {note}", file=sys.stderr),
    )
    for node, files in result.files.items():
        for path in files:
            print(f"node {node}: {path}")
    return 0
