"""Token ids for SD3's three text encoders, made the way the official reference makes them.

Only the ``tokenizers`` library is used at run time (no transformers, no sentencepiece). The files are
the ones SD3's diffusers repository ships: ``tokenizer/`` and ``tokenizer_2/`` (CLIP: ``vocab.json`` +
``merges.txt``) and ``tokenizer_3/`` (T5: ``tokenizer.json``); SD3's own copies ship inside the package
(:mod:`sd35.conditioning.bundled`).

What the reference does (Stability-AI/sd3.5 ``other_impls.py`` ``SD3Tokenizer``,
``SDTokenizer.tokenize_with_weights``), and so what :class:`SD3Tokenizer` does:

- Every prompt goes through the emphasis parser (:func:`sd35.conditioning.prompt.parse_weights`, which
  eats unescaped parentheses and ``:1.2`` weights), ``\\n`` becomes a space, the text is split on spaces
  and **each word is tokenized on its own** (no BOS/EOS); the words' tokens are concatenated.
- CLIP-L and CLIP-G: ``[BOS] + up to 75 tokens + [EOS]``, padded to 77 with EOS (CLIP-L) or with id 0
  (CLIP-G). Only the reference's first 77-token chunk is ever encoded, so a long prompt is cut at a word
  boundary: words are kept whole while they fit; the first word that does not fit ends the prompt,
  except that a word of 8 or more tokens is split to fill the chunk.
- T5: ``tokens + [EOS=1]``, padded with 0 to at least 77.

Where we differ on purpose (see :meth:`SD3Tokenizer.__call__`): the reference cuts the T5 text to its
first 226 *characters* and pads each prompt on its own, so a prompt with more than 76 T5 tokens gives
cond and uncond rows of different lengths, which its CFG cannot batch. We do not cut characters;
instead every row of a batch is padded to the same length (at least 77, at most ``t5_max_tokens``),
and a prompt longer than the cap is truncated with EOS kept last. Prompts with at most 76 T5 tokens
get exactly the reference's ids.

Two opt-in extensions, both off by default (then the ids are the reference's, as above):

- ``weighting="comfy"`` or ``"a1111"``: the emphasis weights are kept, one per token (BOS, EOS and padding
  get 1), in :attr:`SD3Tokens.clip_l_weights` etc.; ``[text]`` de-emphasis is parsed too (see
  :mod:`sd35.conditioning.prompt`). :class:`~sd35.conditioning.encode.TextConditioner` applies them.
- ``long_clip=True``: instead of cutting the CLIP text at 75 tokens, it is cut into chunks of 75 with the
  same word-boundary rule, each made ``BOS + tokens + EOS + padding`` (77), and the rows become 77*k long
  (ComfyUI ``comfy/sd1_clip.py``, ``SDTokenizer.tokenize_with_weights``, which builds the same chunks).
  Every prompt of a batch gets the same number k of chunks: shorter ones are padded with empty chunks
  (``BOS, EOS, padding``), as A1111's ``sd_hijack_clip`` pads a batch with ``empty_chunk()``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sd35.conditioning.prompt import prompt_words
from sd35.conditioning.spiece import tokenizer_from_spiece
from sd35.errors import MissingComponentError, SD35Error

CLIP_LENGTH = 77
T5_MIN_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
T5_EOS = "</s>"
T5_PAD_ID = 0
CLIP_G_PAD_ID = 0
_CLIP_CONTENT = CLIP_LENGTH - 2
# Words of this many tokens or more are split at the end of the chunk (the reference's max_word_length).
_LONG_WORD = 8
_CLIP_MAX_MERGES = 49152 - 256 - 2  # the slow CLIPTokenizer reads at most this many lines of merges.txt

# CLIP's pre-tokenization regex (OpenAI simple_tokenizer, used unchanged by transformers' CLIPTokenizer).
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The slow tokenizer's text cleaning (BERT's BasicTokenizer, used when ftfy is not installed, as in the
# reference's requirements): it drops NUL, U+FFFD and every "C*" category character except \t \n \r ...
_CONTROL = r"[[\p{C}\x{FFFD}]&&[^\t\n\r]]"
# ... and puts spaces around CJK ideographs, so each one is a word of its own.
_CJK = (
    "[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
    "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f]"
)
_CJK_RE = re.compile(_CJK)

SD35_REPO = "stabilityai/stable-diffusion-3.5-medium"
_WHERE_FROM = (
    f"they are the tokenizer/ (CLIP-L), tokenizer_2/ (CLIP-G) and tokenizer_3/ (T5) folders of the diffusers "
    f"repository {SD35_REPO} (https://huggingface.co/{SD35_REPO}/tree/main): download those folders into one "
    "folder and name that folder as the tokenizers, or name none: SD3's own tokenizers ship with sd35"
)
_CLIP_NEEDS = "vocab.json and merges.txt (or tokenizer.json)"
_T5_NEEDS = "tokenizer.json (or spiece.model)"


def clip_normalizer() -> normalizers.Normalizer:
    """The slow CLIPTokenizer's cleaning: drop control characters, NFC, collapse whitespace, lowercase."""
    return normalizers.Sequence(
        [
            normalizers.Replace(Regex(_CONTROL), ""),
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CJK ideographs apart, CLIP's regex (whitespace removed), then bytes mapped to printable characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_SPECIAL_SPLIT = re.compile(f"({re.escape(CLIP_BOS)}|{re.escape(CLIP_EOS)})")


def _is_cjk(ch: str) -> bool:
    return bool(_CJK_RE.match(ch))


def slow_clean(text: str) -> str:
    """The slow CLIPTokenizer's text cleaning without ftfy (BERT's BasicTokenizer, no accent stripping).

    NUL, U+FFFD and every "C*" category character except tab/newline/return are dropped, tab/newline/
    return and "Zs" spaces become spaces, CJK ideographs get spaces around them, NFC, then the text is
    split on whitespace (``str.split``) and each piece lowercased with ``str.lower``.
    """
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs":
            out.append(" ")
        elif ch in "\x00\ufffd" or cat.startswith("C"):
            continue
        elif _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return " ".join(t.lower() for t in unicodedata.normalize("NFC", "".join(out)).split())


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order (``"!"`` first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def clip_vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary, which its merges determine: the 256 byte symbols, the same with ``</w>``, each
    merge's result in merge order (a repeated result keeps its first id), then BOS and EOS (OpenAI CLIP
    ``simple_tokenizer.py`` builds its table this way; ``vocab.json`` is that table written out)."""
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


class ClipTokenizer:
    """CLIP's byte-level BPE (``</w>`` marks a word's last token), giving the slow CLIPTokenizer's ids.

    The slow (pure Python) tokenizer is what the reference uses; transformers' fast one skips its
    control-character removal and CJK splitting, which we keep (:func:`slow_clean`). Lowercasing uses
    Python's ``str.lower`` (as the slow tokenizer does; it differs from the Rust one on a word-final capital
    sigma). BOS/EOS are found as the slow tokenizer finds them: written exactly so anywhere, or in any case
    where CLIP's regex cuts out exactly that string. Checked against transformers 4.46's slow tokenizer on a
    corpus of 1,200 stress prompts (``tests/conditioning/test_bundled_tokenizers.py``).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "CLIP tokenizer"):
        for name in (CLIP_BOS, CLIP_EOS):
            if name not in vocab:
                raise SD35Error(
                    f"{source}: the vocabulary has no {name} token, so this is not a CLIP tokenizer."
                )
        self.bos_id = vocab[CLIP_BOS]
        self.eos_id = vocab[CLIP_EOS]
        self.vocab_size = len(vocab)
        try:
            model = BPE(
                vocab=vocab,
                merges=merges[:_CLIP_MAX_MERGES],
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=CLIP_EOS,
            )
        except Exception as e:  # the Rust side raises plain Exceptions
            raise SD35Error(f"{source}: the vocabulary and the merges do not fit together ({e}).") from e
        tok = Tokenizer(model)
        tok.normalizer = clip_normalizer()
        tok.pre_tokenizer = clip_pre_tokenizer()
        # BOS/EOS written in a prompt are found here, case-sensitively (see encode_words), not by the Rust
        # side, which would also take "<|STARTOFTEXT|>" once the text is lowercased.
        self._tokenizer = tok
        self._specials = {CLIP_BOS: self.bos_id, CLIP_EOS: self.eos_id}

    @classmethod
    def from_merges_text(cls, text: str, source: str) -> ClipTokenizer:
        """From the text of a ``merges.txt`` alone (the vocabulary follows from the merges)."""
        merges = _parse_merges(text.split("\n"), source)[:_CLIP_MAX_MERGES]
        return cls(clip_vocab_from_merges(merges), merges, source)

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """From ``vocab.json`` + ``merges.txt``, else from the BPE model inside ``tokenizer.json``."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if vocab_file.is_file() and merges_file.is_file():
            vocab = _read_json(vocab_file)
            merges = _parse_merges(_read_text(merges_file).split("\n"), merges_file)
            source = str(vocab_file)
        elif (folder / "tokenizer.json").is_file():
            source = str(folder / "tokenizer.json")
            model = _read_json(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise SD35Error(f"{source}: not a BPE tokenizer, so not a CLIP tokenizer.")
            vocab = model["vocab"]
            merges = [
                tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])
            ]
        else:
            raise MissingComponentError(
                f"{folder}: the CLIP tokenizer needs {_CLIP_NEEDS}; {_WHERE_FROM}.", param="tokenizers"
            )
        if not isinstance(vocab, dict):
            raise SD35Error(f"{source}: expected a JSON object mapping tokens to ids.")
        return cls(vocab, merges, source)

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        """Each word's ids, without BOS/EOS (the reference's ``tokenizer(word)["input_ids"][1:-1]``)."""
        # One call per word (prompts are short): encode_batch would start the Rust thread pool, which
        # makes tokenizers warn if the process forks later.
        return [self._encode_word(w) for w in words]

    def _encode_word(self, word: str) -> list[int]:
        """The slow tokenizer's order: split off BOS/EOS written exactly so, clean and lowercase the rest.

        Lowercasing (Python's, for the word-final sigma) comes after control characters are dropped, as in
        BERT's BasicTokenizer, since a dropped character can stand between a sigma and the next letter.
        """
        ids: list[int] = []
        for part in _SPECIAL_SPLIT.split(word):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                text = slow_clean(part)
                if CLIP_BOS in text or CLIP_EOS in text:
                    ids += self._encode_pieces(text)
                else:
                    ids += self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def _encode_pieces(self, text: str) -> list[int]:
        """Text in which BOS/EOS appear only after lowercasing ("<|EndOfText|>"): the slow tokenizer gives
        the special id where CLIP's regex cuts out exactly that string (its BPE cache holds both), and BPE
        pieces where the string is part of a longer match (``"、<|endoftext|>"`` is one punctuation run)."""
        tok = self._tokenizer
        ids: list[int] = []
        for piece, _span in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            if piece in self._specials:
                ids.append(self._specials[piece])
            else:
                ids += [t.id for t in tok.model.tokenize(piece)]
        return ids


class T5Tokenizer:
    """T5's SentencePiece-style Unigram tokenizer, read from a ``tokenizer.json`` as it is."""

    def __init__(self, tokenizer: Tokenizer, source: str = "T5 tokenizer"):
        eos = tokenizer.token_to_id(T5_EOS)
        if eos is None:
            raise SD35Error(f"{source}: the vocabulary has no {T5_EOS} token, so this is not a T5 tokenizer.")
        self.eos_id = eos
        self.pad_id = T5_PAD_ID
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer

    @classmethod
    def from_json_text(cls, text: str, source: str) -> T5Tokenizer:
        """From the text of a ``tokenizer.json``."""
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:
            raise SD35Error(f"{source}: cannot read this tokenizer file ({e}).") from e
        return cls(tokenizer, source)

    @classmethod
    def from_folder(cls, folder: Path) -> T5Tokenizer:
        """From ``tokenizer.json``, else from a SentencePiece ``spiece.model`` (:mod:`sd35.conditioning.spiece`)."""
        path = Path(folder) / "tokenizer.json"
        spiece = Path(folder) / "spiece.model"
        if not path.is_file() and spiece.is_file():
            try:
                data = spiece.read_bytes()
            except OSError as e:
                raise SD35Error(f"{spiece}: cannot read this tokenizer file ({e}).") from e
            return cls(tokenizer_from_spiece(data, str(spiece)), str(spiece))
        if not path.is_file():
            raise MissingComponentError(
                f"{folder}: the T5 tokenizer needs {_T5_NEEDS}; {_WHERE_FROM}.", param="tokenizers"
            )
        return cls.from_json_text(_read_text(path), str(path))

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        """Each word's ids without EOS (the reference's ``tokenizer(word)["input_ids"][:-1]``)."""
        return [self._tokenizer.encode(w, add_special_tokens=False).ids for w in words]


T5_MAX_TOKENS = 256
"""The T5 prompt limit SD3.5 Medium's model card gives (longer prompts are cut with a warning)."""

Weighting = Literal["none", "comfy", "a1111"]
"""How ``(word:1.2)`` emphasis is applied: ignored (the reference), ComfyUI's way or A1111's."""

WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


@dataclass
class SD3Tokens:
    """Token ids for one batch of prompts; every row of a tensor has the same length.

    ``clip_dropped`` / ``t5_dropped`` say, per prompt, how many tokens did not fit (CLIP reads only
    75 unless ``long_clip``; T5 stops at ``t5_max_tokens``), so that the caller can warn.

    The ``*_weights`` tensors hold one float32 weight per token, of the ids' shapes; they are all ones
    unless the prompt was tokenized with a ``weighting``, which :class:`~sd35.conditioning.encode.TextConditioner`
    reads from ``weighting``. ``*_empty`` are the empty prompt's ids, one row of one CLIP chunk (77) or
    of the T5 length, which the ``"comfy"`` weighting encodes. Left out (``None``), the weights are
    filled with ones.
    """

    clip_l: torch.Tensor  # [B, 77*k] int64: k chunks of BOS, tokens, EOS, EOS padding (k = 1 by default)
    clip_g: torch.Tensor  # [B, 77*k] int64: k chunks of BOS, tokens, EOS, 0 padding
    t5: torch.Tensor | None  # [B, L] int64: tokens, EOS, 0 padding; None without a T5 tokenizer
    clip_dropped: list[int]
    t5_dropped: list[int]
    clip_l_weights: torch.Tensor | None = None  # [B, 77*k] float32
    clip_g_weights: torch.Tensor | None = None  # [B, 77*k] float32
    t5_weights: torch.Tensor | None = None  # [B, L] float32; None when t5 is None
    clip_l_empty: torch.Tensor | None = None  # [1, 77] int64
    clip_g_empty: torch.Tensor | None = None  # [1, 77] int64
    t5_empty: torch.Tensor | None = None  # [1, L] int64
    weighting: str = "none"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise SD35Error(f"weighting must be one of {', '.join(WEIGHTINGS)} (it was {self.weighting!r}).")
        if self.clip_l_weights is None:
            self.clip_l_weights = torch.ones(self.clip_l.shape, dtype=torch.float32)
        if self.clip_g_weights is None:
            self.clip_g_weights = torch.ones(self.clip_g.shape, dtype=torch.float32)
        if self.t5_weights is None and self.t5 is not None:
            self.t5_weights = torch.ones(self.t5.shape, dtype=torch.float32)

    @property
    def clip_chunks(self) -> int:
        """How many 77-token CLIP chunks each row holds (1 unless tokenized with ``long_clip``)."""
        return max(1, -(-self.clip_l.shape[1] // CLIP_LENGTH))


class SD3Tokenizer:
    """The three tokenizers of SD3 / SD3.5, applied the reference's way (see the module docstring)."""

    def __init__(self, clip_l: ClipTokenizer, clip_g: ClipTokenizer, t5: T5Tokenizer | None):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5

    @classmethod
    def from_folders(cls, clip_l: Path, clip_g: Path, t5: Path | None = None) -> SD3Tokenizer:
        """From the three tokenizer folders (``t5=None``: no T5 tokens). All missing files are named at once."""
        needed = [("CLIP-L", clip_l, _CLIP_NEEDS), ("CLIP-G", clip_g, _CLIP_NEEDS)]
        if t5 is not None:
            needed.append(("T5", t5, _T5_NEEDS))
        missing = [
            f"{folder} ({name}) needs {needs}"
            for name, folder, needs in needed
            if not _has_files(Path(folder), name == "T5")
        ]
        if missing:
            raise MissingComponentError(
                f"tokenizer files are missing: {'; '.join(missing)}; {_WHERE_FROM}.", param="tokenizers"
            )
        return cls(
            ClipTokenizer.from_folder(Path(clip_l)),
            ClipTokenizer.from_folder(Path(clip_g)),
            T5Tokenizer.from_folder(Path(t5)) if t5 is not None else None,
        )

    @classmethod
    def from_root(cls, root: Path, *, t5: bool | None = None) -> SD3Tokenizer:
        """From a folder holding ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` (a diffusers folder).

        ``clip_l/``, ``clip_g/``, ``t5xxl/`` are accepted too. ``t5``: ``None`` loads the T5 tokenizer
        when its folder exists, ``True`` requires it, ``False`` skips it.
        """
        root = Path(root)
        if not root.is_dir():
            raise MissingComponentError(
                f"{root}: no such tokenizer folder; {_WHERE_FROM}.", param="tokenizers"
            )
        clip_l = _first_dir(root, ("tokenizer", "clip_l"))
        clip_g = _first_dir(root, ("tokenizer_2", "clip_g"))
        t5_dir = _first_dir(root, ("tokenizer_3", "t5xxl")) if t5 is not False else None
        if t5 and t5_dir is None:
            t5_dir = root / "tokenizer_3"
        return cls.from_folders(clip_l or root / "tokenizer", clip_g or root / "tokenizer_2", t5_dir)

    def __call__(
        self,
        prompts: Sequence[str],
        t5_max_tokens: int = T5_MAX_TOKENS,
        *,
        weighting: str = "none",
        long_clip: bool = False,
    ) -> SD3Tokens:
        """Tokenize a batch. T5 rows are padded to ``L = min(max(77, longest row), t5_max_tokens)``.

        Unlike the reference, the T5 text is not cut to 226 characters: that cut only kept most
        prompts under the 77 tokens its un-batched padding could handle (longer cond and uncond rows
        had different lengths). A common length per batch plus the token cap replace it, and the cap
        truncates at a token with EOS kept last.

        ``weighting``: ``"none"`` (the reference: weights parsed and ignored, all ones), ``"comfy"`` or
        ``"a1111"`` (keep the per-token weights, parse ``[text]``; the conditioner applies them the chosen
        way). ``long_clip``: keep every CLIP token, in 77-token chunks, instead of the first 75 tokens.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if t5_max_tokens < 1:
            raise SD35Error(f"t5_max_tokens must be at least 1 (it was {t5_max_tokens}).")
        if weighting not in WEIGHTINGS:
            raise SD35Error(f"weighting must be one of {', '.join(WEIGHTINGS)} (it was {weighting!r}).")
        weighted = weighting != "none"
        l_chunks, g_chunks, clip_dropped, t5_rows = [], [], [], []
        for prompt in prompts:
            words = prompt_words(prompt, brackets=weighted)
            text = [w for w, _weight in words]
            weights = [weight if weighted else 1.0 for _w, weight in words]
            l_ids, g_ids = self.clip_l.encode_words(text), self.clip_g.encode_words(text)
            l_chunks.append(_clip_chunks(l_ids, weights))
            g_chunks.append(_clip_chunks(g_ids, weights))
            if long_clip:
                clip_dropped.append(0)
            else:
                l_chunks[-1], g_chunks[-1] = l_chunks[-1][:1], g_chunks[-1][:1]
                l_lost = sum(map(len, l_ids)) - len(l_chunks[-1][0])
                g_lost = sum(map(len, g_ids)) - len(g_chunks[-1][0])
                clip_dropped.append(max(l_lost, g_lost))
            if self.t5 is not None:
                ids = self.t5.encode_words(text)
                t5_rows.append(
                    [(t, w) for word, w in zip(ids, weights, strict=True) for t in word]
                    + [(self.t5.eos_id, 1.0)]
                )

        chunks = max([1, *map(len, l_chunks), *map(len, g_chunks)])
        l_rows = [_clip_row(c, chunks, self.clip_l, pad=self.clip_l.eos_id) for c in l_chunks]
        g_rows = [_clip_row(c, chunks, self.clip_g, pad=CLIP_G_PAD_ID) for c in g_chunks]
        clip_length = CLIP_LENGTH * chunks

        t5_tensor = t5_weights = t5_empty = None
        t5_dropped = [0] * len(prompts)
        if self.t5 is not None:
            length = min(max([T5_MIN_LENGTH, *map(len, t5_rows)]), t5_max_tokens)
            t5_dropped = [max(0, len(r) - length) for r in t5_rows]
            eos = (self.t5.eos_id, 1.0)
            t5_rows = [r if len(r) <= length else [*r[: length - 1], eos] for r in t5_rows]
            t5_rows = [r + [(self.t5.pad_id, 1.0)] * (length - len(r)) for r in t5_rows]
            t5_tensor, t5_weights = _ids(t5_rows, length), _weights(t5_rows, length)
            t5_empty = _ids([[eos, *[(self.t5.pad_id, 1.0)] * (length - 1)]], length)
        return SD3Tokens(
            clip_l=_ids(l_rows, clip_length),
            clip_g=_ids(g_rows, clip_length),
            t5=t5_tensor,
            clip_dropped=clip_dropped,
            t5_dropped=t5_dropped,
            clip_l_weights=_weights(l_rows, clip_length),
            clip_g_weights=_weights(g_rows, clip_length),
            t5_weights=t5_weights,
            clip_l_empty=_ids([_clip_row([[]], 1, self.clip_l, pad=self.clip_l.eos_id)], CLIP_LENGTH),
            clip_g_empty=_ids([_clip_row([[]], 1, self.clip_g, pad=CLIP_G_PAD_ID)], CLIP_LENGTH),
            t5_empty=t5_empty,
            weighting=weighting,
        )


_Token = tuple[int, float]  # (id, weight)


def _clip_chunks(words: list[list[int]], weights: list[float]) -> list[list[_Token]]:
    """The reference's CLIP chunks: lists of at most 75 (id, weight) tokens, BOS/EOS not included.

    Words go in whole while they fit in the 75 content slots. A word that does not fit starts the next
    chunk; a word of 8 or more tokens is split instead, filling the chunk and going on in the next
    (Stability-AI/sd3.5 ``other_impls.py`` and ComfyUI ``comfy/sd1_clip.py``, both
    ``SDTokenizer.tokenize_with_weights``). There is
    always at least one chunk (empty for an empty prompt). The reference encodes only the first one.
    """
    chunks: list[list[_Token]] = [[]]
    for ids, weight in zip(words, weights, strict=True):
        tokens = [(t, weight) for t in ids]
        split = len(tokens) >= _LONG_WORD
        while tokens:
            room = _CLIP_CONTENT - len(chunks[-1])
            if len(tokens) <= room:
                chunks[-1].extend(tokens)
                break
            if split:
                chunks[-1].extend(tokens[:room])
                tokens = tokens[room:]
            chunks.append([])
    return chunks


def _clip_row(chunks: list[list[_Token]], count: int, tok: ClipTokenizer, pad: int) -> list[_Token]:
    """``count`` chunks of ``BOS + tokens + EOS + padding`` (77 each), with empty chunks added at the end."""
    row: list[_Token] = []
    for content in chunks + [[]] * (count - len(chunks)):
        chunk = [(tok.bos_id, 1.0), *content, (tok.eos_id, 1.0)]
        row += chunk + [(pad, 1.0)] * (CLIP_LENGTH - len(chunk))
    return row


def _ids(rows: list[list[_Token]], length: int) -> torch.Tensor:
    return _tensor([[t for t, _w in r] for r in rows], length)


def _weights(rows: list[list[_Token]], length: int) -> torch.Tensor:
    if not rows:
        return torch.ones((0, length), dtype=torch.float32)
    return torch.tensor([[w for _t, w in r] for r in rows], dtype=torch.float32)


def _tensor(rows: list[list[int]], length: int) -> torch.Tensor:
    if not rows:
        return torch.zeros((0, length), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def _has_files(folder: Path, is_t5: bool) -> bool:
    if is_t5:
        return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()
    has_pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return has_pair or (folder / "tokenizer.json").is_file()


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SD35Error(f"{path}: cannot read this tokenizer file ({e}).") from e


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise SD35Error(f"{path}: not valid JSON ({e}); the download may be incomplete.") from e
    if not isinstance(data, dict):
        raise SD35Error(f"{path}: expected a JSON object.")
    return data


def _parse_merges(lines: list[str], path: Path | str) -> list[tuple[str, str]]:
    """``merges.txt``: an optional ``#version`` header, then one ``left right`` pair a line."""
    first = 1 if lines and lines[0].startswith("#") else 0
    merges = []
    for n, line in enumerate(lines[first:], start=first + 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise SD35Error(f"{path}, line {n}: expected two tokens separated by a space, got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges
