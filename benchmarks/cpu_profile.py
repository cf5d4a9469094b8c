"""Where one MMDiT-X CFG step spends its time on the CPU: torch.profiler's op table, and the fraction of the
measured matmul rate the step reaches.

    python benchmarks/cpu_profile.py                     # SD3.5 Medium's width (1536, depth 24), 512 px, bf16
    python benchmarks/cpu_profile.py --scaled --size 256 # the scaled config (hidden 256, depth 4)
    python benchmarks/cpu_profile.py --dtype fp32 --rows 30

The step's FLOPs are counted from the shapes (every linear and the attention's two matmuls; the
elementwise ops are a rounding error), so "fraction of the matmul rate" = (FLOPs / step time) / the rate
of one 2048^3 matmul in the same dtype measured in the same process just before.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from sd35.devices import DTYPES


def main(argv: list[str] | None = None) -> None:
    from sd35.bench.flops import matmul_rate, step_flops
    from sd35.bench.options import TEXT_TOKENS
    from sd35.bench.random_models import step_inputs
    from sd35.models.configs import medium_mmditx_config, scaled_mmditx_config
    from sd35.models.mmditx import MMDiTX
    from sd35.models.random_init import build_random

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scaled", action="store_true", help="the scaled config instead of SD3.5 Medium's width")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    cfg = scaled_mmditx_config() if args.scaled else medium_mmditx_config()
    cpu = torch.device("cpu")
    model = build_random(MMDiTX, cfg, cpu, dtype, seed=0)
    inp = step_inputs(cfg, args.size, cpu, dtype, seed=0)
    inp.context = inp.context[:, : args.text_tokens]
    flops = step_flops(cfg, args.size, args.text_tokens)
    with torch.no_grad():
        model(*inp.args)
        rate = matmul_rate(cpu, dtype)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            model(*inp.args)
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(*inp.args)
    step = min(times)
    print(
        f"{'scaled' if args.scaled else 'full'} width {cfg.hidden_size} depth {cfg.depth}, {args.size} px, "
        f"{args.dtype}, {torch.get_num_threads()} threads: step {step:.3f} s, {flops / 1e12:.2f} TFLOP, "
        f"{flops / step / 1e12:.3f} TF/s = {flops / step / rate:.0%} of a 2048^3 {args.dtype} matmul "
        f"({rate / 1e12:.3f} TF/s)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
