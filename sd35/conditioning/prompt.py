"""Prompt pre-processing: the official SD3.5 reference's emphasis parser (Stability-AI/sd3.5
``other_impls.py`` ``token_weights``, ``parse_parentheses``, ``escape_important``), optional A1111 square
brackets, and the prompt-file reader.

Before tokenizing, the reference runs every prompt through an A1111-style emphasis parser:

- ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies again: ``((text))`` is 1.21;
- ``(text:1.3)`` sets the weight to 1.3 (it replaces the weight, it does not multiply it);
- ``\\(`` and ``\\)`` are literal parentheses; the unescaped parentheses of a group are removed from the text.

The reference computes the weights and then ignores them: its encoders read only token ids. With
``brackets=False`` (the default, and what the reference path uses) we parse exactly like it, so the text
and hence the token ids stay identical. Prompt weighting (:mod:`sd35.conditioning.encode`) uses the
weights; it also turns on ``brackets=True``, which adds A1111's de-emphasis (AUTOMATIC1111
stable-diffusion-webui ``modules/prompt_parser.py``, ``parse_prompt_attention``):

- ``[text]`` multiplies the weight by ``1 / 1.1``; ``[[text]]`` by ``1 / 1.1**2``. Square brackets take no
  ``:weight`` (as in A1111, where ``[a:b:n]`` is prompt-editing syntax, which we do not support): in
  ``[cat:1.2]`` the text ``cat:1.2`` gets weight ``1 / 1.1``;
- ``\\[`` and ``\\]`` are literal square brackets.

Our ``(text:1.3)`` keeps the reference's (and ComfyUI's) meaning: the number replaces the weight. In
A1111 it multiplies the enclosing weight, so ``((cat:1.3))`` is 1.3 here and 1.43 in A1111.

The parser keeps the reference's quirks on unbalanced input: an unclosed ``(`` stays in the text, and
after a stray ``)`` the rest of the prompt is read literally, parentheses included. With brackets on,
``[`` and ``]`` count like ``(`` and ``)`` for that, and a group opened with one kind and closed with the
other (``(a]``) is read literally.
"""

from __future__ import annotations

from pathlib import Path

from sd35.errors import SD35Error

# Escaped brackets become these two-character items, which never compare equal to "(" or ")".
_ESCAPES = ("\\(", "\\)")
_BRACKET_ESCAPES = ("\\[", "\\]")
_EMPHASIS = 1.1
# A1111 multiplies by this (prompt_parser.py: square_bracket_multiplier = 1 / 1.1) rather than dividing by 1.1.
_DEEMPHASIS = 1 / 1.1


def parse_weights(text: str, brackets: bool = False) -> list[tuple[str, float]]:
    """Split ``text`` into ``(segment, weight)`` pairs, with group brackets and escapes resolved.

    ``brackets=False`` is the reference's parser: ``[`` and ``]`` are ordinary text. ``brackets=True``
    adds ``[text]`` (weight times ``1 / 1.1``) and the escapes ``\\[``, ``\\]``.

    >>> parse_weights("a (red:1.3) ((cat)) \\\\(b\\\\)")
    [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 1.2100000000000002), (' (b)', 1.0)]
    >>> parse_weights("[dog] [cat]", brackets=True)
    [('dog', 0.9090909090909091), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    out: list[tuple[str, float]] = []
    _weigh(_items(text, brackets), 1.0, out, brackets)
    return out


def prompt_words(text: str, brackets: bool = False) -> list[tuple[str, float]]:
    """The words the reference tokenizes one by one: each segment with ``\\n`` -> space, split on spaces.

    Empty words are dropped. Only the space character separates words (other whitespace such as tabs
    stays inside a word and is handled by the tokenizer), as in the reference. ``brackets``: as in
    :func:`parse_weights`.
    """
    words: list[tuple[str, float]] = []
    for segment, weight in parse_weights(text, brackets):
        words.extend((w, weight) for w in segment.replace("\n", " ").split(" ") if w)
    return words


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file: one prompt a line, UTF-8 (a leading byte-order mark is accepted).

    Blank lines, and lines whose first non-blank character is ``#`` (comments), are skipped; each prompt
    has its surrounding whitespace removed. A missing or unreadable file, text that is not UTF-8, or a
    file with no prompt raises :class:`~sd35.errors.SD35Error`.
    """
    path = Path(path)
    if not path.exists():
        raise SD35Error(f"{path}: no such prompt file.")
    if not path.is_file():
        raise SD35Error(f"{path}: not a file; a prompt file is a text file with one prompt a line.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SD35Error(f"{path}: the prompt file is not UTF-8 text ({e}); save it as UTF-8.") from e
    except OSError as e:
        raise SD35Error(f"{path}: cannot read the prompt file ({e}).") from e
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SD35Error(
            f"{path}: the prompt file has no prompt (it is empty, or holds only blank lines and # comments); "
            "write one prompt a line."
        )
    return prompts


def _items(text: str, brackets: bool) -> list[str]:
    """The text as a list of characters, with each escape (``\\(`` ...) kept together as one item."""
    escapes = _ESCAPES + _BRACKET_ESCAPES if brackets else _ESCAPES
    items: list[str] = []
    i = 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in escapes:
            items.append(pair)
            i += 2
        else:
            items.append(text[i])
            i += 1
    return items


def _join(items: list[str]) -> str:
    return "".join(c[1] if len(c) == 2 else c for c in items)


def _groups(items: list[str], brackets: bool) -> list[list[str]]:
    """Top-level pieces: plain text runs and ``( ... )`` groups (with their outer brackets).

    An opening bracket at depth 0 starts a new piece; the closing one that brings the depth back to 0
    ends it. A stray closing bracket makes the depth negative, after which nothing starts a new group
    until it is back at 0. With ``brackets``, ``[`` and ``]`` count like ``(`` and ``)``.
    """
    opens, closes = ("(", "[") if brackets else ("(",), (")", "]") if brackets else (")",)
    groups: list[list[str]] = []
    current: list[str] = []
    depth = 0
    for c in items:
        if c in opens:
            if depth == 0 and current:
                groups.append(current)
                current = []
            current.append(c)
            depth += 1
        elif c in closes:
            depth -= 1
            current.append(c)
            if depth == 0:
                groups.append(current)
                current = []
        else:
            current.append(c)
    if current:
        groups.append(current)
    return groups


def _weigh(items: list[str], weight: float, out: list[tuple[str, float]], brackets: bool) -> None:
    for group in _groups(items, brackets):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner = group[1:-1]
            inner_weight = weight * _EMPHASIS
            colon = max((i for i, c in enumerate(inner) if c == ":"), default=-1)
            if colon > 0:  # "(:2)" is not a weight: the colon must follow some text
                try:
                    inner_weight = float(_join(inner[colon + 1 :]))
                    inner = inner[:colon]
                except ValueError:
                    pass
            _weigh(inner, inner_weight, out, brackets)
        elif brackets and len(group) >= 2 and group[0] == "[" and group[-1] == "]":
            _weigh(group[1:-1], weight * _DEEMPHASIS, out, brackets)
        else:
            out.append((_join(group), weight))
