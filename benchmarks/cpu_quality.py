"""What the CPU's speed options cost in image quality, on the demo model: bf16 against fp32, and the step
cache (``--cache fbcache:T``) at several thresholds against the uncached bf16 image. One table.

    python benchmarks/cpu_quality.py [--n 40] [--thresholds 0.05,0.1,0.15,0.2,0.3]

For each setting: the prompt adherence of :mod:`sd35.demo.adherence` (CFG on, the demo default; the same
scenes and seeds for every setting), the PSNR of every image against its reference (min and median), the
fraction of joint-block calls the cache skipped (counted by hooks on the first and last block), and the
CPU time per image (median over images; ``time.process_time`` on one thread, which a loaded machine
disturbs far less than wall time). Settings run interleaved image by image, so load drifts hit all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from sd35.demo import DEMO_DEFAULTS, load_demo_pipeline
from sd35.demo.adherence import ATTRIBUTES, prompts
from sd35.demo.shapes import detect


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


class BlockCounter:
    """Counts calls of the first and the last joint block (the cache skips every block after the first)."""

    def __init__(self, model):
        self.first = self.last = 0
        model.joint_blocks[0].register_forward_hook(lambda *_: self._add("first"))
        model.joint_blocks[-1].register_forward_hook(lambda *_: self._add("last"))

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.3")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipes = {"fp32": load_demo_pipeline(dtype="fp32"), "bf16": load_demo_pipeline(dtype="bf16")}
    pipes["default"] = load_demo_pipeline()
    default_name = str(pipes["default"].mmditx.dtype).removeprefix("torch.")
    settings = [("fp32", "fp32", None, None), ("default (" + default_name + ")", "default", None, "fp32")]
    settings += [
        (f"fbcache:{t}", "default", f"fbcache:{t}", "default (" + default_name + ")")
        for t in args.thresholds.split(",")
    ]
    counters = {name: BlockCounter(p.mmditx) for name, p in pipes.items()}
    scenes = prompts(args.n)
    images: dict[str, list] = {s[0]: [] for s in settings}
    seconds: dict[str, list[float]] = {s[0]: [] for s in settings}
    hits = {s[0]: dict.fromkeys(ATTRIBUTES, 0) for s in settings}
    skipped = {s[0]: [0, 0] for s in settings}
    for i, scene in enumerate(scenes):
        for name, pipe_name, cache, _ref in settings:
            pipe, counter = pipes[pipe_name], counters[pipe_name]
            first, last = counter.first, counter.last
            t0 = time.process_time()
            image = pipe.generate(scene.caption, cfg=DEMO_DEFAULTS.cfg, seed=1000 + i, cache=cache)[0]
            seconds[name].append(time.process_time() - t0)
            skipped[name][0] += (counter.first - first) - (counter.last - last)
            skipped[name][1] += counter.first - first
            images[name].append(np.asarray(image))
            found = detect(image)
            for a in ATTRIBUTES:
                hits[name][a] += getattr(found, a) == getattr(scene, a)
    print(
        f"demo model, {args.n} adherence scenes, {DEMO_DEFAULTS.steps} steps, CFG on, 1 thread, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    head = "| setting | vs | PSNR min | PSNR median | blocks skipped | CPU s/image | speed-up |"
    head += "".join(f" {a} |" for a in ATTRIBUTES)
    print(head)
    print("|" + "---|" * (7 + len(ATTRIBUTES)))
    base = statistics.median(seconds[settings[1][0]])
    for name, _p, _c, ref in settings:
        ps = [psnr(a, b) for a, b in zip(images[name], images[ref], strict=True)] if ref else []
        sec = statistics.median(seconds[name])
        row = [
            name,
            ref or "-",
            f"{min(ps):.1f}" if ps else "-",
            f"{statistics.median(ps):.1f}" if ps else "-",
            f"{skipped[name][0] / max(1, skipped[name][1]):.0%}",
            f"{sec:.3f}",
            f"{base / sec:.2f}x",
        ]
        row += [f"{100 * hits[name][a] / args.n:.0f}%" for a in ATTRIBUTES]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
