"""Float tensors to GGUF blocks, in torch: the inverse of :func:`sd35.loading.gguf_io.dequantize`.

``sd35 convert --to gguf`` writes files that llama.cpp-based tools (ComfyUI-GGUF, stable-diffusion.cpp) read, so
each type follows llama.cpp's reference quantizer (``ggml-quants.c``, ``quantize_row_*_ref``) value for value:

- Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (halves away from zero);
- Q4_0 / Q5_0: ``d = m / -8`` (``/ -16``) where ``m`` is the value of largest magnitude, sign kept, and
  ``q = min(15, trunc(x / d + 8.5))`` (``min(31, trunc(x / d + 16.5))``);
- Q4_1 / Q5_1: ``d = (max - min) / 15`` (``/ 31``), ``q = min(15, trunc((x - min) / d + 0.5))`` (31), the
  minimum stored beside ``d``;
- in every type ``1 / d`` is taken once in float32 (0 when ``d`` is 0) and multiplied in, ``d`` (and the minimum)
  stored as fp16; values ``j`` and ``j + 16`` share byte ``j`` (low and high nibble), and Q5's fifth bits
  form a little-endian 32-bit mask;
- F16 rounds to nearest even; BF16 as ``ggml_compute_fp32_to_bf16`` (nearest even, NaN kept quiet); F32 as is.

Tests compare the bytes with the ``gguf`` package's own numpy quantizers (an independent implementation).
The K-quants Q6_K, Q5_K and Q4_K are :mod:`sd35.loading.gguf_kquants`'s; Q2_K and Q3_K are read, not written.
"""

from __future__ import annotations

import torch

from sd35.loading.gguf_io import BLOCKS
from sd35.loading.gguf_kquants import K_TYPES, quantize_k

WRITABLE = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "BF16", "F16", "F32")
"""The types :func:`quantize` writes, most precise block type first (the K-quants: :mod:`.gguf_kquants`)."""


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: halves away from zero. ``torch.round`` rounds halves to even, so a tie it rounded toward
    zero (``x - round(x)`` is half, in ``x``'s direction) moves one further out."""
    r = torch.round(x)
    sign = torch.sign(x)
    return r + sign * ((x - r) * sign == 0.5)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] bytes of their fp16 values."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values -> [n, 16] bytes: value j in the low nibble of byte j, value j + 16 in its high nibble."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _fifth_bit_mask(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] five-bit values -> [n, 4] bytes: bit j of the little-endian 32-bit mask is bit 4 of value j."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, device=q.device)).sum(dim=2)


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's value of largest magnitude, sign kept (the first one where several tie, as the C loop)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))[:, 0]


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``ggml_compute_fp32_to_bf16``: round to nearest even (as torch's cast), and a NaN made quiet with its sign
    and top payload bits kept (torch's cast gives one canonical NaN instead)."""
    out = x.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(x)
    if bool(nan.any()):
        bits = x[nan].view(torch.int32)
        out[nan] = ((bits >> 16) | 64).to(torch.int16)
    return out.view(torch.uint8)


def quantize(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """The bytes (uint8, flat) of ``x`` stored as ``type_name``; ``x.numel()`` must fill whole blocks (for the
    block types, each row's length a multiple of 32, as GGUF blocks never straddle rows)."""
    if type_name not in WRITABLE:
        raise ValueError(f"cannot write GGUF type {type_name} (writable: {', '.join(WRITABLE)})")
    x = x.detach().to(torch.float32).contiguous().reshape(-1)
    if type_name == "F32":
        return x.view(torch.uint8)
    if type_name == "F16":
        return x.to(torch.float16).view(torch.uint8)
    if type_name == "BF16":
        return _bf16_bytes(x)
    per_block = BLOCKS[type_name][0]
    if x.numel() % per_block:
        raise ValueError(f"{x.numel()} values do not fill whole {type_name} blocks of {per_block}")
    blocks = x.reshape(-1, per_block)
    return torch.cat([_blocks(chunk, type_name) for chunk in blocks.split(_CHUNK)]).reshape(-1)


_CHUNK = 1 << 13  # blocks at a time: the temporaries stay in cache (3-5x faster on a 6144x1536 matrix)


def _blocks(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """[n, values per block] float32 -> [n, block bytes] uint8."""
    if type_name in K_TYPES:
        return quantize_k(blocks, type_name)
    if type_name == "Q8_0":
        d = blocks.abs().amax(dim=1) / 127
        q = _roundf(blocks * _inverse(d)[:, None]).to(torch.int8).view(torch.uint8)
        return torch.cat([_half_bytes(d), q], dim=1)
    if type_name in ("Q4_0", "Q5_0"):
        levels = 16 if type_name == "Q4_0" else 32
        d = _signed_max(blocks) / -(levels // 2)
        shifted = blocks * _inverse(d)[:, None] + (levels // 2 + 0.5)
        q = shifted.trunc().clamp(0, levels - 1).to(torch.uint8)
        head = [_half_bytes(d)]
    else:  # Q4_1, Q5_1
        levels = 16 if type_name == "Q4_1" else 32
        lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
        d = (hi - lo) / (levels - 1)
        q = ((blocks - lo[:, None]) * _inverse(d)[:, None] + 0.5).trunc().clamp(0, levels - 1).to(torch.uint8)
        head = [_half_bytes(d), _half_bytes(lo)]
    if levels == 32:
        head.append(_fifth_bit_mask(q).to(torch.uint8))
    return torch.cat([*head, _pack_nibbles(q)], dim=1)
