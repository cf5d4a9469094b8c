"""Applying LoRA-family adapters (:mod:`sd35.lora.adapters`) to a model's layers, and taking them off again.

Several adapters on one weight add up: ``W_final = W + sum_i s_i * dW_i(W)``, every ``dW_i`` computed
from the original ``W`` (for plain LoRAs this is what every tool does; for stacked DoRAs it makes the
result independent of loading order). Both ways of applying give this same weight:

- **merge**: the weight is overwritten with ``W_final`` (computed in float32); an exact copy of the
  original weight (and bias) is kept on the CPU, so unloading restores it bit for bit.
- **runtime**: a forward hook adds ``sum_i s_i * (x @ dW_i^T)`` to the module's output (low-rank
  LoRAs as ``up(down(x))``, never materialising ``dW``). The module's parameters are never touched,
  so this is the way for fp8 or otherwise quantized bases and for training; unloading removes the hook.

Trainable adapters (:func:`add_lora`) are runtime LoRAs whose tensors are ``nn.Parameter``s;
:func:`merge_lora` bakes one into the weights for good.

A patched layer keeps what was done to it in a :class:`LoRAState` under
:data:`sd35.models.contract.LORA_STATE_ATTR` in its ``__dict__`` (outside the state dict), where code that
must not import this package (the fused adaLN path, CUDA graphs, fp8) can see it. Quantized layers take
part through :class:`sd35.models.contract.QuantizedLinear`, whatever their format: they are targets, the
loader applies runtime patches to them, and DoRA reads their base weight from
:meth:`~sd35.models.contract.QuantizedLinear.dequantized_weight`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import SD35Error
from sd35.lora.adapters import Adapter, LoRA
from sd35.models.contract import BLOCK_LINEARS, LORA_STATE_ATTR, QuantizedLinear, matches_suffix

DEFAULT_TARGETS = BLOCK_LINEARS  # add_lora's default targets: the joint blocks' attention and MLP matrices
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Patch:
    """One adapter of a named LoRA on one module, at a strength."""

    name: str
    adapter: Adapter
    strength: float = 1.0


@dataclass
class LoRAState:
    """What sd35 changed on one module (kept in ``module.__dict__``, outside the state dict)."""

    merged: list[Patch] = field(default_factory=list)
    runtime: list[Patch] = field(default_factory=list)
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # exact CPU copies, while merged
    handle: Any = None  # the forward hook, while runtime patches exist


def get_state(module: nn.Module) -> LoRAState | None:
    """The LoRA state of ``module`` (what :func:`sd35.models.contract.lora_state` shows others), or None."""
    return module.__dict__.get(LORA_STATE_ATTR)


def _ensure_state(module: nn.Module) -> LoRAState:
    st = get_state(module)
    if st is None:
        st = module.__dict__[LORA_STATE_ATTR] = LoRAState()
    return st


def is_target(module: nn.Module) -> bool:
    """Linear and Conv2d layers, and quantized linears (:class:`sd35.models.contract.QuantizedLinear`)."""
    return isinstance(module, (nn.Linear, nn.Conv2d, QuantizedLinear))


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of the weight an adapter changes: [out, in] (or the conv's), whatever the layer stores."""
    if isinstance(module, QuantizedLinear):
        return module.out_features, module.in_features
    return tuple(module.weight.shape)


def has_float_weight(module: nn.Module) -> bool:
    """A plain float16/bfloat16/float32/float64 weight, which merging can change and restore exactly.

    Never true of a :class:`~sd35.models.contract.QuantizedLinear`, whatever dtype it stores.
    """
    if isinstance(module, QuantizedLinear):
        return False
    w = getattr(module, "weight", None)
    return type(w) in (torch.Tensor, nn.Parameter) and w.dtype in _FLOAT_DTYPES and not w.is_meta


def base_weight(module: nn.Module) -> torch.Tensor:
    """The module's original weight in float32 (the pre-merge copy if LoRAs are merged into it).

    A :class:`~sd35.models.contract.QuantizedLinear` gives it through
    :meth:`~sd35.models.contract.QuantizedLinear.dequantized_weight` (in its own compute dtype, then float32).
    """
    st = get_state(module)
    w = st.original["weight"] if st is not None and st.merged else module.weight
    if isinstance(module, QuantizedLinear) and w is module.weight:
        return module.dequantized_weight().float()
    if not (w.is_floating_point()):
        raise SD35Error(
            "a DoRA adapter needs the base weight, but this layer stores it in a quantized form it cannot be read "
            "from (make the layer a sd35.models.contract.QuantizedLinear)."
        )
    return w.to(device=module.weight.device, dtype=torch.float32)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


def _apply_delta(module: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    if _is_conv(module):
        return F.conv2d(x, dw, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, dw)


def runtime_output(module: nn.Module, x: torch.Tensor, patch: Patch) -> torch.Tensor:
    """What one patch adds to ``module(x)``."""
    a, s = patch.adapter, patch.strength
    like = {"device": x.device, "dtype": x.dtype}
    factors = None if _is_conv(module) else a.low_rank()
    if factors is not None:
        up, down = factors
        y = F.linear(F.linear(x, down.to(**like)), (up * s).to(**like))
    else:
        shape = weight_shape(module)
        w = base_weight(module) if a.needs_weight else None
        y = _apply_delta(module, x, (a.weight_delta(shape, w) * s).to(**like))
    b = a.bias_delta()
    if b is not None:
        b = (b * s).to(**like)
        y = y + (b.reshape(-1, 1, 1) if _is_conv(module) else b)
    return y


def _runtime_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    st = get_state(module)
    if st is None or not st.runtime:
        return output
    x = args[0] if args else kwargs["input"]
    for p in st.runtime:
        if p.strength != 0:
            output = output + runtime_output(module, x, p)
    return output


@torch.no_grad()
def _remerge(module: nn.Module, st: LoRAState) -> None:
    """Set the weight (and bias) to the original plus every merged patch, or back to the exact original."""
    params = {"weight": module.weight}
    if getattr(module, "bias", None) is not None:
        params["bias"] = module.bias
    if not st.merged:
        for k, orig in st.original.items():
            params[k].copy_(orig)
        st.original.clear()
        return
    if not st.original:
        st.original = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
    w = params["weight"]
    w0 = st.original["weight"].to(device=w.device, dtype=torch.float32)
    new_w, new_b = w0.clone(), None
    for p in st.merged:
        a = p.adapter
        new_w += p.strength * a.weight_delta(tuple(w.shape), w0 if a.needs_weight else None).to(w.device)
        db = a.bias_delta()
        if db is not None:
            if "bias" not in params:
                raise SD35Error("internal error: a bias change for a layer without bias.")
            if new_b is None:
                new_b = st.original["bias"].to(device=w.device, dtype=torch.float32).clone()
            new_b += p.strength * db.to(w.device)
    w.copy_(new_w.to(w.dtype))
    if "bias" in params:
        params["bias"].copy_(new_b.to(params["bias"].dtype) if new_b is not None else st.original["bias"])


def attach(module: nn.Module, patch: Patch, mode: str) -> None:
    """Apply ``patch`` to ``module`` by ``mode`` "merge" or "runtime"."""
    if mode not in ("merge", "runtime"):
        raise SD35Error(f"LoRA mode must be 'merge' or 'runtime', got {mode!r}.")
    if mode == "merge" and not has_float_weight(
        module
    ):  # a quantized weight (fp8 + scale, GGUF) takes no float delta
        raise SD35Error(
            "cannot merge a LoRA into a quantized layer or one whose weight is not a plain float tensor; "
            "use mode='runtime' (or 'auto', which picks it for such layers)."
        )
    st = _ensure_state(module)
    if mode == "merge":
        st.merged.append(patch)
        try:
            _remerge(module, st)
        except Exception:
            st.merged.pop()
            _remerge(module, st)
            if not st.merged and not st.runtime:
                del module.__dict__[LORA_STATE_ATTR]
            raise
    else:
        st.runtime.append(patch)
        if st.handle is None:
            st.handle = module.register_forward_hook(_runtime_hook, with_kwargs=True)


def detach(module: nn.Module, name: str | None = None) -> set[str]:
    """Remove the patches of LoRA ``name`` (all if None) from ``module``; returns the names removed."""
    st = get_state(module)
    if st is None:
        return set()
    removed = {p.name for p in st.merged + st.runtime if name is None or p.name == name}
    if not removed:
        return removed
    keep_merged = [p for p in st.merged if p.name not in removed]
    if len(keep_merged) != len(st.merged):
        st.merged = keep_merged
        _remerge(module, st)
    st.runtime = [p for p in st.runtime if p.name not in removed]
    if not st.runtime and st.handle is not None:
        st.handle.remove()
        st.handle = None
    if not st.merged and not st.runtime:
        del module.__dict__[LORA_STATE_ATTR]
    return removed


def iter_patches(model: nn.Module) -> Iterator[tuple[str, nn.Module, Patch, str]]:
    """(module name, module, patch, "merge"|"runtime") for every patch in ``model``."""
    for mname, module in model.named_modules():
        st = get_state(module)
        if st is None:
            continue
        for p in st.merged:
            yield mname, module, p, "merge"
        for p in st.runtime:
            yield mname, module, p, "runtime"


def lora_names(model: nn.Module) -> list[str]:
    """The names of the LoRAs applied to ``model``, in the order first seen."""
    return list(dict.fromkeys(p.name for _, _, p, _ in iter_patches(model)))


def set_strength(model: nn.Module, name: str, strength: float) -> int:
    """Change the strength of LoRA ``name`` (merged layers are recomputed from the original); returns layers."""
    n = 0
    for _, module, p, mode in list(iter_patches(model)):
        if p.name == name:
            p.strength = float(strength)
            n += 1
            if mode == "merge":
                _remerge(module, get_state(module))
    return n


# ---------------------------------------------------------------------------------------------
# Training


def _block_index(name: str) -> int | None:
    m = re.match(r"joint_blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    blocks: Iterable[int] | None = None,
    dora: bool = False,
    name: str = "train",
    init: str = "kohya",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> list[nn.Parameter]:
    """Wrap every layer whose name ends with one of ``targets`` in a trainable runtime LoRA; return its parameters.

    ``targets`` are module-name suffixes (``"attn.qkv"`` matches ``joint_blocks.3.x_block.attn.qkv`` and
    ``...context_block.attn.qkv`` but not ``attn2.qkv``). ``blocks`` keeps only those joint-block
    indices (layers outside the joint blocks, e.g. ``context_embedder``, are kept if targeted).
    ``alpha`` None means alpha = rank (scale 1). ``init="kohya"`` (also "peft"): down Kaiming-uniform
    (a = sqrt(5), as kohya ``LoRAModule`` and PEFT), up zeros; ``"gaussian"``: down ~ N(0, 1/rank).
    Either way the model's output is unchanged until training moves ``up``. ``dora=True`` adds a
    magnitude per input column, initialised to the base weight's column norms (kohya-file layout
    [1, in], which ComfyUI reads), so again the output starts unchanged. Parameters are created on
    each weight's device in ``dtype``; apply this after moving the model to its device.
    """
    if rank < 1:
        raise SD35Error(f"LoRA rank must be a positive integer, got {rank}.")
    if init not in ("kohya", "peft", "gaussian"):
        raise SD35Error(f"unknown LoRA init {init!r}; choose kohya, peft or gaussian.")
    targets = tuple(targets)
    keep = None if blocks is None else {int(b) for b in blocks}
    if name in lora_names(model):
        raise SD35Error(
            f"a LoRA named {name!r} is already applied to this model; unload it or pick another name."
        )
    chosen = []
    for mname, module in model.named_modules():
        if not is_target(module) or not matches_suffix(mname, targets):
            continue
        idx = _block_index(mname)
        if keep is not None and idx is not None and idx not in keep:
            continue
        chosen.append((mname, module))
    if not chosen:
        raise SD35Error(f"no layer matches the LoRA targets {list(targets)} (blocks {blocks}).")
    params: list[nn.Parameter] = []
    config = {"rank": rank, "alpha": float(alpha if alpha else rank), "targets": list(targets), "dora": dora}
    config["init"] = init
    for _, module in chosen:
        w = module.weight
        if w.is_meta:
            raise SD35Error("add_lora needs a model with real weights (it is on the meta device).")
        shape = weight_shape(module)
        out_dim, in_shape = shape[0], shape[1:]
        down = torch.empty(rank, *in_shape, device=w.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(down, std=1.0 / rank, generator=generator)
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up = torch.zeros(out_dim, rank, *([1] * (len(shape) - 2)), device=w.device, dtype=dtype)
        magnitude = None
        if dora:
            base = base_weight(module)
            dims = tuple(d for d in range(base.dim()) if d != 1)
            magnitude = torch.linalg.vector_norm(base, dim=dims, keepdim=True).to(dtype)
        adapter = LoRA(up, down, alpha, dora_scale=magnitude, trainable=True)
        adapter.config = dict(config)
        attach(module, Patch(name, adapter, 1.0), "runtime")
        params += [adapter.down, adapter.up] + ([adapter.dora_scale] if dora else [])
    return params


@torch.no_grad()
def merge_lora(model: nn.Module, name: str = "train") -> int:
    """Bake LoRA ``name`` into the weights for good (it stops being a patch); returns the layers changed.

    Other LoRAs stay applied: where some are merged, the baked change becomes part of their
    "original" too, so unloading them later keeps this one.
    """
    n = 0
    for _, module, patch, _mode in list(iter_patches(model)):
        if patch.name != name:
            continue
        a, s = patch.adapter, patch.strength
        detach(module, name)
        st = get_state(module)
        target = st.original if st is not None and st.merged else None
        w = module.weight
        w0 = (target["weight"] if target else w).to(device=w.device, dtype=torch.float32)
        new_w = w0 + s * a.weight_delta(tuple(w.shape), w0 if a.needs_weight else None).to(w.device)
        db = a.bias_delta()
        if target:
            target["weight"] = new_w.to(target["weight"].dtype).cpu()
            if db is not None:
                target["bias"] = (target["bias"].float() + s * db.cpu()).to(target["bias"].dtype)
            _remerge(module, st)
        else:
            w.copy_(new_w.to(w.dtype))
            if db is not None:
                module.bias.copy_((module.bias.float() + s * db.to(w.device)).to(module.bias.dtype))
        n += 1
    if n == 0:
        raise SD35Error(f"no LoRA named {name!r} is applied to this model.")
    return n
