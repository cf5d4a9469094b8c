"""Linear layers whose weights stay GGUF-quantized in memory and are dequantized at each forward.

A GGUF checkpoint (ComfyUI-GGUF, stable-diffusion.cpp) is chosen for its size: a Q4_0 MMDiT-X is about a
seventh of its fp32 weights. :class:`GGUFLinear` keeps the file's bytes (on the layer's device) and expands
the weight only for the matmul, so resident weight memory stays close to the file's size and the float
matrix of one layer exists only while that layer runs. It is a :class:`~sd35.models.contract.QuantizedLinear`,
so LoRA applies on top at run time (it cannot merge into packed blocks).

:func:`keep_quantized` swaps every ``nn.Linear`` of a model built on the meta device whose weight is a
quantized GGUF tensor, and returns the state dict to load into it (those weights as raw bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd35.loading.gguf_io import BLOCKS, GGUFLazyTensor, dequantize
from sd35.loading.tensors import LazyTensor, StateDict
from sd35.models.contract import QuantizedLinear


class GGUFLinear(QuantizedLinear):
    """``y = x W^T + b`` with ``W`` stored as GGUF blocks (``weight``: uint8 bytes) and expanded per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, type_name: str):
        super().__init__()
        per_block, block_bytes = BLOCKS[type_name]
        self.in_features, self.out_features, self.type_name = in_features, out_features, type_name
        nbytes = in_features * out_features // per_block * block_bytes
        self.register_buffer("weight", torch.empty(nbytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize(self.weight, self.type_name, (self.out_features, self.in_features))
        return w.to(dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


def keep_quantized(model: nn.Module, sd: StateDict) -> dict:
    """Swap ``model``'s linears whose weights in ``sd`` are quantized GGUF tensors for :class:`GGUFLinear`;
    return ``sd`` with those weights as their raw bytes (what the swapped layers load)."""
    out = dict(sd)
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        t = sd.get(key)
        if not (type(module) is nn.Linear and isinstance(t, GGUFLazyTensor) and t.quantized):
            continue
        with torch.device("meta"):
            layer = GGUFLinear(module.in_features, module.out_features, module.bias is not None, t.type_name)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
        out[key] = LazyTensor((layer.weight.numel(),), torch.uint8, t.raw, t.origin)
    return out
