"""The one order in which the MMDiT-X fast paths compose, and the combinations that cannot run.

Quantize to fp8 first, so that compilation traces the layers that will run; then compile the joint blocks;
then wrap the model in the CUDA-graph runner, the outermost layer, since a capture records the kernels one
whole call launches (compiled ones included). :func:`accelerate` applies them in that order;
:func:`check_accelerations` refuses, before any work, what cannot run on a device or in a memory mode.
``SD3Pipeline.accelerate`` and ``sd35 bench`` both go through these two functions, so the rule and its
refusals are written once.
"""

from __future__ import annotations

import torch
from torch import nn

from sd35.accel.compile import compile_blocks
from sd35.accel.cuda_graphs import GraphedDenoiser
from sd35.accel.fp8 import quantize_model_fp8
from sd35.errors import InvalidRequest, Unsupported

ACCELERATIONS = ("fp8", "compile", "cuda_graphs")  # in the order they are applied


def check_accelerations(
    device: torch.device,
    memory: str,
    *,
    fp8: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> None:
    """Refuse fast paths that cannot run with this device or memory mode (callers check before loading).

    fp8 and CUDA graphs are GPU paths (:class:`Unsupported` elsewhere): fp8 matmuls and graph capture exist
    only there. Compiling runs on the CPU too (inductor's C++ backend): at SD3.5 Medium's full width it makes
    a 512 px CPU step about 6% faster (benchmarks/RESULTS.md, "CPU speed"), after a first call that compiles
    for tens of seconds to minutes (the demo model's 20 steps ran no slower compiled than eager on
    2026-12-05, so it is not refused there either). Compiling and graphs cannot see through the
    hooks that ``memory="low"`` block streaming runs around every block (:class:`InvalidRequest`). Whether
    a GPU has fp8 kernels (compute capability 8.9+) is left to :func:`quantize_model_fp8`. Messages name the
    options by their request names (``fp8``), never by one front end's flags.
    """
    gpu_only = {"fp8": fp8, "cuda_graphs": cuda_graphs}
    wanted = [name for name, on in gpu_only.items() if on]
    if wanted and device.type != "cuda":
        raise Unsupported(
            f"{' and '.join(wanted)} need{'s' if len(wanted) == 1 else ''} a CUDA GPU, but this run uses {device}; "
            "leave them out.",
            param=wanted[0],
        )
    if (compile or cuda_graphs) and memory == "low":
        raise InvalidRequest(
            "compile and cuda_graphs do not work with the low memory mode (its block streaming runs hooks "
            "around every block); use memory balanced or high.",
            param="memory",
        )


def accelerate(
    mmditx: nn.Module,
    *,
    fp8: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
    applied: list[str] | None = None,
) -> tuple[nn.Module | GraphedDenoiser, list[str]]:
    """Apply the requested fast paths to ``mmditx`` in place, in :data:`ACCELERATIONS` order.

    ``fp8``: e4m3 weights with per-tensor scales in the joint blocks' big linears (compute capability 8.9+,
    else :class:`sd35.errors.SD35Error`). ``compile``: ``torch.compile`` per joint block, one static graph
    per input size (``dynamic=False``), as a sampler at one resolution runs. ``cuda_graphs``: a
    :class:`GraphedDenoiser` around the model.

    ``applied`` lists the names applied by earlier calls (they are not applied twice) and is extended in
    place as each step succeeds: the model changes in place, so the record must stay true when a later
    step fails. Returns what to call in place of the model (a new :class:`GraphedDenoiser` when
    ``cuda_graphs`` is applied now, else ``mmditx`` itself) and ``applied``. Call
    :func:`check_accelerations` first: this function assumes the device can run what it is asked for.
    """
    names = [] if applied is None else applied
    runner: nn.Module | GraphedDenoiser = mmditx
    if fp8 and "fp8" not in names:
        quantize_model_fp8(mmditx)
        names.append("fp8")
    if compile and "compile" not in names:
        compile_blocks(mmditx, dynamic=False)
        names.append("compile")
    if cuda_graphs and "cuda_graphs" not in names:
        runner = GraphedDenoiser(mmditx)
        names.append("cuda_graphs")
    return runner, names
