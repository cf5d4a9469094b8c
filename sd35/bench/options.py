"""What a benchmark run is asked to do: every argument checked up front, device-dependent defaults filled in.

A run on a GPU can take many minutes; a typo found after the first model is built wastes them, so
:func:`make_options` turns each bad argument into one :class:`SD35Error` before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.devices import DTYPES, resolve_device, resolve_dtype
from sd35.errors import SD35Error
from sd35.models.configs import medium_mmditx_config, scaled_mmditx_config, tiny_configs
from sd35.models.mmditx import MMDiTXConfig

BATCH = 2  # cond + uncond: one CFG step is one batch-2 forward
TEXT_TOKENS = 77 + 256  # CLIP (L and G side by side) + T5 padded to diffusers' default 256
FULL_SIZES = (512, 1024, 1440)
SCALED_SIZES = (128, 256)
OUR_VARIANTS = ("eager", "compile", "fp8", "cuda_graphs")
DIFFUSERS_VARIANTS = ("eager", "compile")


@dataclass(frozen=True)
class BenchOptions:
    """A validated benchmark request (see :func:`make_options`)."""

    device: torch.device
    dtype: torch.dtype
    full: bool
    sizes: tuple[int, ...]
    warmup: int
    iters: int
    ours: tuple[str, ...]
    diffusers: tuple[str, ...]
    steps_benchmark: bool
    whole_image: bool
    image_size: int
    steps: int
    memory: tuple[str, ...]
    json_path: Path | None
    seed: int = 0

    @property
    def config(self) -> MMDiTXConfig:
        """The MMDiT-X the step benchmark times: SD3.5 Medium's, or the scaled one."""
        return medium_mmditx_config() if self.full else scaled_mmditx_config()

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def parse_variants(flag: str, value: str | None, known: tuple[str, ...]) -> tuple[str, ...]:
    """``"eager,fp8+compile"`` -> ``("eager", "fp8+compile")``, refusing unknown parts and impossible orders."""
    if value is None:
        return ()
    items = tuple(v.strip().replace("-", "_") for v in value.split(",") if v.strip())
    for item in items:
        parts = item.split("+")
        bad = [p for p in parts if p not in known]
        if bad:
            raise SD35Error(
                f"{flag}: unknown variant {bad[0]!r}; choose from {', '.join(known)} (join with +)."
            )
        if len(parts) > 1 and "eager" in parts:
            raise SD35Error(f"{flag}: 'eager' cannot be combined with other variants ({item!r}).")
        if "cuda_graphs" in parts[:-1]:
            raise SD35Error(f"{flag}: cuda_graphs must come last in a combination ({item!r}).")
    return items


def parse_sizes(value: str | None, default: tuple[int, ...], cfg: MMDiTXConfig) -> tuple[int, ...]:
    """``"512,1024"`` -> ``(512, 1024)``: each a multiple of 8x VAE times the patch, inside ``cfg``'s grid."""
    if value is None:
        return default
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise SD35Error(f"--sizes takes comma-separated pixel sizes like 512,1024, got {value!r}.") from None
    if not sizes:
        raise SD35Error("--sizes is empty; give at least one size like 512.")
    step = 8 * cfg.patch_size
    for s in sizes:
        if s < step or s % step:
            raise SD35Error(
                f"size {s} is not a positive multiple of {step} pixels (8x VAE, patch {cfg.patch_size})."
            )
        if s > cfg.max_image_size:
            which = "full" if cfg == medium_mmditx_config() else "scaled"
            raise SD35Error(
                f"size {s} is larger than the {which} config's position grid allows (at most {cfg.max_image_size}); "
                + ("use --full for real sizes." if which == "scaled" else "pick a smaller size.")
            )
    return sizes


def _whole_image_max_size(full: bool) -> int:
    return (medium_mmditx_config() if full else tiny_configs().mmditx).max_image_size


def make_options(
    *,
    device: str | None = None,
    dtype: str | None = None,
    full: bool | None = None,
    sizes: str | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    ours: str | None = None,
    diffusers: str | None = None,
    extra_ours: tuple[str, ...] = (),
    extra_diffusers: tuple[str, ...] = (),
    steps_benchmark: bool = True,
    whole_image: bool = False,
    image_size: int | None = None,
    steps: int = 28,
    memory: str | None = None,
    json_path: str | Path | None = None,
    seed: int = 0,
) -> BenchOptions:
    """Check every argument up front (one clear SD35Error each) and fill the device-dependent defaults:
    full size, bf16, 512/1024/1440 and 20 timed calls on CUDA; scaled, fp32, 128/256 and 3 calls on the CPU."""
    dev = resolve_device(device, allowed=("cuda", "cpu"))
    on_gpu = dev.type == "cuda"
    full = on_gpu if full is None else full
    cfg = medium_mmditx_config() if full else scaled_mmditx_config()
    torch_dtype = resolve_dtype(dtype, dev)
    warmup = (5 if on_gpu else 1) if warmup is None else warmup
    iters = (20 if on_gpu else 3) if iters is None else iters
    if warmup < 0:
        raise SD35Error(f"--warmup must be 0 or more, got {warmup}.")
    if iters < 1:
        raise SD35Error(f"--iters must be at least 1, got {iters}.")
    our_variants = parse_variants("--ours", ours, OUR_VARIANTS) if ours is not None else ("eager",)
    our_variants += tuple(v for v in extra_ours if v not in our_variants)
    if diffusers is not None and diffusers.strip() == "none":
        diff_variants: tuple[str, ...] = ()
    else:
        diff_variants = (
            parse_variants("--diffusers", diffusers, DIFFUSERS_VARIANTS) if diffusers else ("eager",)
        )
        diff_variants += tuple(v for v in extra_diffusers if v not in diff_variants)
    if not our_variants and steps_benchmark:
        raise SD35Error("--ours is empty; name at least one variant, e.g. eager.")
    image_size = image_size if image_size is not None else (1024 if full else 128)
    if image_size % 16 or image_size < 16:
        raise SD35Error(f"--image-size {image_size} is not a positive multiple of 16.")
    if whole_image and image_size > _whole_image_max_size(full):
        raise SD35Error(
            f"--image-size {image_size} is larger than the {'full' if full else 'tiny'} pipeline allows "
            f"(at most {_whole_image_max_size(full)})."
        )
    if steps < 1:
        raise SD35Error(f"--steps must be at least 1, got {steps}.")
    if not steps_benchmark and not whole_image:
        raise SD35Error("--skip-steps leaves nothing to run; add --whole-image.")
    json_out = Path(json_path) if json_path is not None else None
    if json_out is not None and json_out.is_dir():
        raise SD35Error(f"--json {json_out} is a folder; give a file name like {json_out / 'bench.json'}.")
    modes = tuple(m.strip() for m in memory.split(",") if m.strip()) if memory else ()
    return BenchOptions(
        device=dev,
        dtype=torch_dtype,
        full=full,
        sizes=parse_sizes(sizes, FULL_SIZES if full else SCALED_SIZES, cfg),
        warmup=warmup,
        iters=iters,
        ours=our_variants,
        diffusers=diff_variants,
        steps_benchmark=steps_benchmark,
        whole_image=whole_image,
        image_size=image_size,
        steps=steps,
        memory=modes,
        json_path=json_out,
        seed=seed,
    )
