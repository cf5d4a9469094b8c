"""Loading LoRA files onto the loaded models, and taking them off again."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd35.errors import SD35Error, SD35Warning
from sd35.lora.formats import COMPONENT_NAMES, COMPONENTS, parse_lora, read_lora
from sd35.lora.patching import Patch, attach, detach, has_float_weight, lora_names, set_strength

MODES = ("auto", "merge", "runtime")


@dataclass
class LoadReport:
    """What :func:`load_lora` did."""

    name: str
    source: str
    strength: float
    formats: list[str]  # producers whose key names were recognised (kohya, diffusers, OneTrainer, ...)
    kinds: list[str]  # adapter types found (lora, loha, lokr, diff; "+dora" when weight-decomposed)
    layers: dict[str, int]  # component -> layers changed
    modes: dict[str, int] = field(default_factory=dict)  # "merge"/"runtime" -> layers
    unmatched: list[str] = field(default_factory=list)  # keys that fit no layer (also warned about)
    skipped: list[str] = field(default_factory=list)  # keys for a text encoder that is not loaded

    def summary(self) -> str:
        parts = ", ".join(f"{COMPONENT_NAMES[c]} {n}" for c, n in self.layers.items())
        modes = ", ".join(f"{m} {n}" for m, n in self.modes.items())
        return (
            f"LoRA {self.name!r} ({'/'.join(self.formats)} {'/'.join(self.kinds)}) at strength {self.strength}: "
            f"{parts} layers ({modes})"
        )


def _models(models: dict[str, nn.Module | None]) -> dict[str, nn.Module]:
    unknown = set(models) - set(COMPONENTS)
    if unknown:
        raise SD35Error(f"unknown model component(s) {sorted(unknown)}; use {list(COMPONENTS)}.")
    return {c: m for c, m in models.items() if m is not None}


def _kind(adapter) -> str:
    parts = getattr(adapter, "parts", None)
    inner = getattr(adapter, "inner", None)
    if parts is not None:
        return "+".join(sorted({_kind(p) for p in parts}))
    if inner is not None:
        return _kind(inner)
    return adapter.kind + ("+dora" if adapter.dora_scale is not None else "")


def load_lora(
    models: dict[str, nn.Module | None],
    path: str | os.PathLike | dict[str, torch.Tensor],
    strength: float = 1.0,
    mode: str = "auto",
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> LoadReport:
    """Apply a LoRA / LyCORIS / DoRA file (any layout :mod:`sd35.lora.formats` reads) to ``models``.

    ``models`` maps "mmditx", "clip_l", "clip_g", "t5" to the loaded modules (None for one that is not
    loaded: its keys are reported as skipped). ``path`` may also be a state dict (then pass ``name``).
    ``mode``: "merge" changes the weights (exact copies are kept for unloading), "runtime" adds the
    adapters' outputs in a forward hook and leaves the weights alone, "auto" merges into
    float16/bfloat16/float32 weights and uses runtime for fp8 or other quantized layers.
    Keys that fit no layer are listed in the report and warned about (:class:`SD35Warning`).
    The LoRA is known by ``name`` (default: the file name without extension) for :func:`unload_lora`.
    """
    if mode not in MODES:
        raise SD35Error(f"unknown LoRA mode {mode!r}; choose one of {', '.join(MODES)}.")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise SD35Error(f"LoRA strength must be a number, got {strength!r}.") from None
    live = _models(models)
    if isinstance(path, dict):
        sd, meta, source = path, dict(metadata or {}), "<state dict>"
        name = name or "lora"
    else:
        sd, meta = read_lora(path)
        meta.update(metadata or {})
        source = str(path)
        name = name or Path(path).stem
    taken = {n for m in live.values() for n in lora_names(m)}
    if name in taken:
        raise SD35Error(f"a LoRA named {name!r} is already loaded; unload it first or give another name.")
    parsed = parse_lora(sd, models, meta, what=source)

    layers: dict[str, int] = {}
    modes: dict[str, int] = {}
    kinds: dict[str, None] = {}
    try:
        for (comp, mname), adapter in parsed.adapters.items():
            module = live[comp].get_submodule(mname)
            adapter.to(device=module.weight.device)
            how = mode if mode != "auto" else ("merge" if has_float_weight(module) else "runtime")
            attach(module, Patch(name, adapter, strength), how)
            layers[comp] = layers.get(comp, 0) + 1
            modes[how] = modes.get(how, 0) + 1
            kinds[_kind(adapter)] = None
    except Exception:
        for m in live.values():
            for module in m.modules():
                detach(module, name)
        raise
    report = LoadReport(
        name=name,
        source=source,
        strength=strength,
        formats=parsed.formats,
        kinds=list(kinds),
        layers=layers,
        modes=modes,
        unmatched=parsed.unmatched,
        skipped=parsed.skipped,
    )
    if parsed.unmatched:
        shown = ", ".join(parsed.unmatched[:8]) + (
            f" (and {len(parsed.unmatched) - 8} more)" if len(parsed.unmatched) > 8 else ""
        )
        warnings.warn(
            f"LoRA {name!r}: {len(parsed.unmatched)} tensor(s) fit no layer of this model and were not applied: {shown}.",
            SD35Warning,
            stacklevel=2,
        )
    if parsed.skipped:
        warnings.warn(
            f"LoRA {name!r}: {len(parsed.skipped)} tensor(s) are for a text encoder that is not loaded and were not "
            f"applied (e.g. {parsed.skipped[0]}).",
            SD35Warning,
            stacklevel=2,
        )
    return report


def unload_lora(models: dict[str, nn.Module | None], name: str | None = None) -> list[str]:
    """Take LoRA ``name`` (every LoRA, including trainable ones, if None) off ``models``; weights come back bit-exact.

    Returns the names removed. Raises :class:`SD35Error` if ``name`` is not loaded.
    """
    removed: dict[str, None] = {}
    for m in _models(models).values():
        for module in m.modules():
            removed.update(dict.fromkeys(sorted(detach(module, name))))
    if name is not None and not removed:
        raise SD35Error(f"no LoRA named {name!r} is loaded.")
    return list(removed)


def loaded_loras(models: dict[str, nn.Module | None]) -> list[str]:
    """Names of the LoRAs applied to any of ``models``."""
    out: dict[str, None] = {}
    for m in _models(models).values():
        out.update(dict.fromkeys(lora_names(m)))
    return list(out)


def set_lora_strength(models: dict[str, nn.Module | None], name: str, strength: float) -> int:
    """Change the strength of loaded LoRA ``name`` (merged layers are recomputed from the exact originals)."""
    n = sum(set_strength(m, name, float(strength)) for m in _models(models).values())
    if n == 0:
        raise SD35Error(f"no LoRA named {name!r} is loaded.")
    return n
