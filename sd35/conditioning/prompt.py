"""Prompt pre-processing as the official SD3.5 reference does it (REFERENCE.md 4.2, other_impls.py 245-443).

Before tokenizing, the reference runs every prompt through an A1111-style emphasis parser:

- ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies again: ``((text))`` is 1.21;
- ``(text:1.3)`` sets the weight to 1.3 (it replaces the weight, it does not multiply it);
- ``\\(`` and ``\\)`` are literal parentheses; the unescaped parentheses of a group are removed from the text.

The weights are computed and then ignored: the reference encoders read only token ids. We return them
so that prompt weighting can be added later, but tokenization uses the text alone, exactly like the
reference.

The parser keeps the reference's quirks on unbalanced input, so the text (and hence the token ids)
stays identical: an unclosed ``(`` stays in the text, and after a stray ``)`` the rest of the prompt is
read literally, parentheses included.
"""

from __future__ import annotations

# Escaped parentheses become these two-character items, which never compare equal to "(" or ")".
_ESCAPED_OPEN = "\\("
_ESCAPED_CLOSE = "\\)"
_EMPHASIS = 1.1


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(segment, weight)`` pairs, with group parentheses and escapes resolved.

    >>> parse_weights("a (red:1.3) ((cat)) \\\\(b\\\\)")
    [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 1.2100000000000002), (' (b)', 1.0)]
    """
    out: list[tuple[str, float]] = []
    _weigh(_items(text), 1.0, out)
    return out


def prompt_words(text: str) -> list[tuple[str, float]]:
    """The words the reference tokenizes one by one: each segment with ``\\n`` -> space, split on spaces.

    Empty words are dropped. Only the space character separates words (other whitespace such as tabs
    stays inside a word and is handled by the tokenizer), as in the reference.
    """
    words: list[tuple[str, float]] = []
    for segment, weight in parse_weights(text):
        words.extend((w, weight) for w in segment.replace("\n", " ").split(" ") if w)
    return words


def _items(text: str) -> list[str]:
    """The text as a list of characters, with ``\\(`` and ``\\)`` kept together as one item each."""
    items: list[str] = []
    i = 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in (_ESCAPED_OPEN, _ESCAPED_CLOSE):
            items.append(pair)
            i += 2
        else:
            items.append(text[i])
            i += 1
    return items


def _join(items: list[str]) -> str:
    return "".join(c[1] if c in (_ESCAPED_OPEN, _ESCAPED_CLOSE) else c for c in items)


def _groups(items: list[str]) -> list[list[str]]:
    """Top-level pieces: plain text runs and ``( ... )`` groups (with their outer parentheses).

    A ``(`` at depth 0 starts a new piece; the ``)`` that brings the depth back to 0 ends it. A stray
    ``)`` makes the depth negative, after which nothing starts a new group until it is back at 0.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    depth = 0
    for c in items:
        if c == "(":
            if depth == 0 and current:
                groups.append(current)
                current = []
            current.append(c)
            depth += 1
        elif c == ")":
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


def _weigh(items: list[str], weight: float, out: list[tuple[str, float]]) -> None:
    for group in _groups(items):
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
            _weigh(inner, inner_weight, out)
        else:
            out.append((_join(group), weight))
