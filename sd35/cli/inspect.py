"""``sd35 inspect``: what each file or folder is, and what a complete pipeline still lacks.

Reads only file headers (safetensors: shapes, dtypes, metadata; GGUF: the tensor table and its
key/values), so it answers in a moment even for 10 GB files. The MMDiT-X is named as its release
(:func:`sd35.models.family.identify`: SD3.5 Medium, SD3.5 Large, SD3.5 Large Turbo, SD3 Medium) with the
defaults a generation gets from it, and how each part is stored: its dtypes, or a GGUF's quantization types
with their tensor counts. ControlNets
(:func:`sd35.control.files.describe_controlnet`) and LoRA, DoRA and LyCORIS files are described too (:func:`sd35.lora.summary.summarize_lora` reads them; this module
only formats), including LoRAs for other model families: inspect is for finding out what a file is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sd35.control.files import describe_controlnet, is_controlnet
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
from sd35.loading.gguf_io import GGUFLazyTensor, is_gguf
from sd35.lora.formats import COMPONENT_NAMES
from sd35.lora.summary import LoraSummary, is_lora_file, summarize_lora
from sd35.models.clip import CLIPTextConfig
from sd35.models.family import identify
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAEConfig
from sd35.presets import defaults_for


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


def describe(c: Component, name: str = "") -> str:
    """A one-line description of a component's model and size (``name``: the model's file or folder name,
    which may say which release it is)."""
    if c.kind == MMDITX:
        cfg = MMDiTXConfig.from_state_dict(c.tensors)
        attn2 = f"attn2 in blocks {_ranges(cfg.attn2_layers)}" if cfg.attn2_layers else "no attn2"
        who = identify(cfg, c.metadata, name)
        evidence = f" (by {who.evidence})" if who.variant else ""
        return (
            f"{who.title}{evidence}: {cfg.depth} blocks, hidden {cfg.hidden_size}, {attn2}, "
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


def storage(c: Component) -> str:
    """How a component's tensors are stored: its dtypes (``bf16``, ``fp8_e4m3fn 98% / fp32``), or for a GGUF
    file its types with their tensor counts, most first (``Q8_0: 430 tensors, F32: 120``)."""
    if not all(isinstance(t, GGUFLazyTensor) for t in c.tensors.values()):
        return c.dtypes()
    counts = Counter(t.type_name for t in c.tensors.values()).most_common()
    first, *rest = (f"{name}: {n}" for name, n in counts)
    return ", ".join([f"{first} tensor{'s' if counts[0][1] != 1 else ''}", *rest])


def defaults_line(c: Component, name: str) -> str:
    """The defaults a generation gets from an MMDiT-X (its release's, or its file's own)."""
    cfg = MMDiTXConfig.from_state_dict(c.tensors)
    d = defaults_for(cfg, c.metadata, identify(cfg, c.metadata, name).variant)
    return (
        f"  {'defaults':8} {d.steps} steps, CFG {d.cfg}, {d.sampler}, shift {d.shift}, "
        f"{d.width}x{d.height} ({d.name})"
    )


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


# What the blocks of each network are called, for "35 layers in joint blocks 0-23".
_BLOCK_WORDS = {"mmditx": "joint blocks", "clip_l": "layers", "clip_g": "layers", "t5": "blocks"}


def _number(x: float) -> str:
    return f"{x:g}"


def _spread(values: list) -> str:
    """The most common value, and the range when they differ: ``4``, ``16 (most layers; 4-32)``, or ``2-4``
    when no value is the most common."""
    (common, n), *others = Counter(values).most_common()
    if not others:
        return _number(common)
    span = f"{_number(min(values))}-{_number(max(values))}"
    return span if others[0][1] == n else f"{_number(common)} (most layers; {span})"


def _kind_line(s: LoraSummary) -> str:
    if list(s.kinds) == ["LoRA"] and s.dora:
        every = "" if s.dora == s.kinds["LoRA"] else f" on {s.dora} of {s.kinds['LoRA']} adapters"
        return f"DoRA (LoRA with magnitude vectors{every})"
    if len(s.kinds) == 1 and not s.dora:
        return s.kind
    parts = ", ".join(f"{kind} ({n})" for kind, n in s.kinds.items())
    return f"adapters: {parts}" + (f"; DoRA magnitude vectors on {s.dora}" if s.dora else "")


def _alpha_line(s: LoraSummary) -> str:
    stored = [a for a in s.alphas if a is not None]
    if not stored:
        return "= rank (none stored; scale 1)"
    text = _spread(stored)
    if len(stored) == len(s.alphas) and len(set(stored)) == 1 and len(set(s.ranks)) == 1:
        text += f" (scale alpha/rank = {_number(stored[0] / s.ranks[0])})"
    if len(stored) < len(s.alphas):
        text += f"; {len(s.alphas) - len(stored)} of {len(s.alphas)} adapters store none (= rank)"
    return text


def describe_lora(s: LoraSummary) -> list[str]:
    """The lines of one LoRA file's block: what it is, what it changes, what it was made for."""
    if s.foreign:
        lines = [
            f"{s.path}  [LoRA for {s.foreign}]",
            f"  {'made for':9} {s.foreign} ({s.foreign_evidence}); sd35 cannot apply it",
        ]
    else:
        layouts = ", ".join(s.layouts) or "unrecognised"
        lines = [f"{s.path}  [{s.kind}: {layouts} layout{'s' if len(s.layouts) > 1 else ''}]"]
    if s.kinds:
        lines.append(f"  {'kind':9} {_kind_line(s)}")
    if s.ranks:
        lines.append(f"  {'rank':9} {_spread(s.ranks)}")
        lines.append(f"  {'alpha':9} {_alpha_line(s)}")
    elif s.kinds:
        lines.append(f"  {'rank':9} none (full-rank changes)")
    for comp, use in s.components.items():
        text = f"{use.layers} layer{'s' if use.layers != 1 else ''}"
        if use.blocks:
            word = _BLOCK_WORDS[comp] if len(use.blocks) > 1 else _BLOCK_WORDS[comp][:-1]
            text += f" in {word} {_ranges(use.blocks)}: {', '.join(use.kinds)}"
        if use.outside:
            text += f"; also {', '.join(use.outside)}" if use.blocks else f": {', '.join(use.outside)}"
        lines.append(f"  {COMPONENT_NAMES[comp]:9} {text}")
    if not s.foreign:
        base = s.base or "unknown"
        why = s.base_evidence or "no metadata names it and its shapes match no release"
        lines.append(f"  {'made for':9} {base} ({why})")
    lines.append(f"  {'stored':9} {s.dtypes} | {_count(s.parameters)} parameters")
    if s.training:
        version = s.training.get("sd35")
        rest = ", ".join(f"{k} {v}" for k, v in s.training.items() if k != "sd35")
        lines.append(f"  {'training':9} {'sd35 ' + version + ': ' if version else ''}{rest}")
    if s.unmatched and not s.foreign:
        first = ", ".join(f"'{k}'" for k in s.unmatched[:2])
        lines.append(f"  {'unmatched':9} {len(s.unmatched)} tensors fit no SD3-family layer (first: {first})")
    return lines


def report(paths: list[str | Path]) -> str:
    """The text ``sd35 inspect`` prints for these paths (raises SD35Error on bad input).

    LoRA files get a block of their own and do not count toward what a complete pipeline lacks; that
    summary is printed only when some path holds model weights.
    """
    lines: list[str] = []
    found: dict[str, Component] = {}
    loras = {Path(p) for p in paths if Path(p).is_file() and not is_gguf(p) and is_lora_file(p)}
    controlnets = {Path(p) for p in paths if Path(p) not in loras and is_controlnet(p)}
    models = [Path(p) for p in paths if Path(p) not in loras | controlnets]
    components = scan(models)
    for path in paths:
        path = Path(path)
        if path in loras:
            lines += describe_lora(summarize_lora(path))
            continue
        if path in controlnets:
            lines += [f"{path}  [ControlNet]", f"  {describe_controlnet(path)}"]
            continue
        mine = [c for c in components if c.source == path or path in c.source.parents]
        mine.sort(key=lambda c: KINDS.index(c.kind) if c.kind in KINDS else len(KINDS))
        layouts = sorted({c.layout for c in mine})
        lines.append(f"{path}  [{', '.join(layouts)}]")
        name = path.stem if path.is_file() else path.name
        for c in mine:
            notes = f"  ({'; '.join(c.notes)})" if c.notes else ""
            lines.append(
                f"  {c.name:8} {describe(c, name)} | {storage(c)} | {_count(c.parameter_count())} parameters{notes}"
            )
            if c.kind == MMDITX:
                lines.append(defaults_line(c, name))
            found.setdefault(c.kind, c)
    if not models:
        return "\n".join(lines)
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
        description="For each file or folder: which model it holds (SD3.5 Medium, SD3.5 Large, SD3.5 Large Turbo, "
        "SD3 Medium with the defaults it runs with; CLIP-L, CLIP-G, T5-XXL, VAE), its layout, dtypes (a GGUF's "
        "quantization types) and parameter count; then what a complete pipeline lacks. "
        "A LoRA/DoRA/LyCORIS file is described instead: kind, rank, alpha, the layers it changes and the model "
        "it was made for. Reads only file headers.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        help=".safetensors or .gguf files (models or LoRAs) or diffusers/text-encoder folders",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    print(report(args.paths))
    return 0
