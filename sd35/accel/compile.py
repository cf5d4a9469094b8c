"""``torch.compile`` per joint block ("regional" compilation).

Compiling the 24 joint blocks one by one instead of the whole model keeps compile time small: every
block runs the same code, so dynamo traces one graph per block *variant* and reuses it for every block
of that kind. MMDiT-X has three: blocks with the second self-attention (``attn2``), blocks without it,
and the last block whose context stream is ``pre_only``. The embedders, the fused adaLN product and the
final layer stay eager; they are a handful of kernels per step.

The blocks are compiled in place with :meth:`torch.nn.Module.compile`, which swaps the module's call
for a compiled one and leaves the module tree alone: parameter names and ``state_dict()`` keys are
unchanged (no ``_orig_mod.`` prefix), so loading, LoRA and saving work on a compiled model as before.
Forward hooks inside a block (runtime LoRAs) are part of what is compiled. Dynamo's default is not to
guard on hooks, which would keep running a stale graph after a LoRA is loaded or unloaded;
:func:`compile_blocks` turns those guards on (``guard_hooks``), so such a change recompiles instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sd35.errors import SD35Error


def _joint_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "joint_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise SD35Error("compile_blocks needs an MMDiT-X model (one with joint_blocks).")
    return blocks


def _set_recompile_limit(limit: int) -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(int(getattr(cfg, name)), limit))


def compile_blocks(
    model: nn.Module,
    *,
    mode: str | None = None,
    backend: str = "inductor",
    dynamic: bool | None = None,
    fullgraph: bool = False,
    options: dict[str, Any] | None = None,
    recompile_limit: int | None = 64,
    guard_hooks: bool = True,
) -> int:
    """Compile each of ``model.joint_blocks`` in place; returns how many blocks were compiled.

    ``mode``, ``backend``, ``dynamic``, ``fullgraph`` and ``options`` go to :func:`torch.compile`
    (``mode`` and ``options`` are exclusive there). ``backend="eager"`` or ``"aot_eager"`` only
    traces (fast, for tests); ``"inductor"`` generates kernels (on the CPU it needs a C++ compiler).
    ``dynamic=None`` is PyTorch's default: a static graph for the first size, one with symbolic sizes
    after a size change; pass False to keep one static graph per size (what CUDA graphs want).

    Every variant, size and batch is one entry in dynamo's cache for the shared block code, whose
    default limit (8) a few resolutions with and without SLG already reach; past it the blocks would
    silently run eager. ``recompile_limit`` raises that process-wide limit to at least this value (None
    leaves it).

    ``guard_hooks`` (default True) sets dynamo's process-wide ``skip_nnmodule_hook_guards`` to False.
    PyTorch's default skips those guards: a hook added or removed after compiling (loading or unloading
    a runtime LoRA) would then be silently ignored and the first compiled version kept running. With the
    guards, such a change recompiles the blocks it touches.
    """
    if mode is not None and options is not None:
        raise SD35Error("compile_blocks: give either mode or options, not both (torch.compile takes one).")
    blocks = _joint_blocks(model)
    if recompile_limit is not None:
        _set_recompile_limit(recompile_limit)
    if guard_hooks:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def compiled_blocks(model: nn.Module) -> list[int]:
    """Indices of the joint blocks that currently run compiled."""
    return [
        i
        for i, block in enumerate(_joint_blocks(model))
        if getattr(block, "_compiled_call_impl", None) is not None
    ]


def uncompile_blocks(model: nn.Module) -> int:
    """Return every joint block to eager execution; returns how many were compiled."""
    n = 0
    for block in _joint_blocks(model):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
            n += 1
    return n
