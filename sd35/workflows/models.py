"""Model names in a workflow, resolved as ComfyUI resolves them, or found by content when missing.

A loader node names a file relative to one of ComfyUI's model folders under ``--models-dir``
(``checkpoints/``, ``diffusion_models/`` or ``unet/``, ``text_encoders/`` or ``clip/``, ``vae/``,
``loras/``, ``controlnet/`` or ``t2i_adapter/``; sub-folders allowed, as in ComfyUI's lists). Shared
workflows name the files their author had (``sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors``), so a
name that is not there falls back to a file of the right kind found by what it holds
(:func:`sd35.loading.components.scan_file`; a ControlNet by :func:`sd35.control.files.read_controlnet`),
and the choice is reported. A LoRA cannot be recognised that way, so a missing LoRA is an error. A name that is a
path (absolute, or climbing out with ``..``) is refused: a workflow may come from anyone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from sd35.control.files import read_controlnet
from sd35.errors import InvalidRequest, NotFound, SD35Error
from sd35.loading.components import CLIP_G, CLIP_L, MMDITX, T5XXL, VAE, scan_file

FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet", "t2i_adapter"),
}
"""ComfyUI's folder names, each with the older alias it still reads."""

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")
TEXT_KINDS = frozenset({CLIP_L, CLIP_G, T5XXL, "clip"})

WANTED: dict[str, str] = {
    "checkpoints": "a checkpoint with the MMDiT-X",
    "diffusion_models": "a diffusion model (MMDiT-X)",
    "text_encoders": "a text encoder",
    "vae": "a VAE",
    "controlnet": "an SD3 ControlNet",
}


def _fits(folder: str, kinds: frozenset[str], role: str | None) -> bool:
    """Whether a file holding ``kinds`` can stand in for a missing name of ``folder`` (``role``: the
    text encoder a TripleCLIPLoader slot expects; an HF CLIP of a toy width, ``"clip"``, fits L or G)."""
    if folder in ("checkpoints", "diffusion_models"):
        return MMDITX in kinds
    if folder == "vae":
        return kinds == {VAE}
    if folder == "text_encoders":
        if not kinds or not kinds <= TEXT_KINDS:
            return False
        return role is None or role in kinds or (role in (CLIP_L, CLIP_G) and "clip" in kinds)
    return False


def text_role(name: object) -> str | None:
    """The text encoder a file name says it is (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``), or
    None: what a CLIPLoader or DualCLIPLoader slot, which holds any encoder, expects in a fallback."""
    text = str(name).lower().replace("-", "_")
    for role, signs in ((T5XXL, ("t5",)), (CLIP_G, ("clip_g", "clipg")), (CLIP_L, ("clip_l", "clipl"))):
        if any(sign in text for sign in signs):
            return role
    return None


def _is_sd3_controlnet(path: Path) -> bool:
    """Whether ``path`` (a file or a diffusers folder) is an SD3-family ControlNet, from its headers."""
    try:
        read_controlnet(path)  # refuses the ControlNets of other families
    except SD35Error:
        return False
    return True


def check_name(name: object) -> str:
    """``name`` if it is a plain model name (a file, maybe in a sub-folder); else InvalidRequest."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"a model name must be a file name, got {name!r}.")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise InvalidRequest(
            f"{name!r} is a path; a workflow names a model by its file name in the models folder "
            "(sub-folders allowed, nothing outside it)."
        )
    return name


@dataclass
class ModelsDir:
    """ComfyUI's ``models/`` folder; None: no models folder, so every name is missing."""

    root: Path | None
    _kinds: dict[Path, frozenset[str]] = field(default_factory=dict, repr=False)

    def folders(self, folder: str) -> list[Path]:
        """The existing folders ComfyUI reads ``folder``'s names from."""
        if self.root is None:
            return []
        return [self.root / name for name in FOLDERS[folder] if (self.root / name).is_dir()]

    def names(self, folder: str) -> list[str]:
        """Every weight file of ``folder``, as a workflow names it (``sub/name.safetensors``), sorted."""
        found = {
            p.relative_to(base).as_posix()
            for base in self.folders(folder)
            for p in base.rglob("*")
            if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
        }
        return sorted(found)

    def kinds(self, path: Path) -> frozenset[str]:
        """The components ``path`` holds (empty for a file that is not SD3-family weights), read once."""
        if path not in self._kinds:
            try:
                self._kinds[path] = frozenset(c.kind for c in scan_file(path))
            except SD35Error:
                self._kinds[path] = frozenset()
        return self._kinds[path]

    def resolve(
        self, folder: str, name: object, *, role: str | None = None, avoid: Sequence[Path] = ()
    ) -> tuple[Path, str | None]:
        """The file ``name`` means in ``folder``, and a note when it was found by content instead.

        ``role`` narrows a text-encoder fallback to CLIP-L, CLIP-G or T5-XXL; ``avoid`` are files the
        same node already uses. Raises InvalidRequest for a path, NotFound for a missing name with no
        file to fall back to.
        """
        name = check_name(name)
        for base in self.folders(folder):
            candidate = base / name
            if candidate.is_file() or (candidate.is_dir() and folder != "loras"):
                return candidate, None
        where = " or ".join(f"{n}/" for n in FOLDERS[folder])
        root = f"the models folder {self.root}" if self.root else "the models folder (none was given)"
        if folder not in WANTED:
            raise NotFound(f"{name!r} is not in {where} of {root}; put the file there.")
        for p in self._candidates(folder, avoid):
            if _is_sd3_controlnet(p) if folder == "controlnet" else _fits(folder, self.kinds(p), role):
                shown = p.relative_to(self.root).as_posix() if self.root else str(p)
                return p, f"{name!r} is not in {where}; using {shown}, {WANTED[folder]} found by content."
        raise NotFound(
            f"{name!r} is not in {where} of {root}, and no file there is {WANTED[folder]}; put the file there."
        )

    def _candidates(self, folder: str, avoid: Sequence[Path]) -> list[Path]:
        """The files that may stand in for a missing name of ``folder``: for a ControlNet the weight files
        and diffusers folders of the ControlNet folders (a ControlNet is never elsewhere); else the weight
        files of the checkpoint, diffusion-model, text-encoder and VAE folders (a checkpoint may serve as
        the text encoders), less ``avoid``."""
        if folder == "controlnet":
            return [
                p
                for base in self.folders(folder)
                for p in sorted(base.rglob("*"))
                if (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES) or (p / "config.json").is_file()
            ]
        pool = [
            p
            for other in WANTED
            if other != "controlnet"
            for base in self.folders(other)
            for p in sorted(base.rglob("*"))
            if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES and p not in avoid
        ]
        return list(dict.fromkeys(pool))
