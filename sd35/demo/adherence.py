"""Prompt adherence of the built-in demo model: how often generated images show the colour, shape, position and
background their prompts ask for, read back by the pixel detector :func:`sd35.demo.shapes.detect`.

:func:`measure` runs the three :data:`SETTINGS` on the same prompts and seeds: CFG off (cfg 1), CFG on (the
demo default) and CFG + SLG. ``benchmarks/adherence.py`` is its command line; the test suite scores a sample.
"""

from __future__ import annotations

import random

from sd35.demo import DEMO_DEFAULTS
from sd35.demo.shapes import Scene, all_scenes, detect
from sd35.sampling.guidance import SkipLayerGuidance

ATTRIBUTES = ("colour", "shape", "position", "background")

SETTINGS: dict[str, dict] = {
    "CFG off": dict(cfg=1.0, slg=None),
    "CFG on": dict(cfg=DEMO_DEFAULTS.cfg, slg=None),
    "CFG + SLG": dict(cfg=DEMO_DEFAULTS.cfg, slg=SkipLayerGuidance()),  # the demo's own SLG settings
}
"""The three settings of the benchmark, as keyword arguments of :func:`score`."""


def prompts(n: int, seed: int = 1) -> list[Scene]:
    """``n`` scenes of :func:`sd35.demo.shapes.all_scenes` in a seeded random order (the same for every setting)."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return scenes[:n]


def score(
    pipe,
    scenes: list[Scene],
    cfg: float,
    slg: SkipLayerGuidance | None,
    seed: int = 1000,
    steps: int | None = None,
) -> dict[str, float]:
    """The fraction of ``scenes`` whose image (seed ``seed + i``) shows each attribute its caption asks for."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for i, scene in enumerate(scenes):
        image = pipe.generate(scene.caption, steps=steps, cfg=cfg, seed=seed + i, slg=slg)[0]
        found = detect(image)
        for a in ATTRIBUTES:
            hits[a] += getattr(found, a) == getattr(scene, a)
    return {a: hits[a] / len(scenes) for a in ATTRIBUTES}


def measure(pipe, n: int) -> dict[str, dict[str, float]]:
    """:func:`score` of every setting of :data:`SETTINGS` on the first ``n`` :func:`prompts`."""
    scenes = prompts(n)
    return {name: score(pipe, scenes, **setting) for name, setting in SETTINGS.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    """``results`` of :func:`measure` as a text table: one row per setting, one percentage per attribute."""
    lines = [f"{'setting':10} " + " ".join(f"{a:>10}" for a in ATTRIBUTES)]
    for name, r in results.items():
        lines.append(f"{name:10} " + " ".join(f"{100 * r[a]:9.1f}%" for a in ATTRIBUTES))
    return "\n".join(lines)


__all__ = ["ATTRIBUTES", "SETTINGS", "measure", "prompts", "score", "table"]
