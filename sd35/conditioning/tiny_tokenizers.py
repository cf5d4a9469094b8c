"""Tiny SD3 tokenizer folders, built from a small built-in corpus (no downloads).

:func:`write_tiny_tokenizers` writes what SD3's diffusers repository ships, at toy vocabulary sizes
that fit the tiny text encoders of :func:`sd35.models.configs.tiny_configs`. The demo model ships them
(``sd35.demo.build``), ``sd35 bench`` loads random pipelines through them and the tests read them:

- ``tokenizer/`` and ``tokenizer_2/``: CLIP byte-level BPE (``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``, ``special_tokens_map.json``). The vocabulary has exactly ``clip_vocab``
  entries laid out like CLIP's: the 256 byte symbols, the same with ``</w>``, the merges in order, then
  ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids. ``tokenizer_2``'s pad token is ``"!"``
  (id 0), as in SD3's.
- ``tokenizer_3/``: a T5-style Unigram ``tokenizer.json`` (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
  Metaspace pre-tokenization, ``$A </s>`` post-processing) with at most ``t5_vocab`` ids, plus the
  config files ``T5TokenizerFast`` reads. It has no normalizer (real T5 carries SentencePiece's
  precompiled one, which only SentencePiece can build); transformers rebuilds T5 tokenizers without a
  normalizer when the file has none, so our ids and transformers' agree on any text.

The merges come from our own small BPE trainer and the Unigram pieces from substring counts: toy
quality, fully deterministic. The files load in transformers' ``CLIPTokenizer`` / ``CLIPTokenizerFast``
and ``T5TokenizerFast``, as ``StableDiffusion3Pipeline.from_pretrained`` loads them.
"""

from __future__ import annotations

import itertools
import json
import math
import string
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

from sd35.conditioning.tokenize import (
    CLIP_BOS,
    CLIP_EOS,
    byte_symbols,
    clip_normalizer,
    clip_pre_tokenizer,
    clip_vocab_from_merges,
)

_COLOURS = "red orange yellow green blue purple pink brown black white grey golden silver".split()  # noqa: SIM905
_SHAPES = "circle square triangle star heart cube sphere cone spiral line".split()  # noqa: SIM905
_OBJECTS = (  # noqa: SIM905
    "cat dog bird horse fish tree flower house car boat mountain river city castle robot astronaut "
    "woman man child apple cup book lamp chair window bridge train dragon owl"
).split()
_PLACES = [
    "on a beach",
    "in a forest",
    "in the city",
    "on the moon",
    "under the sea",
    "in a garden",
    "on a table",
    "in the snow",
    "at sunset",
    "at night",
    "next to the window",
]
_STYLES = [
    "photo",
    "photograph",
    "oil painting",
    "watercolor",
    "digital art",
    "illustration",
    "pencil sketch",
    "3d render",
    "portrait",
    "close-up shot",
    "wide angle",
    "35mm film",
    "studio lighting",
    "bokeh",
    "highly detailed",
    "8k",
    "sharp focus",
    "cinematic",
]
_SENTENCES = [
    "a red circle on a blue background, photo",
    "a photo of a cat sitting on a wooden table",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of mountains at sunset",
    "close-up portrait of an old man with a grey beard, studio lighting",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of fruit: apples, oranges and grapes",
    "it's a beautiful day; don't forget the umbrella!",
    'a neon sign that says "hello world"',
    "two cups of coffee and 3 books on a shelf",
    "Cozy cafe interior with warm light, 50mm lens",
    "A small house by the lake, early morning fog",
    "macro photograph of a dew drop on a green leaf",
    "an old castle on a hill, dramatic clouds, matte painting",
    "futuristic city skyline at night with flying cars",
    "a cute robot holding a yellow umbrella in the rain",
    "still life with a vase of flowers, soft shadows",
    "a dragon made of glass, iridescent, octane render",
]


def corpus() -> list[str]:
    """The built-in English corpus: image-prompt-like sentences, always the same."""
    lines = list(_SENTENCES)
    for i in range(240):
        lines.append(
            f"a {_COLOURS[i % len(_COLOURS)]} {_SHAPES[(i * 7) % len(_SHAPES)]} and a "
            f"{_COLOURS[(i * 5 + 3) % len(_COLOURS)]} {_OBJECTS[(i * 11) % len(_OBJECTS)]} "
            f"{_PLACES[(i * 3) % len(_PLACES)]}, {_STYLES[(i * 13) % len(_STYLES)]}"
        )
    return lines


def _pseudo_words():
    """Letter strings ("aa", "ab", ... "aaa", ...) to merge once the corpus has nothing left to merge."""
    for n in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(letters)


def _word_symbols(piece: str) -> tuple[str, ...]:
    return (*piece[:-1], piece[-1] + "</w>")


def train_clip_bpe(n_tokens: int, lines: list[str] | None = None) -> list[tuple[str, str]]:
    """Merges that add ``n_tokens`` new tokens, most frequent pair first (ties: the larger pair)."""
    normalizer, pre_tokenizer = clip_normalizer(), clip_pre_tokenizer()
    counts: Counter[tuple[str, ...]] = Counter()
    for line in lines if lines is not None else corpus():
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[_word_symbols(piece)] += 1
    words = dict(counts)
    pseudo = _pseudo_words()
    merges: list[tuple[str, str]] = []
    new_tokens: set[str] = set()
    while len(new_tokens) < n_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            for word in itertools.islice(pseudo, 64):
                words.setdefault(_word_symbols(word), 1)
            continue
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        new_tokens.add(a + b)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            key = _merge(symbols, a, b)
            merged[key] = merged.get(key, 0) + count
        words = merged
    return merges


def _merge(symbols: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _clip_files(clip_vocab: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = 2 * len(byte_symbols())
    if clip_vocab < base + 2:
        raise ValueError(f"clip_vocab must be at least {base + 2} (the byte symbols and BOS/EOS).")
    merges = train_clip_bpe(clip_vocab - base - 2)
    return clip_vocab_from_merges(merges), merges


def _added(content: str, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_clip(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {vocab[CLIP_BOS]: CLIP_BOS, vocab[CLIP_EOS]: CLIP_EOS, vocab[pad]: pad}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(i): {**_added(t, True), "special": True} for i, t in sorted(specials.items())
            },
            "bos_token": CLIP_BOS,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": _added(CLIP_BOS, True),
            "eos_token": _added(CLIP_EOS, True),
            "pad_token": _added(pad, True),
            "unk_token": _added(CLIP_EOS, True),
        },
    )


_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_MAX_PIECE = 10


def _t5_pieces(t5_vocab: int) -> list[tuple[str, float]]:
    """``(piece, log-probability)`` for a Unigram vocabulary: specials, characters, frequent substrings."""
    word_counts = Counter(w for line in corpus() for w in line.split())
    chars = sorted(set(string.printable.strip()) | {c for w in word_counts for c in w})
    n_free = t5_vocab - len(_T5_SPECIALS) - 1 - len(chars)
    if n_free < 0:
        raise ValueError(
            f"t5_vocab must be at least {t5_vocab - n_free} (the specials, '▁' and the characters)."
        )
    substrings: Counter[str] = Counter()
    single: Counter[str] = Counter()
    for word, count in word_counts.items():
        s = "▁" + word
        single.update({c: count for c in s})
        for i in range(len(s)):
            for j in range(i + 2, min(len(s), i + _MAX_PIECE) + 1):
                substrings[s[i:j]] += count
    # Prefer pieces that cover much text; ties broken by the piece itself, so the result never varies.
    best = sorted(substrings.items(), key=lambda kv: (-kv[1] * len(kv[0]), kv[0]))[:n_free]
    counts = {**{c: single.get(c, 0) + 1 for c in ["▁", *chars]}, **dict(best)}
    total = sum(counts.values())
    scored = sorted(((p, math.log(c / total)) for p, c in counts.items()), key=lambda ps: (-ps[1], ps[0]))
    return [(s, 0.0) for s in _T5_SPECIALS] + scored


def _write_t5(folder: Path, t5_vocab: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(Unigram(_t5_pieces(t5_vocab), unk_id=2, byte_fallback=False))
    # As transformers rebuilds a T5 tokenizer: split on whitespace, then "▁" before every word.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _T5_SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(i): {**_added(s, False), "special": True} for i, s in enumerate(_T5_SPECIALS)
            },
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": 0,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "eos_token": _added("</s>", False),
            "pad_token": _added("<pad>", False),
            "unk_token": _added("<unk>", False),
        },
    )


def write_tiny_tokenizers(root: Path, clip_vocab: int = 1000, t5_vocab: int = 500) -> dict[str, Path]:
    """Write ``root/tokenizer/``, ``root/tokenizer_2/`` (CLIP) and ``root/tokenizer_3/`` (T5); return the folders."""
    root = Path(root)
    vocab, merges = _clip_files(clip_vocab)
    folders = {name: root / name for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    _write_clip(folders["tokenizer"], vocab, merges, pad=CLIP_EOS)
    _write_clip(folders["tokenizer_2"], vocab, merges, pad="!")
    _write_t5(folders["tokenizer_3"], t5_vocab)
    return folders
