"""LoRA-family adapters: the formulas of the weight change ``dW`` each kind of file describes.

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

This module is the maths only: an adapter knows nothing of modules or of how it is applied. Applying
adapters to a model (merged into the weights or added at runtime), trainable adapters and merging them for
good are :mod:`sd35.lora.patching`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sd35.errors import SD35Error
from sd35.loading.diffusers_mmditx import swap_halves


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

    Tensors are held as frozen ``nn.Parameter``s (trainable ones for :func:`sd35.lora.patching.add_lora`), in the
    dtype they came in; every computation runs in float32.
    """

    kind = "adapter"
    rank: int | None = None  # the low-rank dimension alpha is divided by; None for full-rank changes

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
        self.rank = rank = w1_b.shape[0]
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
        self.rank = rank = w2_b.shape[0] if w2 is None else (w1_b.shape[0] if w1 is None else None)
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
