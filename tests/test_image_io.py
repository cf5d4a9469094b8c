"""The one image reader: EXIF orientation applied, transparency on white, masks by alpha or grey level."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd35.errors import InvalidRequest, NotFound
from sd35.image_io import image_size, read_image, read_mask

ORIENTATION = 0x0112


def _rotated_jpeg(path):
    """A 40x20 image stored as 20x40 with EXIF orientation 6 (rotate 90 degrees clockwise to view): a phone photo."""
    stored = Image.new("RGB", (20, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 10))  # red at the stored top: on the right when viewed
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_rotation_is_applied_everywhere(tmp_path):
    path = _rotated_jpeg(tmp_path / "phone.jpg")
    image = read_image(path)
    assert image.size == (40, 20) == image_size(path)
    r, g, b = image.getpixel((35, 10))
    assert r > 200 and b < 60  # the red band is on the right
    assert read_image(Image.open(path)).size == (40, 20)  # an opened image too
    assert read_image(path.read_bytes()).size == (40, 20)  # and encoded bytes (what an HTTP body carries)
    assert read_mask(path).size == (40, 20)


def test_transparency_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "t.png")
    image = read_image(tmp_path / "t.png")
    assert (
        image.mode == "RGB"
        and image.getpixel((1, 1)) == (255, 255, 255)
        and image.getpixel((0, 0)) == (0, 0, 255)
    )


def test_masks_by_alpha_or_grey(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent = repaint
    mask = read_mask(rgba)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255 and mask.getpixel((1, 1)) == 0
    grey = Image.fromarray(np.array([[0, 128], [255, 3]], np.uint8))
    assert np.array_equal(np.asarray(read_mask(grey)), np.asarray(grey))


def test_missing_and_broken_inputs(tmp_path):
    with pytest.raises(NotFound, match="no such init image file") as e:
        read_image(tmp_path / "nope.png", "init image", param="edit.image")
    assert e.value.param == "edit.image"
    (tmp_path / "bad.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(InvalidRequest, match="cannot be read as an image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(InvalidRequest, match="cannot be read as an image"):
        read_mask(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InvalidRequest, match="cannot be read as an image"):
        image_size(tmp_path / "bad.png")
