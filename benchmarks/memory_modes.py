"""Peak device memory and time of each memory mode, phase by phase (checks the table in sd35/memory.py).

    python benchmarks/memory_modes.py --model DIR_OR_FILE [--text-encoders DIR] [--size 1024] [--steps 28]

For every mode ("high", "balanced", "low") in a fresh pipeline: load, encode a new prompt, encode it again
(the cache), sample, decode; on CUDA it prints torch.cuda.max_memory_allocated per phase (GB = 1e9 B) and
the wall time, and checks that the image equals the high mode's (exact tiling and streaming change
nothing but float rounding). On a CPU it runs the same code and prints times only.
``--model tiny`` writes and uses the tiny random set of sd35.testing (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sd35 import load_pipeline
from sd35.sampling.schedules import get_sigmas

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase(device: torch.device, name: str, fn, results: dict):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    results[name] = (time.perf_counter() - t0, peak)
    return out


@torch.no_grad()
def run_mode(args, mode: str) -> tuple[dict, np.ndarray]:
    device = torch.device(args.device) if args.device else None
    results: dict[str, tuple[float, float]] = {}
    pipe = _phase(
        device or torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        "load",
        lambda: load_pipeline(args.model, args.text_encoders, device=device, memory=mode),
        results,
    )
    dev = pipe.device
    cond = _phase(dev, "encode", lambda: pipe.encode_prompt([PROMPT, ""]), results)
    _phase(dev, "encode (cached)", lambda: pipe.encode_prompt([PROMPT, ""]), results)
    ctx, pooled = (t.to(dev, pipe.mmditx.dtype) for t in cond)
    h = w = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, h, w, generator=g).to(dev)
    sigmas = get_sigmas("simple", args.steps, 3.0).to(dev)

    def sample():
        lat = x * sigmas[0]
        for i in range(args.steps):
            s = sigmas[i].expand(2)
            eps = pipe.mmditx(torch.cat([lat, lat]).to(pipe.mmditx.dtype), s * 1000, pooled, ctx).float()
            v = eps[1] + 5.0 * (eps[0] - eps[1])
            lat = lat + (sigmas[i + 1] - sigmas[i]) * v
        return lat

    latent = _phase(dev, "sample", sample, results)
    image = _phase(dev, "decode", lambda: pipe.decode_latent(latent), results)
    return results, np.asarray(image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text-encoders")
    ap.add_argument("--device")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--modes", default="high,balanced,low")
    args = ap.parse_args()
    if args.model == "tiny":
        from sd35.testing import write_tiny_set

        args.model = str(write_tiny_set(Path(tempfile.mkdtemp()))["diffusers"])
    reference = None
    for mode in args.modes.split(","):
        results, image = run_mode(args, mode)
        gc.collect()  # the mode's pipeline is gone: free its memory before the next one loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        line = ", ".join(f"{k} {t:.2f} s / {p:.2f} GB" for k, (t, p) in results.items())
        same = ""
        if reference is None:
            reference = image
        else:
            same = f"; max pixel difference to {args.modes.split(',')[0]}: {np.abs(image.astype(int) - reference).max()}"
        print(f"{mode}: {line}{same}", flush=True)


if __name__ == "__main__":
    main()
