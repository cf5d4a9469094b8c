"""Memory-mapped safetensors reading with clear errors for the files users actually pass us.

The header is parsed here (8-byte length, then JSON) so that a truncated download, a pickle
``.ckpt`` or a GGUF file is named as such before any tensor is touched. Tensor data is read through
``safetensors.safe_open``, which memory-maps the file: nothing is read until a tensor is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from sd35.errors import CheckpointError
from sd35.files import write_atomic
from sd35.loading.tensors import LazyTensor

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


def _sniff_foreign_format(path: Path, head: bytes) -> str | None:
    if head[:4] == b"GGUF":
        return (
            "a GGUF file; only an MMDiT-X may be GGUF (give it as the model), this place reads .safetensors"
        )
    if head[:2] == b"PK":
        return "a PyTorch pickle/zip checkpoint (.ckpt/.pt); convert it to .safetensors or use the .safetensors release"
    if head[:1] == b"\x80":
        return "a Python pickle file; use the .safetensors release"
    if head[:1] in (b"{", b"<") or path.suffix in (".json", ".txt", ".html"):
        return "a text file, not a weight file (a failed download saves an HTML error page like this)"
    return None


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """Return the safetensors header (``{key: {dtype, shape, data_offsets}}``), validated against the file size."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a .safetensors file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: the file is empty or truncated ({size} bytes). Download it again."
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            foreign = _sniff_foreign_format(path, head)
            if foreign:
                raise CheckpointError(f"{path}: this is {foreign}.")
            raise CheckpointError(
                f"{path}: not a valid .safetensors file (header of {n} bytes in a file of {size} bytes); "
                "it is truncated or of another format. Download it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        foreign = _sniff_foreign_format(path, head)
        raise CheckpointError(
            f"{path}: this is {foreign}."
            if foreign
            else f"{path}: the safetensors header is not valid JSON; the file is corrupt."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt.")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: malformed header entry for '{key}'; the file is corrupt."
            ) from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {dtype}, which sd35 cannot read.")
        numel = 1
        for s in shape:
            numel *= s
        if end > data_size:
            raise CheckpointError(
                f"{path}: the file is truncated: tensor '{key}' ends at byte {end} of the data but the file holds "
                f"{data_size} bytes of data. Download it again."
            )
        if end - begin != numel * _ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path}: tensor '{key}' has {end - begin} bytes for shape {shape}; the file is corrupt."
            )
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {}) or {}


class SafetensorsFile:
    """One memory-mapped safetensors file whose tensors are :class:`LazyTensor` values."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle = None

    def _open(self):
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path}: cannot be read as safetensors ({e}).") from None
        return self._handle

    def _get(self, key: str) -> torch.Tensor:
        return self._open().get_tensor(key)

    def tensors(self) -> dict[str, LazyTensor]:
        out = {}
        for key, info in self.header.items():
            out[key] = LazyTensor(
                tuple(info["shape"]),
                _DTYPES[info["dtype"]],
                (lambda k=key: self._get(k)),
                f"{self.path.name}:{key}",
            )
        return out


def open_safetensors(paths: str | os.PathLike | list) -> dict[str, LazyTensor]:
    """Lazy tensors of one file, or of several shards merged (later shards never silently replace keys)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    merged: dict[str, LazyTensor] = {}
    for p in paths:
        for k, v in SafetensorsFile(p).tensors().items():
            if k in merged:
                raise CheckpointError(
                    f"{p}: tensor '{k}' also appears in another shard; the set of files is inconsistent."
                )
            merged[k] = v
    return merged


def shards_of(folder: Path, stem: str) -> list[Path] | None:
    """The safetensors shards of a Hugging Face folder component: ``{stem}.safetensors`` or ``{stem}.safetensors.index.json``."""
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid shard index (no 'weight_map').") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(
                f"{index}: lists shard(s) {', '.join(missing)} that are not in {folder}. Download them."
            )
        return [folder / f for f in files]
    return None


def save_file_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a safetensors file whole or not at all (:func:`sd35.files.write_atomic`).

    ``overwrite=True`` replaces ``path``; ``overwrite=False`` refuses an existing name, even one that
    appears while writing (an SD35Error naming the file).
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    return write_atomic(path, write, "replace" if overwrite else "refuse")
