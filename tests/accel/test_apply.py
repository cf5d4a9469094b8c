"""sd35.accel.apply: the fast paths are applied in one order, once each, and impossible ones refused early."""

from __future__ import annotations

import pytest
import torch

import sd35.accel.apply as apply
from sd35.errors import InvalidRequest, SD35Error, Unsupported

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags,memory,kind,param,says",
    [
        ({"fp8": True}, "high", Unsupported, "fp8", "fp8 needs a CUDA GPU"),
        ({"cuda_graphs": True}, "high", Unsupported, "cuda_graphs", "cuda_graphs needs a CUDA GPU"),
        (
            {"fp8": True, "cuda_graphs": True},
            "high",
            Unsupported,
            "fp8",
            "fp8 and cuda_graphs need a CUDA GPU",
        ),
        (
            {"compile": True},
            "low",
            InvalidRequest,
            "memory",
            "do not work with the low memory",
        ),
    ],
)
def test_impossible_combinations_are_refused(flags, memory, kind, param, says):
    with pytest.raises(kind, match=says) as info:
        apply.check_accelerations(CPU, memory, **flags)
    assert isinstance(info.value, SD35Error) and info.value.param == param


def test_possible_combinations_pass():
    apply.check_accelerations(CPU, "balanced", compile=True)  # inductor's C++ backend on the CPU
    apply.check_accelerations(torch.device("cuda"), "high", fp8=True, compile=True, cuda_graphs=True)


def test_order_is_quantize_compile_graph_and_each_applies_once(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(apply, "quantize_model_fp8", lambda m: calls.append("fp8"))
    monkeypatch.setattr(
        apply, "compile_blocks", lambda m, dynamic: calls.append(f"compile dynamic={dynamic}")
    )

    class FakeGraphs:
        def __init__(self, model):
            calls.append("cuda_graphs")
            self.model = model

    monkeypatch.setattr(apply, "GraphedDenoiser", FakeGraphs)
    model = torch.nn.Linear(2, 2)
    runner, applied = apply.accelerate(model, cuda_graphs=True, compile=True, fp8=True)
    assert calls == ["fp8", "compile dynamic=False", "cuda_graphs"] and applied == list(apply.ACCELERATIONS)
    assert isinstance(runner, FakeGraphs) and runner.model is model

    calls.clear()
    again, same = apply.accelerate(model, fp8=True, compile=True, cuda_graphs=True, applied=applied)
    assert calls == [] and again is model and same is applied  # nothing twice; the earlier runner stays


def test_the_record_stays_true_when_a_later_step_fails(monkeypatch):
    monkeypatch.setattr(apply, "quantize_model_fp8", lambda m: None)

    def broken(m, dynamic):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(apply, "compile_blocks", broken)
    applied: list[str] = []
    with pytest.raises(RuntimeError):
        apply.accelerate(torch.nn.Linear(2, 2), fp8=True, compile=True, applied=applied)
    assert applied == ["fp8"]  # the model is quantized: a retry must not quantize it again
