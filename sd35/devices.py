"""Which device and dtype a run uses: the one place that turns ``--device`` into a ``torch.device``.

A device the machine does not have is a user mistake, reported in one line before any weight is read
(``torch.device("cuda")`` itself succeeds on a machine without CUDA; the failure would come much later,
as a traceback from deep inside a copy).
"""

from __future__ import annotations

import os
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


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX-BF16 or AVX512_BF16), as torch's kernels see it.

    With them a bf16 matmul runs several times faster than fp32 (measured: 1.9 against 0.32 TF/s on
    2 cores of a Xeon with AMX, 2.8x for a whole MMDiT-X step); without them torch emulates bf16 by
    converting to fp32 and back, slower than fp32 itself.
    """
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


CPU_DTYPE_ENV = "SD35_CPU_DTYPE"


def default_dtype(device: torch.device, *, cpu_bf16: bool | None = None) -> torch.dtype:
    """bf16 on GPUs (the models' official dtype); on the CPU bf16 where it computes bf16 natively
    (:func:`cpu_computes_bf16`; ``cpu_bf16`` forces the answer), fp32 elsewhere.

    The environment variable ``SD35_CPU_DTYPE`` (fp32 or bf16) sets the CPU's default instead: for
    fp32 images on every machine (the test suite's expected values) without passing ``--dtype`` each time.
    The sampler's arithmetic (sigmas, the latent update, guidance) and the qk-norm statistics stay fp32
    whatever the model dtype, and so do the text encoders by default (:func:`text_encoder_dtype`).
    """
    if device.type != "cpu":
        return torch.bfloat16
    forced = os.environ.get(CPU_DTYPE_ENV)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise InvalidRequest(
                f"{CPU_DTYPE_ENV}={forced!r} is not a CPU dtype; set fp32 or bf16, or unset it.",
                param=CPU_DTYPE_ENV,
            )
        return DTYPES[forced]
    native = cpu_computes_bf16() if cpu_bf16 is None else cpu_bf16
    return torch.bfloat16 if native else torch.float32


def text_encoder_dtype(
    requested: str | torch.dtype | None, device: torch.device, dtype: torch.dtype
) -> torch.dtype:
    """The text encoders' dtype for a pipeline whose other models run in ``dtype``.

    The one that was ``requested`` (``--dtype``) applies to all models. The CPU's bf16 default keeps the
    text encoders in fp32: they run once per prompt, not once per step, so bf16 saves little there,
    while their rounding reaches every step (demo model: 32.7 dB PSNR against fp32 with bf16 text
    encoders, 41.9 dB and up with only the MMDiT-X and the VAE in bf16).
    """
    if requested is None and device.type == "cpu":
        return torch.float32
    return dtype
