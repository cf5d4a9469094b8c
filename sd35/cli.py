"""The ``sd35`` command line.

Every user mistake surfaces as one line ``sd35: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from sd35.errors import SD35Error


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sd35.inspect import report

    print(report(args.paths))
    return 0


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sd35: warning: {message}", file=sys.stderr)


def _slg_from_args(args: argparse.Namespace):
    from sd35.sampling.guidance import SkipLayerGuidance

    parts = {
        "layers": args.slg_layers,
        "scale": args.slg_scale,
        "start": args.slg_start,
        "end": args.slg_end,
    }
    if not args.slg and all(v is None for v in parts.values()):
        return None
    if parts["layers"] is not None:
        try:
            parts["layers"] = tuple(int(v) for v in parts["layers"].split(",") if v.strip())
        except ValueError:
            raise SD35Error(
                f"--slg-layers must be comma-separated block numbers like 7,8,9, got {args.slg_layers!r}."
            ) from None
    return SkipLayerGuidance(**{k: v for k, v in parts.items() if v is not None})


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sd35.image_io import check_output_path, save_png
    from sd35.pipeline import check_arguments, load_pipeline

    slg = _slg_from_args(args)
    check_output_path(args.output)  # before spending minutes on loading and sampling
    check_arguments(args.width, args.height, args.steps, args.cfg, args.num_images, args.sampler)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = load_pipeline(args.model, args.text_encoders, args.tokenizers, device=args.device, dtype=dtype)
    bars: list[tqdm] = []

    def progress(step: int, total: int, x, denoised) -> None:
        if not bars:  # opened at the first step, so a request that fails early shows no bar
            bars.append(tqdm(total=total, initial=step, unit="step", desc="sampling", dynamic_ncols=True))
        bars[0].update(1)

    try:
        images = pipe.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            sampler=args.sampler,
            shift=args.shift,
            slg=slg,
            num_images=args.num_images,
            t5_max_tokens=args.t5_max_tokens,
            callback=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    for image in images:
        path = save_png(image, args.output, image.info.get("parameters"))
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sd35.pipeline import DEFAULTS
    from sd35.sampling.guidance import SkipLayerGuidance
    from sd35.sampling.samplers import SAMPLERS

    slg_defaults = SkipLayerGuidance()

    parser = argparse.ArgumentParser(prog="sd35", description="Stable Diffusion 3.5 Medium engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect",
        help="say what weight files/folders are and what a complete pipeline still lacks",
        description="For each file or folder: which model it holds (SD3 Medium, SD3.5 Medium, SD3.5 Large, CLIP-L, "
        "CLIP-G, T5-XXL, VAE), its layout, dtype and parameter count; then what a complete pipeline lacks. "
        "Reads only file headers.",
    )
    p.add_argument("paths", nargs="+", help=".safetensors files or diffusers/text-encoder folders")
    p.set_defaults(func=_cmd_inspect)

    g = sub.add_parser(
        "generate",
        help="text to image",
        description="Generate images from a prompt. Defaults are the official reference's for SD3.5 Medium "
        f"({DEFAULTS.steps} steps, CFG {DEFAULTS.cfg}, {DEFAULTS.sampler}, shift {DEFAULTS.shift}).",
    )
    g.add_argument(
        "--model",
        required=True,
        type=Path,
        help="sd3.5_medium.safetensors (or all-in-one) or a diffusers folder",
    )
    g.add_argument(
        "--text-encoders",
        nargs="+",
        type=Path,
        default=None,
        help="clip_l/clip_g/t5xxl .safetensors files, or a folder holding them (any names)",
    )
    g.add_argument(
        "--tokenizers", type=Path, default=None, help="folder with tokenizer/, tokenizer_2/, tokenizer_3/"
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=DEFAULTS.width, help="multiple of 16 (default %(default)s)")
    g.add_argument("--height", type=int, default=DEFAULTS.height, help="multiple of 16 (default %(default)s)")
    g.add_argument("--steps", type=int, default=DEFAULTS.steps, help="default %(default)s")
    g.add_argument(
        "--cfg", type=float, default=DEFAULTS.cfg, help="classifier-free guidance scale (default %(default)s)"
    )
    g.add_argument("--seed", type=int, default=None, help="random if omitted; image i uses seed+i")
    g.add_argument(
        "--sampler", default=DEFAULTS.sampler, choices=sorted(SAMPLERS), help="default %(default)s"
    )
    g.add_argument(
        "--shift", type=float, default=None, help="flow shift (default 3.0 for SD3.5, 1.0 for SD3 Medium)"
    )
    g.add_argument(
        "--slg", action="store_true", help="Skip Layer Guidance with the reference's SD3.5 Medium settings"
    )
    g.add_argument(
        "--slg-layers",
        default=None,
        help=f"blocks to skip (default {','.join(map(str, slg_defaults.layers))})",
    )
    g.add_argument("--slg-scale", type=float, default=None, help=f"default {slg_defaults.scale}")
    g.add_argument(
        "--slg-start", type=float, default=None, help=f"fraction of steps (default {slg_defaults.start})"
    )
    g.add_argument(
        "--slg-end", type=float, default=None, help=f"fraction of steps (default {slg_defaults.end})"
    )
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument(
        "--t5-max-tokens",
        type=int,
        default=256,
        help="T5 prompt limit; longer prompts are cut with a warning",
    )
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    g.add_argument(
        "-o", "--output", type=Path, default=Path("sd35.png"), help="PNG path; never overwritten (numbered)"
    )
    g.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except SD35Error as e:
            print(f"sd35: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("sd35: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
