"""The files users keep (official single file + clip_l, clip_g, t5xxl fp16 or fp8) run with no tokenizer folder.

The text encoders are tiny but have SD3's real vocabulary sizes (CLIP 49,408, T5 32,128 embeddings), so the
tokenizers that ship with sd35 fit them; diffusers' StableDiffusion3Pipeline, given the same real tokenizers
and the same weights, is the reference for the prompt embeddings on prompts where the official reference's
word-by-word tokenization and diffusers' whole-prompt tokenization agree (lowercase words, single spaces,
no emphasis, under 75 tokens).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sd35 import load_pipeline
from sd35.cli import main
from sd35.conditioning.bundled import CLIP_MERGES, T5_JSON, read_bundled
from sd35.conditioning.tokenize import ClipTokenizer
from sd35.errors import MissingComponentError
from sd35.loading.writers import write_diffusers, write_official, write_text_encoders
from sd35.models.configs import tiny_configs
from sd35.testing import tiny_weights
from tests.helpers import rel_err

PROMPTS = ["a photo of a cat holding a sign that says hello world", "an astronaut riding a horse on mars, 8k"]


@pytest.fixture(scope="module")
def weights():
    """Values that fp16 holds exactly, so the fp16 files and diffusers' fp32 copy are the same weights."""
    w = tiny_weights(seed=16, configs=tiny_configs(clip_vocab=49408, t5_vocab=32128))
    parts = ("mmditx", "vae", "clip_l", "clip_g", "t5")
    rounded = {p: {k: v.half().float() for k, v in getattr(w, p).items()} for p in parts}
    return dataclasses.replace(w, **rounded)


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    """The official single file and clip_l, clip_g, t5xxl_fp8_e4m3fn, all fp16 but the fp8 T5."""
    d = tmp_path_factory.mktemp("user_files")
    model = write_official(d / "sd3.5_medium.safetensors", weights, dtype=torch.float16)
    names = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp8_e4m3fn.safetensors")
    fp8 = write_text_encoders(
        d / "fp8", weights, names=names, dtype=torch.float16, t5_dtype=torch.float8_e4m3fn
    )
    return model, fp8


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, weights):
    """diffusers' pipeline on the same weights (fp32), with the real tokenizers built by transformers."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = write_diffusers(tmp_path_factory.mktemp("diffusers") / "sd35", weights, tokenizers=False)
    tok = root / "real_tokenizers"
    tok.mkdir()
    merges = read_bundled(CLIP_MERGES)
    (tok / "merges.txt").write_text(merges, encoding="utf-8")
    vocab = ClipTokenizer.from_merges_text(merges, "bundled")._tokenizer.get_vocab(with_added_tokens=True)
    (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tok / "tokenizer.json").write_text(read_bundled(T5_JSON), encoding="utf-8")
    clip = str(tok / "vocab.json"), str(tok / "merges.txt")
    return StableDiffusion3Pipeline.from_pretrained(
        root,
        tokenizer=CLIPTokenizer(*clip, model_max_length=77),
        tokenizer_2=CLIPTokenizer(*clip, pad_token="!", model_max_length=77),
        tokenizer_3=T5TokenizerFast(tokenizer_file=str(tok / "tokenizer.json"), model_max_length=512),
    ).to("cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_official_files_run_without_a_tokenizer_folder_like_diffusers(tmp_path, weights, theirs, dtype):
    model = write_official(tmp_path / "sd3.5_medium.safetensors", weights, dtype=dtype)
    pipe = load_pipeline(model, write_text_encoders(tmp_path / "te", weights, dtype=dtype), device="cpu")
    for prompt in PROMPTS:
        context, pooled = pipe.encode_prompt(prompt)
        ref_ctx, _, ref_pooled, _ = theirs.encode_prompt(
            prompt=prompt, prompt_2=prompt, prompt_3=prompt, do_classifier_free_guidance=False, max_sequence_length=77
        )  # fmt: skip
        assert context.shape == ref_ctx.shape == (1, 154, 256)
        assert rel_err(context, ref_ctx) <= 1e-4 and rel_err(pooled, ref_pooled) <= 1e-4, prompt
    tokens = pipe.tokenizer(PROMPTS[:1])
    hf = theirs.tokenizer(PROMPTS[0], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(tokens.clip_l, hf)


def test_cli_generates_from_fp8_t5_without_tokenizers(files, tmp_path, capsys):
    model, fp8 = files
    out = tmp_path / "cat.png"
    code = main(
        ["generate", "--model", str(model), "--text-encoders", *map(str, fp8), "--prompt", PROMPTS[0]]
        + ["--width", "32", "--height", "32", "--steps", "1", "--device", "cpu", "-o", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_toy_encoders_do_not_take_the_real_tokenizers(tiny):
    with pytest.raises(MissingComponentError, match=r"1000 token embeddings.*49408.*--tokenizers"):
        load_pipeline(tiny["official"], tiny["text_encoders"], device="cpu")
