"""LoRA-family adapters and the two ways of applying them to a model.

An :class:`Adapter` describes a change ``dW`` of one base weight ``W``: an ``nn.Linear`` weight
[out, in] or an ``nn.Conv2d`` weight [out, in, kh, kw] (``in`` below is ``in * kh * kw`` for a conv).
The formulas, at strength 1 (sources: ComfyUI ``comfy/weight_adapter/lora.py``, ``loha.py``,
``lokr.py``, ``base.py``; LyCORIS ``lycoris/modules/locon.py``, ``loha.py``, ``lokr.py``):

- **LoRA / LoCon** (kohya ``lora_down``/``lora_up``, PEFT ``lora_A``/``lora_B``):
  ``dW = (alpha / r) * up @ down`` with up [out, r], down [r, in], ``r = down.shape[0]``. A missing
  alpha means ``alpha = r``; so does alpha 0 (kohya ``LoRAModule`` and LyCORIS read 0 as the rank). The
  optional Tucker core ``lora_mid`` [r, r, kh, kw] (LoCon on convolutions) gives
  ``dW[o, i, ...] = sum_mn up[o, m] * mid[m, n, ...] * down[n, i]``.
- **LoHa**: ``dW = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise product), ``r =
  w1_b.shape[0]``, scale 1 without alpha. With Tucker cores ``hada_t1/t2`` each factor is
  ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``.
- **LoKr**: ``dW = scale * kron(w1, w2)``; ``w1 = lokr_w1`` or ``w1_a @ w1_b``; ``w2 = lokr_w2`` or
  ``w2_a @ w2_b`` or the Tucker form with ``lokr_t2``; ``scale = alpha / r`` where ``r`` is the rank
  of the factored matrix (``w2_b.shape[0]`` if w2 is factored, else ``w1_b.shape[0]``), and 1 when
  neither is factored or there is no alpha (ComfyUI ``LoKrAdapter.calculate_weight``).
- **Full diff**: ``dW = diff``, ``db = diff_b``.
- **DoRA** (``dora_scale``; PEFT ``lora_magnitude_vector``), weight-decomposed LoRA (Liu et al. 2024,
  arXiv:2402.09353) as LyCORIS ``apply_weight_decompose`` and ComfyUI ``weight_decompose`` compute it:
  with ``V = W + dW`` (dW from any of the above, alpha included),
  ``W' = m * V / ||V||``, where the norm is taken per input column over the output rows (LyCORIS
  ``wd_on_out=False``, the layout kohya-style files and ComfyUI use: ``m`` stored as [1, in, 1, ...])
  or per output row over the inputs (LyCORIS ``wd_on_out=True``, PEFT: ``m`` stored as [out, 1, ...]
  or [out]); the stored shape of ``m`` says which. A 1-D magnitude whose length is ``out`` is per row
  (PEFT). No epsilon is added to the norm (as ComfyUI). At strength ``s`` the weight is
  ``W + s * (W' - W)`` (ComfyUI; LyCORIS' merge uses ``V * (1 + s * (m / ||V|| - 1))``, which
  differs for s != 1: at s = 0 it still keeps ``dW``).

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

STATE_ATTR = "_sd35_lora"
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _param(t: torch.Tensor | None, trainable: bool = False) -> nn.Parameter | None:
    if t is None:
        return None
    return nn.Parameter(t.detach() if not trainable else t, requires_grad=trainable)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _prod(shape: Iterable[int]) -> int:
    return math.prod(shape)


def dora_axis(magnitude: torch.Tensor, shape: tuple[int, ...]) -> int:
    """0 if ``magnitude`` holds one value per output row, 1 if one per input column of a weight of ``shape``.

    Raises ``ValueError`` for a magnitude that fits neither.
    """
    out, inp = shape[0], shape[1]
    m = tuple(magnitude.shape)
    if len(m) == 1:
        if m[0] == out:
            return 0
        if m[0] == inp:
            return 1
    elif len(m) >= 2 and _prod(m[2:]) == 1:
        if m[0] == out and m[1] == 1:
            return 0
        if m[0] == 1 and m[1] == inp:
            return 1
    raise ValueError(f"magnitude of shape {list(m)} fits neither the {out} rows nor the {inp} columns")


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``m * (W + dW) / ||W + dW||`` with the norm along the axis ``magnitude``'s shape names (see module doc)."""
    v = weight + delta
    axis = dora_axis(magnitude, tuple(v.shape))
    dims = tuple(d for d in range(v.dim()) if d != axis)
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return v * (_f32(magnitude).reshape(norm.shape) / norm)


class Adapter(nn.Module):
    """One weight change. Subclasses give :meth:`delta` (before DoRA) and :meth:`delta_shape`.

    Tensors are held as frozen ``nn.Parameter``s (trainable ones for :func:`add_lora`), in the
    dtype they came in; every computation runs in float32.
    """

    kind = "adapter"

    def __init__(self, dora_scale: torch.Tensor | None = None, trainable: bool = False):
        super().__init__()
        self.dora_scale = _param(dora_scale, trainable)

    @property
    def needs_weight(self) -> bool:
        """Whether the change depends on the base weight (DoRA)."""
        return self.dora_scale is not None

    def delta_shape(self) -> tuple[int, int]:
        """(rows, inputs) of the change, conv kernels flattened into the inputs."""
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        """The change before weight decomposition, alpha included: float32 [rows, inputs] (or conv-shaped)."""
        raise NotImplementedError

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up * scale, down)`` when the change is exactly their product (for cheap runtime use), else None."""
        return None

    def bias_delta(self) -> torch.Tensor | None:
        return None

    def weight_delta(self, shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
        """The effective change of a weight of ``shape`` at strength 1 (DoRA applied), float32.

        ``weight`` (the original base weight) is needed only when :attr:`needs_weight`.
        """
        d = self.delta().reshape(shape)
        if self.dora_scale is None:
            return d
        if weight is None:
            raise SD35Error("internal error: a DoRA adapter needs the base weight.")
        w = _f32(weight)
        return dora_weight(w, d, self.dora_scale) - w


class LoRA(Adapter):
    """LoRA / LoCon: ``(alpha / r) * up @ down`` (optional Tucker ``mid``; optional DoRA magnitude)."""

    kind = "lora"

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        alpha: float | None = None,
        mid: torch.Tensor | None = None,
        dora_scale: torch.Tensor | None = None,
        trainable: bool = False,
    ):
        super().__init__(dora_scale, trainable)
        self.up = _param(up, trainable)
        self.down = _param(down, trainable)
        self.mid = _param(mid, trainable)
        self.rank = down.shape[0]
        self.alpha = float(self.rank if alpha is None or alpha == 0 else alpha)
        self.config: dict[str, Any] = {}  # what add_lora was asked for (exported as metadata)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_shape(self) -> tuple[int, int]:
        if self.mid is None:
            return self.up.shape[0], _prod(self.down.shape[1:])
        return self.up.shape[0], self.down.shape[1] * _prod(self.mid.shape[2:])

    def delta(self) -> torch.Tensor:
        up, down = _f32(self.up).flatten(1), _f32(self.down).flatten(1)
        if self.mid is None:
            return (up @ down) * self.scale
        return torch.einsum("mn...,im,nj->ij...", _f32(self.mid), up, down) * self.scale

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.mid is not None or self.dora_scale is not None:
            return None
        return _f32(self.up).flatten(1) * self.scale, _f32(self.down).flatten(1)


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`` (any number of kernel dims)."""
    return torch.einsum("ij...,jr,ip->pr...", _f32(t), _f32(w_b), _f32(w_a))


class LoHa(Adapter):
    """LoHa: ``(alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)``, optional Tucker cores t1, t2."""

    kind = "loha"

    def __init__(self, w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, alpha=None, dora_scale=None):
        super().__init__(dora_scale)
        self.w1_a, self.w1_b = _param(w1_a), _param(w1_b)
        self.w2_a, self.w2_b = _param(w2_a), _param(w2_b)
        self.t1, self.t2 = _param(t1), _param(t2)
        rank = w1_b.shape[0]
        self.scale = 1.0 if alpha is None else float(alpha) / rank

    def _factor(self, a, b, t) -> torch.Tensor:
        return _tucker(t, a, b) if t is not None else _f32(a) @ _f32(b)

    def delta_shape(self) -> tuple[int, int]:
        if self.t1 is not None:
            return self.w1_a.shape[1], self.w1_b.shape[1] * _prod(self.t1.shape[2:])
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def delta(self) -> torch.Tensor:
        m1 = self._factor(self.w1_a, self.w1_b, self.t1)
        m2 = self._factor(self.w2_a, self.w2_b, self.t2)
        return m1 * m2 * self.scale


class LoKr(Adapter):
    """LoKr: ``scale * kron(w1, w2)`` with either factor full or low-rank (w2 optionally Tucker)."""

    kind = "lokr"

    def __init__(
        self,
        w1=None,
        w1_a=None,
        w1_b=None,
        w2=None,
        w2_a=None,
        w2_b=None,
        t2=None,
        alpha=None,
        dora_scale=None,
    ):
        super().__init__(dora_scale)
        if (w1 is None) == (w1_a is None or w1_b is None) or (w2 is None) == (w2_a is None or w2_b is None):
            raise ValueError("LoKr needs lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b")
        self.w1, self.w1_a, self.w1_b = _param(w1), _param(w1_a), _param(w1_b)
        self.w2, self.w2_a, self.w2_b = _param(w2), _param(w2_a), _param(w2_b)
        self.t2 = _param(t2)
        rank = w2_b.shape[0] if w2 is None else (w1_b.shape[0] if w1 is None else None)
        self.scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0

    def _w1(self) -> torch.Tensor:
        return _f32(self.w1) if self.w1 is not None else _f32(self.w1_a) @ _f32(self.w1_b)

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return _f32(self.w2)
        if self.t2 is not None:
            return _tucker(self.t2, self.w2_a, self.w2_b)
        return _f32(self.w2_a) @ _f32(self.w2_b)

    def _shape1(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])

    def _shape2(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        return self.w2_a.shape[0], self.w2_b.shape[1]

    def delta_shape(self) -> tuple[int, int]:
        (a, b), s2 = self._shape1(), self._shape2()
        return a * s2[0], b * _prod(s2[1:])

    def delta(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2) * self.scale


class Diff(Adapter):
    """A full weight (and/or bias) difference: ``diff``, ``diff_b``."""

    kind = "diff"

    def __init__(self, diff: torch.Tensor | None = None, diff_b: torch.Tensor | None = None, out_in=None):
        super().__init__()
        self.diff, self.diff_b = _param(diff), _param(diff_b)
        self._out_in = out_in  # (rows, inputs) for a bias-only diff

    def delta_shape(self) -> tuple[int, int]:
        if self.diff is not None:
            return self.diff.shape[0], _prod(self.diff.shape[1:])
        return self._out_in

    def delta(self) -> torch.Tensor:
        if self.diff is None:
            return torch.zeros(self._out_in, device=self.diff_b.device)
        return _f32(self.diff)

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else _f32(self.diff_b)


class RowStack(Adapter):
    """Adapters on row ranges of one weight (split q/k/v LoRAs on a fused qkv), summed.

    With separate ``down`` matrices the result is exact: ``dW = [up_q @ down_q; up_k @ down_k; up_v @ down_v]``;
    rows no part covers are unchanged.
    """

    def __init__(self, parts: list[tuple[int, Adapter]], rows: int, inputs: int):
        super().__init__()
        self.offsets = [off for off, _ in parts]
        self.parts = nn.ModuleList(a for _, a in parts)
        self.rows, self.inputs = rows, inputs
        self.kind = "+".join(sorted({p.kind for p in self.parts}))

    @property
    def needs_weight(self) -> bool:
        return any(p.needs_weight for p in self.parts)

    def delta_shape(self) -> tuple[int, int]:
        return self.rows, self.inputs

    def weight_delta(self, shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        for off, part in zip(self.offsets, self.parts, strict=True):
            n = part.delta_shape()[0]
            d = part.weight_delta((n, *shape[1:]), None if weight is None else weight[off : off + n])
            if out is None:
                out = torch.zeros(shape, dtype=d.dtype, device=d.device)
            out[off : off + n] += d
        return out

    def delta(self) -> torch.Tensor:
        return self.weight_delta((self.rows, self.inputs))

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        factors = [p.low_rank() for p in self.parts]
        if any(f is None for f in factors):
            return None
        down = torch.cat([d for _, d in factors], dim=0)
        up = torch.zeros(self.rows, down.shape[0], dtype=down.dtype, device=down.device)
        col = 0
        for off, (u, _) in zip(self.offsets, factors, strict=True):
            up[off : off + u.shape[0], col : col + u.shape[1]] = u
            col += u.shape[1]
        return up, down

    def bias_delta(self) -> torch.Tensor | None:
        out = None
        for off, part in zip(self.offsets, self.parts, strict=True):
            b = part.bias_delta()
            if b is not None:
                out = torch.zeros(self.rows, dtype=b.dtype, device=b.device) if out is None else out
                out[off : off + b.shape[0]] += b
        return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class SwapHalves(Adapter):
    """An adapter made for a weight whose two row halves are stored the other way round.

    diffusers keeps the final adaLN and the last block's pre-only context adaLN as (scale, shift);
    the official layout (ours) as (shift, scale). The inner adapter sees the weight in its own layout.
    """

    def __init__(self, inner: Adapter):
        super().__init__()
        self.inner = inner
        self.kind = inner.kind

    @property
    def needs_weight(self) -> bool:
        return self.inner.needs_weight

    def delta_shape(self) -> tuple[int, int]:
        return self.inner.delta_shape()

    def weight_delta(self, shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
        w = None if weight is None else swap_halves(weight)
        return swap_halves(self.inner.weight_delta(shape, w))

    def delta(self) -> torch.Tensor:
        return swap_halves(self.inner.delta())

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        f = self.inner.low_rank()
        return None if f is None else (swap_halves(f[0]), f[1])

    def bias_delta(self) -> torch.Tensor | None:
        b = self.inner.bias_delta()
        return None if b is None else swap_halves(b)


# ---------------------------------------------------------------------------------------------
# Applying adapters to modules


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
    return module.__dict__.get(STATE_ATTR)


def _ensure_state(module: nn.Module) -> LoRAState:
    st = get_state(module)
    if st is None:
        st = module.__dict__[STATE_ATTR] = LoRAState()
    return st


def is_target(module: nn.Module) -> bool:
    """Linear and Conv2d layers, and quantized linear layers that expose ``in_features``/``out_features``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return True
    return isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "out_features")


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.Conv2d):
        return tuple(module.weight.shape)
    if isinstance(module, nn.Linear) or not hasattr(module, "in_features"):
        return tuple(module.weight.shape)
    return module.out_features, module.in_features


def has_float_weight(module: nn.Module) -> bool:
    """A plain float16/bfloat16/float32/float64 weight, which merging can change and restore exactly."""
    w = getattr(module, "weight", None)
    return type(w) in (torch.Tensor, nn.Parameter) and w.dtype in _FLOAT_DTYPES and not w.is_meta


def base_weight(module: nn.Module) -> torch.Tensor:
    """The module's original weight in float32 (the pre-merge copy if LoRAs are merged into it)."""
    st = get_state(module)
    w = st.original["weight"] if st is not None and st.merged else module.weight
    if hasattr(module, "dequantized_weight") and w is module.weight:
        return module.dequantized_weight().float()
    if not (w.is_floating_point()):
        raise SD35Error(
            "a DoRA adapter needs the base weight, but this layer stores it in a quantized form it cannot be read "
            "from (give the layer a dequantized_weight() method)."
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
    st = _ensure_state(module)
    if mode == "merge":
        if not module.weight.is_floating_point():
            raise SD35Error(
                "cannot merge a LoRA into a layer whose weight is not a float tensor; use mode='runtime'."
            )
        st.merged.append(patch)
        try:
            _remerge(module, st)
        except Exception:
            st.merged.pop()
            _remerge(module, st)
            if not st.merged and not st.runtime:
                del module.__dict__[STATE_ATTR]
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
        del module.__dict__[STATE_ATTR]
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


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


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
        if not is_target(module) or not _matches(mname, targets):
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
