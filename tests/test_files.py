"""Writing files whole or not at all, never over an existing one, with the mode the umask asks for."""

from __future__ import annotations

import os
import threading

import pytest

from sd35.errors import SD35Error
from sd35.files import check_writable_folder, next_free_path, write_atomic


def _text(content: str):
    def write(tmp):
        tmp.write_text(content)

    return write


def test_number_never_overwrites(tmp_path):
    target = tmp_path / "a.png"
    target.write_text("precious")
    assert write_atomic(target, _text("new"), "number") == tmp_path / "a-1.png"
    assert write_atomic(target, _text("newer"), "number") == tmp_path / "a-2.png"
    assert target.read_text() == "precious" and (tmp_path / "a-2.png").read_text() == "newer"
    assert next_free_path(target) == tmp_path / "a-3.png"


def test_refuse_and_replace(tmp_path):
    target = tmp_path / "w.safetensors"
    write_atomic(target, _text("one"), "refuse")
    with pytest.raises(SD35Error, match="never overwrites"):
        write_atomic(target, _text("two"), "refuse")
    assert write_atomic(target, _text("three"), "replace") == target and target.read_text() == "three"


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "x.png", broken, "number")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_atomic(tmp_path / f"m{umask:o}.txt", _text("x"), "number")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


def test_concurrent_writers_never_share_a_name(tmp_path):
    names = []

    def worker(i):
        names.append(write_atomic(tmp_path / "img.png", _text(str(i)), "number"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and sorted(p.read_text() for p in names) == [str(i) for i in range(8)]


def test_unwritable_or_missing_folder(tmp_path):
    with pytest.raises(SD35Error, match="does not exist"):
        check_writable_folder(tmp_path / "nope")
    with pytest.raises(SD35Error, match="cannot write files in this folder"):
        check_writable_folder(__import__("pathlib").Path("/proc"))
