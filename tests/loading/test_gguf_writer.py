"""Our GGUF writer and torch quantizers against the ``gguf`` package (llama.cpp's own Python reader and numpy
quantizers, an independent implementation of the same reference formulas)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd35.errors import SD35Error
from sd35.loading.gguf_io import dequantize, read_gguf
from sd35.loading.gguf_quantize import WRITABLE, quantize
from sd35.loading.gguf_writer import TensorOut, write_gguf

gguf = pytest.importorskip("gguf")  # in the [test] extra; importorskip only gives a clear message


def _values(rows: int = 24, cols: int = 128, seed: int = 0) -> np.ndarray:
    """Random rows of mixed scales, plus the blocks a quantizer can get wrong: all zeros, a constant, ties for the
    largest magnitude of opposite signs, values exactly halfway between two levels, a huge range."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.exponential(1.0, (rows, 1))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 0.75
    x[2, :32] = np.tile([1.0, -1.0], 16)
    x[3, :32] = np.arange(32, dtype=np.float32) / 2 - 8  # Q4_0's d = 1: x / d + 8.5 lands on .5s
    x[4, :32] = np.geomspace(1e-6, 1e4, 32, dtype=np.float32)
    return x


@pytest.mark.parametrize("type_name", [t for t in WRITABLE if not t.endswith("_K")])
def test_quantized_bytes_equal_the_gguf_package(type_name):
    x = _values()
    expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name]).reshape(-1).view(np.uint8)
    got = quantize(torch.from_numpy(x), type_name)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)
    back = dequantize(got, type_name, x.shape)
    if type_name == "F32":
        assert torch.equal(back, torch.from_numpy(x))
    elif type_name.startswith(
        "Q"
    ):  # no value is further than one step from its block's value (fp16 scales aside)
        blocks = torch.from_numpy(x).reshape(-1, 32)
        amax, span = blocks.abs().amax(1), blocks.amax(1) - blocks.amin(1)
        step = {"Q8_0": amax / 127, "Q4_0": amax / 8, "Q5_0": amax / 16, "Q4_1": span / 15, "Q5_1": span / 31}
        err = (back.reshape(-1, 32) - blocks).abs().amax(1)
        assert bool((err <= step[type_name] * 1.01 + amax * 2**-10).all())


REFERENCE = Path(__file__).parent / "data" / "kquants_reference.npz"  # scripts/kquant_reference.py wrote it


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_equal_ggml_reference_bytes(type_name):
    """The gguf package cannot make K-quants: the bytes of ggml's own C reference quantizer, on awkward blocks too,
    are the fixture; the gguf package's dequantizer then reads our bytes as we do."""
    reference = np.load(REFERENCE)
    x = torch.from_numpy(reference["inputs"])
    got = quantize(x, type_name)
    assert np.array_equal(got.numpy(), reference[type_name])
    theirs = gguf.quants.dequantize(got.numpy(), gguf.GGMLQuantizationType[type_name]).astype(np.float32)
    ours = dequantize(got, type_name, tuple(x.shape))
    assert torch.allclose(ours, torch.from_numpy(theirs).reshape(x.shape), rtol=1e-6, atol=1e-9)
    random = x[9:]  # the seeded random rows: within a few percent of each block's largest value
    err = (ours[9:] - random).abs().reshape(-1, 256).amax(1) / random.abs().reshape(-1, 256).amax(1)
    assert float(err.max()) <= {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[type_name]


def test_bf16_keeps_nan_quiet_and_rounds_to_even():
    x = torch.tensor([float("nan"), 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, float("inf")] * 8)
    expected = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.BF16).view(np.uint8)
    assert np.array_equal(quantize(x, "BF16").numpy(), expected.reshape(-1))


def _tensors() -> dict[str, tuple[torch.Tensor, str]]:
    g = torch.Generator().manual_seed(3)
    return {
        "blocks.0.weight": (torch.randn(48, 64, generator=g), "Q5_1"),
        "blocks.0.bias": (torch.randn(48, generator=g), "F32"),
        "pos_embed": (torch.randn(1, 6, 32, generator=g), "F16"),
        "conv.weight": (torch.randn(8, 4, 2, 2, generator=g), "BF16"),
        "proj.weight": (torch.randn(16, 96, generator=g), "Q8_0"),
        "odd.weight": (torch.randn(5, 7, generator=g), "F32"),
    }


def test_written_file_reads_in_the_gguf_package_and_ours(tmp_path):
    tensors = _tensors()
    metadata = {
        "general.architecture": "sd3",
        "general.name": "tést",
        "general.file_type": 9,
        "test.float": 0.5,
        "test.flag": True,
        "test.big": 2**40,
        "test.negative": -3,
        "test.list": [1, 2, 3],
        "test.names": ["a", "bc"],
    }
    outs = [
        TensorOut(n, tuple(v.shape), ty, lambda v=v, ty=ty: quantize(v, ty)) for n, (v, ty) in tensors.items()
    ]
    path = write_gguf(tmp_path / "m.gguf", metadata, outs, align=64)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "sd3" and fields["general.name"].contents() == "tést"
    assert fields["general.file_type"].contents() == 9 and fields["test.float"].contents() == 0.5
    assert fields["test.flag"].contents() is True and fields["test.big"].contents() == 2**40
    assert fields["test.negative"].contents() == -3 and fields["test.list"].contents() == [1, 2, 3]
    assert fields["test.names"].contents() == ["a", "bc"] and fields["general.alignment"].contents() == 64
    assert [t.name for t in reader.tensors] == list(tensors)
    ours = read_gguf(path)
    for t in reader.tensors:
        value, type_name = tensors[t.name]
        assert t.tensor_type.name == type_name and tuple(reversed(t.shape.tolist())) == tuple(value.shape)
        assert t.data_offset % 64 == 0
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
        mine = ours.dequantize(t.name)
        assert mine.shape == value.shape and torch.equal(mine, theirs.reshape(value.shape)), t.name
        if type_name == "F32":
            assert torch.equal(mine, value)
    ours.close()


def test_writer_refuses_what_readers_would(tmp_path):
    ok = TensorOut("w", (4, 32), "Q8_0", lambda: quantize(torch.ones(4, 32), "Q8_0"))
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(SD35Error, match="already exists"):
        write_gguf(tmp_path / "taken.gguf", {"general.architecture": "sd3"}, [ok])
    assert (tmp_path / "taken.gguf").read_bytes() == b"x"
    bad = {
        "do not fill Q8_0 blocks": TensorOut("w", (4, 40), "Q8_0", lambda: torch.zeros(0)),
        "at most 4": TensorOut("w", (1, 1, 1, 1, 32), "F32", lambda: torch.zeros(0)),
        "longer than": TensorOut("w" * 130, (32,), "F32", lambda: torch.zeros(0)),
        "expected 136 bytes": TensorOut("w", (4, 32), "Q8_0", lambda: torch.zeros(10, dtype=torch.uint8)),
    }
    for message, t in bad.items():
        with pytest.raises(ValueError, match=message):
            write_gguf(tmp_path / "bad.gguf", {"general.architecture": "sd3"}, [t])
        assert not list(tmp_path.glob("*bad.gguf*")), (
            message
        )  # nothing left behind, not even the temporary file
