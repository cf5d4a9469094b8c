"""Our GGUF reader and torch dequantizers against the ``gguf`` package (llama.cpp's own Python reader/writer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd35.errors import CheckpointError
from sd35.loading.gguf_io import BLOCKS, dequantize, read_gguf

gguf = pytest.importorskip("gguf")  # in the [test] extra; importorskip only gives a clear message
Q = gguf.GGMLQuantizationType
TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1}
TYPES |= {"Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1}
SHAPES = {"w": (64, 96), "b": (64,), "conv": (8, 4, 2, 32)}


def _write(path, qtype, arch="sd3", extra=None):
    """A GGUF file of random tensors quantized by the gguf package; returns {name: (raw bytes array, values)}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", "test")
    w.add_uint32("test.count", 7)
    w.add_array("test.list", [1, 2, 3])
    rng = np.random.default_rng(int(qtype))
    out = {}
    for name, shape in {**SHAPES, **(extra or {})}.items():
        values = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        out[name] = raw
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("type_name", list(TYPES))
def test_dequantize_equals_the_gguf_package(tmp_path, type_name):
    qtype = TYPES[type_name]
    raws = _write(tmp_path / "m.gguf", qtype)
    f = read_gguf(tmp_path / "m.gguf")
    assert f.metadata["general.architecture"] == "sd3" and f.metadata["test.count"] == 7
    assert f.metadata["test.list"] == [1, 2, 3]
    reference = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert sorted(f.tensors) == sorted(t.name for t in reference.tensors)
    for name, shape in SHAPES.items():
        t = f.tensors[name]
        assert t.type_name == type_name and t.shape == shape, name
        assert np.array_equal(f.raw(name), raws[name].reshape(-1).view(np.uint8)), name
        expected = torch.from_numpy(gguf.quants.dequantize(raws[name], qtype).astype(np.float32))
        got = f.dequantize(name)
        assert got.shape == shape and got.dtype == torch.float32
        assert torch.equal(got, expected.reshape(shape)), name  # the same arithmetic: exact
    f.close()


def test_quantized_bytes_stay_small_and_expand_on_request(tmp_path):
    _write(tmp_path / "q4.gguf", Q.Q4_0)
    f = read_gguf(tmp_path / "q4.gguf")
    t = f.tensors["w"]
    assert t.nbytes == 64 * 96 // 32 * BLOCKS["Q4_0"][1] and t.nbytes * 7 < t.numel * 4
    assert f.dequantize("w", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_gguf_files_are_one_clear_error(tmp_path):
    _write(tmp_path / "m.gguf", Q.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "st.gguf").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 6)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "st.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(CheckpointError, match="version 9"):
        read_gguf(tmp_path / "v9.gguf")
    with pytest.raises(CheckpointError, match="IQ2_XXS is not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))


# where each K-quant keeps its fp16 super-block scale(s) (``d``, and ``dmin`` beside it where there is one)
K_SCALES = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


def random_k_blocks(type_name: str, n: int, seed: int = 5) -> np.ndarray:
    """``n`` random blocks of a K-quant: any bytes are valid packed values; the fp16 scales are set finite."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, BLOCKS[type_name][1]), dtype=np.uint8)
    start, end = K_SCALES[type_name]
    raw[:, start:end] = (
        (rng.standard_normal((n, (end - start) // 2)) * 0.01).astype(np.float16).view(np.uint8)
    )
    return raw


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_equal_the_gguf_package(type_name):
    per_block, _ = BLOCKS[type_name]
    raw = random_k_blocks(type_name, 40)
    expected = gguf.quants.dequantize(raw.reshape(-1), Q[type_name]).astype(np.float32).reshape(-1)
    got = dequantize(torch.from_numpy(raw.reshape(-1)), type_name, (40 * per_block,))
    assert torch.allclose(got, torch.from_numpy(expected), rtol=1e-6, atol=1e-9)
