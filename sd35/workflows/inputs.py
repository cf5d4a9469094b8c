"""ComfyUI's ``input/`` folder: where LoadImage and LoadImageMask find the image a workflow names.

A name is a file in the folder (sub-folders allowed, ``sub/photo.png``), optionally with ComfyUI's
``" [input]"`` annotation. Nothing outside the folder is read: absolute paths, ``..`` and symlinks that
lead out are refused, as are ComfyUI's ``[output]`` and ``[temp]`` annotations (other folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from sd35.errors import InvalidRequest, NotFound

ANNOTATION = " [input]"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
OTHER_FOLDERS = (" [output]", " [temp]")


@dataclass(frozen=True)
class InputDir:
    """The input folder (None: none was given, so every name is missing)."""

    root: Path | None

    def names(self) -> list[str]:
        """The images in the folder as a workflow names them (``sub/photo.png``), sorted: LoadImage's choices."""
        if self.root is None:
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    def resolve(self, name: object) -> Path:
        """The file ``name`` means; InvalidRequest for a path or name leaving the folder, NotFound for a
        name that is not there."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"an image name must be a file name, got {name!r}.")
        if name.endswith(OTHER_FOLDERS):
            raise InvalidRequest(
                f"{name!r} names ComfyUI's output or temp folder; sd35 reads images from the input folder only: "
                "copy the image there."
            )
        name = name.removesuffix(ANNOTATION)
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise InvalidRequest(
                f"{name!r} is a path; a workflow names an image by its file name in the input folder "
                "(sub-folders allowed, nothing outside it)."
            )
        if self.root is None:
            raise NotFound(f"{name!r}: no input folder was given; pass --input-dir (ComfyUI's input/).")
        path = self.root.joinpath(*windows.parts)
        if not path.is_file():
            raise NotFound(f"{name!r} is not in the input folder {self.root}; put the image there.")
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise InvalidRequest(
                f"{name!r} is a link to a file outside the input folder {self.root}; copy the image there."
            )
        return path
