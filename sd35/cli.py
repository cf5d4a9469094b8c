"""The ``sd35`` command line.

Every user mistake surfaces as one line ``sd35: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
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


def _apg_from_args(args: argparse.Namespace):
    from sd35.sampling.guidance import APG

    parts = {"eta": args.apg_eta, "norm_threshold": args.apg_norm_threshold, "momentum": args.apg_momentum}
    if not args.apg and all(v is None for v in parts.values()):
        return None
    return APG(**{k: v for k, v in parts.items() if v is not None})


def _hires_from_args(args: argparse.Namespace):
    from sd35.pipeline import HiresFix

    if args.hires_scale is None:
        if any(v is not None for v in (args.hires_steps, args.hires_strength, args.hires_upscaler)):
            raise SD35Error("--hires-steps/--hires-strength/--hires-upscaler need --hires-scale.")
        return None
    parts = {"steps": args.hires_steps, "strength": args.hires_strength, "upscaler": args.hires_upscaler}
    return HiresFix(scale=args.hires_scale, **{k: v for k, v in parts.items() if v is not None})


def _edit_inputs(args: argparse.Namespace):
    """(init image, mask) from --init-image, --mask and --outpaint; None where not given."""
    from sd35.imaging import load_image, load_mask, outpaint_canvas

    if args.init_image is None:
        if args.mask is not None or args.outpaint is not None or args.strength is not None:
            raise SD35Error("--mask, --outpaint and --strength need --init-image.")
        return None, None
    init = load_image(args.init_image, "init image")
    mask = load_mask(args.mask) if args.mask is not None else None
    if args.outpaint is not None:
        if mask is not None:
            raise SD35Error("--outpaint makes its own mask; do not pass --mask with it.")
        try:
            left, top, right, bottom = (int(v) for v in args.outpaint.split(","))
        except ValueError:
            raise SD35Error(
                f"--outpaint takes four pixel counts LEFT,TOP,RIGHT,BOTTOM, got {args.outpaint!r}."
            ) from None
        init, mask = outpaint_canvas(init, left, top, right, bottom)
        if init.width % 16 or init.height % 16:
            raise SD35Error(
                f"the outpainted canvas is {init.width}x{init.height}; choose borders that make both sides multiples "
                "of 16."
            )
    return init, mask


def _lora_arg(value: str) -> tuple[Path, float]:
    """``FILE[:STRENGTH]``; a colon followed by something that is not a number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            path, strength = value, 1.0
    else:
        path, strength = value, 1.0
    if not Path(path).is_file():
        raise SD35Error(f"{path}: no such LoRA file.")
    return Path(path), strength


def _prompts(args: argparse.Namespace) -> list[str]:
    from sd35.conditioning.prompt import read_prompt_file

    if (args.prompt is None) == (args.prompt_file is None):
        raise SD35Error("give exactly one of --prompt and --prompt-file.")
    return [args.prompt] if args.prompt is not None else read_prompt_file(args.prompt_file)


class _Progress:
    """A tqdm bar per sampling pass (opened at a pass's first step, so a request that fails early shows none),
    and the live preview file, rewritten every ``every`` steps."""

    def __init__(self, preview: Path | None, every: int):
        from sd35.image_io import next_free_path

        self.bar = None
        self.preview = next_free_path(preview) if preview is not None else None
        self.every = every

    def __call__(self, step: int, total: int, x, denoised) -> None:
        from tqdm import tqdm

        if self.bar is None or step == 0:
            self.close()
            self.bar = tqdm(total=total, initial=step, unit="step", desc="sampling", dynamic_ncols=True)
        self.bar.update(1)
        if self.preview is not None and ((step + 1) % self.every == 0 or step + 1 == total):
            from sd35.image_io import replace_png
            from sd35.preview import latent_preview

            replace_png(latent_preview(denoised), self.preview)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _resolve_model(args: argparse.Namespace) -> None:
    """Fill the model and the defaults: the real model's, or the built-in demo's when no --model is given."""
    from sd35.pipeline import DEFAULTS

    if args.demo or args.model is None:
        from sd35.demo import DEMO_DEFAULTS, demo_files

        if args.model is not None:
            raise SD35Error("--demo and --model exclude each other.")
        args.model, args.tokenizers = demo_files()
        if not args.demo:
            print(
                "sd35: no --model given, so this uses the built-in demo model (a small model trained on synthetic "
                "shapes, 64x64). For real images pass --model sd3.5_medium.safetensors --text-encoders ... .",
                file=sys.stderr,
            )
        defaults = DEMO_DEFAULTS
        args.width, args.height = args.width or defaults.width, args.height or defaults.height
        args.shift = defaults.shift if args.shift is None else args.shift
    else:
        defaults = DEFAULTS
    args.steps = defaults.steps if args.steps is None else args.steps
    args.cfg = defaults.cfg if args.cfg is None else args.cfg
    args.sampler = args.sampler or defaults.sampler


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from sd35.image_io import check_output_path, save_png
    from sd35.pipeline import DEFAULTS, check_accelerations, check_arguments, default_device, load_pipeline

    prompts = _prompts(args)
    _resolve_model(args)
    slg, apg, hires = _slg_from_args(args), _apg_from_args(args), _hires_from_args(args)
    init, mask = _edit_inputs(args)
    check_output_path(args.output)  # before spending minutes on loading and sampling
    if args.preview is not None:
        check_output_path(args.preview)
    if args.preview_every < 1:
        raise SD35Error(f"--preview-every must be a positive integer, got {args.preview_every}.")
    width = args.width or (init.width if init is not None else DEFAULTS.width)
    height = args.height or (init.height if init is not None else DEFAULTS.height)
    if init is None or (args.width and args.height):
        check_arguments(width, height, args.steps, args.cfg, args.num_images, args.sampler)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    loras = [_lora_arg(v) for v in args.lora]
    device = torch.device(args.device) if args.device else default_device()
    check_accelerations(device, args.memory, fp8=args.fp8, compile=args.compile, cuda_graphs=args.cuda_graphs)
    pipe = load_pipeline(
        args.model,
        args.text_encoders,
        args.tokenizers,
        device=args.device,
        dtype=dtype,
        memory=args.memory,
        vae_tiling=args.vae_tiling,
    )
    for path, strength in loras:
        pipe.load_lora(path, strength)
    pipe.accelerate(fp8=args.fp8, compile=args.compile, cuda_graphs=args.cuda_graphs)
    progress = _Progress(args.preview, args.preview_every)
    try:
        for prompt in prompts:
            images = pipe.generate(
                prompt,
                negative_prompt=args.negative_prompt,
                width=args.width,
                height=args.height,
                steps=args.steps,
                cfg=args.cfg,
                seed=args.seed,
                sampler=args.sampler,
                scheduler=args.scheduler,
                shift=args.shift,
                slg=slg,
                apg=apg,
                num_images=args.num_images,
                t5_max_tokens=args.t5_max_tokens,
                init_image=init,
                strength=args.strength,
                mask=mask,
                mask_blur=args.mask_blur,
                hires=hires,
                weighting=args.weighting,
                long_clip=args.long_clip,
                callback=progress,
            )
            progress.close()
            for image in images:
                print(save_png(image, args.output, image.info.get("parameters")))
    finally:
        progress.close()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sd35.bench import make_options, run

    extra_ours = tuple(
        name
        for flag, name in ((args.compile, "compile"), (args.fp8, "fp8"), (args.cuda_graphs, "cuda_graphs"))
        if flag
    )
    options = make_options(
        device=args.device,
        dtype=args.dtype,
        full=args.full,
        sizes=args.sizes,
        warmup=args.warmup,
        iters=args.iters,
        ours=args.ours,
        diffusers=args.diffusers,
        extra_ours=extra_ours,
        extra_diffusers=("compile",) if args.diffusers_compile else (),
        steps_benchmark=not args.skip_steps,
        whole_image=args.whole_image,
        image_size=args.image_size,
        steps=args.steps,
        memory=args.memory,
        json_path=args.json,
        seed=args.seed,
    )
    return run(options)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="time our MMDiT-X step and whole image against diffusers on the same random weights",
        description="Side-by-side benchmark on random weights: one CFG step (MMDiT-X forward, batch 2, 77+256 text "
        "tokens) of ours and of diffusers' SD3Transformer2DModel, after checking both give the same output; "
        "optionally a whole image (text encoding + sampling + VAE decode) with each pipeline. On CUDA: full "
        "SD3.5 Medium sizes in bf16 at 512, 1024 and 1440 px; on the CPU: a scaled-down config that runs in "
        "seconds. Prints a table; --json writes every number.",
    )
    b.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    size = b.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        dest="full",
        action="store_true",
        default=None,
        help="real SD3.5 Medium sizes (default on CUDA)",
    )
    size.add_argument(
        "--scaled",
        dest="full",
        action="store_false",
        help="a small config of the same architecture (default on CPU)",
    )
    b.add_argument(
        "--sizes", default=None, help="image sides in pixels, e.g. 512,1024,1440 (CPU default 128,256)"
    )
    b.add_argument(
        "--iters", type=int, default=None, help="timed calls per measurement (default 20 CUDA, 3 CPU)"
    )
    b.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 CUDA, 1 CPU)")
    b.add_argument(
        "--ours",
        default=None,
        help="our variants, comma-separated: eager, compile, fp8, cuda_graphs, or combinations like fp8+compile "
        "(default eager)",
    )
    b.add_argument(
        "--compile", action="store_true", help="add our compiled variant (sd35.accel.compile_blocks)"
    )
    b.add_argument("--fp8", action="store_true", help="add our fp8 variant (sd35.accel.fp8)")
    b.add_argument(
        "--cuda-graphs", action="store_true", help="add our CUDA-graphs variant (sd35.accel.cuda_graphs)"
    )
    b.add_argument(
        "--diffusers", default=None, help="diffusers variants: eager, compile, or none (default eager)"
    )
    b.add_argument(
        "--diffusers-compile", action="store_true", help="also time torch.compile of diffusers' model"
    )
    b.add_argument("--skip-steps", action="store_true", help="leave out the step benchmark")
    b.add_argument(
        "--whole-image",
        action="store_true",
        help="also time prompt-to-image with each pipeline (all parts random)",
    )
    b.add_argument("--image-size", type=int, default=None, help="whole-image side (default 1024; tiny: 128)")
    b.add_argument("--steps", type=int, default=28, help="whole-image sampling steps (default 28)")
    b.add_argument(
        "--memory",
        default=None,
        help="whole image: our memory modes to run, e.g. high,balanced,low (if supported)",
    )
    b.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write every number to this JSON file"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from sd35.memory import MEMORY_MODES
    from sd35.pipeline import DEFAULTS, VAE_TILING
    from sd35.sampling.guidance import SkipLayerGuidance
    from sd35.sampling.samplers import SAMPLERS
    from sd35.sampling.schedules import SCHEDULERS

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
        default=None,
        type=Path,
        help="sd3.5_medium.safetensors (or all-in-one) or a diffusers folder; without it, the built-in demo model",
    )
    g.add_argument(
        "--demo",
        action="store_true",
        help="use the built-in demo model (a small model trained on synthetic shapes)",
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
    g.add_argument("--prompt", default=None)
    g.add_argument(
        "--prompt-file", type=Path, default=None, help="one prompt per line (# comments); each is generated"
    )
    g.add_argument("--negative-prompt", default="")
    g.add_argument(
        "--width", type=int, default=None, help="multiple of 16 (default 1024, or the init image's)"
    )
    g.add_argument(
        "--height", type=int, default=None, help="multiple of 16 (default 1024, or the init image's)"
    )
    g.add_argument("--steps", type=int, default=None, help=f"default {DEFAULTS.steps}")
    g.add_argument(
        "--cfg", type=float, default=None, help=f"classifier-free guidance scale (default {DEFAULTS.cfg})"
    )
    g.add_argument("--seed", type=int, default=None, help="random if omitted; image i uses seed+i")
    g.add_argument("--sampler", default=None, choices=list(SAMPLERS), help=f"default {DEFAULTS.sampler}")
    g.add_argument(
        "--scheduler", default=DEFAULTS.scheduler, choices=list(SCHEDULERS), help="default %(default)s"
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
    g.add_argument("--apg", action="store_true", help="adaptive projected guidance instead of plain CFG")
    g.add_argument("--apg-eta", type=float, default=None, help="weight of the parallel component (default 0)")
    g.add_argument(
        "--apg-norm-threshold", type=float, default=None, help="cap on the guidance norm (0 = off)"
    )
    g.add_argument("--apg-momentum", type=float, default=None, help="running-average momentum (default 0)")
    g.add_argument("--init-image", type=Path, default=None, help="img2img / inpainting source image")
    g.add_argument(
        "--strength", type=float, default=None, help="img2img denoise 0..1 (default 0.8; 1.0 with a mask)"
    )
    g.add_argument(
        "--mask", type=Path, default=None, help="inpainting mask: white (or transparent) = repaint"
    )
    g.add_argument(
        "--mask-blur", type=float, default=8.0, help="mask feathering radius in pixels (default 8)"
    )
    g.add_argument("--outpaint", default=None, help="extend the init image by LEFT,TOP,RIGHT,BOTTOM pixels")
    g.add_argument(
        "--hires-scale", type=float, default=None, help="hires fix: second pass at this scale (e.g. 1.5)"
    )
    g.add_argument("--hires-steps", type=int, default=None, help="steps of the second pass (default --steps)")
    g.add_argument(
        "--hires-strength", type=float, default=None, help="denoise of the second pass (default 0.5)"
    )
    g.add_argument("--hires-upscaler", choices=["latent", "lanczos"], default=None, help="default latent")
    g.add_argument(
        "--weighting",
        choices=["none", "comfy", "a1111"],
        default="none",
        help="apply (word:1.2) emphasis: none (the reference: parsed, ignored), comfy or a1111",
    )
    g.add_argument("--long-clip", action="store_true", help="encode CLIP prompts past 75 tokens in chunks")
    g.add_argument(
        "--preview", type=Path, default=None, help="PNG rewritten with a latent preview while sampling"
    )
    g.add_argument("--preview-every", type=int, default=5, help="preview interval in steps (default 5)")
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
        "--memory",
        choices=MEMORY_MODES,
        default="high",
        help="high: everything on the GPU; balanced: text encoders only on the GPU while encoding; "
        "low: also stream the transformer's blocks from CPU memory and tile the VAE",
    )
    g.add_argument(
        "--vae-tiling",
        choices=VAE_TILING,
        default="auto",
        help="decode/encode in tiles with whole-image statistics (same result, less memory); "
        "auto: above 1024x1024 on CUDA and in --memory low",
    )
    g.add_argument(
        "--fp8", action="store_true", help="fp8 (e4m3, scaled) transformer linears; Ada/Hopper GPUs"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block (GPU)")
    g.add_argument("--cuda-graphs", action="store_true", help="replay the transformer as CUDA graphs (GPU)")
    g.add_argument(
        "-o", "--output", type=Path, default=Path("sd35.png"), help="PNG path; never overwritten (numbered)"
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA/LyCORIS/DoRA file (any common format); repeatable; strength default 1.0",
    )
    g.set_defaults(func=_cmd_generate)

    _add_bench_parser(sub)

    sub.add_parser(
        "train",
        help="fine-tune (LoRA, DoRA or full) on a folder of captioned images; see `sd35 train --help`",
        add_help=False,
    )
    return parser


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run a command the way every sd35 entry point does: warnings as ``sd35: warning: ...`` lines, a user
    mistake (SD35Error) as one ``sd35: error: ...`` line and exit code 2, Ctrl-C as exit code 130."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return command()
        except SD35Error as e:
            print(f"sd35: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("sd35: interrupted", file=sys.stderr)
            return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer has its own parser (every config key is a flag)
        from sd35.train.cli import main_train

        return main_train(argv[1:])

    def command() -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main())
