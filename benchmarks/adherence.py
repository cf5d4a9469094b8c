"""Prompt adherence of the built-in demo model: how often generated images show the colour, shape and position
their prompts ask for, read back by the pixel detector of sd35.demo.shapes (the scoring is sd35.demo.adherence).

    python benchmarks/adherence.py [--n 120] [--json out.json]
    python benchmarks/adherence.py --model WORK/sd35_demo.safetensors --tokenizers WORK/tokenizers   # a fresh build

Runs three settings on the same prompts and seeds: CFG off (cfg 1), CFG on (the demo default) and CFG + SLG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sd35.demo import DEMO_DEFAULTS, load_demo_pipeline
from sd35.demo.adherence import measure, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokenizers", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.model:
        from sd35 import load_pipeline

        pipe = load_pipeline(args.model, tokenizers=args.tokenizers, device="cpu")
    else:
        pipe = load_demo_pipeline()
    t0 = time.time()
    results = measure(pipe, args.n)
    print(
        f"prompt adherence, {args.n} prompts, {DEMO_DEFAULTS.steps} steps {DEMO_DEFAULTS.sampler}, "
        f"{time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
