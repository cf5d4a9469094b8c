"""A T5 tokenizer from a SentencePiece ``spiece.model`` alone, without the sentencepiece package.

Some T5 tokenizer folders hold only ``spiece.model`` (the file Google released), no ``tokenizer.json``.
The model file is a protobuf ``ModelProto``; the few fields a Unigram tokenizer needs are read here with
a small wire-format reader (no protobuf dependency): the pieces with their scores and types
(field 1: ``piece`` 1, ``score`` 2, ``type`` 3), the trainer's ``unk_id`` (field 2, its field 40) and the
normalizer's precompiled character map and flags (field 3: ``precompiled_charsmap`` 2,
``add_dummy_prefix`` 3). From them :func:`tokenizer_from_spiece` builds the pipeline that transformers'
``T5TokenizerFast`` builds from ``spiece.model`` (the reference's T5 tokenizer class): the precompiled
normalizer, a split on whitespace, Metaspace with a leading ``▁``, Unigram; T5's 100 sentinels
``<extra_id_N>`` are appended (99 first) when the model lacks them. Checked against that conversion and
SentencePiece itself in ``tests/conditioning/test_tokenize.py``.
"""

from __future__ import annotations

import struct

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import Unigram

from sd35.errors import SD35Error

_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3
T5_EXTRA_IDS = 100


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varint/fixed fields, bytes for length-delimited."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((field, value))
    return out


def _read(data: bytes) -> tuple[list[tuple[str, float, int]], int, bytes, bool]:
    """(pieces as (piece, score, type), unk_id, precompiled charsmap, add_dummy_prefix) of a ModelProto."""
    pieces: list[tuple[str, float, int]] = []
    unk_id, charsmap, dummy_prefix = 0, b"", True
    for field, value in _fields(data):
        if field == 1:
            sub = dict(_fields(value))
            score = struct.unpack("<f", struct.pack("<I", sub.get(2, 0)))[0]
            pieces.append((sub[1].decode("utf-8"), score, sub.get(3, _NORMAL)))
        elif field == 2:
            unk_id = dict(_fields(value)).get(40, 0)
        elif field == 3:
            spec = dict(_fields(value))
            charsmap, dummy_prefix = spec.get(2, b""), bool(spec.get(3, 1))
    return pieces, unk_id, charsmap, dummy_prefix


def tokenizer_from_spiece(data: bytes, source: str) -> Tokenizer:
    """The tokenizers-library equivalent of the Unigram SentencePiece model in ``data`` (``spiece.model``)."""
    try:
        pieces, unk_id, charsmap, dummy_prefix = _read(data)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error, TypeError, AttributeError) as e:
        raise SD35Error(f"{source}: not a readable SentencePiece model ({e}).") from e
    if not pieces or not 0 <= unk_id < len(pieces):
        raise SD35Error(
            f"{source}: not a readable SentencePiece model (no pieces, or no unknown-token piece)."
        )
    vocab = [(p, s) for p, s, _t in pieces]
    if "<extra_id_0>" not in {p for p, _s in vocab}:
        vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tok = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    prepend = "always" if dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True),
        ]
    )
    specials = [p for p, _s, t in pieces if t in (_UNKNOWN, _CONTROL)] + [p for p, _s in vocab[len(pieces) :]]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok
