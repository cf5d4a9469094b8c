"""Encoding and decoding large images in tiles, so that the VAE's activation memory stays bounded.

At 1024x1024 the decoder's full-resolution activations (128-256 channels) are the pipeline's memory
peak, ~2 GB in bf16, growing with the image area. Two ways to tile (:class:`Tiling`):

**Exact** (``exact=True``, the default). The network is run stage by stage, each stage over the whole
image in tiles. A stage is what lies between two GroupNorms: pointwise work plus one 3x3 convolution
(or an up/down-sampling conv), so a tile needs only a one-pixel halo of real neighbours to come out
exactly as in the untiled run. Each GroupNorm gets the whole image's statistics, accumulated from the
tiles of the stage that produced its input (Chan et al.'s pairwise mean/variance merge), and the
mid-block (with its attention over all pixels) runs whole at the latent resolution, where it is small.
The result equals the untiled one up to float rounding, so there are no seams and no tone shifts.
Whole activations wait between stages in ``store``: on the compute device they cost ~2-3 activations
instead of the untiled ~4-6 plus workspace; on the CPU (``store="cpu"``, the low memory mode) the device
holds only one tile's work, at the price of moving each activation over PCIe about twice per stage.

**Blend** (``exact=False``). Each tile runs through the whole network on its own, with ``overlap``
cells shared with its neighbours, and the tiles are blended with linear ramps across the overlaps
(the weights add up to 1, so a tile-local function would be reproduced exactly). No activation store,
but not the untiled result: each tile's GroupNorms normalise by that tile's own statistics, its
mid-block attention sees only its own pixels, and its convs see zero padding at tile borders. On a
mostly flat tile (sky, a plain background) the tile's tiny variance gets amplified; measured errors in
``tests/models/test_vae_tiling.py``. The ramps do hide the borders: the error has no seams.

Both work on :class:`sd35.models.vae.Encoder` / ``Decoder`` (the modules are read by attribute here, to
keep this module free of a circular import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import SD35Error

GROUPS = 32  # every GroupNorm of the SD3 VAE (sd35.models.vae.normalize)


@dataclass(frozen=True)
class Tiling:
    """How to tile, in latent cells (one cell = ``downscale`` pixels, 8 for SD3).

    ``tile``: a tile's side (at the pixel resolution, ``tile * downscale`` pixels; at each level of the
    network the same image area). An image no larger than one tile is processed whole, exactly as
    without tiling. The default, 128 cells = 1024 px, is diffusers' tile for the SD3 VAE. ``exact`` and
    ``store``: see the module doc; ``overlap``: cells that blended tiles share at least (blend only;
    default a quarter of the tile, diffusers' overlap factor).
    """

    tile: int = 128
    overlap: int | None = None
    exact: bool = True
    store: str | None = (
        None  # exact only: where whole activations wait between stages (None: the compute device)
    )

    def __post_init__(self) -> None:
        if not isinstance(self.tile, int) or self.tile < 1:
            raise SD35Error(f"VAE tile size must be a positive number of latent cells, got {self.tile!r}.")
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.tile // 4)
        if not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.tile // 2:
            raise SD35Error(
                f"VAE tile overlap must be between 0 and half the tile ({self.tile // 2} cells), got {self.overlap!r}."
            )

    def fits(self, h: int, w: int) -> bool:
        """Whether an ``h`` x ``w``-cell latent fits one tile (then nothing is tiled)."""
        return h <= self.tile and w <= self.tile

    def starts(self, length: int) -> list[int]:
        """Blend tiles' start cells along one side of ``length`` cells, spread evenly from 0 to ``length - tile``."""
        if length <= self.tile:
            return [0]
        overlap = self.overlap or 0
        stride = self.tile - overlap
        n = -(-(length - overlap) // stride)  # fewest tiles that overlap by at least ``overlap``
        span = length - self.tile
        return [round(i * span / (n - 1)) for i in range(n)]


# 512 px tiles with activations kept in CPU memory: the device holds one tile's work (~0.5 GB in bf16)
LOW_MEMORY_TILING = Tiling(64, store="cpu")


def decode_tiled(decoder: nn.Module, z: torch.Tensor, tiling: Tiling, downscale: int) -> torch.Tensor:
    """``decoder(z)`` computed in tiles (``z`` on the decoder's device and dtype)."""
    h, w = z.shape[-2:]
    if tiling.fits(h, w):
        return decoder(z)
    if tiling.exact:
        return _decode_exact(decoder, z, tiling)
    return run_blended(decoder, z, tiling, (h, w), 1, downscale)


def encode_tiled(encoder: nn.Module, image: torch.Tensor, tiling: Tiling, downscale: int) -> torch.Tensor:
    """``encoder(image)`` (the moments) computed in tiles."""
    h, w = image.shape[-2] // downscale, image.shape[-1] // downscale
    if tiling.fits(h, w):
        return encoder(image)
    if tiling.exact:
        return _encode_exact(encoder, image, tiling, downscale)
    return run_blended(encoder, image, tiling, (h, w), downscale, 1)


# --------------------------------------------------------------------------------------------------
# Exact: stage by stage, with whole-image GroupNorm statistics


class _Stats:
    """Per-(sample, group) count, mean and sum of squared deviations, merged tile by tile.

    Each tile contributes ``torch.var_mean`` of its own pixels (a stable two-pass computation); tiles are
    merged with Chan et al.'s pairwise formula in float64 (float32 on MPS, which has no float64).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        b, c = x.shape[:2]
        var, mean = torch.var_mean(x.reshape(b, GROUPS, -1).float(), dim=-1, correction=0)
        n = x[0, : c // GROUPS].numel()
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        mean, m2 = mean.to(wide), var.to(wide) * n
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, population variance), each (B, groups) float32."""
        assert self.mean is not None and self.m2 is not None
        return self.mean.float(), (self.m2 / self.n).float()


def _whole_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _Stats()
    s.add(x)
    return s.result()


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``norm(x)`` with the mean and variance given (those of the whole image, ``x`` being a tile of it).

    Computed in float32 and rounded once to ``x``'s dtype, as PyTorch's GroupNorm does for half types.
    """
    mean, var = stats
    b, c = x.shape[:2]
    per = c // mean.shape[1]
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(per, dim=1)
    scale = rstd * norm.weight.float()
    shift = norm.bias.float() - mean.repeat_interleave(per, dim=1) * scale
    return (x * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)


Window = Callable[[int, int, int], tuple[int, int, int]]


def _conv_window(o0: int, o1: int, n: int) -> tuple[int, int, int]:
    """Input rows for output rows [o0, o1) of a 3x3, padding-1 conv: one real neighbour each side."""
    i0, i1 = max(o0 - 1, 0), min(o1 + 1, n)
    return i0, i1, o0 - i0


def _up_window(o0: int, o1: int, n: int) -> tuple[int, int, int]:
    """Input rows for output rows [o0, o1) of nearest-x2 then a 3x3 conv (``n`` input rows)."""
    i0, i1 = max(o0 // 2 - 1, 0), min((o1 + 1) // 2 + 1, n)
    return i0, i1, o0 - 2 * i0


def _down_window(o0: int, o1: int, n: int) -> tuple[int, int, int]:
    """Input rows for output rows [o0, o1) of the pad-right-1, 3x3 stride-2 conv: rows 2*o0 to 2*o1 inclusive.

    A crop that stops before the image end has one real row past the last one read, so the zero row
    the module pads there is never used; at the image end the padding is the real one.
    """
    return 2 * o0, min(2 * o1 + 1, n), 0


def _sweep(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    out_hw: tuple[int, int],
    window: Window,
    tile: int,
    device: torch.device,
    store: torch.device,
    stats: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``fn(*inputs)`` over an ``out_hw`` output, one ``tile`` x ``tile`` output region at a time.

    Every input is cropped to the region's ``window`` (with its halo), moved to ``device``, and ``fn``'s
    output is cut back to the region and written into the whole output, kept on ``store``. Returns the
    output and (unless ``stats`` is False) its GroupNorm statistics.
    """
    out_h, out_w = out_hw
    in_h, in_w = inputs[0].shape[-2:]
    out: torch.Tensor | None = None
    acc = _Stats()
    for r0 in range(0, out_h, tile):
        r1 = min(r0 + tile, out_h)
        i0, i1, cut_r = window(r0, r1, in_h)
        for c0 in range(0, out_w, tile):
            c1 = min(c0 + tile, out_w)
            j0, j1, cut_c = window(c0, c1, in_w)
            y = fn(*(t[..., i0:i1, j0:j1].to(device) for t in inputs))
            kept = y[..., cut_r : cut_r + r1 - r0, cut_c : cut_c + c1 - c0]
            if stats:
                acc.add(kept)
            if out is None:
                out = torch.empty((*y.shape[:2], out_h, out_w), dtype=y.dtype, device=store)
            out[..., r0:r1, c0:c1] = kept
            del y, kept
    assert out is not None
    return out, acc.result() if stats else None


class _Runner:
    """The exact tiled run's fixed arguments: the compute device, where activations wait, the tile side."""

    def __init__(self, device: torch.device, tiling: Tiling):
        self.device = device
        self.store = torch.device(tiling.store) if tiling.store is not None else device
        self.cells = tiling.tile

    def sweep(self, fn, inputs, out_hw, window, scale: int, stats: bool = True):
        """One stage at a level ``scale`` pixels per latent cell (tiles cover the same image area at every level)."""
        return _sweep(fn, inputs, out_hw, window, self.cells * scale, self.device, self.store, stats)

    def resnet(self, block: nn.Module, x: torch.Tensor, sx, scale: int):
        """A ResnetBlock as two stages: h = conv1(silu(norm1 x)); out = shortcut(x) + conv2(silu(norm2 h))."""
        hw = tuple(x.shape[-2:])

        def first(xt):
            return block.conv1(F.silu(group_norm(block.norm1, xt, sx)))

        h, sh = self.sweep(first, [x], hw, _conv_window, scale)

        def second(xt, ht):
            short = block.nin_shortcut(xt) if block.nin_shortcut is not None else xt
            return short + block.conv2(F.silu(group_norm(block.norm2, ht, sh)))

        return self.sweep(second, [x, h], hw, _conv_window, scale)


def _decode_exact(decoder: nn.Module, z: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    run = _Runner(z.device, tiling)
    x = decoder.mid(decoder.conv_in(z))  # whole: the attention needs every pixel, and it is small here
    sx = _whole_stats(x)
    x = x.to(run.store)
    scale = 1
    for level in reversed(decoder.up):
        for block in level.block:
            x, sx = run.resnet(block, x, sx, scale)
        upsample = level._modules.get(level.resample_name)
        if upsample is not None:
            scale *= 2
            x, sx = run.sweep(upsample, [x], (x.shape[-2] * 2, x.shape[-1] * 2), _up_window, scale)

    def final(xt):
        return decoder.conv_out(F.silu(group_norm(decoder.norm_out, xt, sx)))

    out, _ = run.sweep(final, [x], tuple(x.shape[-2:]), _conv_window, scale, stats=False)
    return out.to(z.device)


def _encode_exact(encoder: nn.Module, image: torch.Tensor, tiling: Tiling, downscale: int) -> torch.Tensor:
    run = _Runner(image.device, tiling)
    scale = downscale
    x, sx = run.sweep(encoder.conv_in, [image], tuple(image.shape[-2:]), _conv_window, scale)
    for level in encoder.down:
        for block in level.block:
            x, sx = run.resnet(block, x, sx, scale)
        downsample = level._modules.get(level.resample_name)
        if downsample is not None:
            scale //= 2
            x, sx = run.sweep(downsample, [x], (x.shape[-2] // 2, x.shape[-1] // 2), _down_window, scale)
    x = encoder.mid(x.to(image.device))  # whole, at the latent resolution
    return encoder.conv_out(F.silu(encoder.norm_out(x)))


# --------------------------------------------------------------------------------------------------
# Blend: overlapping tiles through the whole network, linear ramps across the overlaps


def _ramp_weights(starts: list[int], size: int, length: int, scale: int) -> list[torch.Tensor]:
    """1-D blend weights (in output units, ``scale`` per cell) of each tile along one side.

    A tile's weight rises linearly from 0 at its first pixel to 1 across its overlap with the previous
    tile, and falls to 0 at its last pixel across its overlap with the next, so its (zero-padded, least
    accurate) border pixels count for nothing and no tile switches on or off abruptly. The rising ramp
    of one tile and the falling ramp of its neighbour add up to exactly 1 at every position; the
    image's own borders get no ramp.
    """

    def rising(r: int) -> torch.Tensor:
        if r == 1:
            return torch.full((1,), 0.5)
        return torch.arange(r, dtype=torch.float32) / (r - 1)

    out = []
    for i, s in enumerate(starts):
        n = min(size, length) * scale
        w = torch.ones(n, dtype=torch.float32)
        if i > 0:
            r = (starts[i - 1] + size - s) * scale  # overlap with the previous tile
            w[:r] = rising(r)
        if i < len(starts) - 1:
            r = (s + size - starts[i + 1]) * scale  # overlap with the next tile
            w[n - r :] = torch.minimum(w[n - r :], 1 - rising(r))
        out.append(w)
    return out


def run_blended(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiling: Tiling,
    cells: tuple[int, int],
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """``fn`` applied to overlapping tiles of ``x`` and blended (the weights are normalised to sum to 1).

    The tile grid is laid over ``cells`` = (h, w) latent cells; an input tile is ``in_scale`` units
    per cell (1 for latents, ``downscale`` for pixels) and ``fn`` returns ``out_scale`` units per cell.
    With a single tile this is just ``fn(x)``. The blend is accumulated in float32 and returned in
    ``fn``'s dtype.
    """
    h, w = cells
    ys, xs = tiling.starts(h), tiling.starts(w)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    size = tiling.tile
    wy = _ramp_weights(ys, size, h, out_scale)
    wx = _ramp_weights(xs, size, w, out_scale)
    th, tw = min(size, h), min(size, w)
    out: torch.Tensor | None = None
    total: torch.Tensor | None = None
    dtype = x.dtype
    for y0, ry in zip(ys, wy, strict=True):
        for x0, rx in zip(xs, wx, strict=True):
            crop = x[..., y0 * in_scale : (y0 + th) * in_scale, x0 * in_scale : (x0 + tw) * in_scale]
            y = fn(crop)
            if out is None or total is None:
                shape = (h * out_scale, w * out_scale)
                out = torch.zeros((*y.shape[:-2], *shape), dtype=torch.float32, device=y.device)
                total = torch.zeros(shape, dtype=torch.float32, device=y.device)
                dtype = y.dtype
            weight = (ry[:, None] * rx[None, :]).to(y.device)
            oy, ox = y0 * out_scale, x0 * out_scale
            out[..., oy : oy + th * out_scale, ox : ox + tw * out_scale] += y.float() * weight
            total[oy : oy + th * out_scale, ox : ox + tw * out_scale] += weight
            del y
    assert out is not None and total is not None
    return (out / total).to(dtype)
