"""The control-image preprocessors that need no model weights: canny, blur, tile, grayscale and none.

Each maps (1, 3, H, W) pixels in [0, 1] to the map a ControlNet of that kind was trained on, at the same
size. Depth and pose detectors need weights we cannot ship, so their maps come ready-made ("none").

Canny is our own torch version of the classic detector (Canny 1986) with OpenCV's ``cv2.Canny`` conventions,
which A1111's "canny" module calls (thresholds on the 0..255 scale, no smoothing before it, 3x3 Sobel, L1
gradient magnitude, on a colour image the channel with the largest gradient): non-maximum suppression
along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis (weak edges kept where
they connect to strong ones). It needs no OpenCV.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sd35.control.unit import ControlUnit

TAN_22_5 = math.tan(math.pi / 8)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, OpenCV's RGB -> gray


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Luminance, repeated to 3 channels."""
    weights = torch.tensor(LUMA, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius ceil(3 sigma), borders reflected (clamped for tiny images)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).to(pixels.dtype)
    c = pixels.shape[1]
    out = pixels
    for shape in ((1, 1, 1, -1), (1, 1, -1, 1)):
        pad = (radius, radius, 0, 0) if shape[-1] == -1 else (0, 0, radius, radius)
        mode = "reflect" if min(pixels.shape[-2:]) > radius else "replicate"
        out = F.conv2d(
            F.pad(out, pad, mode=mode),
            kernel.view(shape).expand(c, 1, *kernel.view(shape).shape[2:]),
            groups=c,
        )
    return out


def _shifted(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t`` at (y + dy, x + dx) for every (y, x), zero outside (the same shape as ``t``)."""
    h, w = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1))
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny(pixels: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """White edges on black, (1, 3, H, W) in {0, 1}; ``low`` and ``high`` on the 0..255 gradient scale."""
    x = pixels.float() * 255.0
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    b, c, h, w = x.shape
    grads = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), kernels)
    grads = grads.reshape(b, c, 2, h, w)
    magnitude = grads.abs().sum(2)  # L1, per channel
    best = magnitude.argmax(1, keepdim=True)  # the channel with the strongest gradient
    mag = magnitude.gather(1, best)
    gx = grads[:, :, 0].gather(1, best)
    gy = grads[:, :, 1].gather(1, best)

    ax, ay = gx.abs(), gy.abs()
    horizontal = ay <= ax * TAN_22_5  # gradient along x: compare left and right
    vertical = ay * TAN_22_5 > ax  # gradient along y: compare above and below
    same_sign = (gx * gy) > 0  # diagonal down-right (y grows downwards) or down-left
    neighbours = [
        (horizontal, (0, -1), (0, 1)),
        (vertical, (-1, 0), (1, 0)),
        (~horizontal & ~vertical & same_sign, (-1, -1), (1, 1)),
        (~horizontal & ~vertical & ~same_sign, (-1, 1), (1, -1)),
    ]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for where, before, after in neighbours:
        local_max = (mag > _shifted(mag, *before)) & (mag >= _shifted(mag, *after))
        keep |= where & local_max
    thin = torch.where(keep, mag, torch.zeros_like(mag))

    weak = thin > low
    edges = thin > high
    while True:  # hysteresis: grow the strong edges through 8-connected weak ones until nothing changes
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(pixels.dtype).expand(-1, 3, -1, -1).contiguous()


def tile(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Downsampled by ``factor`` (area averaging) and back up (bicubic): the blurry input a tile ControlNet reads."""
    if factor <= 1:
        return pixels
    h, w = pixels.shape[-2:]
    small = F.interpolate(pixels, size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def preprocess(pixels: torch.Tensor, unit: ControlUnit) -> torch.Tensor:
    """The control map of ``pixels`` (1, 3, H, W) in [0, 1] by ``unit.preprocess``, in [0, 1]."""
    kind = unit.preprocess
    if kind == "canny":
        return canny(pixels, unit.low_threshold, unit.high_threshold)
    if kind == "blur":
        return gaussian_blur(pixels, unit.blur_sigma)
    if kind == "tile":
        return tile(pixels, unit.tile_factor)
    if kind == "grayscale":
        return grayscale(pixels)
    return pixels
