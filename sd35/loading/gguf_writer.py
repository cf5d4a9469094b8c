"""Writing GGUF files: the header, key/value metadata, tensor descriptions and aligned data.

The layout is GGUF version 3 (llama.cpp's ``gguf.c``; :mod:`sd35.loading.gguf_io` reads it): ``GGUF``, the
version (uint32), the tensor and key counts (uint64); each key as a string (uint64 length + UTF-8), a value
type (uint32) and the value; each tensor as its name, its number of dimensions (uint32), the dimensions
innermost first (uint64 each), its ggml type (uint32) and its data offset (uint64, from the start of the data
section); then zero padding to ``general.alignment`` (32) and the data, every tensor starting aligned.

The sizes of every tensor follow from its shape and type, so the header is written first and the tensors are
then produced and written one at a time: converting a model never holds more than one quantized tensor.
The file is written atomically and never over an existing one (:func:`sd35.files.write_atomic`).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.files import write_atomic
from sd35.loading.gguf_io import BLOCKS, DEFAULT_ALIGNMENT, MAGIC, TYPE_NAMES

TYPE_IDS = {name: i for i, name in TYPE_NAMES.items()}
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME = 127  # ComfyUI-GGUF's limit (ggml's own is 63 unless built with a larger GGML_MAX_NAME)

_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64 = 4, 5, 6, 7, 8, 9, 10, 11

MetadataValue = str | bool | int | float | Sequence[str] | Sequence[int]


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: ``shape`` in torch order; ``data()`` returns its bytes (uint8) when it is its turn."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = BLOCKS[self.type_name]
        return math.prod(self.shape) // per_block * block_bytes


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(v: str | bool | int | float) -> tuple[int, bytes]:
    if isinstance(v, str):
        return _STRING, _string(v)
    if isinstance(v, bool):
        return _BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        if 0 <= v < 2**32:
            return _UINT32, struct.pack("<I", v)
        return (_UINT64, struct.pack("<Q", v)) if v >= 0 else (_INT64, struct.pack("<q", v))
    return _FLOAT32, struct.pack("<f", v)


def _value(v: MetadataValue) -> bytes:
    """A value's type id and bytes; a list is an array of its first item's type (all items must share it)."""
    if isinstance(v, (list, tuple)):
        items = [_scalar(x) for x in v]
        kind = items[0][0] if items else _UINT32
        if any(k != kind for k, _ in items):
            raise ValueError("a GGUF array holds values of one type")
        return struct.pack("<IIQ", _ARRAY, kind, len(items)) + b"".join(b for _, b in items)
    kind, raw = _scalar(v)
    return struct.pack("<I", kind) + raw


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def header(metadata: Mapping[str, MetadataValue], tensors: Sequence[TensorOut], align: int) -> bytes:
    """Everything before the data section, padded to ``align``."""
    out = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        out += [_string(key), _value(value)]
    offset = 0
    for t in tensors:
        dims = list(reversed(t.shape)) or [1]
        out += [_string(t.name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims)]
        out.append(struct.pack("<IQ", TYPE_IDS[t.type_name], offset))
        offset = _aligned(offset + t.nbytes, align)
    raw = b"".join(out)
    return raw + bytes(_aligned(len(raw), align) - len(raw))


def check_tensor(t: TensorOut) -> None:
    """What a GGUF reader would refuse later, refused now (ValueError naming the tensor)."""
    if len(t.name.encode("utf-8")) > MAX_NAME:
        raise ValueError(f"tensor name '{t.name}' is longer than GGUF readers take ({MAX_NAME} bytes)")
    if len(t.shape) > MAX_DIMS:
        raise ValueError(f"tensor '{t.name}' has {len(t.shape)} dimensions; GGUF holds at most {MAX_DIMS}")
    per_block = BLOCKS[t.type_name][0]
    if t.shape and t.shape[-1] % per_block:
        raise ValueError(
            f"tensor '{t.name}' rows of {t.shape[-1]} do not fill {t.type_name} blocks of {per_block}"
        )


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, MetadataValue],
    tensors: Sequence[TensorOut],
    *,
    align: int = DEFAULT_ALIGNMENT,
) -> Path:
    """Write a GGUF file at ``path`` (refused if it exists); ``metadata`` should hold ``general.architecture``.

    ``general.alignment`` is added when ``align`` is not GGUF's default. Each tensor's ``data()`` must return
    exactly its :attr:`TensorOut.nbytes` bytes."""
    for t in tensors:
        check_tensor(t)
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("two tensors share a name")
    meta = dict(metadata)
    if align != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = align

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header(meta, tensors, align))
            for t in tensors:
                raw = t.data().reshape(-1).contiguous()
                if raw.dtype != torch.uint8 or raw.numel() != t.nbytes:
                    raise ValueError(
                        f"tensor '{t.name}': expected {t.nbytes} bytes, got {raw.numel()} {raw.dtype}"
                    )
                f.write(raw.numpy().tobytes())
                f.write(bytes(_aligned(t.nbytes, align) - t.nbytes))

    return write_atomic(path, write, "refuse")
