"""The SD3 16-channel VAE (encoder + decoder), in the official ldm key layout (``first_stage_model.*``).

Behaviour follows Stability-AI/sd3.5 ``sd3_impls.py`` (``SDVAE``, ``VAEEncoder``, ``VAEDecoder``):
GroupNorm(32, eps 1e-6) everywhere, residual blocks without time embedding or dropout, one single-head
self-attention in the middle of each half, no ``quant_conv`` / ``post_quant_conv``. The sizes (base
channels, levels, blocks per level, latent channels) are read from the weights, so a file that holds
only the decoder (or only the encoder) builds just that half.

``encode`` and ``decode`` work on RAW latents. The diffusion model sees latents through
:func:`latent_to_model` / :func:`model_to_latent`.

``encode`` and ``decode`` take a :class:`~sd35.models.vae_tiling.Tiling` to process large images in
tiles, with a bounded activation memory (see :mod:`sd35.models.vae_tiling`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import CheckpointError, SD35Error
from sd35.loading.tensors import StateDict, shape_of
from sd35.loading.weights import load_weights
from sd35.models.vae_tiling import Tiling, decode_tiled, encode_tiled

PREFIX = "first_stage_model."

LATENT_SCALE = 1.5305
LATENT_SHIFT = 0.0609


def latent_to_model(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the diffusion model's latent space (REF sd3_impls.py SD3LatentFormat.process_in)."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def model_to_latent(x: torch.Tensor) -> torch.Tensor:
    """The diffusion model's latent -> raw VAE latent (REF sd3_impls.py SD3LatentFormat.process_out)."""
    return x / LATENT_SCALE + LATENT_SHIFT


# --------------------------------------------------------------------------------------------------
# Config


def _levels(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return sorted(found)


def _require(sd: StateDict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(
            f"VAE: the weights lack '{key}'. The file is incomplete or is not an SD3-style VAE "
            "in the official (ldm) key layout."
        )
    return shape_of(sd[key])


class _Half(NamedTuple):
    """Sizes read from one half (encoder or decoder) of the weights."""

    name: str
    ch: int
    widths: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    image_channels: int

    def sizes(self) -> tuple[tuple[int, ...], int, int]:
        """What both halves must agree on. ``ch`` may not: the decoder alone only shows ``ch * ch_mult[0]``."""
        return (self.widths, self.num_res_blocks, self.z_channels)


def _level_widths(sd: StateDict, keys: list[str], half: str, kind: str) -> tuple[int, ...]:
    """Output width of every level: ``{half}.{kind}.{l}.block.0.conv1.weight`` rows, levels numbered 0..L-1."""
    levels = _levels(keys, rf"{half}\.{kind}\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(
            f"VAE: the {half}'s levels '{half}.{kind}.N' are {levels or 'absent'}; expected 0..L-1. "
            "The file is not an SD3-style VAE in the official (ldm) key layout."
        )
    return tuple(_require(sd, f"{half}.{kind}.{lv}.block.0.conv1.weight")[0] for lv in levels)


@dataclass(frozen=True)
class VAEConfig:
    """The VAE's sizes. SD3: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 16 latent channels, RGB."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    has_encoder: bool = True
    has_decoder: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8 for SD3)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> VAEConfig:
        """Infer the config from key names and shapes only (``sd`` without the ``first_stage_model.`` prefix)."""
        keys = list(sd.keys())
        if "quant_conv.weight" in sd or "post_quant_conv.weight" in sd:
            raise CheckpointError(
                "VAE: the weights hold quant_conv/post_quant_conv, so this is an SD1/SDXL-style VAE, not the "
                "SD3 16-channel VAE (which has neither). Use the SD3 VAE."
            )
        has_encoder = "encoder.conv_in.weight" in sd
        has_decoder = "decoder.conv_in.weight" in sd
        if not (has_encoder or has_decoder):
            raise CheckpointError(
                "VAE: found neither 'encoder.conv_in.weight' nor 'decoder.conv_in.weight'. "
                "The file is not a VAE in the official (ldm) key layout."
            )

        halves: list[_Half] = []
        if has_encoder:
            ch, in_channels = _require(sd, "encoder.conv_in.weight")[:2]
            widths = _level_widths(sd, keys, "encoder", "down")
            nrb = len(_levels(keys, r"encoder\.down\.0\.block\.(\d+)\."))
            z = _require(sd, "encoder.conv_out.weight")[0] // 2
            halves.append(_Half("encoder", ch, widths, nrb, z, in_channels))
        if has_decoder:
            z = _require(sd, "decoder.conv_in.weight")[1]
            out_channels, ch = _require(sd, "decoder.conv_out.weight")[:2]
            widths = _level_widths(sd, keys, "decoder", "up")
            nrb = len(_levels(keys, r"decoder\.up\.0\.block\.(\d+)\.")) - 1
            halves.append(_Half("decoder", ch, widths, nrb, z, out_channels))  # ch here = ch * ch_mult[0]

        first = halves[0]
        if len(halves) == 2 and halves[0].sizes() != halves[1].sizes():
            raise CheckpointError(
                f"VAE: the encoder's (level widths, blocks per level, latent channels) = {halves[0].sizes()} and the decoder's "
                f"{halves[1].sizes()} do not match."
            )
        ch = first.ch  # the encoder's conv_in width when there is an encoder
        widths, nrb, z = first.sizes()
        if any(w % ch for w in widths):
            raise CheckpointError(
                f"VAE: level widths {list(widths)} are not multiples of the base width {ch}."
            )
        if nrb < 1:
            raise CheckpointError("VAE: the weights hold no residual blocks per level.")
        in_channels = first.image_channels
        out_channels = halves[-1].image_channels
        return cls(
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=nrb,
            z_channels=z,
            in_channels=in_channels,
            out_channels=out_channels,
            has_encoder=has_encoder,
            has_decoder=has_decoder,
        )


# --------------------------------------------------------------------------------------------------
# Building blocks


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6, affine (``sd3_impls.py`` ``Normalize``)."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x' + conv2(silu(norm2(conv1(silu(norm1(x))))))``, with ``x'`` a 1x1 conv of ``x`` when widths differ.

    No time embedding and no dropout (``sd3_impls.py`` ``ResnetBlock``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all pixels with ONE head as wide as the channels (``sd3_impls.py`` ``AttnBlock``).

    q, k, v and the output projection are 1x1 convs; the pixels are flattened to a sequence
    ``(b, 1, h*w, c)`` and fed to SDPA, whose default scale is 1/sqrt(c).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def seq(t: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, 1, h*w, c)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(seq(self.q(hn)), seq(self.k(hn)), seq(self.v(hn)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad ONE pixel on the right and bottom only, then a 3x3 stride-2 conv without padding.

    The asymmetric ``F.pad(x, (0, 1, 0, 1))`` is what the reference does (``sd3_impls.py``
    ``Downsample.forward``); a symmetric ``padding=1`` would shift the sampling grid.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (``sd3_impls.py`` ``Upsample``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (keys ``mid.{block_1,attn_1,block_2}``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block.{i}`` ResnetBlocks, then an optional ``downsample``/``upsample``."""

    def __init__(self, widths: list[tuple[int, int]], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in widths)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        resample = self._modules.get(self.resample_name)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*z, H/f, W/f): the first z channels are the mean, the rest logvar."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        levels = []
        width = ch
        for i, m in enumerate(mult):
            out = ch * m
            widths = [(width if j == 0 else out, out) for j in range(n)]
            width = out
            last = i == len(mult) - 1
            levels.append(Level(widths, None if last else Downsample(out), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(width)
        self.norm_out = normalize(width)
        self.conv_out = nn.Conv2d(width, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out, h*f, w*f).

    Levels are stored as ``up.{0..L-1}`` (0 = full resolution) but run from L-1 down to 0; each has
    ``num_res_blocks + 1`` ResnetBlocks and, except level 0, an Upsample.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult, n = config.ch, config.ch_mult, config.num_res_blocks
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width)
        levels: list[Level] = []
        for i in reversed(range(len(mult))):
            out = ch * mult[i]
            widths = [(width if j == 0 else out, out) for j in range(n + 1)]
            width = out
            levels.insert(0, Level(widths, Upsample(out) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(width)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# The VAE


def strip_prefix(sd: StateDict) -> dict:
    """The VAE's tensors without ``first_stage_model.``; if no key has that prefix, all of ``sd``.

    As in the reference loader, a whole checkpoint (MMDiT + VAE) may be passed: only the prefixed
    keys are taken.
    """
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return dict(sd)


class VAE(nn.Module):
    """The SD3 VAE. ``encoder`` / ``decoder`` are ``None`` when the weights do not hold that half."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if config.has_encoder else None
        self.decoder = Decoder(config) if config.has_decoder else None

    @classmethod
    def from_state_dict(
        cls,
        sd: StateDict,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        what: str = "VAE",
    ) -> VAE:
        """Build from an official-layout state dict (with or without ``first_stage_model.``).

        Other layouts (diffusers) are mapped to this one by :mod:`sd35.loading` first.
        """
        sd = strip_prefix(sd)
        config = VAEConfig.from_state_dict(sd)
        with torch.device("meta"):
            module = cls(config)
        load_weights(module, sd, what=what, dtype=dtype, device=device)
        return module

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(
        self,
        image: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tiling: Tiling | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W) -> RAW latents (B, z, H/f, W/f), in the module's dtype.

        Returns the posterior mean, or with ``sample=True`` ``mean + exp(0.5*clamp(logvar, -30, 20)) * noise``
        (REF sd3_impls.py SDVAE.encode); the noise is drawn in float32 with ``generator`` on its device.
        With ``tiling`` the encoder runs in tiles (see :mod:`sd35.models.vae_tiling`).
        """
        if self.encoder is None:
            raise CheckpointError(
                "This VAE holds only the decoder, so it cannot encode an image (img2img needs it). "
                "Use a VAE file that includes the encoder."
            )
        cfg = self.config
        if image.ndim != 4 or image.shape[1] != cfg.in_channels:
            raise SD35Error(
                f"VAE encode expects images shaped (B, {cfg.in_channels}, H, W); got {list(image.shape)}."
            )
        f = cfg.downscale
        h, w = image.shape[-2:]
        if h % f or w % f:
            raise SD35Error(
                f"Image size {w}x{h} is not a multiple of {f} (the VAE's downscale); resize or crop it."
            )
        image = image.to(device=self.device, dtype=self.dtype)
        moments = self.encoder(image) if tiling is None else encode_tiled(self.encoder, image, tiling, f)
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return mean + std * noise.to(device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """RAW latents (B, z, h, w) -> images (B, out, h*f, w*f), nominally in [-1, 1] (not clamped).

        With ``tiling`` the decoder runs in tiles (see :mod:`sd35.models.vae_tiling`).
        """
        if self.decoder is None:
            raise CheckpointError(
                "This VAE holds only the encoder, so it cannot decode latents. Use a VAE file with the decoder."
            )
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise SD35Error(
                f"VAE decode expects latents shaped (B, {self.config.z_channels}, h, w); got {list(z.shape)}."
            )
        z = z.to(device=self.device, dtype=self.dtype)
        if tiling is None:
            return self.decoder(z)
        return decode_tiled(self.decoder, z, tiling, self.config.downscale)
