"""The step benchmark: one CFG denoising step (one MMDiT-X forward at batch 2), ours against diffusers'.

Order of work: both engines' outputs are compared first at every size, so a broken model (or a broken
weight conversion) is never timed as if it were fast; then diffusers' variants are timed, then each of our
variants on a fresh model (the same seed, so the same weights). Each model is alone on the device while it
is timed, so its peak memory is its own. A fast path that cannot run here, or fails, becomes a status in its
row; the other rows still count.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from sd35.accel import GraphedDenoiser, fp8_supported
from sd35.accel.apply import ACCELERATIONS, accelerate, check_accelerations
from sd35.bench.flops import matmul_rate, step_flops
from sd35.bench.options import TEXT_TOKENS, BenchOptions
from sd35.bench.random_models import StepInputs, call_diffusers, compare, diffusers_transformer, step_inputs
from sd35.bench.report import Report, error_text, log
from sd35.bench.timing import free_memory, time_calls, time_paired
from sd35.errors import SD35Error, SD35Warning, Unsupported
from sd35.models.mmditx import MMDiTX
from sd35.models.random_init import build_random

PAIRED_ROUNDS = 9  # CPU only: alternating blocks of ours / diffusers eager (see time_paired)
# Relative L2 difference ||ours - diffusers|| / ||diffusers|| allowed before the equivalence check fails.
# float32 agrees to rounding (~3e-7 measured); over 24 blocks bf16 drifts to ~1.1e-2 and fp16 to ~1.4e-3
# (measured on the CPU with the real depth and attn2 layout), while a wrong weight or op gives O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Unavailable(Exception):
    """A requested fast path that this installation or device does not have (reported, not fatal)."""


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

    The parts go through :func:`sd35.accel.apply.accelerate`, in the one order that composes, after
    :func:`sd35.accel.apply.check_accelerations` (in the "high" memory mode: the model under test is wholly on
    the device) has refused what ``device`` cannot run. Returns a factory: inputs -> a no-argument call. The
    CUDA graphs are dropped before each new input size, so the graph memory of one size is freed before the
    next is measured.
    """
    parts = set(variant.split("+")) - {"eager"}
    flags = {name: name in parts for name in ACCELERATIONS}
    try:
        check_accelerations(device, "high", **flags)
    except Unsupported as e:  # in the "high" mode only a GPU-only path on another device is refused
        raise Unavailable("needs CUDA") from e
    runner, _ = accelerate(model, **flags)  # fp8: SD35Error where it cannot run, reported as unavailable

    def call(inp: StepInputs) -> Callable[[], torch.Tensor]:
        if isinstance(runner, GraphedDenoiser):
            runner.reset()
        return lambda: runner(*inp.args)

    return call


def _equivalence(
    opts: BenchOptions, report: Report, inputs: dict[int, StepInputs]
) -> tuple[dict, dict, nn.Module | None]:
    """Our eager output and diffusers' at every size, compared before anything is timed.

    Returns both outputs by size (on the CPU, so they weigh nothing in later peak-memory readings) and the
    diffusers model, which its own timing reuses; our model is freed here and rebuilt per variant.
    """
    cfg = opts.config
    log(f"building our MMDiT-X ({'full' if opts.full else 'scaled'}) on {opts.device} in {opts.dtype_name}")
    ours = build_random(MMDiTX, cfg, opts.device, opts.dtype, opts.seed)
    ref_ours = {s: ours(*inputs[s].args).float().cpu() for s in opts.sizes}
    if not opts.diffusers:
        del ours
        free_memory(opts.device)
        return ref_ours, {}, None
    log("building diffusers' SD3Transformer2DModel from the same weights")
    theirs = diffusers_transformer(ours)
    if opts.device.type == "cpu":  # no peak memory to isolate on the CPU: time both side by side
        for s in opts.sizes:
            log(f"timing ours and diffusers eager alternately at {s}px")
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
        row["status"] = f"failed: {error_text(e)}"
        log(f"{row['engine']} {row['variant']} at {row['size']}px failed: {error_text(e)}")
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
            log(f"timing diffusers {variant} at {s}px")

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
        log(f"building our MMDiT-X for variant {variant}")
        factory, setup_s, problem = None, None, None
        try:
            factory, setup_s = _prepare_ours(opts, variant)
        except (Unavailable, SD35Error) as e:  # SD35Error: the fast path says it cannot run here
            problem = f"unavailable: {e}"
        except Exception as e:
            problem = f"failed: {error_text(e)}"
            log(f"ours {variant} failed: {problem}")
        for s in opts.sizes:
            row = {"size": s, "engine": "ours", "variant": variant, "setup_s": setup_s}
            if factory is None:
                row["status"] = problem
                report.add("steps", row)
                continue
            log(f"timing ours {variant} at {s}px")
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
    report.data["matmul_tflops"] = matmul_rate(opts.device, opts.dtype) / 1e12
    report.data["step_tflop"] = {str(s): step_flops(opts.config, s, TEXT_TOKENS) / 1e12 for s in opts.sizes}
    with torch.inference_mode():
        ref_ours, ref_theirs, theirs = _equivalence(opts, report, inputs)
        _time_diffusers(opts, report, theirs, inputs, ref_ours)
        del theirs  # before our models are built, so each is timed alone on the device
        free_memory(opts.device)
        _time_ours(opts, report, inputs, ref_ours, ref_theirs)
