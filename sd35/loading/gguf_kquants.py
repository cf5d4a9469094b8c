"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K, quantized in torch as ``ggml-quants.c`` does without an importance
matrix (``quantize_row_q4_K_ref`` and its siblings: what ``llama-quantize`` writes when no imatrix is given).

A K-quant block holds 256 values in sub-blocks with their own small scales:

- Q4_K / Q5_K: 8 sub-blocks of 32, each ``x ~= d_j * q - m_j`` with ``q`` in 0..15 (0..31). ``make_qkx2_quants``
  picks each sub-block's scale and minimum: a first guess from its range, then ``nstep + 1`` candidate scales
  ``(nmax + rmin + rdelta * is) / (max - min)``, each followed by the least-squares scale and minimum for its
  levels (weights ``sqrt(mean x^2) + |x|``), keeping the one of least weighted squared error. The 8 scales and 8
  minimums are then stored as 6-bit multiples of two fp16 super-scales, and the levels chosen again against the
  stored scales.
- Q6_K: 16 sub-blocks of 16 with a signed 8-bit scale each and levels -32..31 (``make_qx_quants``, weights
  ``x^2``: 19 candidate scales ``-(32 + 0.1 is) / max``, the least-squares scale of each, the best kept).

The reference sums its terms one after another in float32, and a different order rounds differently, so the sums
here run over the values of a sub-block one position at a time (all sub-blocks at once), in the C order, with the
C's groupings (``w * x * l`` is ``(w * x) * l``). ``nearest_int`` rounds halves to even, as ``torch.round``.
Checked byte for byte against the C reference compiled from ggml (``tests/loading/data/kquants_reference.npz``).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15
K_TYPES = ("Q6_K", "Q5_K", "Q4_K")


def _f32(v: float) -> float:
    """A float32 constant as C computes it (``0.1f * is`` and the like are float32 operations)."""
    return float(np.float32(v))


def _div(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` as one float32 division (torch computes ``number / tensor`` as ``number * (1 / t)``, which
    rounds twice)."""
    return torch.full_like(t, c) / t


def _seq(t: torch.Tensor) -> torch.Tensor:
    """``t[0] + t[1] + t[2] + ...`` left to right, each addition rounded to float32 (C's ``sum += t`` loop over a
    sub-block's values). ``t`` is [values, sub-blocks]: each step adds one contiguous row for all sub-blocks."""
    acc = t[0].clone()
    for row in t[1:]:
        acc.add_(row)
    return acc


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` (``use_mad`` false) for the columns of ``x`` [values, sub-blocks] with weights ``w``:
    (scale, -min, levels)."""
    lo = torch.clamp(x.amin(dim=0), max=0.0)  # the C loop keeps min <= 0 (``if (min > 0) min = 0``)
    hi = x.amax(dim=0)
    flat = hi == lo
    sum_w = _seq(w)
    sum_x = _seq(w * x)
    iscale = _div(nmax, hi - lo)
    scale = 1 / iscale
    levels = torch.round(iscale * (x - lo)).clamp_(0, nmax)
    diff = scale * levels + lo - x
    best = _seq(w * (diff * diff))
    for step in range(nstep + 1):
        # the C loop moves ``min`` to each better fit's minimum, and later candidates start from it
        factor = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * step)) + nmax)
        cand = torch.round(_div(factor, hi - lo) * (x - lo)).clamp_(0, nmax)
        wl = w * cand
        sum_l, sum_l2, sum_xl = _seq(wl), _seq(wl * cand), _seq(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        diff = this_scale * cand + this_min - x
        err = _seq(w * (diff * diff))
        better = (det > 0) & (err < best)
        levels = torch.where(better, cand, levels)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    return scale, -lo, levels


def _qx(x: torch.Tensor, nmax: int):
    """``make_qx_quants`` with ``rmse_type`` 1 (weights ``x^2``) for the columns of ``x`` [values, sub-blocks]:
    (scale, levels + nmax)."""
    mx = x.gather(0, x.abs().argmax(dim=0, keepdim=True))[0]
    zero = mx.abs() < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def fit(iscale: torch.Tensor):
        lv = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return lv, _seq(wx * lv), _seq(w * lv * lv)

    levels, sumlx, suml2 = fit(_div(-nmax, mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = fit(_div(-_f32(nmax + _f32(_f32(0.1) * step)), mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better, lv, levels)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return scale, levels


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """Each row's largest value if positive, else +0 (the C loop starts from 0 and takes only larger values, so
    a row of -0.0 gives +0.0)."""
    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _half(v: torch.Tensor) -> torch.Tensor:
    """float32 -> its fp16 value back in float32, and the fp16's 2 bytes."""
    h = v.to(torch.float16)
    return h.float(), h.reshape(-1, 1).view(torch.uint8)


def _as_uint8(v: torch.Tensor) -> torch.Tensor:
    """C's ``(uint8_t)`` of an int: the low 8 bits."""
    return v.to(torch.int32) & 0xFF


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per block -> the 12 bytes Q4_K/Q5_K store (the inverse of gguf_io's reader)."""
    low = torch.cat([ls[:, :4], lm[:, :4], (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
    low[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    low[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return low.to(torch.uint8)


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K's choices for blocks ``x`` [n, 256]: fp16 bytes of d and dmin, the 12 scale bytes, levels."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    cols = sub.t().contiguous()  # [32 values, sub-blocks]
    # sqrtf: torch's float32 sqrt can miss by an ulp; the float64 root rounded to float32 is the exact one
    av = torch.sqrt((_seq(cols * cols) / 32).double()).float()
    scales, mins, levels = _qkx2(cols, av + cols.abs(), nmax, rmin, 0.1, nstep)
    levels = levels.t()
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    inv_scale = torch.where(max_scale > 0, _div(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _div(63, max_min), torch.zeros_like(max_min))
    ls = _as_uint8(torch.round(inv_scale[:, None] * scales)).clamp(max=63)
    lm = _as_uint8(torch.round(inv_min[:, None] * mins)).clamp(max=63)
    d, d_bytes = _half(max_scale / 63)
    dmin, dmin_bytes = _half(max_min / 63)
    dj = (d[:, None] * ls.float()).reshape(-1)
    dm = (dmin[:, None] * lm.float()).reshape(-1)
    again = torch.round((sub + dm[:, None]) / dj[:, None]).clamp(0, nmax)
    levels = torch.where((dj != 0)[:, None], again, levels).reshape(n, 256).to(torch.int32)
    return d_bytes, dmin_bytes, _pack_scales(ls, lm), levels


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _q45_k(x, 15, -1.0, 20)
    g = levels.reshape(-1, 4, 2, 32)  # [block, 64-value group, half, 32]
    qs = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([d, dmin, scales, qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _q45_k(x, 31, -0.5, 15)
    g = levels.reshape(-1, 4, 2, 32)
    qs = ((g[:, :, 0] & 0xF) | ((g[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)
    fifth = (levels.reshape(-1, 8, 32) >> 4) & 1  # sub-block j's fifth bits go to bit j of the 32 qh bytes
    qh = (fifth << torch.arange(8, device=x.device)[None, :, None]).sum(dim=1).to(torch.uint8)
    return torch.cat([d, dmin, scales, qh, qs], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, levels = _qx(sub.t().contiguous(), 32)
    levels = levels.t()
    scales = scales.reshape(n, 16)
    pick = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = scales.gather(1, pick)[:, 0]
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128, max_scale)
    d, d_bytes = _half(1 / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    dj = (d[:, None] * sc).reshape(-1)
    again = torch.round(sub / dj[:, None]).clamp(-32, 31) + 32
    levels = torch.where((dj != 0)[:, None], again, levels).reshape(n, 256).to(torch.int32)
    levels = torch.where(empty[:, None], torch.zeros_like(levels), levels)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc).to(torch.int8).view(torch.uint8)
    d_bytes = torch.where(empty[:, None], torch.zeros_like(d_bytes), d_bytes)
    g = levels.reshape(n, 2, 4, 32)  # [block, 128-value half, quarter, 32]
    ql = torch.cat(
        [g[:, :, 0] & 0xF | ((g[:, :, 2] & 0xF) << 4), g[:, :, 1] & 0xF | ((g[:, :, 3] & 0xF) << 4)], 2
    )
    qh = (g >> 4) << (2 * torch.arange(4, device=x.device))[None, None, :, None]
    qh = qh.sum(dim=2)
    return torch.cat(
        [ql.reshape(n, 128).to(torch.uint8), qh.reshape(n, 64).to(torch.uint8), sc, d_bytes], dim=1
    )


QUANTIZERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_k(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """[n, 256] float32 values -> [n, block bytes] uint8 of ``type_name`` (one of :data:`K_TYPES`)."""
    return QUANTIZERS[type_name](blocks)
