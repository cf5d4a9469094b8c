"""ComfyUI's IMAGE and MASK values as tensors, and what its image and latent nodes do to them.

An IMAGE is ``(batch, height, width, 3)`` float in [0, 1] and a MASK ``(batch, height, width)`` float in
[0, 1] (1: repaint), as in ComfyUI; latents are ``(batch, channels, h, w)``. The functions mean what
ComfyUI v0.3.64's nodes mean (``nodes.py`` LoadImage, LoadImageMask, VAEEncodeForInpaint,
InpaintModelConditioning, ImageScale; ``comfy/utils.py`` ``common_upscale``, ``lanczos``;
``comfy/sd.py`` ``vae_encode_crop_pixels``), written from their documented behaviour.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence

from sd35.image_io import has_alpha

EMPTY_MASK = 64
"""The side of the all-zero mask ComfyUI gives for an image without an alpha channel."""

DOWNSCALE = 8  # the SD3 VAE's pixels per latent cell
MASK_CHANNELS = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}


def _frames(path: Path) -> list[Image.Image]:
    """The frames LoadImage keeps: each EXIF-rotated, all of the first frame's size (an MPO's first only)."""
    with Image.open(path) as image:
        frames = [ImageOps.exif_transpose(f) for f in ImageSequence.Iterator(image)]
        if image.format == "MPO":
            frames = frames[:1]
    return [f for f in frames if f.size == frames[0].size]


def _integer(frame: Image.Image) -> Image.Image:
    """ComfyUI scales 32-bit integer images (mode I, 16-bit PNGs) by 1/255 before converting."""
    return frame.point(lambda v: v * (1 / 255)) if frame.mode == "I" else frame


def alpha_mask(path: Path) -> bool:
    """Whether LoadImage's MASK of ``path`` comes from its alpha (else it is an empty 64 x 64 one)."""
    return has_alpha(_frames(path)[0])


def _unit(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0)


def image_size(path: Path) -> tuple[int, int, int]:
    """``(width, height, frames)`` of the IMAGE LoadImage makes from ``path`` (reads the frames' headers)."""
    frames = _frames(path)
    return frames[0].width, frames[0].height, len(frames)


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage: the IMAGE (RGB) and its MASK (``1 - alpha``, the transparent parts; all zeros, 64 x 64,
    without alpha). The mask is computed as ``(255 - alpha) / 255``, which is ComfyUI's ``1 - alpha/255``
    up to float rounding and exactly what a mask image of ``255 - alpha`` gives ``sd35 generate --mask``."""
    images, masks = [], []
    for frame in _frames(path):
        frame = _integer(frame)
        images.append(_unit(frame.convert("RGB")))
        if has_alpha(frame):
            alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32)
            masks.append(_unit(255.0 - alpha))
        else:
            masks.append(torch.zeros(EMPTY_MASK, EMPTY_MASK))
    return torch.stack(images), torch.stack(masks)


def load_mask(path: Path, channel: str) -> torch.Tensor:
    """LoadImageMask: one channel of the first frame as a MASK (alpha inverted: 1 where transparent)."""
    with Image.open(path) as image:
        frame = ImageOps.exif_transpose(image)
        if frame.getbands() != ("R", "G", "B", "A"):
            frame = _integer(frame).convert("RGBA")
        values = np.asarray(frame.getchannel(MASK_CHANNELS[channel]), dtype=np.float32)
    return _unit(255.0 - values if channel == "alpha" else values)[None]


def upscale(
    samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled"
) -> torch.Tensor:
    """``(b, c, h, w)`` resized to ``width`` x ``height`` as ComfyUI's ``common_upscale``: ``crop="center"``
    first cuts the middle of the new aspect ratio; ``lanczos`` goes through 8-bit PIL images (values
    clipped and truncated), ``bislerp`` is :func:`bislerp`, the other methods are
    ``torch.nn.functional.interpolate``'s."""
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
        samples = samples[..., y : old_h - y, x : old_w - x]
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        out = []
        for row in samples:
            pixels = np.clip(255.0 * row.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
            resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS)
            out.append(_unit(np.asarray(resized)).movedim(-1, 0))
        return torch.stack(out).to(samples)
    return F.interpolate(samples, size=(height, width), mode=method)


def _neighbours(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` positions resampling ``old`` ones bilinearly (half-pixel centres, clamped at the
    edges): the source index at or below it, the one above (the last index at the edge), and how far
    between them it lies. The positions are bilinear interpolation's own, obtained by interpolating the
    index ramp, so they round as ComfyUI's do."""
    ramp = torch.arange(old, dtype=torch.float32).reshape(1, 1, 1, -1)
    position = F.interpolate(ramp, size=(1, new), mode="bilinear").flatten()
    above = F.interpolate(torch.clamp(ramp + 1, max=old - 1), size=(1, new), mode="bilinear").flatten()
    return position.long(), above.long(), position - position.floor()


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows ``a`` and ``b`` (``(n, c)``) blended at ``t`` (``(n, 1)``): their directions by spherical
    interpolation, their lengths linearly; rows pointing the same way keep ``a``, opposite ones blend
    linearly (ComfyUI's ``bislerp`` edge cases)."""
    a_norm, b_norm = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    a_dir = torch.where(a_norm == 0, 0.0, a / a_norm)
    b_dir = torch.where(b_norm == 0, 0.0, b / b_norm)
    cos = (a_dir * b_dir).sum(-1)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    w = t.squeeze(1)
    out = (torch.sin((1.0 - w) * angle) / sin)[:, None] * a_dir + (torch.sin(w * angle) / sin)[
        :, None
    ] * b_dir
    out = out * (a_norm * (1.0 - t) + b_norm * t)
    same, opposite = cos > 1 - 1e-5, cos < 1e-5 - 1
    out[same] = a[same]
    out[opposite] = (a * (1.0 - t) + b * t)[opposite]
    return out


def _bislerp_axis(samples: torch.Tensor, new: int, axis: int) -> torch.Tensor:
    """One pass of :func:`bislerp` along ``axis`` (-1: width, -2: height) of ``(b, c, h, w)``."""
    lower, upper, t = _neighbours(samples.shape[axis], new)
    a = samples.index_select(axis, lower).movedim(1, -1)
    b = samples.index_select(axis, upper).movedim(1, -1)
    shape = [1, 1, 1]
    shape[axis] = new
    t = t.reshape(shape).expand(a.shape[:-1])
    rows = _slerp(a.reshape(-1, a.shape[-1]), b.reshape(-1, a.shape[-1]), t.reshape(-1, 1))
    return rows.reshape(a.shape).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's ``bislerp`` latent resize: bilinear resampling, width then height, where each pair of
    neighbouring latent vectors (over the channels) is blended by :func:`_slerp` instead of linearly, so
    the result keeps the vectors' lengths instead of shrinking them between unlike neighbours."""
    dtype = samples.dtype
    out = _bislerp_axis(samples.float(), width, -1)
    return _bislerp_axis(out, height, -2).to(dtype)


def scale_size(width: int, height: int, new_width: int, new_height: int) -> tuple[int, int]:
    """ImageScale's target size: a side of 0 keeps the aspect ratio (both 0: unchanged)."""
    if new_width == 0 and new_height == 0:
        return width, height
    if new_width == 0:
        new_width = max(1, round(width * new_height / height))
    elif new_height == 0:
        new_height = max(1, round(height * new_width / width))
    return new_width, new_height


def crop_offsets(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the centred crop to whole latent cells that ComfyUI's VAE encode
    makes (``vae_encode_crop_pixels``)."""
    h, w = height // DOWNSCALE * DOWNSCALE, width // DOWNSCALE * DOWNSCALE
    return (height % DOWNSCALE) // 2, (width % DOWNSCALE) // 2, h, w


def crop_image(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE cropped to whole latent cells, as ComfyUI's VAE encode crops it."""
    top, left, h, w = crop_offsets(image.shape[1], image.shape[2])
    return image[:, top : top + h, left : left + w, :]


def mask_at(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A MASK as ``(b, 1, height, width)``, resized bilinearly (the inpaint nodes' first step), then
    cropped as :func:`crop_image` crops the image of that size."""
    resized = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=(height, width), mode="bilinear")
    top, left, h, w = crop_offsets(height, width)
    return resized[:, :, top : top + h, left : left + w]


def grow_mask(mask: torch.Tensor, by: int) -> torch.Tensor:
    """VAEEncodeForInpaint's noise mask: the rounded mask grown by a ``by`` x ``by`` box (0: as it is),
    rounded, at the mask's size."""
    if by == 0:
        return mask.round()
    kernel = torch.ones((1, 1, by, by))
    grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((by - 1) / 2)), 0, 1)
    return grown[:, :, : mask.shape[2], : mask.shape[3]].round()


def fill_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The IMAGE with the pixels under the rounded ``(b, 1, h, w)`` mask set to grey 0.5, as the inpaint
    nodes encode it (so the model does not see what is to be replaced)."""
    keep = (1.0 - mask.round()).squeeze(1)[..., None]
    return (image - 0.5) * keep + 0.5


def to_vae(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE as the VAE reads it: ``(b, 3, h, w)`` in [-1, 1]."""
    return image[..., :3].movedim(-1, 1) * 2.0 - 1.0


def from_vae(pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's ``(b, 3, h, w)`` output in [-1, 1] as an IMAGE (ComfyUI's ``process_output``)."""
    return torch.clamp((pixels.float() + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).cpu()


def to_pil(image: torch.Tensor) -> list[Image.Image]:
    """An IMAGE as 8-bit pictures, as SaveImage writes them (``255 x``, clipped, truncated)."""
    return [Image.fromarray(np.clip(255.0 * row.numpy(), 0, 255).astype(np.uint8)) for row in image.cpu()]
