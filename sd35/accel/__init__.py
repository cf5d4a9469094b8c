"""Opt-in accelerations of the MMDiT-X transformer, each giving the plain path's result within tolerance.

- :func:`compile_blocks`: ``torch.compile`` of each joint block in place (three graph variants, small
  compile time, state-dict keys unchanged): ``compile_blocks(pipe.mmditx, dynamic=False)``.
- :class:`GraphedDenoiser`: the model call captured as a CUDA graph per (shapes, dtypes, skip_layers),
  used in place of the model: ``flow_denoiser(GraphedDenoiser(pipe.mmditx))``. CUDA only.
- :func:`quantize_model_fp8` / :class:`Fp8Linear`: e4m3 weights and ``torch._scaled_mm`` on GPUs of compute
  capability 8.9+: ``quantize_model_fp8(pipe.mmditx)`` after the model is on its GPU.

They compose in one order, written once in :mod:`sd35.accel.apply`: its ``accelerate`` applies them, after
its ``check_accelerations`` has refused what the device or memory mode cannot run (that module is not
imported here: it imports the others). Compile modes that bring their own CUDA graphs
(``"reduce-overhead"``, ``"max-autotune"``) must not be combined with :class:`GraphedDenoiser` (graphs
cannot be captured inside a capture); use ``mode=None`` or ``"max-autotune-no-cudagraphs"`` with it.

The model never imports this package: it sits above :mod:`sd35.models` and takes what it shares with the
model from there (the fused adaLN cache of :mod:`sd35.models.modulation`, which is part of the model and on
by default, and the layer contract of :mod:`sd35.models.contract`: fp8 layers are
:class:`~sd35.models.contract.QuantizedLinear`). Nor does it import :mod:`sd35.lora`: it sees a LoRA-patched
layer through :func:`sd35.models.contract.lora_state`. The helpers find blocks and layers by their module
names.
"""

from sd35.accel.compile import compile_blocks, compiled_blocks, uncompile_blocks
from sd35.accel.cuda_graphs import GraphCache, GraphedDenoiser, ModelSnapshot, graph_key, model_fingerprint
from sd35.accel.fp8 import (
    Fp8Linear,
    fp8_layer_names,
    fp8_supported,
    quantize_model_fp8,
    scaled_fp8_state_dict,
)

__all__ = [
    "Fp8Linear",
    "GraphCache",
    "GraphedDenoiser",
    "ModelSnapshot",
    "compile_blocks",
    "compiled_blocks",
    "fp8_layer_names",
    "fp8_supported",
    "graph_key",
    "model_fingerprint",
    "quantize_model_fp8",
    "scaled_fp8_state_dict",
    "uncompile_blocks",
]
