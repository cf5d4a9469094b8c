"""Prompt weighting, long CLIP prompts and prompt files (all opt-in; the reference path is unchanged).

Weighting conventions checked here: ComfyUI's ``z_empty + (z - z_empty) * w`` (comfy/sd1_clip.py,
ClipTokenWeightEncoder.encode_token_weights) and A1111's multiply-then-restore-the-mean
(modules/sd_hijack_clip.py). Long prompts: ComfyUI's 77-token chunks, pooled from the first chunk.
"""

from __future__ import annotations

import pytest
import torch

from sd35.conditioning.encode import TextConditioner
from sd35.conditioning.prompt import parse_weights, prompt_words, read_prompt_file
from sd35.conditioning.tiny_tokenizers import write_tiny_tokenizers
from sd35.conditioning.tokenize import SD3Tokenizer, SD3Tokens
from sd35.errors import SD35Error
from sd35.models.clip import CLIPTextEncoder
from sd35.models.t5 import T5Encoder
from sd35.testing import tiny_weights

L_WIDTH, G_WIDTH = 64, 128  # the tiny CLIP-L / CLIP-G widths: features [0, 64) and [64, 192) of the context
RED = 554  # "red" is one token for both tiny CLIP tokenizers


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tiny = write_tiny_tokenizers(tmp_path_factory.mktemp("tok") / "sd35-tiny")
    return SD3Tokenizer.from_root(tiny["tokenizer"].parent)


@pytest.fixture(scope="module")
def text():
    w = tiny_weights(seed=5)
    return TextConditioner(
        CLIPTextEncoder.from_state_dict(w.clip_l, "clip_l"),
        CLIPTextEncoder.from_state_dict(w.clip_g, "clip_g"),
        T5Encoder.from_state_dict(w.t5),
        context_dim=w.configs.t5.d_model,
    ).eval()


def _parts(context: torch.Tensor, clip_len: int = 77) -> dict[str, torch.Tensor]:
    return {
        "clip_l": context[:, :clip_len, :L_WIDTH],
        "clip_g": context[:, :clip_len, L_WIDTH : L_WIDTH + G_WIDTH],
        "t5": context[:, clip_len:],
    }


def _encoders(text: TextConditioner) -> dict:
    return {"clip_l": text.clip_l, "clip_g": text.clip_g, "t5": text.t5}


def _hidden(encoder, ids: torch.Tensor) -> torch.Tensor:
    out = encoder(ids)
    return (out[0] if isinstance(out, tuple) else out).float()


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[cat]", [("cat", 1 / 1.1)]),
        ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
        ("a [b] c", [("a ", 1.0), ("b", 1 / 1.1), (" c", 1.0)]),
        ("([cat])", [("cat", 1.1 * (1 / 1.1))]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("[(cat:1.5)]", [("cat", 1.5)]),  # an explicit weight replaces the enclosing one (reference/ComfyUI)
        ("([cat]:2)", [("cat", 2 / 1.1)]),
        ("[cat:1.2]", [("cat:1.2", 1 / 1.1)]),  # square brackets take no weight (A1111)
        ("\\[cat\\]", [("[cat]", 1.0)]),
        ("\\(cat\\) \\[x\\]", [("(cat) [x]", 1.0)]),
        ("[a \\] b]", [("a ] b", 1 / 1.1)]),
        ("(a]", [("(a]", 1.0)]),  # mismatched: literal
        ("a [b", [("a ", 1.0), ("[b", 1.0)]),  # unclosed: kept
        ("a] [b]", [("a] [b]", 1.0)]),  # after a stray "]" the rest is literal, as after ")"
        ("[]", []),
    ],
)
def test_parse_brackets(text, expected):
    got = parse_weights(text, brackets=True)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_brackets_exact_weights():
    assert parse_weights("[cat]", brackets=True) == [("cat", 1 / 1.1)]
    assert parse_weights("[[cat]]", brackets=True) == [("cat", (1 / 1.1) * (1 / 1.1))]
    assert parse_weights("(((cat)))", brackets=True) == [("cat", 1.1 * 1.1 * 1.1)]


def test_reference_parser_keeps_brackets_literal():
    assert parse_weights("a [b] \\[c\\]") == [("a [b] \\[c\\]", 1.0)]
    assert prompt_words("[big] (red) dog") == [("[big]", 1.0), ("red", 1.1), ("dog", 1.0)]
    assert prompt_words("[big] (red) dog", brackets=True) == [("big", 1 / 1.1), ("red", 1.1), ("dog", 1.0)]
    # without brackets in the text, both parsers agree
    for p in ("a (red:1.3) ((cat)) \\(b\\)", "x(y)z", "a) (b)", "(a (b) c)"):
        assert parse_weights(p, brackets=True) == parse_weights(p)


# ---------------------------------------------------------------------------------------------- tokens


def test_tokens_carry_weights(tok):
    plain = tok(["a red cat"])
    out = tok(["a (red:1.5) [cat]"], weighting="comfy")
    for name in ("clip_l", "clip_g", "t5"):
        assert torch.equal(getattr(out, name), getattr(plain, name)), name
        assert getattr(out, f"{name}_weights").shape == getattr(out, name).shape
        assert getattr(out, f"{name}_weights").dtype == torch.float32
    # CLIP: BOS a red cat EOS pad...
    expected = [1.0, 1.0, 1.5, 1 / 1.1] + [1.0] * 73
    assert out.clip_l_weights[0].tolist() == pytest.approx(expected)
    assert out.clip_g_weights[0].tolist() == pytest.approx(expected)
    # T5: a(1 token) red(1) cat(2) EOS pad...
    assert out.t5_weights[0].tolist() == pytest.approx([1.0, 1.5, 1 / 1.1, 1 / 1.1] + [1.0] * 73)
    assert out.weighting == "comfy" and plain.weighting == "none"
    for w in (plain.clip_l_weights, plain.clip_g_weights, plain.t5_weights):
        assert torch.equal(w, torch.ones_like(w))


def test_reference_tokens_ignore_weights(tok):
    out = tok(["a (red:1.5) [cat]"])
    assert torch.equal(out.clip_l_weights, torch.ones(1, 77))
    assert torch.equal(out.t5_weights, torch.ones_like(out.t5_weights))
    # "[" stays text on the reference path, and is parsed away with weighting
    assert not torch.equal(out.clip_l, tok(["a red cat"]).clip_l)
    assert torch.equal(tok(["a red [cat]"], weighting="a1111").clip_l, tok(["a red cat"]).clip_l)
    escaped = tok(["a \\[cat\\]"], weighting="comfy")
    assert torch.equal(escaped.clip_l, tok(["a [cat]"]).clip_l)


def test_t5_truncation_keeps_weights_aligned(tok):
    out = tok(["(" + " ".join(["red"] * 100) + ":2)"], t5_max_tokens=80, weighting="comfy")
    assert out.t5.shape == out.t5_weights.shape == (1, 80)
    assert out.t5_weights[0].tolist() == [2.0] * 79 + [1.0]  # EOS kept last, weight 1
    assert out.t5_empty.tolist() == [[1] + [0] * 79]


def test_empty_rows_and_defaults(tok):
    out = tok(["a cat"], weighting="comfy")
    assert out.clip_l_empty.tolist() == [[998, 999] + [999] * 75]
    assert out.clip_g_empty.tolist() == [[998, 999] + [0] * 75]
    assert out.t5_empty.tolist() == [[1] + [0] * 76]
    bare = SD3Tokens(out.clip_l, out.clip_g, None, [0], [0])
    assert torch.equal(bare.clip_l_weights, torch.ones(1, 77)) and bare.t5_weights is None
    assert bare.clip_chunks == 1
    with pytest.raises(SD35Error, match="weighting"):
        tok(["a"], weighting="strong")
    with pytest.raises(SD35Error, match="weighting"):
        SD3Tokens(out.clip_l, out.clip_g, None, [0], [0], weighting="x")


# ---------------------------------------------------------------------------------------------- weighting


def test_weight_one_is_bit_identical(tok, text):
    ref_ctx, ref_pooled = text(tok(["a red cat", "blue photo"]))
    for mode in ("comfy", "a1111"):
        for p in ("a (red:1) cat", "a ((red:1.0)) cat", "a red cat"):
            ctx, pooled = text(tok([p, "blue photo"], weighting=mode))
            assert torch.equal(ctx, ref_ctx), (mode, p)
            assert torch.equal(pooled, ref_pooled), (mode, p)


def test_comfy_weights_change_exactly_the_named_tokens(tok, text):
    plain = tok(["a red cat", "blue photo on blue"])
    weighted = tok(["a (red:1.5) cat", "blue [photo] on blue"], weighting="comfy")
    ref_ctx, ref_pooled = text(plain)
    ctx, pooled = text(weighted)
    assert torch.equal(pooled, ref_pooled)  # pooled outputs are not weighted
    assert ctx.shape == ref_ctx.shape

    encoders = _encoders(text)
    got, ref = _parts(ctx), _parts(ref_ctx)
    for name in ("clip_l", "clip_g", "t5"):
        w = getattr(weighted, f"{name}_weights")
        changed = w != 1
        assert changed.sum() >= 2, name  # "red" in row 0 and "photo" in row 1
        keep = ~changed
        assert torch.equal(got[name][keep], ref[name][keep]), name
        z_empty = _hidden(encoders[name], getattr(weighted, f"{name}_empty"))  # [1, T, D]
        formula = (ref[name] - z_empty) * w[..., None] + z_empty
        assert torch.equal(got[name][changed], formula[changed]), name
        assert not torch.allclose(got[name][changed], ref[name][changed]), name
    # the zero padding of the CLIP features stays zero
    assert torch.equal(ctx[:, :77, L_WIDTH + G_WIDTH :], torch.zeros_like(ctx[:, :77, L_WIDTH + G_WIDTH :]))


def test_comfy_weight_zero_gives_the_empty_prompt_state(tok, text):
    weighted = tok(["a (red:0) cat"], weighting="comfy")
    ctx, _ = text(weighted)
    z_empty = _hidden(text.clip_l, weighted.clip_l_empty)
    assert torch.equal(ctx[0, 2, :L_WIDTH], z_empty[0, 2])


def test_unweighted_rows_of_a_weighted_batch_are_untouched(tok, text):
    ref_ctx, ref_pooled = text(tok(["a red cat", "blue photo"]))
    for mode in ("comfy", "a1111"):
        ctx, pooled = text(tok(["a (red:1.3) cat", "blue photo"], weighting=mode))
        assert torch.equal(ctx[1], ref_ctx[1]) and torch.equal(pooled, ref_pooled), mode
        assert not torch.equal(ctx[0], ref_ctx[0]), mode


def test_nesting_and_brackets_weights(tok, text):
    ref_ctx, _ = text(tok(["a red cat"]))
    z_empty = _hidden(text.clip_l, tok([""]).clip_l)
    for prompt, weight in (
        ("a ((red)) cat", 1.1 * 1.1),
        ("a [red] cat", 1 / 1.1),
        ("a [[red]] cat", 1 / 1.1 / 1.1),
    ):
        weighted = tok([prompt], weighting="comfy")
        assert weighted.clip_l_weights[0, 2].item() == pytest.approx(weight)
        ctx, _ = text(weighted)
        w = weighted.clip_l_weights[0, 2]
        expected = (ref_ctx[0, 2, :L_WIDTH] - z_empty[0, 2]) * w + z_empty[0, 2]
        assert torch.equal(ctx[0, 2, :L_WIDTH], expected), prompt
        assert torch.equal(ctx[0, 3:77], ref_ctx[0, 3:77]), prompt
        t5_keep = weighted.t5_weights[0] == 1
        assert t5_keep.sum() == 76  # "red" is one T5 token
        assert torch.equal(ctx[0, 77:][t5_keep], ref_ctx[0, 77:][t5_keep]), prompt


def test_escaped_parentheses_are_text_not_weights(tok, text):
    weighted = tok(["a \\(red\\) cat"], weighting="comfy")
    assert torch.equal(weighted.clip_l_weights, torch.ones(1, 77))
    assert torch.equal(weighted.clip_l, tok(["a \\(red\\) cat"]).clip_l)
    ctx, _ = text(weighted)
    assert torch.equal(ctx, text(tok(["a \\(red\\) cat"]))[0])


def test_a1111_weights_restore_the_mean(tok, text):
    ref_ctx, ref_pooled = text(tok(["a red cat", "blue photo"]))
    weighted = tok(["a (red:1.5) [cat]", "blue photo"], weighting="a1111")
    ctx, pooled = text(weighted)
    assert torch.equal(pooled, ref_pooled)
    got, ref = _parts(ctx), _parts(ref_ctx)
    for name in ("clip_l", "clip_g", "t5"):
        w = getattr(weighted, f"{name}_weights")[0, :, None]
        z = ref[name][0]
        scaled = z * w
        expected = scaled * (z.mean() / scaled.mean())
        torch.testing.assert_close(got[name][0], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[name][0].mean(), z.mean(), rtol=1e-5, atol=1e-6)
        assert torch.equal(got[name][1], ref[name][1])  # the other prompt is not rescaled


# ---------------------------------------------------------------------------------------------- long CLIP


def test_long_clip_tokens(tok):
    long = " ".join(["red"] * 200)
    out = tok([long, ""], long_clip=True)
    assert out.clip_l.shape == out.clip_g.shape == out.clip_l_weights.shape == (2, 231)
    assert out.clip_chunks == 3 and out.clip_dropped == [0, 0]
    row = out.clip_l[0].tolist()
    assert row[:77] == [998] + [RED] * 75 + [999]
    assert row[77:154] == [998] + [RED] * 75 + [999]
    assert row[154:] == [998] + [RED] * 50 + [999] + [999] * 25
    assert out.clip_g[0, 154:].tolist() == [998] + [RED] * 50 + [999] + [0] * 25
    # the short prompt is padded with empty chunks so that the batch has one shape
    assert out.clip_l[1].tolist() == ([998, 999] + [999] * 75) * 3
    assert out.clip_g[1].tolist() == ([998, 999] + [0] * 75) * 3
    # the reference path cuts at 75 and reports the rest
    ref = tok([long, ""])
    assert ref.clip_l.shape == (2, 77) and ref.clip_dropped == [125, 0]
    assert torch.equal(ref.clip_l[0], out.clip_l[0, :77])
    # short prompts are the same either way
    short = tok(["a red cat"], long_clip=True)
    assert torch.equal(short.clip_l, tok(["a red cat"]).clip_l) and short.clip_chunks == 1


def test_long_clip_chunks_at_word_boundaries(tok):
    split_word = tok.clip_l.encode_words(["qzxvqzxvqzxv"])[0]
    small = tok.clip_l.encode_words(["qzxv"])[0]
    assert len(small) == 4 and len(split_word) == 12

    out = tok([" ".join(["red"] * 74 + ["qzxv", "red"])], long_clip=True)  # qzxv moves to chunk 2
    assert out.clip_l[0, :77].tolist() == [998] + [RED] * 74 + [999, 999]
    assert out.clip_l[0, 77:84].tolist() == [998, *small, RED, 999]

    out = tok([" ".join(["red"] * 74 + ["qzxvqzxvqzxv", "red"])], long_clip=True)  # 8+ tokens: split
    assert out.clip_l[0, :77].tolist() == [998] + [RED] * 74 + [split_word[0], 999]
    assert out.clip_l[0, 77:91].tolist() == [998, *split_word[1:], RED, 999]

    assert tok([" ".join(["red"] * 75)], long_clip=True).clip_chunks == 1  # exactly full
    assert tok([" ".join(["red"] * 76)], long_clip=True).clip_chunks == 2


def test_long_clip_encoding(tok, text):
    long = " ".join(["red"] * 200)
    tokens = tok([long], long_clip=True)
    ctx, pooled = text(tokens)
    t5_len = tokens.t5.shape[1]
    assert ctx.shape == (1, 231 + t5_len, 256)

    normal_ctx, normal_pooled = text(tok([long]))  # the reference path: the first chunk alone
    assert torch.equal(ctx[:, :77], normal_ctx[:, :77])
    assert torch.equal(ctx[:, 231:], normal_ctx[:, 77:])  # the same T5 part
    assert torch.equal(pooled, normal_pooled)  # pooled from the first chunk
    second, _ = text(tok([" ".join(["red"] * 75)]))
    assert torch.equal(ctx[:, 77:154], second[:, :77])
    third, _ = text(tok([" ".join(["red"] * 50)]))
    assert torch.equal(ctx[:, 154:231], third[:, :77])


def test_long_clip_batch(tok, text):
    long = " ".join(["red"] * 100)
    tokens = tok([long, "blue photo"], long_clip=True)
    ctx, pooled = text(tokens)
    assert tokens.clip_chunks == 2 and ctx.shape[1] == 154 + tokens.t5.shape[1]
    alone, alone_pooled = text(tok(["blue photo"], t5_max_tokens=tokens.t5.shape[1]))
    assert tok(["blue photo"]).t5.shape[1] == 77
    empty, _ = text(tok([""]))
    # a batch of 2 against batches of 1: other matmul shapes, so equal up to float32 rounding (the states reach
    # ~10, where 1e-6 is one ulp: too tight for another BLAS); a wrong chunk or padding is off by O(1)
    torch.testing.assert_close(ctx[1, :77], alone[0, :77], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx[1, 77:154], empty[0, :77], rtol=1e-5, atol=1e-5)  # the padding chunk
    torch.testing.assert_close(pooled[1], alone_pooled[0], rtol=1e-5, atol=1e-5)


def test_long_clip_with_weights(tok, text):
    long = " ".join(["red"] * 80) + " (blue:1.4)"  # "blue" lands in the second chunk, position 1 + 5
    plain = tok([" ".join(["red"] * 80) + " blue"], long_clip=True)
    weighted = tok([long], long_clip=True, weighting="comfy")
    assert torch.equal(weighted.clip_l, plain.clip_l)
    pos = 77 + 1 + 5
    assert weighted.clip_l_weights[0, pos].item() == pytest.approx(1.4)
    assert (weighted.clip_l_weights != 1).sum().item() == 1
    ref_ctx, ref_pooled = text(plain)
    ctx, pooled = text(weighted)
    assert torch.equal(pooled, ref_pooled)
    z_empty = _hidden(text.clip_l, weighted.clip_l_empty)
    expected = (ref_ctx[0, pos, :L_WIDTH] - z_empty[0, pos - 77]) * weighted.clip_l_weights[0, pos] + z_empty[
        0, pos - 77
    ]
    assert torch.equal(ctx[0, pos, :L_WIDTH], expected)
    others = torch.ones(ctx.shape[1], dtype=torch.bool)
    others[pos] = False
    others[154 + 80 : 154 + 81] = False  # blue's T5 token (red = 1 T5 token each)
    assert torch.equal(ctx[0, others, :L_WIDTH], ref_ctx[0, others, :L_WIDTH])


def test_clip_only_conditioner(tok):
    w = tiny_weights(seed=5)
    text = TextConditioner(
        CLIPTextEncoder.from_state_dict(w.clip_l, "clip_l"),
        CLIPTextEncoder.from_state_dict(w.clip_g, "clip_g"),
        None,
        context_dim=256,
    )
    ctx, pooled = text(tok(["a (red:1.2) cat " + " ".join(["red"] * 90)], long_clip=True, weighting="comfy"))
    assert ctx.shape == (1, 154, 256) and pooled.shape == (1, 192)


# ---------------------------------------------------------------------------------------------- prompt files


def test_read_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(
        "\ufeff# a comment\r\na red cat\r\n\r\n   \n  # indented comment\n  (café:1.2) \u732b  \nlast".encode()
    )
    assert read_prompt_file(f) == ["a red cat", "(café:1.2) \u732b", "last"]
    assert read_prompt_file(str(f)) == read_prompt_file(f)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "no prompt"),
        (b"\n\n  \n", "no prompt"),
        (b"# only\n#comments\n", "no prompt"),
        (b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_read_prompt_file_errors(tmp_path, content, match):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(SD35Error, match=match):
        read_prompt_file(f)


def test_read_prompt_file_missing(tmp_path):
    with pytest.raises(SD35Error, match="no such prompt file"):
        read_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(SD35Error, match="not a file"):
        read_prompt_file(tmp_path)
