"""A generated corpus of prompts that stress a tokenizer, always the same (a seeded generator).

Each prompt mixes an ordinary image prompt with the things tokenizers disagree on: mixed case, runs of
punctuation, emphasis syntax (``(word:1.2)``, ``((x))``, ``[x]``, escaped parentheses), numbers, URLs,
HTML entities, odd whitespace (tabs, newlines, no-break and ideographic spaces, zero-width characters),
emoji (ZWJ sequences, skin tones, flags), control characters, and non-Latin scripts (CJK, Japanese kana,
Hangul, Cyrillic, Greek with a final sigma, Arabic, Hebrew, Devanagari, Thai) and accents, precomposed
and combining.
"""

from __future__ import annotations

import random

BASE = [
    "a photo of a cat holding a sign that says hello world",
    "portrait of an old fisherman, dramatic lighting, 85mm, bokeh",
    "A majestic CASTLE on a hill at Sunset, Oil Painting by Greg Rutkowski",
    "cyberpunk city street at night, neon signs, rain, reflections, highly detailed",
    "watercolor illustration of a fox in a snowy forest",
    "isometric 3D render of a tiny cozy room, pastel colours",
    "macro shot of a dew drop on a leaf, 8k, ultra-detailed",
    "an astronaut riding a horse on mars, trending on artstation",
    "close-up of a woman's face, freckles, natural light, film grain",
    "minimalist logo of a mountain and a river, vector art",
    "the text 'SD3.5' written in neon letters on a brick wall",
    "still life with apples, pears and a wine bottle; chiaroscuro",
]
WORDS = (  # noqa: SIM905
    "red blue green golden silver tiny huge ancient futuristic glowing misty dark bright "
    "dragon robot city forest ocean river bridge tower knight wizard flower garden "
    "cinematic photorealistic masterpiece detailed sharp soft moody vibrant"
).split()
PUNCT = [
    "!!!",
    "???",
    "?!",
    "...",
    "…",
    ",,",
    ";;",
    "--",
    "—",
    "~~",
    "***",
    "###",
    "@@",
    "$$",
    "%%",
    "^^",
    "&&",
    "||",
    "//",
    "\\\\",
    "::",
    "''",
    '""',
    "``",
    "«»",
    "„“",
    "‘’",
    "¿¡",
    "。",
    "、",
    "！",
    "？",
]
EMPHASIS = [
    "(masterpiece:1.2)",
    "((best quality))",
    "[blurry]",
    "(red hair:0.8)",
    "\\(escaped\\)",
    "(a (nested:1.1) phrase:1.3)",
    "[[low quality]]",
    "(unclosed",
    "closed)",
    "(word:)",
    "(:1.5)",
    "BREAK",
    "(x:1e2)",
    "[a|b]",
    "{curly}",
    "<lora:style:0.7>",
    "AND",
]
NUMBERS = [
    "1234",
    "3.14159",
    "8k",
    "4K",
    "35mm",
    "f/1.8",
    "1920x1080",
    "-42",
    "+7",
    "1,000,000",
    "2024-05-17",
    "12:30",
    "50%",
    "0.5",
    "1e-3",
    "#ff0000",
    "v2.1",
    "x2",
    "٣٤٥",
    "४२",
    "１２３",
    "Ⅻ",
    "½",
    "²",
]
URLS = [
    "https://example.com/path?q=1&x=y",
    "www.test.org",
    "http://a.b/c#frag",
    "user@mail.com",
    "ftp://files.example.net/a_b-c.png",
    "example.com/~user/index.html",
]
ENTITIES = [
    "&amp;",
    "&lt;b&gt;",
    "&#39;",
    "&quot;",
    "&nbsp;",
    "&#x1F600;",
    "&copy;",
    "<br>",
    "</s>",
    "<|endoftext|>",
    "<|startoftext|>",
    "<pad>",
    "<extra_id_0>",
    "<unk>",
]
SPACES = [
    "\t",
    "\n",
    "\r\n",
    "  ",
    "   ",
    "\u00a0",
    "\u3000",
    "\u2009",
    "\u200b",
    "\u200d",
    "\u2028",
    "\u2029",
    "\x0b",
    "\x0c",
    "\x85",
    "\ufeff",
    "\u00ad",
]
CONTROLS = ["\x00", "\x01", "\x1b", "\x7f", "\ufffd", "\u200e", "\u202e", "\ue000"]
EMOJI = [
    "🐱",
    "🚀",
    "❤️",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇯🇵",
    "🏳️‍🌈",
    "😀😃😄",
    "✨",
    "🔥",
    "©",
    "™",
    "☃",
    "♥",
    "★",
    "→",
    "∞",
]
SCRIPTS = [
    "一只猫坐在窗台上",
    "山水画",
    "東京の夜景",
    "ひらがなカタカナ",
    "ｶﾀｶﾅ",
    "한국어 텍스트",
    "서울",
    "кошка на крыше",
    "Москва ЗИМОЙ",
    "ΟΔΟΣ",
    "Σοφία",
    "λόγος",
    "مرحبا بالعالم",
    "قطة",
    "שלום עולם",
    "नमस्ते दुनिया",
    "हिन्दी",
    "สวัสดี",
    "ქართული",
    "Հայերեն",
    "café",
    "naïve",
    "Ünïcödé",
    "straße",
    "résumé",
    "Ångström",
    "ÉCOLE",
    "Cafe\u0301",
    "n\u0303",
    "ǅungla",
    "İstanbul",
    "ﬁne",
    "ﬀ",
    "Ｆｕｌｌｗｉｄｔｈ",
    "ＡＢＣ",
    "𝓯𝓪𝓷𝓬𝔂",
    "Ⓒircled",
    "𠀀𠀁",
]
CASES = [str.upper, str.lower, str.title, str.swapcase, lambda s: s]

POOLS = [WORDS, PUNCT, EMPHASIS, NUMBERS, URLS, ENTITIES, EMOJI, SCRIPTS]


def _piece(rng: random.Random) -> str:
    pool = rng.choice(POOLS)
    piece = rng.choice(pool)
    return rng.choice(CASES)(piece) if rng.random() < 0.3 else piece


def _join(rng: random.Random, pieces: list[str]) -> str:
    out = pieces[0]
    for p in pieces[1:]:
        r = rng.random()
        if r < 0.6:
            sep = " "
        elif r < 0.75:
            sep = ""
        elif r < 0.95:
            sep = rng.choice(SPACES)
        else:
            sep = rng.choice(CONTROLS)
        out += sep + p
    return out


def prompt_corpus(n: int = 1200, seed: int = 16) -> list[str]:
    """``n`` prompts: the base prompts as they are, then seeded mixtures of base text and stress pieces."""
    rng = random.Random(seed)
    prompts = list(BASE) + ["", " ", "\n", "x", "X", "A", "'s", "don't", "I'M", "rock'n'roll"]
    while len(prompts) < n:
        base = rng.choice(BASE).split(" ")
        pieces = base[: rng.randint(0, len(base))] if rng.random() < 0.7 else []
        pieces += [_piece(rng) for _ in range(rng.randint(1, 8))]
        if rng.random() < 0.5:
            rng.shuffle(pieces)
        prompt = _join(rng, pieces)
        if rng.random() < 0.15:
            prompt = rng.choice(CASES)(prompt)
        prompts.append(prompt)
    return prompts
