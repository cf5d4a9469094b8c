"""``sd35 bench``: our MMDiT-X step and whole image against diffusers, on the same random weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
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


def add_parser(sub) -> None:
    from sd35.devices import DTYPES

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
    b.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default bf16 on CUDA; on the CPU bf16 where it has bf16 instructions, else fp32",
    )
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
    b.set_defaults(func=run)
