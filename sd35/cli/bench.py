"""``sd35 bench``: our MMDiT-X step and whole image against diffusers, on the same random weights."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    if args.peers:
        return run_peers(args)
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


def _csv(flag: str, value: str, kind: type = str) -> tuple:
    from sd35.errors import SD35Error

    try:
        items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise SD35Error(f"{flag} takes comma-separated values like 256,512, got {value!r}.") from None
    if not items:
        raise SD35Error(f"{flag} is empty; give at least one value.")
    return items


def run_peers(args: argparse.Namespace) -> int:
    """``--peers``: ours, diffusers and stable-diffusion.cpp side by side on the CPU (sd35.bench.peers)."""
    from sd35.bench.peers import PeerOptions
    from sd35.bench.peers import run_peers as run_side_by_side
    from sd35.errors import SD35Error

    if args.device not in (None, "cpu"):
        raise SD35Error("--peers times CPU engines (stable-diffusion.cpp's CPU build); use --device cpu.")
    if args.diffusers not in (None, "eager", "none"):
        raise SD35Error(
            "--peers times diffusers eager (or --diffusers none); its other variants are GPU paths."
        )
    given = {  # the flags given; PeerOptions holds the defaults
        "sizes": _csv("--sizes", args.sizes, int) if args.sizes else None,
        "depth": args.depth,
        "rounds": args.rounds,
        "iters": args.iters,
        "dtypes": _csv("--peer-dtypes", args.peer_dtypes) if args.peer_dtypes else None,
        "sdcpp_types": _csv("--sdcpp-types", args.sdcpp_types) if args.sdcpp_types else None,
        "sdcpp_threads": args.sdcpp_threads,
        "weights_dir": args.sdcpp_weights,
    }
    options = replace(
        PeerOptions(
            diffusers=args.diffusers != "none",
            sdcpp=args.sdcpp,
            seed=args.seed,
            json_path=args.json,
            plot_path=Path(args.plot) if args.plot else None,
        ),
        **{name: value for name, value in given.items() if value is not None},
    )
    report = run_side_by_side(options)
    return 0 if all(r["ok"] for r in report["equivalence"]) else 1


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
    peers = b.add_argument_group(
        "side by side on the CPU (--peers)",
        "ours and diffusers in bf16 and fp32 and stable-diffusion.cpp's sd-cli (benchmarks/build_sdcpp.sh) on "
        "the same random weights, SD3.5 Medium's MMDiT-X at --depth blocks, one CFG step at each of --sizes "
        "(default 256,384,512,768), alternating in rounds; the table gives ours against diffusers at their "
        "defaults and in bf16, against sd.cpp's fastest type, and the share of the matmul rate our step reaches",
    )
    peers.add_argument(
        "--peers", action="store_true", help="run this comparison instead of the step benchmark"
    )
    peers.add_argument(
        "--depth", type=int, default=None, help="MMDiT-X blocks (hidden = 64 x depth; 24: SD3.5M; default 8)"
    )
    peers.add_argument(
        "--rounds", type=int, default=None, help="rounds of every engine at every size (default 3)"
    )
    peers.add_argument("--peer-dtypes", default=None, help="ours' and diffusers' dtypes (default bf16,fp32)")
    peers.add_argument(
        "--sdcpp", default=None, help="sd-cli (default $SDCPP_HOME/build/bin/sd-cli, then PATH)"
    )
    peers.add_argument("--sdcpp-types", default=None, help="sd.cpp --type values (default f16,q8_0,f32)")
    peers.add_argument(
        "--sdcpp-threads", type=int, default=None, help="sd.cpp's -t (default: torch's threads)"
    )
    peers.add_argument(
        "--sdcpp-weights",
        type=Path,
        default=None,
        help="where sd.cpp's weight files are written once and reused (default $SDCPP_HOME/weights)",
    )
    peers.add_argument(
        "--plot", default=None, metavar="PNG", help="step time against resolution (needs matplotlib)"
    )
    b.set_defaults(func=run)
