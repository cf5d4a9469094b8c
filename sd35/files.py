"""Writing files whole or not at all: the one way sd35 puts an output on disk.

Every output (a PNG, a LoRA, a checkpoint, a cache entry) is written to a temporary file in the target's
folder and only then given its name, so a crash or a full disk never leaves a half-written file under the
real name. The temporary file gets the mode a plainly created file would get (``0o666`` less the umask),
not ``mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from sd35.errors import SD35Error

IfExists = Literal["replace", "refuse", "number"]


def _umask() -> int:
    """The process umask, read without changing it where the system allows (a threaded server may be running)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def next_free_path(path: Path) -> Path:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext`` ... (the first name not taken)."""
    if not path.exists():
        return path
    i = 1
    while (candidate := path.with_name(f"{path.stem}-{i}{path.suffix}")).exists():
        i += 1
    return candidate


def check_writable_folder(folder: Path) -> None:
    """Raise a clear error now, not after minutes of work, if files cannot be created in ``folder``."""
    if not folder.is_dir():
        raise SD35Error(f"{folder}: output folder does not exist; create it first.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sd35-probe-", dir=folder)
    except OSError as e:
        raise SD35Error(f"{folder}: cannot write files in this folder ({e.strerror or e}).") from None
    os.close(fd)
    os.unlink(probe)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], if_exists: IfExists) -> Path:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, then give it its name; returns the name.

    ``if_exists``: "replace" renames over an existing file (for files sd35 owns, such as the live preview or
    a cache entry); "refuse" raises an :class:`SD35Error` if the name is taken, even if it appears while
    writing (a hard link never replaces); "number" takes the next free ``stem-N`` name instead.
    """
    path = Path(path)
    if if_exists == "refuse" and path.exists():
        raise SD35Error(f"{path} already exists; sd35 never overwrites a file. Move it or pick another name.")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if if_exists == "replace":
            os.replace(tmp, path)
            return path
        while True:
            target = next_free_path(path) if if_exists == "number" else path
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                if if_exists == "refuse":
                    raise SD35Error(
                        f"{path} already exists (it appeared while being written); not replaced."
                    ) from None
            except OSError:  # file systems without hard links: the check and the rename are not one step
                if target.exists():
                    if if_exists == "refuse":
                        raise SD35Error(f"{path} already exists; not replaced.") from None
                    continue
                os.replace(tmp, target)
                return target
    finally:
        if tmp.exists():
            tmp.unlink()
