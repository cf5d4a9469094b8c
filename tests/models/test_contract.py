"""The layer contract (sd35.models.contract): LoRA treats any QuantizedLinear alike, fp8 is one of them.

A toy int8 layer stands in for a future format (GGUF): if LoRA works on it through the contract alone,
it needs nothing fp8-specific.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd35.lora
from sd35.accel.fp8 import DEFAULT_TARGETS as FP8_TARGETS
from sd35.accel.fp8 import Fp8Linear, quantize_model_fp8
from sd35.errors import SD35Error
from sd35.lora.adapters import LoRA
from sd35.lora.patching import (
    Patch,
    add_lora,
    attach,
    base_weight,
    detach,
    get_state,
    has_float_weight,
    is_target,
    weight_shape,
)
from sd35.models.contract import BLOCK_LINEARS, QuantizedLinear, lora_state, matches_suffix
from sd35.train.config import TrainConfig


class Int8Linear(QuantizedLinear):
    """int8 weight with one float scale per row: a quantized format LoRA has never heard of."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter((w / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias.to(x.dtype))


def _int8(seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear(nn.Linear(16, 8))


def test_quantized_linear_is_abstract():
    with pytest.raises(TypeError):
        QuantizedLinear()


def test_fp8_linear_is_a_quantized_linear():
    layer = Fp8Linear.from_linear(nn.Linear(32, 16), mode="dequant")
    assert isinstance(layer, QuantizedLinear)
    assert is_target(layer) and not has_float_weight(layer)
    assert weight_shape(layer) == (16, 32)
    assert torch.equal(base_weight(layer), layer.dequantized_weight().float())


def test_lora_sees_a_new_quantized_format_through_the_contract():
    layer = _int8()
    assert is_target(layer) and not has_float_weight(layer)  # the loader's "auto" picks runtime for it
    assert weight_shape(layer) == (8, 16)
    assert torch.equal(base_weight(layer), layer.dequantized_weight())

    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    x = torch.randn(3, 16, generator=g)
    before = layer(x)
    attach(layer, Patch("r", LoRA(up, down, alpha=1.0)), "runtime")
    expected = F.linear(x, layer.dequantized_weight() + 0.5 * up @ down, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    detach(layer, "r")
    assert torch.equal(layer(x), before)


def test_dora_on_a_quantized_layer_reads_the_dequantized_weight():
    model = nn.Sequential()
    model.add_module("mlp", nn.Module())
    model.mlp.fc1 = _int8()
    (down, up, magnitude) = add_lora(model, rank=2, targets=("mlp.fc1",), dora=True)
    norms = torch.linalg.vector_norm(model.mlp.fc1.dequantized_weight(), dim=0, keepdim=True)
    assert torch.equal(magnitude.detach(), norms)
    x = torch.randn(4, 16)
    torch.testing.assert_close(
        model.mlp.fc1(x), F.linear(x, model.mlp.fc1.dequantized_weight(), model.mlp.fc1.bias)
    )


def test_lora_state_is_what_the_patcher_keeps():
    layer = nn.Linear(4, 4)
    assert lora_state(layer) is None
    patch = Patch("r", LoRA(torch.zeros(4, 1), torch.zeros(1, 4)), 0.5)
    attach(layer, patch, "runtime")
    state = lora_state(layer)
    assert state is get_state(layer)
    assert [(p.name, p.adapter, p.strength) for p in state.runtime] == [("r", patch.adapter, 0.5)]
    detach(layer)
    assert lora_state(layer) is None


def test_fp8_refuses_a_layer_the_patcher_marked():
    model = nn.Module()
    model.joint_blocks = nn.ModuleList([nn.Module()])
    model.joint_blocks[0].mlp = nn.Module()
    model.joint_blocks[0].mlp.fc1 = nn.Linear(16, 16)
    attach(model.joint_blocks[0].mlp.fc1, Patch("r", LoRA(torch.zeros(16, 1), torch.zeros(1, 16))), "runtime")
    with pytest.raises(SD35Error, match="has a LoRA applied"):
        quantize_model_fp8(model, allow_fallback=True)


def test_one_definition_of_the_block_linears():
    assert sd35.lora.DEFAULT_TARGETS is BLOCK_LINEARS
    assert FP8_TARGETS is BLOCK_LINEARS
    assert TrainConfig().lora_targets == list(BLOCK_LINEARS)
    assert matches_suffix("joint_blocks.3.x_block.attn.qkv", BLOCK_LINEARS)
    assert not matches_suffix("joint_blocks.3.x_block.attn2.qkv", ("attn.qkv",))
    assert matches_suffix("attn.qkv", ("attn.qkv",))


@pytest.mark.parametrize("make", [_int8, lambda: Fp8Linear.from_linear(nn.Linear(32, 16), mode="dequant")])
def test_merging_into_a_quantized_layer_is_refused(make):
    """fp8 stores a float8 weight plus a scale: a merged delta added to the raw values would ignore the scale."""
    layer = make()
    up, down = torch.randn(layer.out_features, 2), torch.randn(2, layer.in_features)
    before = layer.weight.detach().clone()
    with pytest.raises(SD35Error, match="quantized layer"):
        attach(layer, Patch("m", LoRA(up, down, alpha=2.0)), "merge")
    assert torch.equal(layer.weight.detach().view(torch.uint8), before.view(torch.uint8))
    assert get_state(layer) is None
