"""The CPU's default dtype: bf16 where the CPU has bf16 instructions (text encoders fp32), fp32 elsewhere;
and what bf16 costs in precision, per component and for a whole demo image (tolerances stated per test)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35 import devices
from sd35.demo import load_demo_pipeline
from sd35.devices import CPU_DTYPE_ENV, cpu_computes_bf16, default_dtype, text_encoder_dtype
from sd35.errors import InvalidRequest
from tests.helpers import pixels

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def unpinned(monkeypatch):
    """The CPU default as a user gets it: without the suite's fp32 pin (tests/conftest.py)."""
    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)


@pytest.mark.usefixtures("unpinned")
def test_the_choice_forced_on_and_off(monkeypatch):
    assert default_dtype(CPU, cpu_bf16=True) == torch.bfloat16
    assert default_dtype(CPU, cpu_bf16=False) == torch.float32
    assert default_dtype(torch.device("cuda"), cpu_bf16=False) == torch.bfloat16  # GPUs: bf16 regardless
    monkeypatch.setenv(CPU_DTYPE_ENV, "fp32")
    assert default_dtype(CPU, cpu_bf16=True) == torch.float32
    monkeypatch.setenv(CPU_DTYPE_ENV, "bf16")
    assert default_dtype(CPU, cpu_bf16=False) == torch.bfloat16
    monkeypatch.setenv(CPU_DTYPE_ENV, "fp16")
    with pytest.raises(InvalidRequest, match="SD35_CPU_DTYPE='fp16' is not a CPU dtype; set fp32 or bf16"):
        default_dtype(CPU)


def test_detection_agrees_with_the_cpu_flags():
    """On Linux the kernel lists the CPU's features: bf16 instructions are AMX-BF16 or AVX512_BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_computes_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})


def test_text_encoders_stay_fp32_only_under_the_cpu_default():
    bf16 = torch.bfloat16
    assert text_encoder_dtype(None, CPU, bf16) == torch.float32
    assert text_encoder_dtype("bf16", CPU, bf16) == bf16  # asked for: every model
    assert text_encoder_dtype(None, torch.device("cuda"), bf16) == bf16


@pytest.mark.usefixtures("unpinned")
@pytest.mark.parametrize("native", [True, False])
def test_a_pipeline_loads_in_the_chosen_dtypes(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: native)
    pipe = load_demo_pipeline()
    model = torch.bfloat16 if native else torch.float32
    assert pipe.mmditx.dtype == model
    assert {p.dtype for p in pipe.vae.parameters()} == {model}
    assert {p.dtype for p in pipe.text.parameters()} == {torch.float32}


@pytest.fixture(scope="module")
def demo_fp32():
    return load_demo_pipeline(dtype="fp32")


def _bf16(module):
    return copy.deepcopy(module).to(torch.bfloat16)


def _rms_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over the RMS of ``expected``, in float32."""
    a, e = actual.float(), expected.float()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item()


def test_each_component_in_bf16_against_fp32(demo_fp32):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value). Measured on the trained
    demo model: MMDiT-X 0.8%, VAE decode 1.9%, text context 1.3%, pooled 0.5% RMS relative error; each
    bound is and ``err > 0`` catches a copy that did not run in bf16 at all."""
    pipe = demo_fp32
    context, pooled = pipe.encode_prompt("a red circle at the top left on a blue background")
    g = torch.Generator().manual_seed(0)
    cfg = pipe.mmditx.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        v32 = pipe.mmditx(x, t, pooled, context)
        v16 = _bf16(pipe.mmditx)(x, t, pooled, context)
        img32 = pipe.vae.decode(x)
        img16 = _bf16(pipe.vae).decode(x.to(torch.bfloat16))
        tokens = pipe.tokenizer(["a red circle at the top left on a blue background"])
        ctx32, pool32 = pipe.text(tokens)
        ctx16, pool16 = _bf16(pipe.text)(tokens)
    errors = {
        "mmditx": _rms_rel(v16, v32),
        "vae": _rms_rel(img16, img32),
        "text context": _rms_rel(ctx16, ctx32),
        "text pooled": _rms_rel(pool16, pool32),
    }
    bounds = {"mmditx": 0.02, "vae": 0.04, "text context": 0.03, "text pooled": 0.01}
    for name, err in errors.items():
        assert 0 < err <= bounds[name], f"{name}: bf16 vs fp32 RMS relative error {err:.4f} > {bounds[name]}"


@pytest.mark.usefixtures("unpinned")
def test_the_bf16_default_image_is_within_35_db_of_fp32(monkeypatch, demo_fp32):
    """The issue's bound for the default's image: PSNR >= 35 dB against fp32 (measured 41.3-50.1 dB over
    3 prompts x 3 seeds; the lowest of them is the one checked here, with another)."""
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    pipe = load_demo_pipeline()
    assert pipe.mmditx.dtype == torch.bfloat16
    for prompt, seed in [
        ("a green square at the bottom right on a yellow background", 2),
        ("a red circle", 1),
    ]:
        a = pixels(demo_fp32.generate(prompt, seed=seed)[0]).astype(np.float64)
        b = pixels(pipe.generate(prompt, seed=seed)[0]).astype(np.float64)
        mse = ((a - b) ** 2).mean()
        assert mse > 0, "the bf16 default gave the fp32 image: it did not run in bf16"
        psnr = 10 * np.log10(255**2 / mse)
        assert psnr >= 35, f"{prompt!r} seed {seed}: bf16 default vs fp32 PSNR {psnr:.1f} dB < 35"
