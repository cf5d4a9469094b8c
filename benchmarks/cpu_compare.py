"""One CFG step on the CPU: ours, diffusers and stable-diffusion.cpp side by side, at several resolutions.

    python benchmarks/cpu_compare.py [--sdcpp PATH] [--sizes 256,384,512,768] [--depth 8] [--rounds 3]
        [--dtypes bf16,fp32] [--sdcpp-threads N] [--json benchmarks/cpu_speed.json] [--plot benchmarks/cpu_speed.png]

Engines: ours and diffusers' ``SD3Transformer2DModel`` in bf16 and fp32 (the same random weights, in this
process), and sd.cpp's ``sd-cli`` (``benchmarks/build_sdcpp.sh``) with ``--type`` f16, q8_0 and f32 on a file
holding those same weights. The model is SD3.5 Medium's MMDiT-X at ``--depth`` blocks in the shape sd.cpp
accepts (:func:`sd35.bench.sdcpp.comparison_config`: hidden 64 * depth, text 4096, pooled 2048), with
sd.cpp's 154 text tokens for all engines. A round times every engine once at every size, in a rotating
order, so the drift of a shared machine hits all alike; each number is the median over rounds of (torch)
the median of ``--iters`` back-to-back steps after one warm-up, (sd.cpp) its steady-state step from its log
over ``--iters`` + 1 steps. A step is cond + uncond: batch 2 for ours and diffusers, two forwards for sd.cpp.
``--depth 24 --sizes 512 --dtypes bf16`` is SD3.5 Medium's own width (fp32 would hold two 10 GB models).
Without sd.cpp it says so and times ours against diffusers. The plot needs matplotlib (the [bench] extra).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # as the CLI does, before torch loads OpenMP: our engine at its own thread settings
    __import__("sd35.cpu_threads").cpu_threads.configure()

import torch

from sd35.bench.random_models import call_diffusers, compare, diffusers_transformer, step_inputs
from sd35.bench.sdcpp import (
    SDCPP_TEXT_TOKENS,
    SDCPP_TYPES,
    comparison_config,
    find_sdcpp,
    run_sdcpp,
    sdcpp_command,
    write_sdcpp_files,
)
from sd35.errors import SD35Error
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import build_random

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EQUIVALENCE = {"bf16": 5e-2, "fp32": 1e-4}  # relative L2, ours vs diffusers (as sd35/bench/steps.py)


def log(message: str) -> None:
    print(f"cpu_compare: {message}", file=sys.stderr, flush=True)


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
    with torch.inference_mode():
        fn()  # warm-up: allocator, oneDNN primitive cache
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def table(rows: list[dict], sizes: list[int]) -> str:
    """Markdown: one line per size, one column per engine, then ours bf16 against the fastest sd.cpp type."""
    names = list(dict.fromkeys(r["engine"] for r in rows))
    by = {(r["engine"], r["size"]): r["step_s"] for r in rows}
    sd_names = [n for n in names if n.startswith("sd.cpp")]
    head = ["size", *names] + (["ours bf16 / fastest sd.cpp"] if sd_names else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sizes:
        cells = [f"{s} px"] + [f"{by[(n, s)]:.3f}" if by.get((n, s)) else "-" for n in names]
        if sd_names:
            best = [by[(n, s)] for n in sd_names if by.get((n, s))]
            ours = by.get(("ours bf16", s))
            cells.append(f"{ours / min(best):.2f}x" if best and ours else "-")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdcpp", help="sd.cpp's sd-cli (default: $SDCPP_HOME/build/bin/sd-cli, then PATH)")
    p.add_argument("--sizes", default="256,384,512,768")
    p.add_argument("--depth", type=int, default=8, help="MMDiT-X blocks (hidden = 64 * depth; 24 = SD3.5M)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3, help="timed steps per engine and size in a round")
    p.add_argument("--types", default=",".join(SDCPP_TYPES), help="sd.cpp --type values")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--dtypes", default="bf16,fp32", help="ours' and diffusers' dtypes")
    p.add_argument("--sdcpp-threads", type=int, help="sd.cpp's -t (default: torch's thread count)")
    p.add_argument("--weights-dir", default=os.environ.get("SDCPP_WEIGHTS", "/work/sdcpp/weights"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/cpu_speed.json")
    p.add_argument("--plot", default="benchmarks/cpu_speed.png", help="'' for none")
    a = p.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--sizes takes comma-separated sizes like 256,512, got {a.sizes!r}") from None
    if not sizes or any(s % 64 for s in sizes):
        raise SystemExit(f"--sizes must be multiples of 64 (sd.cpp's latent grid), got {a.sizes!r}")
    types = tuple(t.strip() for t in a.types.split(",") if t.strip())
    try:
        binary = find_sdcpp(a.sdcpp)
    except SD35Error as e:
        raise SystemExit(str(e)) from None
    if binary is None:
        log(
            "sd.cpp was not found (build it with benchmarks/build_sdcpp.sh, or pass --sdcpp PATH); "
            "timing ours against diffusers only."
        )
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    cfg = comparison_config(a.depth)
    log(f"depth {cfg.depth}, hidden {cfg.hidden_size}, {SDCPP_TEXT_TOKENS} text tokens, {threads} threads")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in TORCH_DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes takes {','.join(TORCH_DTYPES)} (comma-separated), got {a.dtypes!r}")
    engines, equivalence = torch_engines(cfg, sizes, a.seed, a.iters, not a.no_diffusers, dtypes)
    sd_runs: list[dict] = []
    if binary is not None:
        files = write_sdcpp_files(Path(a.weights_dir), cfg, a.seed)
        sd_threads = a.sdcpp_threads or threads
        engines.update(sdcpp_engines(binary, files, types, a.iters, sd_threads, sd_runs))
    rows = rows_of(time_rounds(engines, sizes, a.rounds))
    load_after = os.getloadavg()
    facts = machine_facts(binary) | {"load_before": load_before, "load_after": load_after}
    report = {
        "machine": facts,
        "config": {"depth": cfg.depth, "hidden": cfg.hidden_size, "text_tokens": SDCPP_TEXT_TOKENS},
        "sdcpp_threads": (a.sdcpp_threads or threads) if binary is not None else None,
        "sdcpp_found": binary is not None,
        "rounds": a.rounds,
        "iters": a.iters,
        "equivalence": equivalence,
        "rows": rows,
        "sdcpp_runs": sd_runs,
    }
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, sizes))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {a.json}")
    if a.plot and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot written.")
    elif a.plot:
        title = (
            f"one CFG step, MMDiT-X depth {cfg.depth} / hidden {cfg.hidden_size}, torch {threads} threads, "
            f"sd.cpp -t {report['sdcpp_threads']}, "
            f"{facts['cpu']}, {facts['date'][:10]}"
        )
        plot(rows, Path(a.plot), title)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
