"""Putting a state dict into a module built on the meta device, one tensor at a time.

Models are constructed under ``torch.device("meta")`` (no memory), then every parameter and
buffer is read from its (usually memory-mapped) source, cast and moved to its device, and assigned.
Peak host memory is therefore one tensor, not a second copy of the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from sd35.errors import CheckpointError
from sd35.loading.tensors import StateDict, materialize, shape_of


def _describe(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(f"'{k}'" for k in keys[:limit]) + more


def load_weights(
    module: nn.Module,
    sd: StateDict,
    *,
    what: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Fill ``module`` (typically built on the meta device) from ``sd``, strictly.

    Every parameter/buffer must be present with the expected shape; keys the module does not have
    are an error unless they match one of the ``ignore`` regexes (for example CLIP's
    ``position_ids``). ``what`` names the source in messages, e.g. ``"MMDiT-X in sd3.5_medium.safetensors"``.
    Floating-point tensors are cast to ``dtype``; integer buffers keep theirs.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    expected = dict(module.named_parameters())
    expected.update(dict(module.named_buffers()))
    ignore_re = [re.compile(p) for p in ignore]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not any(r.fullmatch(k) for r in ignore_re)]
    if missing:
        raise CheckpointError(
            f"{what}: the weights lack {len(missing)} tensor(s) the model needs: {_describe(missing)}. "
            "The file is incomplete or of another model."
        )
    if unexpected:
        raise CheckpointError(
            f"{what}: the weights hold {len(unexpected)} tensor(s) this model does not use: {_describe(unexpected)}. "
            "The file is of another model variant."
        )
    for name, ref in expected.items():
        found = shape_of(sd[name])
        if found != tuple(ref.shape):
            raise CheckpointError(
                f"{what}: tensor '{name}' has shape {list(found)}, expected {list(ref.shape)}. "
                "The file does not fit this model's configuration."
            )
    for name, ref in expected.items():
        value = materialize(sd[name], dtype if ref.is_floating_point() else None, device)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    return module.eval()
