"""Which device and dtype a run uses: the one place that turns ``--device`` into a ``torch.device``.

A device the machine does not have is a user mistake, reported in one line before any weight is read
(``torch.device("cuda")`` itself succeeds on a machine without CUDA; the failure would come much later,
as a traceback from deep inside a copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sd35.errors import InvalidRequest, Unsupported

DEVICE_TYPES = ("cuda", "mps", "cpu")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def best_device(allowed: Sequence[str] = DEVICE_TYPES) -> torch.device:
    """CUDA if present, else MPS (Apple GPUs), else the CPU, among the ``allowed`` device types."""
    if "cuda" in allowed and torch.cuda.is_available():
        return torch.device("cuda")
    if "mps" in allowed and _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(
    name: str | torch.device | None, allowed: Sequence[str] = DEVICE_TYPES, *, param: str = "device"
) -> torch.device:
    """The device called ``name`` (None: :func:`best_device`), checked to exist on this machine.

    ``allowed`` restricts the device types a caller supports (the trainer and the benchmark run on
    cuda or cpu); the error names the choices.
    """
    if name is None:
        return best_device(allowed)
    choices = ", ".join(t + (", cuda:N" if t == "cuda" else "") for t in allowed)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"{name!r} is not a device name; use one of {choices}.", param=param) from None
    if device.type not in allowed:
        raise InvalidRequest(f"device {name!r} is not supported here; use one of {choices}.", param=param)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "is built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
            raise Unsupported(
                f"device {name!r}: this machine's torch {torch.__version__} {build}; use cpu.", param=param
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise Unsupported(
                f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.",
                param=param,
            )
    if device.type == "mps" and not _mps_available():
        raise Unsupported(f"device {name!r}: no Apple GPU (MPS) is available here; use cpu.", param=param)
    if device.type == "cpu" and device.index not in (None, 0):
        raise InvalidRequest(f"device {name!r}: there is one CPU device; use cpu.", param=param)
    return device


def resolve_dtype(
    name: str | torch.dtype | None, device: torch.device, *, param: str = "dtype"
) -> torch.dtype:
    """The dtype called ``name`` (fp32, fp16, bf16); None: :func:`default_dtype` for ``device``."""
    if name is None:
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InvalidRequest(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.", param=param)
    return DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the models' official dtype), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16
