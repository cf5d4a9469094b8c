"""Live preview: a cheap latent-to-RGB approximation, no VAE decode.

Each of the 16 model-space latent channels contributes linearly to R, G and B. The factors and bias
are the SD3 values ComfyUI publishes for its latent previews (``comfy/latent_formats.py``, class
``SD3``, ``latent_rgb_factors`` / ``latent_rgb_factors_bias``); they are fitted to the SD3 VAE.
"""

from __future__ import annotations

import torch
from PIL import Image

SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)  # fmt: skip
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)


def latent_preview(latent: torch.Tensor, upscale: int = 8) -> Image.Image:
    """An RGB preview of a model-space latent (1 or B, 16, h, w); the first image of a batch.

    ``upscale`` enlarges the (h, w) result with nearest-neighbour so it is viewable at the image's size.
    """
    z = latent[0].float().cpu()
    factors = torch.tensor(SD3_LATENT_RGB_FACTORS)
    if z.shape[0] != factors.shape[0]:
        raise ValueError(f"a latent preview needs {factors.shape[0]} channels, got {z.shape[0]}")
    rgb = torch.einsum("chw,cr->hwr", z, factors) + torch.tensor(SD3_LATENT_RGB_BIAS)
    pixels = (rgb.clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return (
        image.resize((image.width * upscale, image.height * upscale), Image.NEAREST) if upscale > 1 else image
    )


def preview_within(latent: torch.Tensor, largest: int = 256) -> Image.Image:
    """:func:`latent_preview` enlarged by a whole factor (at most 8) to at most ``largest`` pixels a side
    (what a server streams while a job runs)."""
    h, w = latent.shape[-2:]
    return latent_preview(latent, upscale=max(1, min(8, largest // max(h, w))))
