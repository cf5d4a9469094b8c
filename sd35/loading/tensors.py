"""Lazy tensors: a weight's shape and dtype known from a file header, its data read only when needed.

Model configs are inferred from shapes alone, so a checkpoint can be inspected without reading
gigabytes. When a model is built, each tensor is read from the memory-mapped file, cast to the
target dtype and placed on the target device one at a time, so RAM never holds two full copies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LazyTensor:
    """A tensor described by its shape and stored dtype; ``load()`` reads it (on the CPU)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    origin: str = ""  # "file.safetensors:key", for messages

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def derive(self, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> LazyTensor:
        """A lazy tensor computed from this one by ``fn`` when loaded."""
        return LazyTensor(tuple(shape), self.dtype, lambda: fn(self.load()), self.origin)


TensorLike = torch.Tensor | LazyTensor
StateDict = Mapping[str, TensorLike]


def shape_of(t: TensorLike) -> tuple[int, ...]:
    return tuple(t.shape)


_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
}


def dtype_mix(tensors: Iterable[TensorLike]) -> str:
    """The stored dtypes by share of elements, most common first: ``bf16`` or ``fp8_e4m3fn 98% / fp32``.

    Shared by every ``sd35 inspect`` line (models and LoRAs) so that all name dtypes the same way.
    """
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[_DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))] += math.prod(t.shape)
    total = sum(counts.values()) or 1
    parts = counts.most_common()
    if len(parts) == 1:
        return parts[0][0]
    return " / ".join(f"{n} {100 * c / total:.0f}%" for n, c in parts)


def materialize(
    t: TensorLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Read ``t`` and cast it; fp8 is upcast through float32 where a direct cast is not supported."""
    x = t.load() if isinstance(t, LazyTensor) else t
    if dtype is not None and x.dtype != dtype:
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.to(torch.float32)
        x = x.to(dtype)
    if device is not None:
        x = x.to(device)
    return x


def concat(parts: list[TensorLike], dim: int = 0) -> LazyTensor:
    """A lazy concatenation (e.g. diffusers' separate q, k, v into the reference's fused qkv)."""
    shapes = [shape_of(p) for p in parts]
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    first = parts[0]
    dtype = first.dtype
    origin = first.origin if isinstance(first, LazyTensor) else ""

    def load() -> torch.Tensor:
        loaded = [materialize(p) for p in parts]
        common = loaded[0].dtype
        if common in (torch.float8_e4m3fn, torch.float8_e5m2):
            common = torch.float32
        return torch.cat([x.to(common) for x in loaded], dim=dim)

    return LazyTensor(tuple(out), dtype, load, origin)


def lazy(t: TensorLike) -> LazyTensor:
    """Wrap a real tensor as a lazy one so maps can treat both alike."""
    if isinstance(t, LazyTensor):
        return t
    return LazyTensor(tuple(t.shape), t.dtype, lambda: t)
