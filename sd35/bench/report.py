"""What the benchmark reports: a JSON document saved after every measurement, and tables read from it.

Every number goes into the JSON with what it was measured on (device, versions, config, dtype) and the
anchors it is to be compared with, so a result file explains itself. The tables are made from that JSON
alone (:func:`tables_from_json`), so a log that kept only the end of a run can still show them.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from sd35.bench.options import BATCH, TEXT_TOKENS, BenchOptions
from sd35.files import write_atomic

# Diffusers 0.42.1 on one H100 80GB HBM3, bf16, random weights (our anchor run, unpublished; the diffusers
# rows of ``sd35 bench --device cuda``, as benchmarks/gpu_run.sh runs them, measure the same things):
# the numbers this engine has to beat. Kept in every JSON so a result file explains itself.
ANCHORS = {
    "source": "diffusers 0.42.1, H100 80GB HBM3, bf16, torch 2.11, random weights (our anchor run)",
    "step_ms": {"512": 66.9, "1024": 87.6, "1440": 193.8},
    "step_compiled_ms": {"1024": 53.4},
    "whole_image_1024": {"seconds": 2.705, "peak_gib": 17.64, "steps": 28, "t5_tokens": 256},
}


def log(message: str) -> None:
    """Progress on stderr, so that stdout keeps only the tables."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    """An exception as one short line for a table note or a JSON status."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.import_module(name).__version__
        except Exception:
            return None

    from sd35._version import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "sd35": __version__,
    }


def device_info(device: torch.device) -> dict:
    """What ran the benchmark, for the JSON (a number means little without the card it came from)."""
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
        text = json.dumps(self.data, indent=2, allow_nan=True) + "\n"
        write_atomic(path, lambda tmp: tmp.write_text(text), "replace")

    def add(self, key: str, row: dict) -> None:
        self.data[key].append(row)
        self.save()


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


def _matmul_fraction(data: dict, size: int, ms: float | None) -> str:
    """The step's FLOP rate as a fraction of the measured matmul rate (runs from before it was measured: -)."""
    tflop = data.get("step_tflop", {}).get(str(size))
    if ms is None or tflop is None or not data.get("matmul_tflops"):
        return "-"
    return f"{tflop / (ms / 1000) / data['matmul_tflops']:.0%}"


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
        "of matmul rate",
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
                _matmul_fraction(data, size, ms),
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
    if "matmul_tflops" in data:
        title += (
            f"; of matmul rate = the step's matmul FLOPs per second over one 2048^3 {data['dtype']} matmul's "
            f"({data['matmul_tflops']:.3f} TF/s here)"
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
