"""``sd35 inspect``: what each file or folder is, and what a complete pipeline still lacks.

Reads only safetensors headers (shapes and dtypes), so it answers in a moment even for 10 GB files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sd35.loading.components import (
    CLIP_G,
    CLIP_L,
    KIND_NAMES,
    KINDS,
    MMDITX,
    T5XXL,
    USUAL_FILES,
    VAE,
    Component,
    scan,
)
from sd35.models.clip import CLIPTextConfig
from sd35.models.mmditx import MMDiTXConfig, mmditx_family
from sd35.models.t5 import T5Config
from sd35.models.vae import VAEConfig


def _ranges(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    out, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def describe(c: Component) -> str:
    """A one-line description of a component's model and size."""
    if c.kind == MMDITX:
        cfg = MMDiTXConfig.from_state_dict(c.tensors)
        attn2 = f"attn2 in blocks {_ranges(cfg.attn2_layers)}" if cfg.attn2_layers else "no attn2"
        return (
            f"{mmditx_family(cfg)}: {cfg.depth} blocks, hidden {cfg.hidden_size}, {attn2}, "
            f"qk-norm {'on' if cfg.qk_norm else 'off'}, images up to {cfg.max_image_size} px"
        )
    if c.kind == VAE:
        cfg = VAEConfig.from_state_dict(c.tensors)
        parts = [p for p, on in (("encoder", cfg.has_encoder), ("decoder", cfg.has_decoder)) if on]
        sd3 = cfg.z_channels == 16 and cfg.ch == 128
        return f"{'SD3 VAE' if sd3 else 'VAE'}: {cfg.z_channels} latent channels, {' + '.join(parts)}"
    if c.kind in (CLIP_L, CLIP_G):
        cfg = CLIPTextConfig.from_state_dict(
            c.tensors, activation="gelu" if c.kind == CLIP_G else "quick_gelu"
        )
        return f"{KIND_NAMES[c.kind]}: {cfg.layers} layers, width {cfg.width}"
    if c.kind == T5XXL:
        cfg = T5Config.from_state_dict(c.tensors)
        real = cfg.d_model == 4096 and cfg.layers == 24
        return f"{'T5-XXL' if real else 'T5'} encoder: {cfg.layers} layers, width {cfg.d_model}"
    return c.name


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def report(paths: list[str | Path]) -> str:
    """The text ``sd35 inspect`` prints for these paths (raises SD35Error on bad input)."""
    lines: list[str] = []
    found: dict[str, Component] = {}
    components = scan(paths)
    for path in paths:
        path = Path(path)
        mine = [c for c in components if c.source == path or path in c.source.parents]
        mine.sort(key=lambda c: KINDS.index(c.kind) if c.kind in KINDS else len(KINDS))
        layouts = sorted({c.layout for c in mine})
        lines.append(f"{path}  [{', '.join(layouts)}]")
        for c in mine:
            notes = f"  ({'; '.join(c.notes)})" if c.notes else ""
            lines.append(
                f"  {c.name:8} {describe(c)} | {c.dtypes()} | {_count(c.parameter_count())} parameters{notes}"
            )
            found.setdefault(c.kind, c)
    missing = [k for k in KINDS if k not in found]
    lines.append("")
    if missing:
        lines.append("A complete pipeline still lacks:")
        lines += [f"  {KIND_NAMES[k]:8} usually {USUAL_FILES[k]}" for k in missing]
    else:
        lines.append("Complete: MMDiT-X, VAE, CLIP-L, CLIP-G and T5-XXL are all present.")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="say what weight files/folders are and what a complete pipeline still lacks",
        description="For each file or folder: which model it holds (SD3 Medium, SD3.5 Medium, SD3.5 Large, CLIP-L, "
        "CLIP-G, T5-XXL, VAE), its layout, dtype and parameter count; then what a complete pipeline lacks. "
        "Reads only file headers.",
    )
    p.add_argument("paths", nargs="+", help=".safetensors files or diffusers/text-encoder folders")
    p.set_defaults(func=run)


def run(args) -> int:
    print(report(args.paths))
    return 0
