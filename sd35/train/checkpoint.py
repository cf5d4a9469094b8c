"""Training checkpoints that resume exactly, and final files that never replace existing ones.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/step-00000500/`` holding

- ``trainable.safetensors``: the trained parameters by name (float32, full tensors);
- ``ema.safetensors``: their moving averages, when EMA is on;
- ``state.pt``: optimizer and lr-scheduler state, step, epoch, the data sampler's state and every RNG
  state (Python, NumPy, torch CPU, CUDA) of every process, the world size and the configuration.

It is written to a hidden ``.step-00000500.partial-*`` folder first and renamed into place when complete,
so a folder named ``step-*`` is always whole: ``resume = "latest"`` takes the highest such step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd35.errors import SD35Error
from sd35.loading.safetensors_io import save_file_atomic

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")
FORMAT_VERSION = 1


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as (step, folder), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """The checkpoint folder ``resume`` names: ``latest`` (newest in output_dir) or a path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise SD35Error(
                f"resume = latest, but {checkpoint_dir(output_dir)} holds no checkpoint; train without --resume "
                "(checkpoints are written every save_every steps)."
            )
        return found[-1][1]
    path = Path(resume)
    if not (path / "state.pt").is_file():
        if path.is_dir() and list_checkpoints(path):  # an output folder: take its newest checkpoint
            return list_checkpoints(path)[-1][1]
        raise SD35Error(
            f"{path}: not a training checkpoint (a checkpoints/step-N folder with state.pt); "
            "pass one, or --resume latest."
        )
    return path


# ------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """Every global RNG state of this process."""
    state: dict[str, Any] = {
        "python": _py_state_to_list(random.getstate()),
        "numpy": _np_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_py_state_from_list(state["python"]))
    np.random.set_state(_np_state_from_dict(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _py_state_to_list(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_list(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def _np_state_to_dict(s: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = s
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _np_state_from_dict(d: dict[str, Any]) -> tuple:
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached"])


# ------------------------------------------------------------------------------------------ writing


def write_new_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file whole, failing rather than replacing a file."""
    return save_file_atomic(tensors, path, metadata, overwrite=False)


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically (rank 0 only); with ``keep`` > 0, delete all but the newest ``keep``."""
    from safetensors.torch import save_file

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists():
        raise SD35Error(f"{final} already exists; not replaced (is another run writing to {output_dir}?).")
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.partial-", dir=root))
    try:
        save_file(
            {k: v.detach().cpu().float().contiguous() for k, v in trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        if ema is not None:
            save_file(
                {k: v.detach().cpu().float().contiguous() for k, v in ema.items()},
                str(tmp / "ema.safetensors"),
            )
        torch.save({"format": FORMAT_VERSION, **state}, tmp / "state.pt")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``(trainable, ema or None, state)`` of a checkpoint folder (tensors on the CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        trainable = load_file(str(path / "trainable.safetensors"))
        ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    except FileNotFoundError as e:
        raise SD35Error(f"{path}: incomplete checkpoint ({e.filename} is missing).") from None
    except Exception as e:  # a damaged file: say which checkpoint
        raise SD35Error(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}).") from None
    if state.get("format") != FORMAT_VERSION:
        raise SD35Error(f"{path}: checkpoint format {state.get('format')} is not {FORMAT_VERSION}.")
    return trainable, ema, state
