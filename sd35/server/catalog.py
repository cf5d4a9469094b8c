"""The models and LoRAs a server's clients may pick, by name only.

Clients never send a file path: they send a name that a list endpoint returned, and this catalog, which
alone knows the files, turns it back into a path. Checkpoints are the ``.safetensors`` files at the top of
``models_dir``; LoRAs are those in its ``loras/`` (or A1111's ``Lora/``) folder; ControlNets those in its
``controlnet/`` (ComfyUI's name; A1111's ``ControlNet/``), as files or diffusers folders. A name is the
file's stem (a folder's name). The model the server started with is always listed, under its own name.
Each checkpoint's release (SD3.5 Medium, SD3.5 Large ...) is read from its file's header the first time a
list asks for it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sd35.errors import NotFound, SD35Error
from sd35.loading.components import MMDITX, scan
from sd35.models.family import identify
from sd35.models.mmditx import MMDiTXConfig

WEIGHT_SUFFIXES = (".safetensors",)
LORA_FOLDERS = ("loras", "Lora", "lora")
CONTROLNET_FOLDERS = ("controlnet", "ControlNet")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _scan(folder: Path | None) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")
    }


def release_of(path: Path) -> str | None:
    """The release title of the MMDiT-X in ``path`` (headers only), or None for a file that holds none or
    cannot be read: a listing shows what it can, loading the file says what is wrong with it."""
    try:
        found = [c for c in scan([path]) if c.kind == MMDITX]
        if not found:
            return None
        cfg = MMDiTXConfig.from_state_dict(found[0].tensors)
        return identify(cfg, found[0].metadata, path.stem).title
    except (SD35Error, OSError, ValueError):
        return None


def _scan_controlnets(folder: Path) -> dict[str, Path]:
    """Weight files and diffusers ControlNet folders (those holding diffusion_pytorch_model.safetensors)."""
    found = _scan(folder)
    if folder.is_dir():
        found.update(
            {p.name: p for p in folder.iterdir() if p.is_dir() and (p / DIFFUSERS_WEIGHTS).is_file()}
        )
    return dict(sorted(found.items()))


def _missing(kind: str, name: str, known: list[str]) -> NotFound:
    listing = f"the server has: {', '.join(known)}" if known else "the server has none (see --models-dir)"
    return NotFound(f"no {kind} named {name!r}; {listing}.", param="loras" if kind == "LoRA" else "controls")


class ModelCatalog:
    """Names to files, rescanned by :meth:`refresh` (A1111's refresh-checkpoints / refresh-loras)."""

    def __init__(self, default_name: str, default_path: Path | None, models_dir: Path | None):
        self.default_name = default_name
        self.default_path = default_path
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._checkpoints: dict[str, Path] = {}
        self._loras: dict[str, Path] = {}
        self._releases: dict[tuple[Path, int], str | None] = {}  # (file, mtime) -> release_of(file)
        self._controlnets: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the folders again (new files appear, removed ones go)."""
        checkpoints = _scan(self.models_dir)
        loras: dict[str, Path] = {}
        controlnets: dict[str, Path] = {}
        if self.models_dir is not None:
            for name in LORA_FOLDERS:
                loras.update(_scan(self.models_dir / name))
            for name in CONTROLNET_FOLDERS:
                controlnets.update(_scan_controlnets(self.models_dir / name))
        checkpoints.pop(self.default_name, None)
        with self._lock:
            self._checkpoints = {self.default_name: self.default_path, **checkpoints}  # type: ignore[dict-item]
            self._loras = loras
            self._controlnets = controlnets

    @property
    def checkpoints(self) -> list[str]:
        with self._lock:
            return list(self._checkpoints)

    @property
    def loras(self) -> list[str]:
        with self._lock:
            return list(self._loras)

    @property
    def controlnets(self) -> list[str]:
        with self._lock:
            return list(self._controlnets)

    def controlnet(self, name: str) -> Path:
        """The file or folder of ControlNet ``name``; the pipeline's ``control_source``."""
        with self._lock:
            path = self._controlnets.get(name)
            known = list(self._controlnets)
        if path is None:
            raise _missing("ControlNet", name, known)
        return path

    def checkpoint(self, name: str) -> Path | None:
        """The file of checkpoint ``name`` (None: the model the server started with, as it was loaded)."""
        with self._lock:
            if name not in self._checkpoints:
                raise NotFound(
                    f"no model named {name!r}; the server has: {', '.join(self._checkpoints)}.", param="model"
                )
            return self._checkpoints[name]

    def release(self, name: str) -> str | None:
        """The release of checkpoint ``name`` as its file says (None: unknown, or the built-in model's)."""
        with self._lock:
            path = self._checkpoints.get(name)
        if path is None or not path.is_file():
            return None
        key = (path, path.stat().st_mtime_ns)
        if key not in self._releases:
            self._releases[key] = release_of(path)
        return self._releases[key]

    def lora(self, name: str) -> Path:
        """The file of LoRA ``name``; the pipeline's ``lora_source``."""
        with self._lock:
            path = self._loras.get(name)
            known = list(self._loras)
        if path is None:
            raise _missing("LoRA", name, known)
        return path
