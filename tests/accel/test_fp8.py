"""fp8 linear layers: quantization error, the two matmul paths, model replacement and state-dict keys.

On this CPU build ``torch._scaled_mm`` exists, so its arithmetic (scales, layouts) is checked against
a float reference; that is a check of the formula, not of the CUDA fp8 kernels' speed or availability.
The bounds are measured values with some margin (random weights, std-normal inputs).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sd35.accel.fp8 import (
    DEFAULT_TARGETS,
    E4M3,
    Fp8Linear,
    fp8_layer_names,
    fp8_supported,
    quantize_activation,
    quantize_model_fp8,
    quantize_weight,
    scaled_fp8_state_dict,
)
from sd35.errors import SD35Error, SD35Warning
from sd35.loading.components import load_component, scan_file
from sd35.loading.safetensors_io import save_file_atomic
from sd35.lora import load_lora
from sd35.models.mmditx import MMDiTX
from sd35.models.modulation import fused_cache
from tests.accel.accel_helpers import inputs, make_model
from tests.helpers import rel_err


def _cpu_scaled_mm() -> bool:
    a = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_scaled_mm = pytest.mark.skipif(
    not _cpu_scaled_mm(), reason="this PyTorch build has no CPU _scaled_mm"
)


def _quantized(granularity: str = "tensor", **kw) -> tuple[MMDiTX, list[str]]:
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SD35Warning)
        names = quantize_model_fp8(model, granularity=granularity, allow_fallback=True, **kw)
    return model, names


def _set_mode(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.set_mode(mode)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_weight_quantization_error(granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * 0.05
    w[3] *= 20  # one loud row: per-row scales keep the other rows' precision
    q, scale = quantize_weight(w, granularity)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == (() if granularity == "tensor" else (256, 1))
    back = q.float() * scale
    assert (back.abs() <= w.abs().amax() * (1 + 2**-4)).all()
    # e4m3 keeps 3 mantissa bits: at most 2**-4 relative error per normal value
    normal = w.abs() > (scale * 2**-6)
    assert ((back - w).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-12).all()
    quiet = torch.ones(256, dtype=torch.bool)
    quiet[3] = False
    err = ((back - w)[quiet].norm() / w[quiet].norm()).item()
    assert err < (0.03 if granularity == "row" else 0.2)


def test_zero_weight_and_activation():
    q, s = quantize_weight(torch.zeros(4, 16))
    assert s.item() > 0 and torch.equal(q.float(), torch.zeros(4, 16))
    xq, xs = quantize_activation(torch.zeros(3, 16), "row")
    assert (xs > 0).all() and torch.equal(xq.float(), torch.zeros(3, 16))


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_dequant_path_is_a_matmul_with_the_dequantized_weight(granularity):
    lin = torch.nn.Linear(128, 96)
    layer = Fp8Linear.from_linear(lin, granularity, mode="dequant")
    x = torch.randn(2, 5, 128)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(torch.float32), layer.bias.float()))
    assert rel_err(layer(x), lin(x)) < 0.06
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@needs_cpu_scaled_mm
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_scaled_mm_arithmetic(granularity):
    lin = torch.nn.Linear(128, 96)
    layer = Fp8Linear.from_linear(lin, granularity, mode="scaled_mm")
    x = torch.randn(2, 5, 128)
    out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32
    xq, xs = quantize_activation(x.reshape(10, 128), granularity)
    w = layer.weight.float() * layer.scale_weight
    ref = (xq.float() * xs) @ w.t() + layer.bias
    assert rel_err(out.reshape(10, 96), ref) < 2**-7  # the bf16 output rounding
    # against the dequant path only the activation quantization differs
    dequant = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert rel_err(out, dequant) < 0.05


def test_auto_mode_on_cpu_dequantizes():
    assert not fp8_supported("cpu") and not fp8_supported("cpu", "row")
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 32))
    assert layer.backend == "dequant"
    with pytest.raises(SD35Error, match="mode"):
        layer.set_mode("fast")


def test_quantize_model_refuses_slow_devices_unless_asked():
    model = make_model()
    with pytest.raises(SD35Error, match="compute capability"):
        quantize_model_fp8(model)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())  # untouched
    with pytest.warns(SD35Warning, match="dequantizes"):
        quantize_model_fp8(model, allow_fallback=True)


def test_replaced_layers_and_state_dict_keys():
    plain = make_model()
    keys = set(plain.state_dict())
    model, names = _quantized()
    n_blocks = model.config.depth
    # per block: x stream qkv, proj, fc1, fc2 (+ attn2 qkv, proj in blocks 0-1); context the same but the
    # pre-only last block has qkv only
    assert len(names) == n_blocks * 4 + 2 * 2 + (n_blocks - 1) * 4 + 1
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in names)
    for kept in ("x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "final_layer.linear"):
        assert type(model.get_submodule(kept)) is not Fp8Linear
    assert all(type(lin) is torch.nn.Linear for lin in model.modulation_layers())
    sd = model.state_dict()
    assert set(sd) == keys | {n + ".scale_weight" for n in names}
    assert sd["joint_blocks.0.x_block.attn.qkv.weight"].dtype == E4M3
    assert sd["joint_blocks.0.x_block.attn.qkv.bias"].dtype == torch.float32


def test_targets_and_skip():
    model = make_model()
    names = fp8_layer_names(model, skip=("*.context_block.*", "joint_blocks.0.*"))
    assert names and all(".x_block." in n and not n.startswith("joint_blocks.0.") for n in names)
    assert fp8_layer_names(model, targets=("mlp.fc1",)) == [
        f"joint_blocks.{i}.{s}.mlp.fc1" for i in range(3) for s in ("context_block", "x_block")
    ] + ["joint_blocks.3.x_block.mlp.fc1"]
    assert set(DEFAULT_TARGETS) >= {"attn.qkv", "mlp.fc2", "attn2.proj"}
    with pytest.raises(SD35Error, match="no linear layer"):
        quantize_model_fp8(model, targets=("nothing",), allow_fallback=True)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_model_output_error_is_bounded(granularity):
    ref_model = make_model()
    args = inputs(ref_model.config)
    model, _ = _quantized(granularity)
    with torch.no_grad():
        ref = ref_model(*args)
        bf16 = make_model(dtype=torch.bfloat16)(*args)
        fp8 = model(*args)
        assert fused_cache(model).builds == 1  # adaLN stays high precision, so stays fused
    # measured: bf16 0.009, fp8 weights 0.026-0.029 (max error over max value)
    assert rel_err(bf16, ref) < 0.02
    assert rel_err(fp8, ref) < 0.06
    assert rel_err(fp8, ref) > rel_err(bf16, ref)  # it is quantized


@needs_cpu_scaled_mm
def test_model_output_error_with_scaled_mm():
    ref_model = make_model()
    args = inputs(ref_model.config)
    model, _ = _quantized()
    _set_mode(model, "scaled_mm")
    with torch.no_grad():
        assert rel_err(model(*args), ref_model(*args)) < 0.08  # measured 0.036-0.039


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_float_state_dict_loads_into_quantized_model(granularity):
    model, names = _quantized(granularity)
    fresh = make_model()
    missing, unexpected = model.load_state_dict(fresh.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    model.load_state_dict(fresh.state_dict())  # strict too: scale_weight may be missing
    again, _ = _quantized(granularity)
    for k, v in again.state_dict().items():
        assert torch.equal(model.state_dict()[k].float(), v.float()), k
    with pytest.raises(RuntimeError, match="size mismatch"):
        bad = fresh.state_dict()
        bad[names[0] + ".weight"] = torch.zeros(3, 3)
        model.load_state_dict(bad)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_scaled_fp8_file_reads_back_through_the_loader(tmp_path, granularity):
    model, _ = _quantized(granularity)
    path = save_file_atomic(
        scaled_fp8_state_dict(model, "model.diffusion_model."), tmp_path / "q.safetensors"
    )
    (component,) = scan_file(path)
    assert any("fp8 scaled" in n for n in component.notes)
    plain = load_component(component).eval()
    args = inputs(model.config)
    with torch.no_grad():
        assert rel_err(plain(*args), model(*args)) <= 1e-5  # the same weights, dequantized as they load


def test_casting_the_model_keeps_fp8_weights():
    model, names = _quantized()
    layer = model.get_submodule(names[0])
    before = layer.weight.detach().clone()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == E4M3 and layer.scale_weight.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))
    assert layer.bias.dtype == torch.bfloat16
    args = inputs(model.config)
    with torch.no_grad():
        assert model(*args).dtype == torch.float32


def test_runtime_lora_on_fp8_layers():
    model, names = _quantized()
    ref = make_model()
    for name in names:  # the reference holds the same (dequantized) numbers in float
        ref.get_submodule(name).weight.data.copy_(model.get_submodule(name).dequantized_weight(torch.float32))
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name in names[:3]:
        key = "lora_unet_" + name.replace(".", "_")
        lin = ref.get_submodule(name)
        sd[f"{key}.lora_down.weight"] = torch.randn(2, lin.in_features, generator=g) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, 2, generator=g) * 0.2
    report = load_lora({"mmditx": model}, sd, name="l")
    assert report.modes == {"runtime": 3}  # fp8 weights cannot be merged into
    load_lora({"mmditx": ref}, sd, name="l", mode="merge")
    args = inputs(model.config)
    with torch.no_grad():
        assert rel_err(model(*args), ref(*args)) <= 1e-5


def test_layers_with_loras_are_refused():
    model = make_model()
    name = "joint_blocks.0.x_block.mlp.fc1"
    lin = model.get_submodule(name)
    key = "lora_unet_" + name.replace(".", "_")
    sd = {
        f"{key}.lora_down.weight": torch.randn(2, lin.in_features),
        f"{key}.lora_up.weight": torch.randn(lin.out_features, 2),
    }
    load_lora({"mmditx": model}, sd, name="l")
    with pytest.raises(SD35Error, match="unload LoRAs"):
        quantize_model_fp8(model, allow_fallback=True)
