"""Fitting a control image to the generation's size, as A1111's ControlNet extension's resize modes do.

- ``just_resize``: stretched to the size (the aspect ratio may change);
- ``crop_and_resize`` (A1111's default, "Crop and Resize"): scaled to cover the size, centre-cropped;
- ``resize_and_fill`` ("Resize and Fill", webuiapi's default): scaled to fit inside, the rest filled with
  the median colour of the image's border (sd-webui-controlnet fills with the border's median, so that a
  map's background continues instead of a black bar that would read as an edge).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sd35.control.unit import ResizeMode


def fit_image(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """``image`` as RGB at ``width`` x ``height`` by ``mode`` (Lanczos resampling throughout)."""
    image = image.convert("RGB")
    if image.size == (width, height) or mode == "just_resize":
        return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
    w, h = image.size
    if mode == "crop_and_resize":
        scale = max(width / w, height / h)
        sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
        big = image.resize((sw, sh), Image.LANCZOS)
        left, top = (sw - width) // 2, (sh - height) // 2
        return big.crop((left, top, left + width, top + height))
    scale = min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(image.resize((sw, sh), Image.LANCZOS))
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    fill = tuple(int(c) for c in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(Image.fromarray(small), ((width - sw) // 2, (height - sh) // 2))
    return canvas


def image_pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
