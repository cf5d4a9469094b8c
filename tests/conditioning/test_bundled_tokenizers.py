"""The tokenizers that ship inside sd35 are SD3's real ones and tokenize as the official reference does.

The reference (Stability-AI/sd3.5 ``other_impls.py``) uses transformers' slow ``CLIPTokenizer`` for both
CLIPs (run here from transformers 4.46 in a subprocess: transformers 5 has no slow one) and
``T5TokenizerFast`` for T5, each word on its own. Both are compared with ours on
:func:`~tests.conditioning.prompt_corpus.prompt_corpus` (1,200 generated prompts), word by word for every
word and row by row for every prompt that fits the reference's 77 tokens.
"""

from __future__ import annotations

import hashlib
import json
import lzma

import pytest

from sd35.conditioning.bundled import (
    CLIP_MERGES,
    CLIP_VOCAB_SIZE,
    CONTENT_SHA256,
    T5_JSON,
    T5_VOCAB_SIZE,
    bundled_tokenizer,
    read_bundled,
)
from sd35.conditioning.prompt import prompt_words
from sd35.conditioning.tokenize import ClipTokenizer
from sd35.errors import SD35Error
from tests.conditioning.prompt_corpus import prompt_corpus
from tests.conditioning.slow_clip_reference import slow_clip_ids

CORPUS = prompt_corpus()


@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """vocab.json + merges.txt as the diffusers repository ships them, written from the bundled merges."""
    folder = tmp_path_factory.mktemp("clip")
    text = read_bundled(CLIP_MERGES)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    vocab = ClipTokenizer.from_merges_text(text, "bundled")._tokenizer.get_vocab(with_added_tokens=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    from transformers import T5TokenizerFast

    folder = tmp_path_factory.mktemp("t5")
    (folder / "tokenizer.json").write_text(read_bundled(T5_JSON), encoding="utf-8")
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def _words(prompt: str) -> list[str]:
    return [w for w, _ in prompt_words(prompt)]


@pytest.fixture(scope="module")
def corpus_words():
    words = sorted({w for p in CORPUS for w in _words(p)})
    assert len(words) > 1500
    return words


def test_the_corpus_is_large_and_diverse():
    assert len(CORPUS) >= 1000 and len(set(CORPUS)) >= 1000
    text = "".join(CORPUS)
    for needle in ["(", ":1.2)", "https://", "&amp;", "\t", "\u3000", "\u200b", "👍🏽", "猫", "ΟΔΟΣ", "кошка",
                   "مرحبا", "नमस्ते", "Cafe\u0301", "1920x1080", "!!!"]:  # fmt: skip
        assert needle in text, needle
    assert any(p != p.lower() for p in CORPUS) and any(p.isupper() for p in CORPUS)


def test_bundled_files_are_the_pinned_ones():
    for path in (CLIP_MERGES, T5_JSON):
        assert path.stat().st_size < 500_000, path  # compressed: the package stays small
        content = lzma.decompress(path.read_bytes())
        assert hashlib.sha256(content).hexdigest() == CONTENT_SHA256[path.name], path


def test_vocabularies_are_sd3s(tok):
    assert tok.clip_l.vocab_size == CLIP_VOCAB_SIZE and (tok.clip_l.bos_id, tok.clip_l.eos_id) == (
        49406,
        49407,
    )
    assert tok.t5.vocab_size == T5_VOCAB_SIZE and tok.t5.eos_id == 1
    # the well-known CLIP ids of "a photo of a cat" (openai/clip-vit-large-patch14)
    out = tok(["a photo of a cat"])
    assert out.clip_l[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert out.clip_g[0, 7].item() == 0 and out.clip_l[0, 7].item() == 49407


def test_clip_words_equal_the_slow_clip_tokenizer(tok, clip_folder, corpus_words):
    reference = slow_clip_ids(clip_folder, corpus_words)
    ours = tok.clip_l.encode_words(corpus_words)
    wrong = [(w, o, r) for w, o, r in zip(corpus_words, ours, reference, strict=True) if o != r]
    assert not wrong, f"{len(wrong)} of {len(corpus_words)} words differ, e.g. {wrong[:5]}"


def test_t5_words_equal_t5_tokenizer_fast(tok, hf_t5, corpus_words):
    reference = [hf_t5(w)["input_ids"][:-1] for w in corpus_words]
    ours = tok.t5.encode_words(corpus_words)
    wrong = [(w, o, r) for w, o, r in zip(corpus_words, ours, reference, strict=True) if o != r]
    assert not wrong, f"{len(wrong)} of {len(corpus_words)} words differ, e.g. {wrong[:5]}"


def test_rows_equal_the_references(tok, clip_folder, hf_t5, corpus_words):
    """Whole rows, built the reference's way from its own per-word ids, for every prompt that fits."""
    clip = dict(zip(corpus_words, slow_clip_ids(clip_folder, corpus_words), strict=True))
    compared = 0
    for prompt in CORPUS:
        words = _words(prompt)
        c_ids = [t for w in words for t in clip[w]]
        t_ids = [t for w in words for t in hf_t5(w)["input_ids"][:-1]]
        if len(c_ids) > 75 or len(t_ids) > 76:
            continue
        compared += 1
        out = tok([prompt])
        row = [49406, *c_ids, 49407]
        assert out.clip_l[0].tolist() == row + [49407] * (77 - len(row)), prompt
        assert out.clip_g[0].tolist() == row + [0] * (77 - len(row)), prompt
        assert out.t5[0].tolist() == [*t_ids, 1] + [0] * (76 - len(t_ids)), prompt
        assert out.clip_dropped == out.t5_dropped == [0]
    assert compared >= 800


def test_damaged_data_is_one_clear_error(tmp_path):
    bad = tmp_path / CLIP_MERGES.name
    bad.write_bytes(CLIP_MERGES.read_bytes()[:1000])
    with pytest.raises(SD35Error, match="missing or damaged.*--tokenizers"):
        read_bundled(bad)
    with pytest.raises(SD35Error, match="missing or damaged"):
        read_bundled(tmp_path / "absent.xz")
