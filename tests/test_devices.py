"""The one device resolver: a device the machine lacks is refused in one line, before any weight is read."""

from __future__ import annotations

import pytest
import torch

from sd35.devices import best_device, default_dtype, resolve_device, resolve_dtype
from sd35.errors import InvalidRequest, Unsupported


def test_names_that_are_not_devices():
    for name in ("gpu0", "cuda:x", ""):
        with pytest.raises(InvalidRequest, match="not a device name") as e:
            resolve_device(name)
        assert e.value.param == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_unsupported():
    with pytest.raises(Unsupported, match="use cpu") as e:
        resolve_device("cuda:1")
    assert e.value.param == "device"


def test_device_types_a_caller_does_not_run_on():
    with pytest.raises(InvalidRequest, match="use one of cuda, cuda:N, cpu"):
        resolve_device("mps", allowed=("cuda", "cpu"))
    with pytest.raises(InvalidRequest, match="one CPU device"):
        resolve_device("cpu:1")


def test_cpu_and_the_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == best_device()
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == default_dtype(cpu) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(InvalidRequest, match="fp32, fp16, bf16"):
        resolve_dtype("float8", cpu)
