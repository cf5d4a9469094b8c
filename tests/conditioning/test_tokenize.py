"""Tokenization against transformers (and SentencePiece) applied the reference's way (Stability-AI/sd3.5
``other_impls.py`` ``SD3Tokenizer``, ``SDTokenizer.tokenize_with_weights``).

The reference tokenizes each word on its own with transformers' tokenizers, strips BOS/EOS, then
builds ``BOS + tokens + EOS + padding``. transformers 5 has no pure-Python CLIPTokenizer any more; its
CLIPTokenizer is the tokenizers-backed one, which agrees with the old slow one on ordinary prompts. The
slow tokenizer's extra text cleaning (control characters, CJK, Python lowercasing) is checked on its
own below.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sd35.conditioning.prompt import parse_weights, prompt_words
from sd35.conditioning.tiny_tokenizers import corpus, write_tiny_tokenizers
from sd35.conditioning.tokenize import ClipTokenizer, SD3Tokenizer, T5Tokenizer
from sd35.errors import SD35Error

PROMPTS = [
    "a red circle on a blue background, photo",
    "A Photo of a CAT sitting on a Table!!!",
    "it's a dog's life; don't STOP, we'll see... you're I'm they've he'd",
    "rock'n'roll 'quoted' \"double\" `tick`",
    "multiple    spaces   and\ttabs\nnewline\n\nlines",
    "digits 1234 and 3.14159 and 8k 35mm 1920x1080",
    "café naïve Ünïcödé straße résumé",
    "emoji 🐱🚀 ❤️ 👍🏽",
    "punctuation: [b] {c} <d> @#$%^&*_+=|/~",
    "hyphen-ated well-known state-of-the-art",
    "unicode quotes ‘single’ “double” — dash … ellipsis",
    "fullwidth ＡＢＣ１２３ and ligature ﬁne",
    "",
    "   ",
    "x",
]
LONG = " ".join(["red circle blue square"] * 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_tokenizers(tmp_path_factory.mktemp("tok") / "sd35-tiny")


@pytest.fixture(scope="module")
def tok(tiny):
    return SD3Tokenizer.from_root(tiny["tokenizer"].parent)


def _words(prompt: str) -> list[str]:
    return [w for w in prompt.replace("\n", " ").split(" ") if w]


def _pad(row: list[int], pad: int, length: int = 77) -> list[int]:
    return row + [pad] * (length - len(row))


def _reference_clip(hf, prompt: str, pad: int) -> list[int]:
    ids = [t for w in _words(prompt) for t in hf(w)["input_ids"][1:-1]]
    assert len(ids) <= 75
    return _pad([hf.bos_token_id, *ids, hf.eos_token_id], pad)


def _reference_t5(hf, prompt: str) -> list[int]:
    ids = [t for w in _words(prompt) for t in hf(w)["input_ids"][:-1]]
    assert len(ids) <= 76
    return _pad([*ids, hf.eos_token_id], hf.pad_token_id)


def _flat(clip: ClipTokenizer, text: str) -> list[int]:
    return [t for ids in clip.encode_words(_words(text)) for t in ids]


def test_tiny_files_load_as_diffusers_loads_them(tiny):
    from transformers import CLIPTokenizer, CLIPTokenizerFast, T5TokenizerFast

    vocab = json.loads((tiny["tokenizer"] / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 1000 and vocab["<|startoftext|>"] == 998 and vocab["<|endoftext|>"] == 999
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        clip_l, g = cls.from_pretrained(tiny["tokenizer"]), cls.from_pretrained(tiny["tokenizer_2"])
        assert (clip_l.bos_token_id, clip_l.eos_token_id, clip_l.pad_token_id) == (998, 999, 999)
        assert (g.bos_token_id, g.eos_token_id, g.pad_token, g.pad_token_id) == (998, 999, "!", 0)
    t5 = T5TokenizerFast.from_pretrained(tiny["tokenizer_3"])
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert len(t5) <= 500
    ids = t5("a red circle on a blue background")["input_ids"]
    assert ids[-1] == 1 and max(ids) < 500 and 2 not in ids


def test_tiny_files_are_deterministic(tiny, tmp_path):
    again = write_tiny_tokenizers(tmp_path / "again")
    for name, folder in tiny.items():
        for f in folder.iterdir():
            assert (again[name] / f.name).read_bytes() == f.read_bytes(), f


def test_clip_ids_match_transformers(tiny, tok):
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tiny["tokenizer"])  # the reference uses this one for L and G
    out = tok(PROMPTS)
    assert out.clip_l.shape == out.clip_g.shape == (len(PROMPTS), 77)
    assert out.clip_l.dtype == out.clip_g.dtype == torch.long
    for i, p in enumerate(PROMPTS):
        assert out.clip_l[i].tolist() == _reference_clip(hf, p, pad=hf.eos_token_id), p
        assert out.clip_g[i].tolist() == _reference_clip(hf, p, pad=0), p
    assert out.clip_dropped == [0] * len(PROMPTS)


def test_clip_cleans_text_like_the_slow_tokenizer(tok):
    # The slow CLIPTokenizer (BERT BasicTokenizer cleaning, no ftfy) drops control and format characters,
    # makes each CJK ideograph a word, and lowercases with Python's str.lower (word-final sigma).
    # Checked against transformers 4.46's slow CLIPTokenizer when this was written.
    c = tok.clip_l
    assert _flat(c, "一只猫") == _flat(c, "一 只 猫")
    assert _flat(c, "a\u200db\u200bc\x0bd\x00e\ufffdf") == _flat(c, "abcdef")
    assert _flat(c, "ΟΔΟΣ") == _flat(c, "οδος") != _flat(c, "οδοσ")
    assert _flat(c, "a\tb") == _flat(c, "a b")
    assert _flat(c, "Cafe\u0301") == _flat(c, "café")


def test_clip_from_tokenizer_json(tiny, tok, tmp_path):
    from transformers import CLIPTokenizer

    folder = tmp_path / "clip_json"
    folder.mkdir()
    CLIPTokenizer.from_pretrained(tiny["tokenizer"]).backend_tokenizer.save(str(folder / "tokenizer.json"))
    assert ClipTokenizer.from_folder(folder).encode_words(_words(PROMPTS[2])) == tok.clip_l.encode_words(
        _words(PROMPTS[2])
    )
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert ClipTokenizer.from_folder(folder).encode_words(_words(PROMPTS[6])) == tok.clip_l.encode_words(
        _words(PROMPTS[6])
    )


def test_t5_ids_match_transformers_on_tiny_files(tiny, tok):
    from transformers import T5TokenizerFast

    hf = T5TokenizerFast.from_pretrained(tiny["tokenizer_3"])
    out = tok(PROMPTS)
    assert out.t5.shape == (len(PROMPTS), 77) and out.t5.dtype == torch.long
    for i, p in enumerate(PROMPTS):
        assert out.t5[i].tolist() == _reference_t5(hf, p), p


@pytest.fixture(scope="module")
def spm_t5(tmp_path_factory):
    """A T5-style tokenizer trained with SentencePiece, converted and saved by transformers (tokenizer.json)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    (d / "src").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "src" / "spiece"),
        vocab_size=150,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    from transformers import T5TokenizerFast

    # transformers 5 converts spiece.model in from_pretrained (its constructor ignores vocab_file).
    hf = T5TokenizerFast.from_pretrained(d / "src")
    hf.save_pretrained(d / "t5")
    assert (d / "t5" / "tokenizer.json").is_file()
    return hf, spm.SentencePieceProcessor(model_file=str(d / "src" / "spiece.model")), d / "t5"


def test_t5_ids_match_transformers_and_sentencepiece(spm_t5, tiny):
    hf, sp, folder = spm_t5
    tok = SD3Tokenizer.from_folders(tiny["tokenizer"], tiny["tokenizer_2"], folder)
    out = tok(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert out.t5[i].tolist() == _reference_t5(hf, p), p
        assert tok.t5.encode_words(_words(p)) == [sp.encode(w) for w in _words(p)], p


def test_empty_prompt(tok):
    out = tok([""])
    assert out.clip_l[0].tolist() == [998, 999] + [999] * 75
    assert out.clip_g[0].tolist() == [998, 999] + [0] * 75
    assert out.t5[0].tolist() == [1] + [0] * 76
    assert out.clip_dropped == out.t5_dropped == [0]


def test_weights_and_parentheses(tok):
    plain, weighted = tok(["a red cat"]), tok(["a (red:1.2) ((cat))"])
    for name in ("clip_l", "clip_g", "t5"):
        assert torch.equal(getattr(plain, name), getattr(weighted, name)), name
    escaped = tok(["a \\(red\\) cat"])
    literal = _flat(tok.clip_l, "a (red) cat")
    assert escaped.clip_l[0, 1 : 1 + len(literal)].tolist() == literal
    assert not torch.equal(escaped.clip_l, plain.clip_l)
    # the groups split words: "x(y)z" is three words
    assert tok(["x(y)z"]).clip_l.tolist() == tok(["x y z"]).clip_l.tolist()


def test_clip_truncates_at_a_word_boundary(tok):
    c = tok.clip_l
    assert [len(ids) for ids in c.encode_words(["red", "qzxv", "qzxvqzxvqzxv"])] == [1, 4, 12]
    red = c.encode_words(["red"])[0][0]

    out = tok([" ".join(["red"] * 74 + ["qzxv", "red"])])  # qzxv does not fit: it ends the prompt
    assert out.clip_l[0].tolist() == [998] + [red] * 74 + [999, 999]
    assert out.clip_g[0].tolist() == [998] + [red] * 74 + [999, 0]
    assert out.clip_dropped == [5]

    out = tok([" ".join(["red"] * 74 + ["qzxvqzxvqzxv", "red"])])  # 8+ tokens: split to fill the chunk
    first = c.encode_words(["qzxvqzxvqzxv"])[0][0]
    assert out.clip_l[0].tolist() == [998] + [red] * 74 + [first, 999]
    assert out.clip_dropped == [12]

    out = tok([" ".join(["red"] * 75)])  # exactly full
    assert out.clip_l[0].tolist() == [998] + [red] * 75 + [999]
    assert out.clip_dropped == [0]


def test_t5_cap_keeps_eos_last(tok):
    full = tok([LONG])
    n = full.t5.shape[1]
    assert n > 80 and full.t5[0, -1].item() == 1 and full.t5_dropped == [0]
    assert full.clip_dropped[0] > 0

    capped = tok([LONG], t5_max_tokens=80)
    assert capped.t5.shape == (1, 80)
    assert capped.t5[0].tolist() == full.t5[0, :79].tolist() + [1]
    assert capped.t5_dropped == [n - 80]
    assert tok([""], t5_max_tokens=10).t5[0].tolist() == [1] + [0] * 9
    with pytest.raises(SD35Error, match="t5_max_tokens"):
        tok(["a"], t5_max_tokens=0)


def test_batch_rows_have_one_length(tok):
    out = tok([LONG, ""])
    single = tok([LONG])
    assert out.t5.shape == (2, single.t5.shape[1])
    assert torch.equal(out.t5[0], single.t5[0])
    assert out.t5[1].tolist() == [1] + [0] * (single.t5.shape[1] - 1)
    assert out.clip_l.shape == out.clip_g.shape == (2, 77)
    assert out.clip_dropped[1] == 0 and out.t5_dropped == [0, 0]
    assert tok([]).clip_l.shape == (0, 77)


def test_without_t5(tiny, tmp_path):
    tok = SD3Tokenizer.from_folders(tiny["tokenizer"], tiny["tokenizer_2"], None)
    out = tok(["a red cat", "b"])
    assert out.t5 is None and out.t5_dropped == [0, 0]
    assert SD3Tokenizer.from_root(tiny["tokenizer"].parent, t5=False).t5 is None

    root = tmp_path / "clip_only"
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny[name], root / name)
    assert SD3Tokenizer.from_root(root).t5 is None
    with pytest.raises(SD35Error, match="tokenizer_3.*tokenizer.json"):
        SD3Tokenizer.from_root(root, t5=True)


def test_other_folder_names(tiny, tok, tmp_path):
    root = tmp_path / "text_encoders"
    for src, dst in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5xxl")):
        shutil.copytree(tiny[src], root / dst)
    other = SD3Tokenizer.from_root(root)
    a, b = other(PROMPTS[:3]), tok(PROMPTS[:3])
    assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.clip_g, b.clip_g) and torch.equal(a.t5, b.t5)


def test_missing_files_are_named(tiny, tmp_path):
    with pytest.raises(SD35Error) as e:
        SD3Tokenizer.from_root(tmp_path, t5=True)
    msg = str(e.value)
    for part in ("tokenizer_2", "tokenizer_3", "vocab.json", "merges.txt", "tokenizer.json"):
        assert part in msg
    assert "stabilityai/stable-diffusion-3.5-medium" in msg

    root = tmp_path / "partial"
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny[name], root / name)
    (root / "tokenizer_3").mkdir()
    (root / "tokenizer_3" / "special_tokens_map.json").write_text("{}")
    (root / "tokenizer_2" / "merges.txt").unlink()
    with pytest.raises(SD35Error) as e:
        SD3Tokenizer.from_root(root)
    msg = str(e.value)
    assert "tokenizer_2 (CLIP-G) needs vocab.json and merges.txt" in msg
    assert "tokenizer_3 (T5) needs tokenizer.json (or spiece.model)" in msg
    assert "tokenizer (CLIP-L)" not in msg

    with pytest.raises(SD35Error, match="no such tokenizer folder"):
        SD3Tokenizer.from_root(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(tiny["tokenizer"], bad)
    (bad / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SD35Error, match="not valid JSON"):
        ClipTokenizer.from_folder(bad)
    (bad / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(SD35Error, match="startoftext"):
        ClipTokenizer.from_folder(bad)
    with pytest.raises(SD35Error, match="tokenizer.json"):
        T5Tokenizer.from_folder(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight replaces, it does not multiply
        ("a (b:1.2) c", [("a ", 1.0), ("b", 1.2), (" c", 1.0)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
        ("(red:1.2:0.5)", [("red:1.2", 0.5)]),  # the last colon
        ("(cat:x)", [("cat:x", 1.1)]),  # not a number: the colon stays
        ("(:2)", [(":2", 1.1)]),  # the colon must follow some text
        ("()", []),
        ("\\(cat\\)", [("(cat)", 1.0)]),
        ("(a \\) b)", [("a ) b", 1.1)]),
        ("a (b", [("a ", 1.0), ("(b", 1.0)]),  # unclosed: kept
        ("a) (b)", [("a) (b)", 1.0)]),  # after a stray ")" the rest is literal
        ("x\\y", [("x\\y", 1.0)]),
    ],
)
def test_parse_weights(text, expected):
    assert parse_weights(text) == expected


def test_prompt_words():
    assert prompt_words("a\nb  c") == [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    assert prompt_words("x(y)z") == [("x", 1.0), ("y", 1.1), ("z", 1.0)]
    assert prompt_words("(big red:1.5) dog\t!") == [("big", 1.5), ("red", 1.5), ("dog\t!", 1.0)]


def test_t5_from_spiece_model_alone_equals_transformers(spm_t5, tiny, tmp_path):
    from tests.conditioning.prompt_corpus import prompt_corpus

    hf, sp, folder = spm_t5  # hf: T5TokenizerFast converted from spiece.model by transformers
    only = tmp_path / "t5_spiece_only"
    only.mkdir()
    shutil.copy(folder.parent / "src" / "spiece.model", only / "spiece.model")
    ours = SD3Tokenizer.from_folders(tiny["tokenizer"], tiny["tokenizer_2"], only)
    assert ours.t5.vocab_size == len(hf) and ours.t5.eos_id == hf.eos_token_id == 1
    words = sorted({w for p in prompt_corpus() for w in _words(p)})
    assert ours.t5.encode_words(words) == [hf(w)["input_ids"][:-1] for w in words]
    plain = [w for w in words if w.isascii() and w.isalnum()]
    assert len(plain) > 100 and ours.t5.encode_words(plain) == [sp.encode(w) for w in plain]
    out = ours(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert out.t5[i].tolist() == _reference_t5(hf, p), p


@pytest.mark.parametrize("content", [b"\x0a\xff\xff\xff\x0f", b"\x0a\x02\x08\x01", b"", b"\x12\x03abc"])
def test_broken_spiece_model_is_one_clear_error(tiny, tmp_path, content):
    only = tmp_path / "t5"
    only.mkdir()
    (only / "spiece.model").write_bytes(content)
    with pytest.raises(SD35Error, match="spiece.model: not a readable SentencePiece model"):
        SD3Tokenizer.from_folders(tiny["tokenizer"], tiny["tokenizer_2"], only)
