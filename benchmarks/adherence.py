"""Prompt adherence of the built-in demo model: how often generated images show the colour, shape and position
their prompts ask for, read back by the pixel detector of sd35.demo.shapes.

    python benchmarks/adherence.py [--n 120] [--json out.json]
    python benchmarks/adherence.py --model WORK/sd35_demo.safetensors --tokenizers WORK/tokenizers   # a fresh build

Runs three settings on the same prompts and seeds: CFG off (cfg 1), CFG on (the demo default) and CFG + SLG.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from sd35.demo import DEMO_DEFAULTS, load_demo_pipeline
from sd35.demo.shapes import all_scenes, detect
from sd35.sampling.guidance import SkipLayerGuidance

ATTRIBUTES = ("colour", "shape", "position", "background")


def prompts(n: int, seed: int = 1):
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return scenes[:n]


def score(
    pipe, scenes, cfg: float, slg: SkipLayerGuidance | None, seed: int = 1000, steps: int | None = None
):
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for i, scene in enumerate(scenes):
        image = pipe.generate(scene.caption, steps=steps, cfg=cfg, seed=seed + i, slg=slg)[0]
        found = detect(image)
        for a in ATTRIBUTES:
            hits[a] += getattr(found, a) == getattr(scene, a)
    return {a: hits[a] / len(scenes) for a in ATTRIBUTES}


SETTINGS = {
    "CFG off": dict(cfg=1.0, slg=None),
    "CFG on": dict(cfg=DEMO_DEFAULTS.cfg, slg=None),
    "CFG + SLG": dict(cfg=DEMO_DEFAULTS.cfg, slg=SkipLayerGuidance()),  # the demo's own SLG settings
}


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
    scenes = prompts(args.n)
    results = {}
    t0 = time.time()
    for name, setting in SETTINGS.items():
        results[name] = score(pipe, scenes, **setting)
    print(
        f"prompt adherence, {args.n} prompts, {DEMO_DEFAULTS.steps} steps {DEMO_DEFAULTS.sampler}, "
        f"{time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s"
    )
    print(f"{'setting':10} " + " ".join(f"{a:>10}" for a in ATTRIBUTES))
    for name, r in results.items():
        print(f"{name:10} " + " ".join(f"{100 * r[a]:9.1f}%" for a in ATTRIBUTES))
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
