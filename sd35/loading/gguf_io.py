"""Reading GGUF files: the header, lazy tensors, and torch dequantization of the block formats.

GGUF (llama.cpp's format; ComfyUI-GGUF and stable-diffusion.cpp store SD3 models in it) is a header of
key/value metadata and tensor descriptions followed by aligned tensor data. This module reads the header
itself (nothing is loaded until asked) and turns one tensor's bytes into a float tensor in torch, so a
caller can keep the bytes quantized in memory and dequantize a layer at a time on the compute device.

Dequantized here: F32, F16, BF16, the 32-value block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (llama.cpp's
``ggml-quants.c`` layouts: an fp16 scale ``d``, for the ``_1`` types an fp16 minimum ``m``, for Q5 a 32-bit
mask of fifth bits, then the packed values; value ``j`` of a block sits in the low nibble of byte ``j`` and
value ``j + 16`` in its high nibble). Checked against the ``gguf`` package's numpy dequantizer in
``tests/loading/test_gguf_io.py``; so are the K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (the ``_K_S``/``_K_M``
files' types). The IQ types are named in :data:`TYPE_NAMES` and refused with one clear message.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd35.errors import CheckpointError
from sd35.loading.tensors import LazyTensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> name (ggml.h's enum ggml_type)
TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip
# name -> (values per block, bytes per block) for the types dequantized here
BLOCKS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

# GGUF metadata value types: id -> struct format (strings and arrays are handled apart)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and what they hold. ``shape`` is torch order
    (outermost first; GGUF stores the dimensions innermost first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """A GGUF file's metadata and tensor table; :meth:`raw` and :meth:`dequantize` read one tensor."""

    path: Path
    version: int
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor]
    _map: mmap.mmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array over the mapped file (nothing copied)."""
        t = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def dequantize(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The tensor as ``dtype`` on ``device`` (the bytes move to the device quantized, then expand there)."""
        t = self.tensors[name]
        data = torch.from_numpy(self.raw(name).copy()).to(device)
        return dequantize(data, t.type_name, t.shape).to(dtype)

    def close(self) -> None:
        self._map.close()


class _Reader:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"{self.path}: the GGUF header is cut short; the file is truncated.")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: the GGUF header is cut short; the file is truncated.")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            return [self.value(item) for _ in range(n)]
        raise CheckpointError(
            f"{self.path}: unknown GGUF metadata value type {kind}; the file may be damaged."
        )


def is_gguf(path: str | Path) -> bool:
    """Whether the file at ``path`` starts with GGUF's magic (False for folders and unreadable files)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of ``path`` (memory-mapped; tensor data is read only when asked for)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read this file ({e}).") from e
    if buf[:4] != MAGIC:
        buf.close()
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF').")
    r = _Reader(buf, path)
    r.pos = 4
    version = r.take("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are).")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, tuple(reversed(dims)), r.take("<I"), r.take("<Q")))
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-r.pos // align) * align
    tensors = {}
    for name, shape, type_id, offset in infos:
        type_name = TYPE_NAMES.get(type_id, f"type {type_id}")
        n = 1
        for d in shape:
            n *= d
        per_block, block_bytes = BLOCKS.get(type_name, (1, 0))
        nbytes = n // per_block * block_bytes
        if start + offset + nbytes > len(buf):
            raise CheckpointError(
                f"{path}: tensor {name} runs past the end of the file; the file is truncated (download it again)."
            )
        tensors[name] = GGUFTensor(name, type_name, shape, start + offset, nbytes)
    return GGUFFile(path, version, metadata, tensors, buf)


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 value stored at byte ``start`` of each block, as float32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes per block -> 32 values: low nibbles are values 0-15, high nibbles values 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int32)


def _fifth_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5's 32-bit mask at byte ``start``: bit j is the fifth bit of value j, as 0 or 16 per value."""
    qh = blocks[:, start : start + 4].to(torch.int64)
    mask = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    bits = (mask[:, None] >> torch.arange(32, device=blocks.device)) & 1
    return (bits << 4).to(torch.int32)


def _k_scales(blocks: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 8 six-bit (scale, min) pairs packed in 12 bytes at ``start``, as float32 [blocks, 8] each.

    Pairs 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); pairs 4-7: the nibbles of bytes 8-11
    with the top 2 bits of bytes 0-3 (scales) and 4-7 (mins) above them."""
    q = blocks[:, start : start + 12].to(torch.int32)
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()


def _k_4bit(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 256 values in Q4_K/Q5_K order: each 32-byte group gives 32 low nibbles, then 32 high."""
    g = qs.reshape(qs.shape[0], 4, 32).to(torch.int32)
    return torch.stack([g & 0x0F, g >> 4], dim=2).reshape(qs.shape[0], 256)


def _k_2bit(qs: torch.Tensor) -> torch.Tensor:
    """64 bytes -> 256 two-bit values in Q2_K/Q3_K order: each 32-byte half gives its 32 bytes' bits 0-1, then
    bits 2-3, 4-5 and 6-7 (values 0-31, 32-63, 64-95, 96-127 of that half)."""
    shifts = torch.arange(0, 8, 2, device=qs.device)[None, None, :, None]
    return ((qs.reshape(qs.shape[0], 2, 1, 32).to(torch.int32) >> shifts) & 3).reshape(qs.shape[0], 256)


def _dequantize_low_k(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """Q2_K (16 sub-blocks of 16: a 4-bit scale and a 4-bit min each, fp16 ``d`` and ``dmin`` at the end) and
    Q3_K (16 sub-blocks of 16 with signed 6-bit scales, a 32-byte mask of third bits, fp16 ``d`` at the end).
    ggml-quants.c ``dequantize_row_q2_K`` / ``dequantize_row_q3_K``."""
    n = blocks.shape[0]
    if type_name == "Q2_K":
        sc = blocks[:, 0:16].to(torch.int32)
        d, dmin = _halves(blocks, 80), _halves(blocks, 82)
        q = _k_2bit(blocks[:, 16:80]).float().reshape(n, 16, 16)
        return ((d * (sc & 15))[:, :, None] * q - (dmin * (sc >> 4))[:, :, None]).reshape(n, 256)
    hmask = blocks[:, 0:32].to(torch.int32)
    raw = blocks[:, 96:108].to(torch.int32)
    d = _halves(blocks, 108)
    # scale i: low 4 bits from byte i % 8 (low nibble for i < 8, high nibble after), top 2 bits from byte
    # 8 + i % 4 at bit 2 * (i // 4)
    low = torch.cat([raw[:, 0:8] & 15, raw[:, 0:8] >> 4], dim=1)
    top = (raw[:, 8:12, None] >> torch.arange(0, 8, 2, device=blocks.device)) & 3  # [n, byte, shift]
    sc = (low | (top.transpose(1, 2).reshape(n, 16) << 4)) - 32
    # bit b of mask byte l is the third bit of value 32 b + l; a clear bit subtracts 4
    high = (hmask[:, None, :] >> torch.arange(8, device=blocks.device)[None, :, None]) & 1  # [n, 8, 32]
    q = _k_2bit(blocks[:, 32:96]) - 4 * (1 - high.reshape(n, 256))
    return ((d * sc)[:, :, None] * q.float().reshape(n, 16, 16)).reshape(n, 256)


def _dequantize_k(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """llama.cpp's K-quants (256 values a block): Q2_K and Q3_K (:func:`_dequantize_low_k`), Q4_K, Q5_K
    (8 sub-blocks of 32 with 6-bit scales and mins) and Q6_K (16 sub-blocks of 16 with int8 scales)."""
    n = blocks.shape[0]
    if type_name in ("Q2_K", "Q3_K"):
        return _dequantize_low_k(blocks, type_name)
    if type_name == "Q6_K":
        ql = blocks[:, 0:128].to(torch.int32).reshape(n, 2, 64)
        qh = blocks[:, 128:192].to(torch.int32).reshape(n, 2, 32)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 16)
        d = _halves(blocks, 208)
        q1 = (ql[:, :, :32] & 0x0F) | ((qh & 3) << 4)
        q2 = (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4)
        q3 = (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)
        q = (torch.stack([q1, q2, q3, q4], dim=2) - 32).float().reshape(n, 16, 16)  # [half, quarter, 32]
        return (d[:, :, None] * sc[:, :, None] * q).reshape(n, 256)
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    sc, m = _k_scales(blocks, 4)
    if type_name == "Q4_K":
        q = _k_4bit(blocks[:, 16:144])
    else:  # Q5_K: bit j of qh[l] (bits 2g and 2g+1 for group g) is the fifth bit of values l of sub-block j
        qh = blocks[:, 16:48].to(torch.int32)
        bits = (qh[:, None, :] >> torch.arange(8, device=blocks.device)[None, :, None]) & 1  # [n, 8, 32]
        q = _k_4bit(blocks[:, 48:176]) + (bits.reshape(n, 256) << 4)
    q = q.float().reshape(n, 8, 32)
    return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).reshape(n, 256)


def dequantize(data: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values of ``shape`` from the uint8 ``data`` of one tensor stored as ``type_name``."""
    if type_name not in BLOCKS:
        raise CheckpointError(
            f"GGUF tensor type {type_name} is not supported (supported: {', '.join(BLOCKS)}); "
            "convert the file to one of those."
        )
    if type_name == "F32":
        return data.view(torch.float32).reshape(shape)
    if type_name == "F16":
        return data.view(torch.float16).to(torch.float32).reshape(shape)
    if type_name == "BF16":
        return data.view(torch.bfloat16).to(torch.float32).reshape(shape)
    blocks = data.reshape(-1, BLOCKS[type_name][1])
    if type_name.endswith("_K"):
        return _dequantize_k(blocks, type_name).reshape(shape)
    d = _halves(blocks, 0)
    if type_name == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        return (d * q).reshape(shape)
    if type_name == "Q4_0":
        q = _nibbles(blocks[:, 2:]) - 8
        return (d * q).reshape(shape)
    if type_name == "Q4_1":
        q = _nibbles(blocks[:, 4:])
        return (d * q + _halves(blocks, 2)).reshape(shape)
    if type_name == "Q5_0":
        q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)) - 16
        return (d * q).reshape(shape)
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)  # Q5_1
    return (d * q + _halves(blocks, 2)).reshape(shape)


FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class GGUFLazyTensor(LazyTensor):
    """A lazy tensor of a GGUF file: ``load()`` dequantizes it (float32, or its own float dtype), while
    ``raw()`` gives the stored bytes, so a layer can keep them quantized (:mod:`sd35.models.gguf_linear`)."""

    type_name: str = "F32"
    raw: Callable[[], torch.Tensor] | None = None

    @property
    def quantized(self) -> bool:
        return self.type_name not in FLOAT_TYPES


def lazy_tensors(f: GGUFFile) -> dict[str, GGUFLazyTensor]:
    """Every tensor of ``f`` as a :class:`GGUFLazyTensor`; an unsupported type is refused here, by name."""
    bad = sorted({t.type_name for t in f.tensors.values() if t.type_name not in BLOCKS})
    if bad:
        raise CheckpointError(
            f"{f.path}: holds tensors of GGUF type {', '.join(bad)}, which sd35 does not read yet (it reads "
            f"{', '.join(BLOCKS)}); use a file of one of those types."
        )
    out = {}
    for name, t in f.tensors.items():

        def raw(name: str = name) -> torch.Tensor:
            return torch.from_numpy(f.raw(name).copy())

        def load(t: GGUFTensor = t, raw=raw) -> torch.Tensor:
            value = dequantize(raw(), t.type_name, t.shape)
            return value.to(FLOAT_TYPES[t.type_name]) if t.type_name in FLOAT_TYPES else value

        dtype = FLOAT_TYPES.get(t.type_name, torch.float32)
        out[name] = GGUFLazyTensor(t.shape, dtype, load, f"{f.path.name}:{name}", t.type_name, raw)
    return out
