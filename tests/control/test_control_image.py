"""Control images: A1111's resize modes and the weight-free preprocessors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd35.control.image import fit_image, image_pixels
from sd35.control.preprocess import canny, gaussian_blur, grayscale, preprocess, tile
from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest


def square(size=32, lo=0, hi=255, box=(8, 8, 24, 24)) -> torch.Tensor:
    a = np.full((size, size, 3), lo, dtype=np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = hi
    return image_pixels(Image.fromarray(a))


def test_canny_outlines_a_square_with_thin_edges():
    edges = canny(square(), 100, 200)[0, 0]
    assert edges.shape == (32, 32) and set(edges.unique().tolist()) == {0.0, 1.0}
    rows = edges.nonzero()[:, 0]
    assert rows.min() >= 6 and rows.max() <= 25  # only around the square's border
    assert edges[16, 16] == 0 and edges[0, 0] == 0  # not inside, not in the background
    assert edges[16].sum() <= 4  # one row crosses the two vertical edges, each 1-2 px thick
    assert edges[16, 6:11].sum() >= 1 and edges[16, 21:26].sum() >= 1


def test_canny_thresholds_and_hysteresis():
    faint = square(hi=20)  # a step of 20: Sobel L1 magnitude 80, under the high threshold
    assert canny(faint, 100, 200).sum() == 0
    assert canny(faint, 10, 60).sum() > 0
    # a strong edge and a weak edge that touches it: hysteresis keeps the weak one, not a lone weak one
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[:, 16:] = 255  # strong vertical edge
    a[8:10, :16] = 30  # weak bar touching it (Sobel L1 120, corners 180)
    a[24:26, 2:8] = 30  # weak bar far from it
    edges = canny(image_pixels(Image.fromarray(a)), 100, 200)[0, 0]
    assert edges[:, 14:18].sum() >= 28
    assert edges[6:12, 8:13].sum() > 0
    assert edges[22:28, 0:10].sum() == 0


def test_blur_tile_grayscale():
    x = square()
    b = gaussian_blur(x, 2.0)
    assert b.shape == x.shape and torch.allclose(b.mean(), x.mean(), atol=1e-3)
    assert 0 < b[0, 0, 16, 8] < 1 and b.diff(dim=-1).abs().max() < x.diff(dim=-1).abs().max()
    t = tile(x, 4.0)
    assert t.shape == x.shape and not torch.equal(t, x) and torch.equal(tile(x, 1.0), x)
    rgb = image_pixels(Image.new("RGB", (4, 4), (255, 0, 0)))
    g = grayscale(rgb)
    assert torch.allclose(g, torch.full_like(g, 0.299))


def test_preprocess_dispatch():
    x = square()
    unit = ControlUnit(model="m", image=Image.new("RGB", (8, 8)), preprocess="canny")
    assert torch.equal(preprocess(x, unit), canny(x, 100, 200))
    none = ControlUnit(model="m", image=Image.new("RGB", (8, 8)))
    assert torch.equal(preprocess(x, none), x)


def test_resize_modes():
    wide = Image.new("RGB", (200, 100), (10, 20, 30))
    wide.paste((250, 250, 250), (90, 0, 110, 100))  # a white bar in the middle
    stretched = fit_image(wide, 64, 64, "just_resize")
    cropped = fit_image(wide, 64, 64, "crop_and_resize")
    filled = fit_image(wide, 64, 64, "resize_and_fill")
    assert stretched.size == cropped.size == filled.size == (64, 64)
    # crop: scaled to cover (128x64), centre crop keeps the middle bar at the same relative place and width
    assert np.asarray(cropped)[32, 32, 0] > 200 and np.asarray(cropped)[32, 2, 0] < 40
    # fill: scaled to fit (64x32) and padded with the border's median colour above and below
    arr = np.asarray(filled)
    assert tuple(arr[2, 2]) == (10, 20, 30) and tuple(arr[61, 60]) == (10, 20, 30)
    assert arr[32, 32, 0] > 200


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(strength=-1), "controls.strength"),
        (dict(start=0.6, end=0.5), "controls.start"),
        (dict(preprocess="depth"), "controls.preprocess"),
        (dict(resize_mode="fill"), "controls.resize_mode"),
        (dict(low_threshold=250, high_threshold=100), "controls.low_threshold"),
        (dict(model=""), "controls.model"),
    ],
)
def test_bad_units_name_the_field(kw, param):
    with pytest.raises(InvalidRequest) as e:
        ControlUnit(**{"model": "m", "image": Image.new("RGB", (8, 8)), **kw})
    assert e.value.param == param


def test_window_is_diffusers_rule():
    unit = ControlUnit(model="m", image=Image.new("RGB", (8, 8)), start=0.25, end=0.75)
    assert [unit.keeps(i, 8) for i in range(8)] == [False, False, True, True, True, True, False, False]
    assert unit.active(2, 8, 0.99, 3.0) and not unit.active(1, 8, 0.5, 3.0)  # the step, not sigma, decides


def test_percent_window_is_comfyuis_sigma_range():
    unit = ControlUnit(model="m", image=Image.new("RGB", (8, 8)), start=0.25, end=0.75, window="percent")
    # shift 3: percent 0.25 -> sigma(0.75) = 0.9, percent 0.75 -> sigma(0.25) = 0.5
    assert [unit.active(0, 10, s, 3.0) for s in (0.95, 0.9, 0.7, 0.5, 0.4)] == [
        False,
        True,
        True,
        True,
        False,
    ]
    whole = ControlUnit(model="m", image=Image.new("RGB", (8, 8)), window="percent")
    assert whole.active(0, 10, 1.0, 3.0) and whole.active(9, 10, 0.0, 3.0)
