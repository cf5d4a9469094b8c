"""Opt-in accelerations of the MMDiT-X transformer, each giving the plain path's result within tolerance.

- :mod:`sd35.accel.modulation`: every adaLN modulation in one matmul. On by default in
  :class:`sd35.models.mmditx.MMDiTX` (exact up to summation order; ``mmditx.fused_modulation = False``
  saves its second copy of the adaLN weights, 1.5 GB in bf16 for SD3.5 Medium).
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

This package does not import :mod:`sd35.models` at import time (the model imports
:mod:`sd35.accel.modulation`); the helpers find blocks and layers by their module names.
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
from sd35.accel.modulation import FusedLinears, refresh

__all__ = [
    "Fp8Linear",
    "FusedLinears",
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
    "refresh",
    "scaled_fp8_state_dict",
    "uncompile_blocks",
]
