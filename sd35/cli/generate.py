"""``sd35 generate``: prompts in, PNGs out, through one :class:`~sd35.request.GenerateRequest` per prompt.

Everything that can be checked without the model (every request field, the output path, the device, the
fast paths) is checked before a weight is read, so a typo costs a moment, not a minute of loading.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from sd35.cli.options import add_request_arguments, request_from_args
from sd35.errors import InvalidRequest
from sd35.result import Progress


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which weights to load and how (shared by every command that runs the model)."""
    from sd35.devices import DTYPES
    from sd35.memory import MEMORY_MODES
    from sd35.models.family import VARIANTS
    from sd35.pipeline import VAE_TILING

    g = parser.add_argument_group("model")
    model = g.add_mutually_exclusive_group()
    model.add_argument(
        "--model",
        default=None,
        type=Path,
        help="sd3.5_medium.safetensors (or all-in-one) or a diffusers folder; without it, the built-in demo model",
    )
    model.add_argument(
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
        "--tokenizers",
        type=Path,
        default=None,
        help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ (default: SD3's, which ship with sd35)",
    )
    g.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="a standalone SD3 VAE file or diffusers vae/ folder (for model files without one; replaces theirs)",
    )
    g.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="which SD3 release the model is, for its defaults (default: read from the weights, the file's "
        "metadata and its name; say large-turbo for a renamed SD3.5 Large Turbo file)",
    )
    g.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available)")
    g.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default bf16 on GPUs; on the CPU bf16 (text encoders fp32) where it has bf16 instructions (AMX, AVX512_BF16), else fp32; SD35_CPU_DTYPE=fp32 or bf16 sets the CPU's default",
    )
    g.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="high",
        help="high: everything on the GPU; balanced: text encoders only on the GPU while encoding; "
        "low: also stream the transformer's blocks from CPU memory and tile the VAE (default high)",
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
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (GPU or CPU; the first call at each size compiles: seconds to minutes)",
    )
    g.add_argument(
        "--cuda-graphs", action="store_true", help="replay the transformer as CUDA graphs (CUDA GPUs)"
    )


def load_from_args(args: argparse.Namespace):
    """Check the device and fast paths, then load the model the options name (the demo if none)."""
    from sd35.accel.apply import check_accelerations
    from sd35.devices import resolve_device
    from sd35.loading.assemble import load_pipeline

    device = resolve_device(args.device)
    check_accelerations(device, args.memory, fp8=args.fp8, compile=args.compile, cuda_graphs=args.cuda_graphs)
    model, tokenizers = args.model, args.tokenizers
    if model is None:
        from sd35.demo import demo_files

        model, demo_tokenizers = demo_files()
        tokenizers = tokenizers or demo_tokenizers
        if not args.demo:
            print(
                "sd35: no --model given, so this uses the built-in demo model (a small model trained on synthetic "
                "shapes, 64x64). For real images pass --model sd3.5_medium.safetensors --text-encoders ... .",
                file=sys.stderr,
            )
    pipe = load_pipeline(
        model, args.text_encoders, tokenizers, device=device, dtype=args.dtype, memory=args.memory,
        vae_tiling=args.vae_tiling, vae=args.vae, variant=args.variant,
    )  # fmt: skip
    pipe.accelerate(fp8=args.fp8, compile=args.compile, cuda_graphs=args.cuda_graphs)
    return pipe


def add_parser(sub) -> None:
    from sd35.demo import DEMO_DEFAULTS
    from sd35.models.family import RELEASES
    from sd35.presets import PRESETS

    releases = "; ".join(
        f"{RELEASES[v].title} {d.steps} steps, CFG {d.cfg}, {d.sampler}, shift {d.shift}"
        for v, d in PRESETS.items()
    )
    g = sub.add_parser(
        "generate",
        help="text to image (img2img, inpainting, outpainting, hires fix, ControlNet)",
        description="Generate images from a prompt. Settings left out take the model's defaults: the official "
        f"reference's for each release ({releases}), the demo model's own for the demo ({DEMO_DEFAULTS.width}x"
        f"{DEMO_DEFAULTS.height}, {DEMO_DEFAULTS.steps} steps, CFG {DEMO_DEFAULTS.cfg}, {DEMO_DEFAULTS.sampler}).",
    )
    add_model_arguments(g)
    p = g.add_argument_group("prompt")
    p.add_argument("--prompt", default=None, help="what to draw")
    p.add_argument(
        "--prompt-file", type=Path, default=None, help="one prompt per line (# comments); each is generated"
    )
    add_request_arguments(g, {RELEASES[v].title: d for v, d in PRESETS.items()} | {"demo": DEMO_DEFAULTS})
    o = g.add_argument_group("output")
    o.add_argument(
        "-o", "--output", type=Path, default=Path("sd35.png"), help="PNG path; never overwritten (numbered)"
    )
    o.add_argument(
        "--preview", type=Path, default=None, help="PNG rewritten with a latent preview while sampling"
    )
    o.add_argument("--preview-every", type=int, default=5, help="preview interval in steps (default 5)")
    g.set_defaults(func=run)


class ProgressBar:
    """A tqdm bar per sampling pass (opened at a pass's first step, so a request that fails early shows none),
    and the live preview file, rewritten every ``every`` steps."""

    def __init__(self, preview: Path | None, every: int):
        from sd35.files import next_free_path

        self.bar = None
        self.preview = next_free_path(preview) if preview is not None else None
        self.every = every

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None or p.step == 0:
            self.close()
            desc = "sampling" if p.stage == "base" else "hires fix"
            self.bar = tqdm(total=p.steps, initial=p.step, unit="step", desc=desc, dynamic_ncols=True)
        self.bar.update(1)
        if self.preview is not None and ((p.step + 1) % self.every == 0 or p.step + 1 == p.steps):
            from sd35.image_io import replace_png
            from sd35.preview import latent_preview

            replace_png(latent_preview(p.denoised), self.preview)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _prompts(args: argparse.Namespace) -> list[str]:
    from sd35.conditioning.prompt import read_prompt_file

    if (args.prompt is None) == (args.prompt_file is None):
        raise InvalidRequest("give exactly one of --prompt and --prompt-file.", param="prompt")
    return [args.prompt] if args.prompt is not None else read_prompt_file(args.prompt_file)


def run(args: argparse.Namespace) -> int:
    from sd35.image_io import check_output_path, save_png

    prompts = _prompts(args)
    request = request_from_args(args, prompts[0])  # every field checked (and images read) once
    from sd35.control.files import read_controlnet
    from sd35.pipeline import controlnet_file, lora_file

    for ref in request.loras:
        lora_file(ref.name)
    for unit in request.controls:  # a missing or foreign ControlNet is named before the model loads
        read_controlnet(controlnet_file(unit.model))
    check_output_path(args.output)  # before spending minutes on loading and sampling
    if args.preview is not None:
        check_output_path(args.preview)
    if args.preview_every < 1:
        raise InvalidRequest(f"--preview-every must be a positive integer, got {args.preview_every}.")
    pipe = load_from_args(args)
    progress = ProgressBar(args.preview, args.preview_every)

    def warn(note: str) -> None:
        progress.close()
        print(f"sd35: warning: {note}", file=sys.stderr)

    try:
        for prompt in prompts:
            result = pipe.run(replace(request, prompt=prompt), on_progress=progress, on_warning=warn)
            progress.close()
            for image, text in zip(result.images, result.infotexts, strict=True):
                print(save_png(image, args.output, text))
    finally:
        progress.close()
    return 0
