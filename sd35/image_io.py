"""Images in and out: the one reader for every image a user hands us, and PNGs written whole.

Reading (:func:`read_image`, :func:`read_mask`) applies the EXIF orientation (a phone photo is stored
sideways with a tag that says so; every viewer honours it, so must we) and flattens transparency onto
white, as A1111's img2img does (``images.flatten`` with its default background). The trainer, img2img,
inpainting and the server all read through here, so an image means the same thing everywhere.

Writing (:func:`save_png`) goes through :func:`sd35.files.write_atomic`: whole or not at all, never
over an existing file, with the generation's A1111 ``parameters`` text chunk.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin

from sd35.errors import InvalidRequest, NotFound
from sd35.files import check_writable_folder, write_atomic

ImageSource = str | os.PathLike | bytes | Image.Image


def _unreadable(name: str, e: Exception, param: str | None = None) -> InvalidRequest:
    reason = f"{type(e).__name__}: {e}".rstrip(": ")
    return InvalidRequest(f"{name}: cannot be read as an image ({reason}).", param=param)


def _open(source: ImageSource, what: str, param: str | None) -> Image.Image:
    """The decoded image, EXIF orientation applied; a clear error for a missing or unreadable input."""
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    if isinstance(source, bytes):
        name, stream = what, io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise NotFound(f"{path}: no such {what} file.", param=param)
        name, stream = str(path), path
    try:
        with Image.open(stream) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as e:  # PIL raises many kinds for broken files
        raise _unreadable(name, e, param) from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as :func:`read_image` will see the image (EXIF rotation applied), from the header alone."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 or 270 degrees
                width, height = height, width
    except Exception as e:  # PIL raises many kinds for broken files
        raise _unreadable(str(path), e) from None
    if width < 1 or height < 1:
        raise InvalidRequest(f"{path}: the image is empty ({width}x{height}).")
    return width, height


def has_alpha(im: Image.Image) -> bool:
    """Whether ``im`` carries transparency: an alpha band, or a palette with a transparent entry."""
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def read_image(source: ImageSource, what: str = "image", *, param: str | None = None) -> Image.Image:
    """An RGB image from a path, encoded bytes or a PIL image: EXIF rotation applied, transparency on white."""
    im = _open(source, what, param)
    if has_alpha(im):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def read_mask(source: ImageSource, what: str = "mask", *, param: str | None = None) -> Image.Image:
    """A greyscale inpainting mask, white = repaint; EXIF rotation applied.

    An image with transparency counts by its alpha channel, transparent = repaint (the convention of
    OpenAI's image edits and of painting programs' erasers); other images by their grey level.
    """
    im = _open(source, what, param)
    if has_alpha(im):
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return Image.eval(alpha, lambda a: 255 - a)
    return im.convert("L")


def check_output_path(path: Path) -> Path:
    """Raise a clear error, before any work, for a PNG output path that cannot be written; returns its folder."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidRequest(
            f"{path}: output must be a .png file (the generation parameters are stored in it).",
            param="output",
        )
    check_writable_folder(path.parent)
    return path.parent


def _png_info(parameters: str | None, text: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return info


def _png_writer(image: Image.Image, parameters: str | None, text: dict[str, str] | None = None):
    def write(tmp: Path) -> None:
        image.save(tmp, format="PNG", pnginfo=_png_info(parameters, text))

    return write


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    parameters: str | None = None,
    *,
    text: dict[str, str] | None = None,
) -> Path:
    """Save ``image`` as a PNG at ``path`` or the next free numbered name (``x-1.png``...); returns the path.

    ``text``: more text chunks (a ComfyUI workflow's ``prompt`` and ``workflow``)."""
    path = Path(path)
    check_output_path(path)
    return write_atomic(path, _png_writer(image, parameters, text), "number")


def replace_png(image: Image.Image, path: Path, parameters: str | None = None) -> None:
    """Write ``path`` whole, replacing our own earlier version (the live preview file, a server's outputs)."""
    write_atomic(path, _png_writer(image, parameters), "replace")


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The PNG file of ``image`` in memory, with the ``parameters`` text chunk when given."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()
