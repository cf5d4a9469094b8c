"""Writing images: whole or not at all, never over an existing file, with A1111-style parameters.

Forge, A1111 and most image browsers read the generation settings from a PNG ``parameters`` text
chunk of the form::

    a photo of a cat
    Negative prompt: blurry
    Steps: 50, Sampler: DPM++ 2M, Schedule type: Simple, CFG scale: 5.0, Seed: 1, Size: 1024x1024, Model: sd3.5_medium
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from sd35.errors import SD35Error


def _quote(value: str) -> str:
    """A1111 quotes values that contain a comma, colon or quote."""
    if any(c in value for c in ',:"'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def next_free_path(path: Path) -> Path:
    """``path`` if free, else ``stem-1.png``, ``stem-2.png`` ... (the first name not taken)."""
    if not path.exists():
        return path
    i = 1
    while (candidate := path.with_name(f"{path.stem}-{i}{path.suffix}")).exists():
        i += 1
    return candidate


def check_output_path(path: Path) -> Path:
    """Raise a clear error for an output path that cannot be written; return its folder."""
    if path.suffix.lower() != ".png":
        raise SD35Error(f"{path}: output must be a .png file (the generation parameters are stored in it).")
    folder = path.parent
    if not folder.is_dir():
        raise SD35Error(f"{folder}: output folder does not exist; create it first.")
    return folder


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Save ``image`` as a PNG at ``path`` or the next free numbered name; returns the path written.

    The file is written to a temporary name in the same folder and then hard-linked into place,
    which fails rather than replaces if another process took the name meanwhile.
    """
    path = Path(path)
    folder = check_output_path(path)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=".sd35-", suffix=".png.partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        while True:
            target = next_free_path(path)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
    finally:
        os.unlink(tmp)


def replace_png(image: Image.Image, path: Path) -> None:
    """Write ``path`` whole, replacing our own earlier version (for the live preview file only)."""
    fd, tmp = tempfile.mkstemp(prefix=".sd35-", suffix=".png.partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
