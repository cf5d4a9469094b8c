"""``sd35 bench``: our engine and diffusers side by side, in one process, on the same random weights.

A speed claim is only worth the baseline it was measured against, so the baseline is measured here, in
the same run, on the same card, with the same weights and inputs:

- **step**: one CFG denoising step, i.e. one MMDiT-X forward at batch 2 with 77 CLIP + 256 T5 text
  tokens, ours (eager, plus the fast paths of :mod:`sd35.accel` where they exist) against diffusers'
  ``SD3Transformer2DModel``. Both are built from one random state dict, converted to diffusers' layout
  with our own key table; before anything is timed, both outputs are compared, so a broken model (or a
  broken conversion) is never timed as if it were fast.
- **whole image** (``--whole-image``): prompt to pixels (text encoding + sampling + VAE decode) with our
  ``load_pipeline(...).generate`` against diffusers' ``StableDiffusion3Pipeline``, both loaded from one
  diffusers-layout folder of random weights (MMDiT-X, VAE, CLIP-L, CLIP-G and T5-XXL at full size).

Timing: warm-up calls first (module load, autotuning and compilation stay out of the numbers), then the
median, p10 and p90 of many calls, each bracketed by CUDA events on a GPU (``time.perf_counter`` on the
CPU); peak memory is ``torch.cuda.max_memory_allocated`` after a reset, with only the model under test
resident. Inputs are random normal, never zeros (zeros can run faster than real data).

On the CPU the default is a scaled-down MMDiT-X (and the tiny test pipeline) so that CI smoke-tests the
whole path in seconds; ``--full`` forces the real sizes anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd35.accel import GraphedDenoiser, compile_blocks, fp8_supported, quantize_model_fp8
from sd35.errors import SD35Error, SD35Warning
from sd35.loading.writers import diffusers_transformer_config, write_diffusers
from sd35.models.configs import (
    TINY_CLIP_VOCAB,
    medium_configs,
    medium_mmditx_config,
    scaled_mmditx_config,
    tiny_configs,
)
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import build_random, random_pipeline_weights

BATCH = 2  # cond + uncond: one CFG step is one batch-2 forward
TEXT_TOKENS = 77 + 256  # CLIP (L and G side by side) + T5 padded to diffusers' default 256
PROMPT = "a red fox sitting in fresh snow at sunrise, photograph"
CFG_SCALE = 4.5
SHIFT = 3.0
IMAGE_SEED = 1234

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL_SIZES = (512, 1024, 1440)
PAIRED_ROUNDS = 9  # CPU only: alternating blocks of ours / diffusers eager (see time_paired)
SCALED_SIZES = (128, 256)
OUR_VARIANTS = ("eager", "compile", "fp8", "cuda_graphs")
DIFFUSERS_VARIANTS = ("eager", "compile")

# Diffusers 0.42.1 on one H100 80GB HBM3, bf16, random weights (shared/spec/PERFORMANCE.md section 10):
# the numbers this engine has to beat. Kept in every JSON so a result file explains itself.
ANCHORS = {
    "source": "diffusers 0.42.1, H100 80GB HBM3, bf16, torch 2.11 (PERFORMANCE.md section 10)",
    "step_ms": {"512": 66.9, "1024": 87.6, "1440": 193.8},
    "step_compiled_ms": {"1024": 53.4},
    "whole_image_1024": {"seconds": 2.705, "peak_gib": 17.64, "steps": 28, "t5_tokens": 256},
}

# Relative L2 difference ||ours - diffusers|| / ||diffusers|| allowed before the equivalence check fails.
# float32 agrees to rounding (~3e-7 measured); over 24 blocks bf16 drifts to ~1.1e-2 and fp16 to ~1.4e-3
# (measured on the CPU with the real depth and attn2 layout), while a wrong weight or op gives O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Unavailable(Exception):
    """A requested fast path that this installation or device does not have (reported, not fatal)."""


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
        return medium_mmditx_config() if self.full else scaled_mmditx_config()

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def _parse_list(flag: str, value: str | None, known: tuple[str, ...]) -> tuple[str, ...]:
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


def _parse_sizes(value: str | None, default: tuple[int, ...], cfg: MMDiTXConfig) -> tuple[int, ...]:
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


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when present; a CUDA request on a machine without CUDA is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SD35Error(f"--device {name!r} is not a device name; use cuda, cuda:N or cpu.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "finds no GPU"
            raise SD35Error(
                f"--device {name}: CUDA is not available (torch {torch.__version__} {build}); use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SD35Error(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise SD35Error(f"--device {name}: the benchmark runs on cuda or cpu.")
    return device


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
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    full = on_gpu if full is None else full
    cfg = medium_mmditx_config() if full else scaled_mmditx_config()
    if dtype is not None and dtype not in DTYPES:
        raise SD35Error(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if on_gpu else torch.float32)
    warmup = (5 if on_gpu else 1) if warmup is None else warmup
    iters = (20 if on_gpu else 3) if iters is None else iters
    if warmup < 0:
        raise SD35Error(f"--warmup must be 0 or more, got {warmup}.")
    if iters < 1:
        raise SD35Error(f"--iters must be at least 1, got {iters}.")
    our_variants = _parse_list("--ours", ours, OUR_VARIANTS) if ours is not None else ("eager",)
    our_variants += tuple(v for v in extra_ours if v not in our_variants)
    if diffusers is not None and diffusers.strip() == "none":
        diff_variants: tuple[str, ...] = ()
    else:
        diff_variants = _parse_list("--diffusers", diffusers, DIFFUSERS_VARIANTS) if diffusers else ("eager",)
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
        sizes=_parse_sizes(sizes, FULL_SIZES if full else SCALED_SIZES, cfg),
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


# --- random models ------------------------------------------------------------------------------------


def diffusers_transformer(ours: MMDiTX) -> nn.Module:
    """diffusers' ``SD3Transformer2DModel`` holding a copy of ``ours``' weights, converted by our key table.

    Built on the meta device and filled with ``assign=True``: no second random init, no float32 copy, and the
    copy owns its memory (so ``ours`` can be freed and each model's peak memory measured alone).
    """
    from diffusers import SD3Transformer2DModel

    from sd35.loading.diffusers_mmditx import mmditx_to_diffusers

    kwargs = {k: v for k, v in diffusers_transformer_config(ours.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = SD3Transformer2DModel(**kwargs)
    state = {k: v.detach().clone() for k, v in mmditx_to_diffusers(ours.state_dict()).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@dataclass
class StepInputs:
    """One CFG step's inputs: latents, t = sigma * 1000, pooled text, text tokens (batch 2)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    context: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.t, self.y, self.context


def step_inputs(
    cfg: MMDiTXConfig, size: int, device: torch.device, dtype: torch.dtype, seed: int
) -> StepInputs:
    """Random normal inputs drawn on the CPU (the same numbers on every device), t uniform in [0, 1000]."""
    g = torch.Generator().manual_seed(seed * 7919 + size)
    lat = size // 8
    x = torch.randn(BATCH, cfg.in_channels, lat, lat, generator=g)
    context = torch.randn(BATCH, TEXT_TOKENS, cfg.context_dim, generator=g)
    y = torch.randn(BATCH, cfg.pooled_dim, generator=g)
    t = torch.rand(BATCH, generator=g) * 1000.0
    return StepInputs(x.to(device, dtype), t.to(device), y.to(device, dtype), context.to(device, dtype))


def call_diffusers(model: nn.Module, inp: StepInputs) -> torch.Tensor:
    return model(
        hidden_states=inp.x,
        encoder_hidden_states=inp.context,
        pooled_projections=inp.y,
        timestep=inp.t,
        return_dict=False,
    )[0]


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs and relative L2 difference (NaN if either side is not finite, so it can never pass)."""
    a, b = out.detach().float().cpu(), ref.detach().float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"max_abs_diff": math.nan, "rel_l2_diff": math.nan, "ref_max_abs": b.abs().max().item()}
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "rel_l2_diff": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
        "ref_max_abs": b.abs().max().item(),
    }


# --- timing -------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 1])."""
    pos = q * (len(sorted_ms) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[dict, torch.Tensor]:
    """Warm up, then time ``iters`` calls one by one: median/p10/p90 in ms, the peak memory of the timed calls,
    and the last call's output (checked against the references, so what was timed is what was checked).

    On CUDA each call sits between two recorded events and the host never waits in between, so host launch
    overhead counts only where it starves the GPU, as it would in a sampling loop.
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            synchronize(device)
            first = time.perf_counter() - t0  # includes compilation / graph capture, reported separately
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            out = fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        peak = None
    ordered = sorted(times)
    stats = {
        "median_ms": statistics.median(times),
        "p10_ms": _percentile(ordered, 0.1),
        "p90_ms": _percentile(ordered, 0.9),
        "mean_ms": statistics.fmean(times),
        "min_ms": ordered[0],
        "iters": iters,
        "warmup": warmup,
        "first_call_s": first,
        "peak_gib": peak,
    }
    return stats, out


def time_paired(
    calls: dict[str, Callable[[], torch.Tensor]], rounds: int, block: int
) -> dict[str, dict[str, float]]:
    """Time several callables in alternating blocks: ``rounds`` times, each runs ``block`` calls in a row (after
    one untimed call), in a rotating order; per callable, the median over rounds of each block's median, in ms.

    On a shared CPU the speed drifts by 10% or more within seconds, so timing one model after the other
    compares two different machines; alternating makes the drift hit every callable alike, while each block
    still measures back-to-back calls (the steady state of a sampling loop).
    """
    names = list(calls)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = calls[name]
            fn()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
            per_round[name].append(statistics.median(times))
    return {
        n: {
            "median_ms": statistics.median(v),
            "min_ms": min(v),
            "max_ms": max(v),
            "rounds": rounds,
            "block": block,
        }
        for n, v in per_round.items()
    }


# --- fast paths ---------------------------------------------------------------------------------------


def acceleration_status(device: torch.device, names: set[str]) -> dict[str, str]:
    """For the JSON: which fast paths were asked for and whether they can run on ``device``."""
    status = {}
    for name in sorted(names):
        status[name] = "available"
        if name == "cuda_graphs" and device.type != "cuda":
            status[name] = "unavailable: needs CUDA"
        if name == "fp8" and not fp8_supported(device):
            status[name] = "unavailable: needs a GPU of compute capability 8.9+"
    return status


def our_runner(
    variant: str, model: MMDiTX, device: torch.device
) -> Callable[[StepInputs], Callable[[], torch.Tensor]]:
    """Apply a variant ("eager", "fp8", "fp8+compile", "compile+cuda_graphs", ...) to ``model``.

    The parts are applied in the only order that composes (quantize, compile, then graph), as
    :meth:`sd35.pipeline.SD3Pipeline.accelerate` does. Returns a factory: inputs -> a no-argument call. The
    CUDA-graph wrapper is made afresh per input size, so the graph memory of one size is freed before the
    next is measured.
    """
    parts = set(variant.split("+")) - {"eager"}
    if "cuda_graphs" in parts and device.type != "cuda":
        raise Unavailable("needs CUDA")
    if "fp8" in parts:
        quantize_model_fp8(model)  # SD35Error where fp8 cannot run: reported as unavailable
    if "compile" in parts:
        compile_blocks(model, dynamic=False)  # one static graph per size, as a sampler at one resolution runs
    if "cuda_graphs" not in parts:
        return lambda inp: lambda: model(*inp.args)

    def graphed(inp: StepInputs) -> Callable[[], torch.Tensor]:
        call = GraphedDenoiser(model)
        return lambda: call(*inp.args)

    return graphed


# --- the report ---------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.import_module(name).__version__
        except Exception:
            return None

    import sd35

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "sd35": getattr(sd35, "__version__", None),
    }


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return {"type": "cpu", "name": f"{platform.machine()} CPU", "threads": torch.get_num_threads()}


class Report:
    """The JSON document, saved after every measurement so a run cut short still leaves its numbers."""

    def __init__(self, opts: BenchOptions):
        self.opts = opts
        self.data: dict = {
            "benchmark": "sd35 bench",
            "schema": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info(opts.device),
            "versions": _versions(),
            "dtype": opts.dtype_name,
            "config": {"name": "full" if opts.full else "scaled", "mmditx": dataclasses.asdict(opts.config)},
            "batch": BATCH,
            "text_tokens": TEXT_TOKENS,
            "warmup": opts.warmup,
            "iters": opts.iters,
            "seed": opts.seed,
            "accelerations": {},
            "equivalence": [],
            "steps": [],
            "paired": [],
            "whole_image": None,
            "anchors": ANCHORS,
        }

    def save(self) -> None:
        path = self.opts.json_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(self.data, indent=2, allow_nan=True) + "\n")
        os.replace(tmp, path)

    def add(self, key: str, row: dict) -> None:
        self.data[key].append(row)
        self.save()


# --- step benchmark -----------------------------------------------------------------------------------


def _equivalence(
    opts: BenchOptions, report: Report, inputs: dict[int, StepInputs]
) -> tuple[dict, dict, nn.Module | None]:
    """Our eager output and diffusers' at every size, compared before anything is timed.

    Returns both outputs by size (on the CPU, so they weigh nothing in later peak-memory readings) and the
    diffusers model, which its own timing reuses; our model is freed here and rebuilt per variant.
    """
    cfg = opts.config
    _log(f"building our MMDiT-X ({'full' if opts.full else 'scaled'}) on {opts.device} in {opts.dtype_name}")
    ours = build_random(MMDiTX, cfg, opts.device, opts.dtype, opts.seed)
    ref_ours = {s: ours(*inputs[s].args).float().cpu() for s in opts.sizes}
    if not opts.diffusers:
        del ours
        free_memory(opts.device)
        return ref_ours, {}, None
    _log("building diffusers' SD3Transformer2DModel from the same weights")
    theirs = diffusers_transformer(ours)
    if opts.device.type == "cpu":  # no peak memory to isolate on the CPU: time both side by side
        for s in opts.sizes:
            _log(f"timing ours and diffusers eager alternately at {s}px")
            paired = time_paired(
                {
                    "ours": lambda s=s, model=ours: model(*inputs[s].args),
                    "diffusers": lambda s=s: call_diffusers(theirs, inputs[s]),
                },
                rounds=PAIRED_ROUNDS,
                block=max(1, opts.iters // 3),
            )
            report.add(
                "paired", {"size": s, **{f"{k}_{m}": v for k, r in paired.items() for m, v in r.items()}}
            )
    del ours
    free_memory(opts.device)
    ref_theirs = {}
    for s in opts.sizes:
        ref_theirs[s] = call_diffusers(theirs, inputs[s]).float().cpu()
        row = {"size": s, **compare(ref_ours[s], ref_theirs[s]), "tolerance": TOLERANCE[opts.dtype]}
        row["ok"] = bool(row["rel_l2_diff"] <= row["tolerance"])  # False for NaN too
        report.add("equivalence", row)
        if not row["ok"]:
            warnings.warn(
                f"at {s}px our output differs from diffusers' (relative L2 {row['rel_l2_diff']:.2e} > "
                f"{row['tolerance']:.0e}): the step timings compare models that do not compute the same thing.",
                SD35Warning,
                stacklevel=2,
            )
    return ref_ours, ref_theirs, theirs


def _measure(
    opts: BenchOptions,
    report: Report,
    row: dict,
    call: Callable[[], torch.Tensor],
    refs: dict[str, torch.Tensor],
) -> None:
    """Time one (engine, variant, size), check its output against the references, record the row."""
    compile_like = row["variant"] != "eager"
    warmup = max(opts.warmup, 2) if compile_like else opts.warmup  # the first call compiles or captures
    stats, out = time_calls(call, opts.device, warmup, opts.iters)
    row.update(stats)
    for name, ref in refs.items():
        diff = compare(out, ref)
        row[f"max_abs_diff_vs_{name}"] = diff["max_abs_diff"]
        row[f"rel_l2_diff_vs_{name}"] = diff["rel_l2_diff"]
    row["status"] = "ok"


def _run_guarded(opts: BenchOptions, report: Report, row: dict, body: Callable[[], None]) -> None:
    """Run one measurement; a missing or failing fast path becomes a status in the row, not a crash."""
    try:
        body()
    except Unavailable as e:
        row["status"] = f"unavailable: {e}"
    except Exception as e:  # a fast path under development may fail in any way; the other rows still count
        row["status"] = f"failed: {_error_text(e)}"
        _log(f"{row['engine']} {row['variant']} at {row['size']}px failed: {_error_text(e)}")
    finally:
        free_memory(opts.device)
    report.add("steps", row)


def _time_diffusers(
    opts: BenchOptions, report: Report, theirs: nn.Module | None, inputs: dict, ref_ours: dict
) -> None:
    for variant in opts.diffusers:
        model = theirs
        if variant == "compile" and theirs is not None:
            model = torch.compile(theirs, dynamic=False)  # one static graph per size, as ours
        for s in opts.sizes:
            row = {"size": s, "engine": "diffusers", "variant": variant}
            _log(f"timing diffusers {variant} at {s}px")

            def body(model=model, s=s, row=row) -> None:
                if model is None:
                    raise Unavailable("diffusers model not built")
                _measure(
                    opts, report, row, lambda: call_diffusers(model, inputs[s]), {"ours_eager": ref_ours[s]}
                )

            _run_guarded(opts, report, row, body)


def _prepare_ours(
    opts: BenchOptions, variant: str
) -> tuple[Callable[[StepInputs], Callable[[], torch.Tensor]], float]:
    """A fresh model (the same seed, so the same weights as every other model) with the variant applied,
    and the seconds applying it took (quantizing, wrapping; compilation itself happens in the first call)."""
    model = build_random(MMDiTX, opts.config, opts.device, opts.dtype, opts.seed)
    t0 = time.perf_counter()
    factory = our_runner(variant, model, opts.device)
    return factory, time.perf_counter() - t0


def _time_ours(opts: BenchOptions, report: Report, inputs: dict, ref_ours: dict, ref_theirs: dict) -> None:
    for variant in opts.ours:
        _log(f"building our MMDiT-X for variant {variant}")
        factory, setup_s, problem = None, None, None
        try:
            factory, setup_s = _prepare_ours(opts, variant)
        except (Unavailable, SD35Error) as e:  # SD35Error: the fast path says it cannot run here
            problem = f"unavailable: {e}"
        except Exception as e:
            problem = f"failed: {_error_text(e)}"
            _log(f"ours {variant} failed: {problem}")
        for s in opts.sizes:
            row = {"size": s, "engine": "ours", "variant": variant, "setup_s": setup_s}
            if factory is None:
                row["status"] = problem
                report.add("steps", row)
                continue
            _log(f"timing ours {variant} at {s}px")
            refs = {"diffusers": ref_theirs[s]} if s in ref_theirs else {}
            refs["ours_eager"] = ref_ours[s]

            def body(factory=factory, s=s, row=row, refs=refs) -> None:
                _measure(opts, report, row, factory(inputs[s]), refs)

            _run_guarded(opts, report, row, body)
        factory = None  # the model goes with it
        free_memory(opts.device)


def run_steps(opts: BenchOptions, report: Report) -> None:
    """Equivalence first, then diffusers' variants, then ours, each model alone on the device while timed."""
    report.data["accelerations"] = acceleration_status(
        opts.device, {p for v in opts.ours for p in v.split("+") if p != "eager"}
    )
    inputs = {s: step_inputs(opts.config, s, opts.device, opts.dtype, opts.seed) for s in opts.sizes}
    with torch.inference_mode():
        ref_ours, ref_theirs, theirs = _equivalence(opts, report, inputs)
        _time_diffusers(opts, report, theirs, inputs, ref_ours)
        del theirs  # before our models are built, so each is timed alone on the device
        free_memory(opts.device)
        _time_ours(opts, report, inputs, ref_ours, ref_theirs)


# --- whole image --------------------------------------------------------------------------------------


def write_random_pipeline(folder: Path, opts: BenchOptions) -> Path:
    """One diffusers-layout folder both pipelines load: full-size random parts (made on the device) or tiny ones.

    The full-size CLIP keeps the tiny tokenizers' vocabulary (:func:`sd35.models.configs.medium_configs`).
    """
    if not opts.full:
        return write_diffusers(folder, random_pipeline_weights(tiny_configs(), opts.seed))
    weights = random_pipeline_weights(
        medium_configs(clip_vocab=TINY_CLIP_VOCAB),
        opts.seed,
        scheme="per_tensor",
        device=opts.device,
        dtype=opts.dtype,
        on_part=lambda name: _log(f"making a random full-size {name} on {opts.device}"),
    )
    return write_diffusers(folder, weights, dtype=opts.dtype)


def _image_diff(ours, theirs) -> dict[str, float]:
    import numpy as np

    a = np.asarray(ours, dtype=np.float32) / 255.0
    b = np.asarray(theirs, dtype=np.float32)
    return {
        "image_max_abs_diff_vs_ours": float(np.abs(a - b).max()),
        "image_mean_abs_diff_vs_ours": float(np.abs(a - b).mean()),
    }


def _timed(opts: BenchOptions, fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """Wall-clock seconds of one whole call (host work such as tokenizing counts) and its peak GPU memory."""
    free_memory(opts.device)
    if opts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(opts.device)
    synchronize(opts.device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(opts.device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(opts.device) / 2**30 if opts.device.type == "cuda" else None
    return result, seconds, peak


def _memory_modes(opts: BenchOptions) -> tuple[str | None, ...]:
    """Our memory modes to run: the requested ones, else one run with the pipeline's default."""
    return opts.memory or (None,)


def _whole_ours(opts: BenchOptions, folder: Path, mode: str | None) -> tuple[dict, object]:
    """Load our pipeline (in ``mode``), warm it up with a 2-step image, then time one whole image."""
    from sd35.pipeline import load_pipeline

    row: dict = {"engine": "ours", "variant": "default" if mode is None else f"memory={mode}", "memory": mode}
    image = None
    try:
        t0 = time.perf_counter()
        pipe = load_pipeline(
            folder, device=opts.device, dtype=opts.dtype, **({} if mode is None else {"memory": mode})
        )
        row["load_s"] = time.perf_counter() - t0
        row["t5_tokens"] = int(pipe.tokenizer([PROMPT, ""], t5_max_tokens=256).t5.shape[1])

        def generate(steps: int):
            size = opts.image_size
            return pipe.generate(
                PROMPT,
                width=size,
                height=size,
                steps=steps,
                cfg=CFG_SCALE,
                sampler="euler",
                shift=SHIFT,
                seed=IMAGE_SEED,
            )

        _, row["warmup_s"], _ = _timed(opts, lambda: generate(2))
        images, row["seconds"], row["peak_gib"] = _timed(opts, lambda: generate(opts.steps))
        image = images[0]
        row["status"] = "ok"
    except Exception as e:  # one failing mode must not cost the other rows
        row["status"] = f"failed: {_error_text(e)}"
        _log(f"our whole image ({row['variant']}) failed: {_error_text(e)}")
    pipe = None
    free_memory(opts.device)
    return row, image


def _whole_diffusers(
    opts: BenchOptions, folder: Path, runs: list, report: Report, ours_image, t5_tokens: int
) -> None:
    """diffusers doing our work (the same T5 length) and its own default (T5 padded to 256)."""
    import transformers
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the loading bars would bury the table in the log
    transformers.logging.disable_progress_bar()
    row0 = {"engine": "diffusers"}
    try:
        t0 = time.perf_counter()
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=opts.dtype).to(opts.device)
        row0["load_s"] = time.perf_counter() - t0
    except Exception as e:
        runs.append({**row0, "variant": "same work", "status": f"failed: {_error_text(e)}"})
        report.save()
        return
    pipe.set_progress_bar_config(disable=True)
    size = opts.image_size

    def generate(steps: int, tokens: int, pipe=pipe):
        return pipe(
            prompt=PROMPT,
            negative_prompt="",
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=CFG_SCALE,
            max_sequence_length=tokens,
            generator=torch.Generator().manual_seed(IMAGE_SEED),
            output_type="np",
        ).images[0]

    for variant, tokens in (("same work", t5_tokens), ("default", 256)):
        row = {**row0, "variant": variant, "t5_tokens": tokens}
        try:
            _, row["warmup_s"], _ = _timed(opts, lambda t=tokens: generate(2, t))
            image, row["seconds"], row["peak_gib"] = _timed(opts, lambda t=tokens: generate(opts.steps, t))
            if variant == "same work" and ours_image is not None:
                row.update(_image_diff(ours_image, image))
            row["status"] = "ok"
        except Exception as e:
            row["status"] = f"failed: {_error_text(e)}"
            _log(f"diffusers whole image ({variant}) failed: {_error_text(e)}")
        runs.append(row)
        report.save()
        row0.pop("load_s", None)  # loading counted once
    del pipe
    free_memory(opts.device)


def run_whole_image(opts: BenchOptions, report: Report) -> None:
    """Prompt to pixels with each pipeline, from one folder of random weights written for this run."""
    runs: list[dict] = []
    report.data["whole_image"] = {
        "config": "full" if opts.full else "tiny",
        "width": opts.image_size,
        "height": opts.image_size,
        "steps": opts.steps,
        "cfg": CFG_SCALE,
        "sampler": "euler (diffusers: FlowMatchEulerDiscreteScheduler)",
        "shift": SHIFT,
        "prompt": PROMPT,
        "memory_modes": list(opts.memory) or None,
        "runs": runs,
    }
    with tempfile.TemporaryDirectory(prefix="sd35-bench-") as tmp:
        t0 = time.perf_counter()
        folder = write_random_pipeline(Path(tmp) / "sd35-random", opts)
        report.data["whole_image"]["write_s"] = time.perf_counter() - t0
        report.save()
        modes = _memory_modes(opts)
        with torch.inference_mode():
            # our first mode, then diffusers, then our other modes: a slow offloading mode cut short by a
            # time limit then costs only its own row
            for i, mode in enumerate(modes):
                _log(f"whole image with ours ({mode or 'default'})")
                row, image = _whole_ours(opts, folder, mode)
                runs.append(row)
                report.save()
                if i == 0:
                    _log("whole image with diffusers")
                    _whole_diffusers(opts, folder, runs, report, image, row.get("t5_tokens", 77))


# --- tables -------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _columns(rows: list[list[str]], left: int = 1) -> str:
    """Aligned columns: the first ``left`` left-aligned (labels), the rest right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def _short_status(row: dict) -> str:
    """'unavailable' or 'failed' for a table cell; the full reason goes to the notes under the table."""
    return row.get("status", "not run").split(":", 1)[0]


def _notes(rows: list[dict], label: Callable[[dict], str]) -> list[str]:
    """One line per (label, reason) for rows that did not run, listing the sizes it applies to."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            grouped.setdefault((label(r), r["status"]), []).append(f"{r['size']}px" if "size" in r else "")
    return [
        f"{name}{' at ' + ', '.join(where) if any(where) else ''}: {status}"
        for (name, status), where in grouped.items()
    ]


def step_table(data: dict) -> str:
    """size | ours variant | ours ms | diffusers ms | speed-up | peaks | max diff vs diffusers, then notes."""
    steps = data["steps"]
    by = {(r["engine"], r["variant"], r["size"]): r for r in steps}
    compiled = any(k[:2] == ("diffusers", "compile") for k in by)
    head = [
        "size",
        "ours",
        "ours ms (p10-p90)",
        "diffusers ms",
        "speed-up",
        "ours GiB",
        "diffusers GiB",
        "max|diff|",
    ]
    if compiled:
        head.insert(4, "diffusers compiled ms")
    rows = [head]
    ours_variants = list(dict.fromkeys(r["variant"] for r in steps if r["engine"] == "ours"))
    for size in sorted({r["size"] for r in steps}):
        base = by.get(("diffusers", "eager", size), {})
        base_ms = base.get("median_ms") if base.get("status") == "ok" else None
        for v in ours_variants:
            r = by.get(("ours", v, size), {})
            ok = r.get("status") == "ok"
            ms = r.get("median_ms") if ok else None
            cells = [
                str(size),
                v,
                f"{ms:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f})" if ok else _short_status(r),
                _fmt(base_ms, ".1f"),
                f"{base_ms / ms:.2f}x" if ok and base_ms else "-",
                _fmt(r.get("peak_gib"), ".2f"),
                _fmt(base.get("peak_gib"), ".2f"),
                _fmt(r.get("max_abs_diff_vs_diffusers"), ".1e"),
            ]
            if compiled:
                cells.insert(4, _fmt(by.get(("diffusers", "compile", size), {}).get("median_ms"), ".1f"))
            rows.append(cells)
    dev = data["device"]
    title = (
        f"one CFG step = MMDiT-X forward at batch {data['batch']} with {data['text_tokens']} text tokens; "
        f"{data['config']['name']} config, {dev['name']} ({dev['type']}), {data['dtype']}; "
        f"median of {data['iters']} after {data['warmup']} warm-up; speed-up = diffusers eager / ours; "
        "max|diff| = ours vs diffusers output"
    )
    failed = [r for r in data["equivalence"] if not r["ok"]]
    notes = _notes(steps, lambda r: f"{r['engine']} {r['variant']}")
    for r in data.get("paired", []):
        notes.append(
            f"alternating blocks at {r['size']}px (ours / diffusers eager, median of {r['ours_rounds']} blocks of "
            f"{r['ours_block']}): {r['ours_median_ms']:.1f} / {r['diffusers_median_ms']:.1f} ms, "
            f"speed-up {r['diffusers_median_ms'] / r['ours_median_ms']:.2f}x"
        )
    notes += [f"EQUIVALENCE FAILED at {r['size']}px: relative L2 {r['rel_l2_diff']:.2e}" for r in failed]
    return "\n".join([title, _columns(rows, left=2), *notes])


def whole_table(data: dict) -> str:
    """One row per pipeline run: T5 length, seconds, peak memory, load time, pixel difference from ours."""
    w = data["whole_image"]
    rows = [["pipeline", "T5 tokens", "seconds", "peak GiB", "load s", "|image - ours| mean/max"]]
    for r in w["runs"]:
        ok = r.get("status") == "ok"
        diff = "-"
        if "image_mean_abs_diff_vs_ours" in r:
            diff = f"{r['image_mean_abs_diff_vs_ours']:.4f}/{r['image_max_abs_diff_vs_ours']:.4f}"
        rows.append(
            [
                f"{r['engine']} ({r['variant']})",
                str(r.get("t5_tokens", "-")),
                f"{r['seconds']:.3f}" if ok else _short_status(r),
                _fmt(r.get("peak_gib"), ".2f"),
                _fmt(r.get("load_s"), ".1f"),
                diff,
            ]
        )
    title = (
        f"whole image {w['width']}x{w['height']}, {w['steps']} steps, {w['config']} random weights: text encoding "
        f"+ euler (shift {w['shift']}, CFG {w['cfg']}) + VAE decode; pixel differences on a 0-1 scale"
    )
    notes = _notes(w["runs"], lambda r: f"{r['engine']} ({r['variant']})")
    if isinstance(w.get("memory_modes"), str):
        notes.append(f"memory modes {w['memory_modes']}")
    return "\n".join([title, _columns(rows), *notes])


def tables_from_json(path: str | Path) -> str:
    """The tables of a finished (or cut-short) run, from its JSON: for logs that only keep the end of the output."""
    data = json.loads(Path(path).read_text())
    parts = [step_table(data)] if data.get("steps") else []
    if data.get("whole_image") and data["whole_image"].get("runs"):
        parts.append(whole_table(data))
    return "\n\n".join(parts) or f"{path}: no results"


# --- entry point --------------------------------------------------------------------------------------


def run(opts: BenchOptions) -> int:
    """Run what ``opts`` asks for, print the tables, write the JSON; exit code 1 if the equivalence check failed."""
    if opts.diffusers or opts.whole_image:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SD35Error(
                "the benchmark compares with diffusers, which is not installed: pip install diffusers==0.42.1 "
                "transformers (or pass --diffusers none and leave out --whole-image)."
            ) from None
    report = Report(opts)
    report.save()
    if opts.steps_benchmark:
        run_steps(opts, report)
        print(step_table(report.data))
    if opts.whole_image:
        run_whole_image(opts, report)
        print(whole_table(report.data))
    if opts.json_path is not None:
        print(f"wrote {opts.json_path}")
    return 0 if all(r["ok"] for r in report.data["equivalence"]) else 1
