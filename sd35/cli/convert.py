"""``sd35 convert IN [IN ...] OUT``: model files written again as an official single file, a diffusers folder,
GGUF or ComfyUI's scaled fp8 (:mod:`sd35.loading.convert` does the work; this module is the command line)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from sd35.loading.convert import convert

    *inputs, out = args.paths
    for line in convert(inputs, out, to=args.to, quant=args.quant, dtype=args.dtype):
        print(line)
    return 0


def add_parser(sub) -> None:
    from sd35.devices import DTYPES
    from sd35.loading.convert import TARGETS
    from sd35.loading.gguf_quantize import WRITABLE

    p = sub.add_parser(
        "convert",
        help="write model files as an official single file, a diffusers folder, GGUF or ComfyUI's scaled fp8",
        description="Reads every input as `sd35 generate` does (official or all-in-one .safetensors, diffusers "
        "folders, text-encoder files, GGUF, fp8) and writes OUT, never over an existing file. The target follows "
        "OUT unless --to names it: NAME.safetensors: official single file (ComfyUI's all-in-one layout when text "
        "encoders are given too); NAME.gguf: GGUF in ComfyUI-GGUF's layout (the MMDiT-X, or one T5/CLIP alone), of "
        "the type --quant names or NAME ends with (model-Q8_0.gguf), else F16; any other NAME: a diffusers folder "
        "(all five parts needed). --to scaled_fp8 writes ComfyUI's fp8 scaled .safetensors.",
    )
    p.add_argument("paths", nargs="+", metavar="IN ... OUT", help="input files or folders, then the output")
    p.add_argument("--to", choices=TARGETS, default=None, help="the output layout (default: from OUT's name)")
    p.add_argument(
        "--quant",
        type=str.upper,
        default=None,
        metavar="TYPE",
        help=f"GGUF type: {', '.join(WRITABLE)} (default: from OUT's name, else F16)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="cast float tensors of a safetensors output (default: each keeps its stored dtype)",
    )
    p.set_defaults(func=run)
