"""The layer contract: what the model, LoRA, fp8 and the fused adaLN path agree on about a layer.

Several packages act on the same linear layers without importing one another: :mod:`sd35.lora` patches
them (merged into the weight, or through a forward hook), :mod:`sd35.accel.fp8` replaces them by quantized
layers, :mod:`sd35.models.modulation` bypasses the adaLN ones with one stacked matmul, and
:mod:`sd35.accel.cuda_graphs` bakes them into a captured graph. Each must recognise what the others did to
a layer. The facts they share live here, one definition each, below all of them: this module imports
nothing of sd35, so every package may import it without an import circle.

- :data:`BLOCK_LINEARS`: which layers are the joint blocks' big matrices (LoRA's and fp8's default targets).
- :data:`LORA_STATE_ATTR` / :func:`lora_state`: where a LoRA-patched layer keeps its state, so code that
  must not import :mod:`sd35.lora` can still see that a layer is patched.
- :class:`QuantizedLinear`: what a linear layer with a non-float weight (fp8 now, GGUF later) must offer so
  that LoRA, DoRA included, applies to it without knowing its format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

BLOCK_LINEARS: tuple[str, ...] = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
"""Module-name suffixes of the joint blocks' attention and MLP matrices, both streams, attn2 included.

They hold almost all parameters and FLOPs of MMDiT-X, so they are the default targets of both LoRA
(:func:`sd35.lora.add_lora`, ``sd35 train``'s ``lora_targets``) and fp8 quantization
(:func:`sd35.accel.quantize_model_fp8`); adaLN, embedders and the final layer are left out of both. A suffix
matches a full module name equal to it or ending with ``"." + suffix`` (``"attn.qkv"`` matches
``joint_blocks.3.x_block.attn.qkv`` but not ``...attn2.qkv``).
"""

LORA_STATE_ATTR = "_sd35_lora"
"""The key in ``module.__dict__`` under which :mod:`sd35.lora` keeps a patched layer's state.

It is a plain attribute, outside the state dict, so checkpoints never see it. Code below the LoRA package
reads it to notice a patched layer without importing :mod:`sd35.lora`: the fused adaLN path must not bypass a
layer with a runtime LoRA, a CUDA graph must be recaptured when runtime patches change, fp8 quantization
refuses a patched layer. What they may read of the state is :class:`LoRAStateView`.
"""


def matches_suffix(name: str, suffixes: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``suffixes`` or ends with ``"." + suffix`` (see :data:`BLOCK_LINEARS`)."""
    return any(name == t or name.endswith("." + t) for t in suffixes)


class RuntimePatchView(Protocol):
    """What code outside :mod:`sd35.lora` may read of one runtime patch (:class:`sd35.lora.patching.Patch`)."""

    name: str
    adapter: object
    strength: float


class LoRAStateView(Protocol):
    """What code outside :mod:`sd35.lora` may read of a patched layer's state (:class:`sd35.lora.patching.LoRAState`).

    ``runtime``: the patches applied through the layer's forward hook (empty when all are merged).
    """

    runtime: Sequence[RuntimePatchView]


def lora_state(module: nn.Module) -> LoRAStateView | None:
    """The LoRA state of ``module``, or None if no LoRA is applied to it (read from ``__dict__``: no ``__getattr__``)."""
    return module.__dict__.get(LORA_STATE_ATTR)


class QuantizedLinear(nn.Module, ABC):
    """A linear layer that stores its weight in a form other than a float matrix (fp8 now, GGUF later).

    Why a base class: LoRA applies to any linear layer without knowing how it stores its weight. It cannot
    merge into such a weight (:func:`sd35.lora.load_lora` then adds the change at runtime through a forward
    hook), it needs the layer's shape to build trainable adapters, and DoRA needs the base weight as floats.
    This class is what it asks for; :class:`sd35.accel.fp8.Fp8Linear` implements it, and so must any new
    quantized format. The fused adaLN path never fuses one (it fuses plain ``nn.Linear`` only).

    A subclass provides:

    - ``in_features``, ``out_features``: the shape of the linear map (the stored tensors' shapes may differ,
      e.g. packed blocks);
    - ``weight``: the stored tensor (any dtype and shape; its device is the layer's; LoRA never writes it)
      and ``bias``: a float tensor [out_features] or None;
    - :meth:`dequantized_weight` and :meth:`forward`, below.
    """

    in_features: int
    out_features: int

    @abstractmethod
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float [out_features, in_features] matrix in ``dtype``.

        None means the dtype the layer computes in (the subclass says which). Gradients need not flow.
        """

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in_features] to [..., out_features], in ``x``'s dtype.

        The result approximates ``F.linear(x, self.dequantized_weight(x.dtype), self.bias)`` (exactly or up
        to the format's own rounding, e.g. fp8 activations), so LoRA's runtime change, computed against
        :meth:`dequantized_weight`, adds to it as it would to the float layer.
        """


__all__ = [
    "BLOCK_LINEARS",
    "LORA_STATE_ATTR",
    "LoRAStateView",
    "QuantizedLinear",
    "RuntimePatchView",
    "lora_state",
    "matches_suffix",
]
