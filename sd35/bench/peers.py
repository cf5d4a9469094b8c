"""``sd35 bench --device cpu --peers``: one CFG step on the CPU, ours, diffusers and stable-diffusion.cpp side
by side at several resolutions, with the share of the measured matmul rate our step reaches.

Engines: ours and diffusers' ``SD3Transformer2DModel`` in bf16 and fp32 (the same random weights, in this
process), and sd.cpp's ``sd-cli`` (``benchmarks/build_sdcpp.sh``; a benchmark-only peer, found by
:func:`sd35.bench.sdcpp.find_sdcpp`) with ``--type`` f16, q8_0 and f32 on a file holding those same weights.
The model is SD3.5 Medium's MMDiT-X at ``depth`` blocks in the shape sd.cpp accepts
(:func:`sd35.bench.sdcpp.comparison_config`: hidden 64 * depth, text 4096, pooled 2048), with sd.cpp's 154
text tokens for all engines. A round times every engine once at every size, in a rotating order, so the
drift of a shared machine hits all alike; each number is the median over rounds of (torch) the median of
``iters`` back-to-back steps after one warm-up, (sd.cpp) its steady-state step from its log over ``iters``
+ 1 steps. A step is cond + uncond: batch 2 for ours and diffusers, two forwards for sd.cpp. Depth 24 with
bf16 alone is SD3.5 Medium's own width (fp32 would hold two 10 GB models). Without sd.cpp it says so and
times ours against diffusers. The plot needs matplotlib (the [bench] extra).

The table states the issue's ratios per size: ours at our CPU default dtype against diffusers at its
default (fp32), ours against diffusers in bf16, ours bf16 against sd.cpp's fastest type, and the share of
one 2048^3 matmul's FLOP rate (same dtype, same threads, measured in the run) that our step reaches.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.bench.flops import matmul_rate, step_flops
from sd35.bench.random_models import call_diffusers, compare, diffusers_transformer, step_inputs
from sd35.bench.report import log
from sd35.bench.sdcpp import (
    SDCPP_TEXT_TOKENS,
    SDCPP_TYPES,
    comparison_config,
    find_sdcpp,
    run_sdcpp,
    sdcpp_command,
    sdcpp_weights_dir,
    write_sdcpp_files,
)
from sd35.bench.timing import time_calls
from sd35.devices import default_dtype
from sd35.errors import SD35Error
from sd35.files import write_atomic
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import build_random

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EQUIVALENCE = {"bf16": 5e-2, "fp32": 1e-4}  # relative L2, ours vs diffusers (as sd35/bench/steps.py)


def machine_facts(sdcpp: Path | None) -> dict:
    """What the RESULTS row needs: CPU model, torch version, sd.cpp's source, date."""
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), model
        )
    except OSError:
        pass
    source = None
    if sdcpp is not None:
        marker = sdcpp.parent.parent / "SOURCE"
        source = marker.read_text().strip() if marker.exists() else str(sdcpp)
    return {
        "cpu": model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sdcpp": source,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def torch_engines(
    cfg: MMDiTXConfig, sizes: list[int], seed: int, iters: int, diffusers: bool, dtypes: list[str]
) -> tuple[dict, list]:
    """name -> (size -> seconds per step) for ours and diffusers at each dtype, and the equivalence rows
    (ours vs diffusers at the smallest size, before anything is timed)."""
    engines: dict[str, Callable[[int], float]] = {}
    equivalence = []
    for dname in dtypes:
        dtype = TORCH_DTYPES[dname]
        inputs = {s: step_inputs(cfg, s, torch.device("cpu"), dtype, seed, SDCPP_TEXT_TOKENS) for s in sizes}
        ours = build_random(MMDiTX, cfg, "cpu", dtype, seed)
        calls = {f"ours {dname}": lambda s, m=ours, i=inputs: m(*i[s].args)}
        if diffusers:
            theirs = diffusers_transformer(ours)
            calls[f"diffusers {dname}"] = lambda s, m=theirs, i=inputs: call_diffusers(m, i[s])
            with torch.inference_mode():
                s0 = min(sizes)
                diff = compare(calls[f"ours {dname}"](s0), calls[f"diffusers {dname}"](s0))
            diff.update(dtype=dname, size=s0, tolerance=EQUIVALENCE[dname])
            diff["ok"] = bool(diff["rel_l2_diff"] <= EQUIVALENCE[dname])
            equivalence.append(diff)
            if not diff["ok"]:
                raise SD35Error(
                    f"ours and diffusers differ in {dname} (relative L2 {diff['rel_l2_diff']:.2e})."
                )
        for name, call in calls.items():
            engines[name] = lambda s, call=call: _median_step(lambda: call(s), iters)
    return engines, equivalence


def _median_step(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Seconds: the median of ``iters`` back-to-back calls after one warm-up (allocator, oneDNN caches)."""
    with torch.inference_mode():
        stats, _ = time_calls(fn, torch.device("cpu"), warmup=1, iters=iters)
    return stats["median_ms"] / 1000.0


def sdcpp_engines(
    binary: Path, files: dict[str, Path], types: tuple[str, ...], iters: int, threads: int, runs: list
) -> dict[str, Callable[[int], float]]:
    """name -> (size -> seconds per step) for each sd.cpp weight type; every run's details go to ``runs``."""
    out = Path(tempfile.gettempdir()) / f"sd35-cpu-compare-{os.getpid()}.png"

    def engine(wtype: str) -> Callable[[int], float]:
        def step(size: int) -> float:
            cmd = sdcpp_command(
                binary, files, size=size, steps=iters + 1, wtype=wtype, threads=threads, output=out
            )
            timing, wall, _ = run_sdcpp(cmd)
            runs.append({"type": wtype, "size": size, "wall_s": wall, **timing.__dict__})
            return timing.step_s

        return step

    return {f"sd.cpp {t}": engine(t) for t in types}


def time_rounds(engines: dict[str, Callable[[int], float]], sizes: list[int], rounds: int) -> dict:
    """Every engine at every size once per round, the engine order rotating; (name, size) -> [seconds]."""
    names = list(engines)
    samples: dict[tuple[str, int], list[float]] = {(n, s): [] for n in names for s in sizes}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for s in sizes:
            for name in order:
                try:
                    seconds = engines[name](s)
                except SD35Error as e:
                    log(f"{name} at {s}px failed: {e}")
                    continue
                samples[(name, s)].append(seconds)
                log(f"round {r + 1}/{rounds} {s}px {name}: {seconds:.3f} s/step")
    return samples


def rows_of(samples: dict) -> list[dict]:
    return [
        {"engine": n, "size": s, "step_s": statistics.median(v) if v else None, "samples": v}
        for (n, s), v in samples.items()
    ]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(
    rows: list[dict], sizes: list[int], default: str = "bf16", rates: dict[str, float] | None = None
) -> str:
    """Markdown: one line per size, one column per engine (seconds per step), then the ratios: ours at our
    default dtype ``default`` against diffusers' default (fp32), ours against diffusers in bf16, ours bf16
    against the fastest sd.cpp type, and the share of ``rates`` (FLOP/s of one matmul per dtype) that our
    step's matmul FLOPs (``flops`` in the rows) reach."""
    names = list(dict.fromkeys(r["engine"] for r in rows))
    by = {(r["engine"], r["size"]): r["step_s"] for r in rows}
    flops = {r["size"]: r.get("flops") for r in rows}
    sd_names = [n for n in names if n.startswith("sd.cpp")]
    ratios = []
    if "diffusers fp32" in names and f"ours {default}" in names:
        ratios.append(
            (f"ours {default} (default) / diffusers fp32 (default)", f"ours {default}", "diffusers fp32")
        )
    if "diffusers bf16" in names and "ours bf16" in names:
        ratios.append(("ours bf16 / diffusers bf16", "ours bf16", "diffusers bf16"))
    shares = [d for d in ("bf16", "fp32") if rates and d in rates and f"ours {d}" in names]
    head = ["size", *names, *(r[0] for r in ratios)]
    head += ["ours bf16 / fastest sd.cpp"] if sd_names else []
    head += [f"ours {d}: of the {d} matmul rate" for d in shares]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sizes:
        cells = [f"{s} px"] + [f"{by[(n, s)]:.3f}" if by.get((n, s)) else "-" for n in names]
        cells += [_ratio(by.get((a, s)), by.get((b, s))) for _, a, b in ratios]
        if sd_names:
            best = [by[(n, s)] for n in sd_names if by.get((n, s))]
            cells.append(_ratio(by.get(("ours bf16", s)), min(best) if best else None))
        for d in shares:
            seconds, work = by.get((f"ours {d}", s)), flops.get(s)
            cells.append(f"{work / seconds / rates[d]:.0%}" if seconds and work else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Step time against resolution, log-y: one line per engine and dtype (colour = engine, style = dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ours": "tab:blue", "diffusers": "tab:orange", "sd.cpp": "tab:green"}
    styles = {"bf16": "-", "f16": "-", "q8_0": ":", "fp32": "--", "f32": "--"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["engine"] for r in rows):
        pts = sorted((r["size"], r["step_s"]) for r in rows if r["engine"] == name and r["step_s"])
        if pts:
            engine, dtype = name.split(" ")
            ax.plot(
                *zip(*pts, strict=True), styles.get(dtype, "-"), marker="o", color=colours[engine], label=name
            )
    ax.set_yscale("log")
    ax.set_xlabel("image size (px, square)")
    ax.set_ylabel("seconds per CFG step (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), "replace")
    plt.close(fig)


@dataclass(frozen=True)
class PeerOptions:
    """What ``sd35 bench --device cpu --peers`` runs (the CLI's flags of the same names)."""

    sizes: tuple[int, ...] = (256, 384, 512, 768)
    depth: int = 8
    rounds: int = 3
    iters: int = 3
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    diffusers: bool = True
    sdcpp: str | None = None
    sdcpp_types: tuple[str, ...] = SDCPP_TYPES
    sdcpp_threads: int | None = None
    weights_dir: Path | None = None  # None: sdcpp_weights_dir()
    seed: int = 0
    json_path: Path | None = None
    plot_path: Path | None = None


def check_peer_options(opts: PeerOptions) -> None:
    """Refuse what cannot run, before anything is built (an SD35Error naming the flag)."""
    if not opts.sizes or any(s <= 0 or s % 64 for s in opts.sizes):
        raise SD35Error(f"--sizes must be multiples of 64 (sd.cpp's latent grid), got {opts.sizes}.")
    if not opts.dtypes or any(d not in TORCH_DTYPES for d in opts.dtypes):
        raise SD35Error(f"--peer-dtypes takes {','.join(TORCH_DTYPES)} (comma-separated), got {opts.dtypes}.")
    if opts.depth < 2 or opts.rounds < 1 or opts.iters < 1:
        raise SD35Error("--depth must be at least 2, --rounds and --iters at least 1.")
    cfg = comparison_config(opts.depth)
    if max(opts.sizes) > cfg.max_image_size:
        raise SD35Error(f"--sizes: at most {cfg.max_image_size} px (SD3.5 Medium's position grid).")


def run_peers(opts: PeerOptions) -> dict:
    """Time the engines (module doc), print the table, write the JSON and the plot; returns the report."""
    check_peer_options(opts)
    sizes = sorted(set(opts.sizes))
    binary = find_sdcpp(opts.sdcpp)
    if binary is None:
        log(
            "sd.cpp was not found (build it with benchmarks/build_sdcpp.sh, or pass --sdcpp PATH); "
            "timing ours against diffusers only."
        )
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    cfg = comparison_config(opts.depth)
    log(f"depth {cfg.depth}, hidden {cfg.hidden_size}, {SDCPP_TEXT_TOKENS} text tokens, {threads} threads")
    rates = {}
    for d in opts.dtypes:
        rates[d] = matmul_rate(torch.device("cpu"), TORCH_DTYPES[d])
        log(f"one 2048^3 {d} matmul: {rates[d] / 1e12:.3f} TF/s")
    engines, equivalence = torch_engines(cfg, sizes, opts.seed, opts.iters, opts.diffusers, list(opts.dtypes))
    sd_runs: list[dict] = []
    sd_threads = (opts.sdcpp_threads or threads) if binary is not None else None
    if binary is not None:
        files = write_sdcpp_files(opts.weights_dir or sdcpp_weights_dir(), cfg, opts.seed)
        engines.update(sdcpp_engines(binary, files, opts.sdcpp_types, opts.iters, sd_threads, sd_runs))
    rows = rows_of(time_rounds(engines, sizes, opts.rounds))
    for row in rows:
        row["flops"] = step_flops(cfg, row["size"], SDCPP_TEXT_TOKENS)
    load_after = os.getloadavg()
    facts = machine_facts(binary) | {"load_before": load_before, "load_after": load_after}
    default = "bf16" if default_dtype(torch.device("cpu")) == torch.bfloat16 else "fp32"
    report = {
        "machine": facts,
        "config": {"depth": cfg.depth, "hidden": cfg.hidden_size, "text_tokens": SDCPP_TEXT_TOKENS},
        "our_default_dtype": default,
        "matmul_flops_per_s": rates,
        "sdcpp_threads": sd_threads,
        "sdcpp_found": binary is not None,
        "rounds": opts.rounds,
        "iters": opts.iters,
        "equivalence": equivalence,
        "rows": rows,
        "sdcpp_runs": sd_runs,
    }
    print(table(rows, sizes, default, rates))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if opts.json_path is not None:
        text = json.dumps(report, indent=2) + "\n"
        write_atomic(opts.json_path, lambda tmp: tmp.write_text(text), "replace")
        print(f"wrote {opts.json_path}")
    if opts.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot written.")
    elif opts.plot_path is not None:
        title = (
            f"one CFG step, MMDiT-X depth {cfg.depth} / hidden {cfg.hidden_size}, torch {threads} threads, "
            f"sd.cpp -t {sd_threads}, {facts['cpu']}, {facts['date'][:10]}"
        )
        plot(rows, opts.plot_path, title)
        print(f"wrote {opts.plot_path}")
    return report
