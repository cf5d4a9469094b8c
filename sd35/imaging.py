"""Pixels and tensors: images to and from the VAE's range, masks, outpainting canvases, compositing.

Images enter the VAE as (1, 3, H, W) tensors in [-1, 1], resized with Lanczos like the reference's
img2img (Stability-AI/sd3.5 ``sd3_infer.py`` ``SD3Inferencer._image_to_latent`` and ``vae_encode``).
Masks are white where the image is to be repainted.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from sd35.errors import SD35Error


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 3, height, width) in [-1, 1], Lanczos-resized if the size differs."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] to 8-bit RGB, truncating like the reference's ``vae_decode``."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    scaled = 255.0 * torch.clamp((pixels.float() + 1.0) / 2.0, 0.0, 1.0)
    return Image.fromarray(scaled.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def mask_to_tensor(mask: Image.Image, width: int, height: int, blur: float = 0.0) -> torch.Tensor:
    """(1, 1, height, width) in [0, 1]; ``blur`` > 0 feathers the edge with a Gaussian of that radius in pixels."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The pixel mask averaged over each latent cell (area interpolation)."""
    return torch.nn.functional.interpolate(mask, size=(latent_height, latent_width), mode="area")


def comfy_latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The mask resized to the latent bilinearly, as ComfyUI resizes a noise mask
    (``comfy/utils.py`` ``reshape_mask``, used by ``sampler_helpers.prepare_mask``)."""
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(mask, size=(latent_height, latent_width), mode="bilinear")


def composite(generated: Image.Image, original: Image.Image, mask: torch.Tensor) -> Image.Image:
    """Original pixels where the mask is 0, generated where 1, blended in between (A1111's inpaint overlay)."""
    m = mask[0, 0].cpu().numpy()[..., None]
    a = np.asarray(generated, dtype=np.float32)
    b = np.asarray(original.resize(generated.size, Image.LANCZOS), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(a * m + b * (1.0 - m)), 0, 255).astype(np.uint8))


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int, overlap: int = 8
) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas (new borders filled by repeating the edge pixels) and its mask.

    The mask is white on the new borders and reaches ``overlap`` pixels into the original so the seam
    is repainted too.
    """
    if min(left, top, right, bottom) < 0 or left + top + right + bottom == 0:
        raise SD35Error(
            "outpainting needs non-negative border sizes, at least one of them > 0 (left,top,right,bottom)."
        )
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    h, w = pixels.shape[:2]
    keep_top = top + (overlap if top else 0)
    keep_left = left + (overlap if left else 0)
    keep_bottom = top + h - (overlap if bottom else 0)
    keep_right = left + w - (overlap if right else 0)
    mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")
