"""The whole text-to-image pipeline against diffusers' StableDiffusion3Pipeline on the same tiny files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sd35 import TextOptions, load_pipeline
from sd35.a1111 import SAMPLER_NAMES, SCHEDULER_NAMES
from sd35.errors import MissingComponentError, SD35Error, SD35Warning
from sd35.loading.writers import write_diffusers, write_official, write_text_encoders
from sd35.lora import save_lora
from sd35.sampling.guidance import SkipLayerGuidance
from sd35.sampling.samplers import SAMPLERS
from sd35.sampling.schedules import SCHEDULERS
from sd35.testing import tiny_weights
from tests.helpers import generate_with_latent, pixel_diff, rel_err, sd35_warnings
from tests.lora.lora_helpers import lora_models, mixed_lora

PROMPT = "a red circle on a blue background, photo"


@pytest.fixture(scope="module")
def weights():
    return tiny_weights(seed=11)


@pytest.fixture(scope="module")
def root(tmp_path_factory, weights):
    return write_diffusers(tmp_path_factory.mktemp("pipe") / "sd35-tiny", weights)


@pytest.fixture(scope="module")
def ours(root):
    return load_pipeline(root, device="cpu")


@pytest.fixture(scope="module")
def theirs(root):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(root).to("cpu")


def test_prompt_embeddings_match_diffusers(ours, theirs):
    context, pooled = ours.encode_prompt(PROMPT)
    ref_ctx, _, ref_pooled, _ = theirs.encode_prompt(
        prompt=PROMPT,
        prompt_2=PROMPT,
        prompt_3=PROMPT,
        do_classifier_free_guidance=False,
        max_sequence_length=77,
    )
    assert context.shape == ref_ctx.shape == (1, 154, 256)
    assert rel_err(context, ref_ctx) <= 1e-4
    assert rel_err(pooled, ref_pooled) <= 1e-4


def _ours(pipe, **kw):
    """(image, final latent) at the settings _theirs gives diffusers."""
    return generate_with_latent(
        pipe, PROMPT, width=64, height=48, sampler="euler", text=TextOptions(t5_max_tokens=77), **kw
    )


def _theirs(pipe, steps, cfg, seed, **kw):
    common = dict(
        prompt=PROMPT,
        negative_prompt="",
        height=48,
        width=64,
        num_inference_steps=steps,
        guidance_scale=cfg,
        max_sequence_length=77,
        **kw,
    )
    latents = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    image = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return image, latents


def assert_image_matches_diffusers(ours, theirs, cfg: float, seed: int, pixels: float) -> None:
    """4 Euler steps at ``cfg`` on both pipelines: final latents within 1e-4, images within ``pixels``."""
    image, latents = _ours(ours, steps=4, cfg=cfg, seed=seed)
    ref_image, ref_latents = _theirs(theirs, 4, cfg, seed)
    assert rel_err(latents, ref_latents) <= 1e-4
    ours_px = np.asarray(image).astype(np.float32) / 255.0
    assert ours_px.shape == ref_image.shape == (48, 64, 3)
    assert np.abs(ours_px - ref_image).max() <= pixels
    assert ours_px.std() > 0.01  # not a blank image


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_image_matches_diffusers(ours, theirs, cfg):
    assert_image_matches_diffusers(ours, theirs, cfg, seed=42, pixels=2 / 255)


def test_skip_layer_guidance_matches_diffusers(ours, theirs):
    slg = SkipLayerGuidance(layers=(1,), scale=2.5, start=0.01, end=0.2)
    image, latents = _ours(ours, steps=10, cfg=4.0, seed=3, slg=slg)
    ref_image, ref_latents = _theirs(
        theirs,
        10,
        4.0,
        3,
        skip_guidance_layers=[1],
        skip_layer_guidance_scale=2.5,
        skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.2,
    )
    assert rel_err(latents, ref_latents) <= 1e-4
    _, plain = _ours(ours, steps=10, cfg=4.0, seed=3)
    assert rel_err(latents, plain) > 1e-3  # SLG really acted


def test_same_seed_same_image_and_batch_seeds(ours):
    a = ours.generate(PROMPT, width=32, height=32, steps=2, seed=7, num_images=2)
    b = ours.generate(PROMPT, width=32, height=32, steps=2, seed=8)
    c = ours.generate(PROMPT, width=32, height=32, steps=2, seed=7)
    # bit-equal: generate() makes the images of a batch one by one, so each image runs exactly the operations
    # of a single-image call with its seed (same pipeline, same shapes)
    assert np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))  # image i of a batch uses seed + i
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert "Seed: 8" in a[1].info["parameters"]


def test_defaults_are_the_references(ours):
    params = ours.generate(PROMPT, width=32, height=32, steps=1, seed=1)[0].info["parameters"]
    assert "Sampler: DPM++ 2M" in params and "CFG scale: 5.0" in params and "Shift: 3.0" in params


@pytest.mark.parametrize(
    "kw,says",
    [
        (dict(width=50), "width 50 is not a multiple of 16.*use 48 or 64"),
        (dict(height=1000), "use 992 or 1008"),
        (dict(width=1024), "at most 512"),
        (dict(width=8), "use 16"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(sampler="dpm_fast"), "dpmpp_2m"),
        (dict(num_images=0), "num_images"),
        (dict(cfg=float("nan")), "cfg"),
    ],
)
def test_bad_generation_arguments(ours, kw, says):
    args = dict(width=32, height=32, steps=1, seed=1) | kw
    with pytest.raises(SD35Error, match=says):
        ours.generate(PROMPT, **args)


def test_long_prompt_warns_for_t5_and_clip(ours):
    long_prompt = " ".join(["red circle blue square"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context, _ = ours.encode_prompt(long_prompt, TextOptions(t5_max_tokens=80))
    messages = sd35_warnings(caught)
    assert any("T5 dropped" in m for m in messages) and any(
        "CLIP reads only the first 75" in m for m in messages
    )
    assert context.shape[1] == 77 + 80


def test_split_files_need_tokenizers_and_text_encoders(tmp_path, weights, root):
    model = write_official(tmp_path / "sd3.5_medium.safetensors", weights)
    with pytest.raises(MissingComponentError, match="text-encoder files"):
        load_pipeline(model, device="cpu")
    te = write_text_encoders(tmp_path / "te", weights)
    with pytest.raises(MissingComponentError, match="tokenizer_3"):
        load_pipeline(model, te, device="cpu")
    pipe = load_pipeline(model, te, tokenizers=root, device="cpu")
    a = pipe.generate(PROMPT, width=32, height=32, steps=2, seed=5)[0]
    b = load_pipeline(root, device="cpu").generate(PROMPT, width=32, height=32, steps=2, seed=5)[0]
    # same weights, same image, whatever the layout, up to rounding: each layout puts a tensor at another file
    # offset, and the weights are used where the file maps them; a CPU matmul's summation order can depend on
    # that alignment. tensor_to_image truncates, so rounding moves a value by at most 1/255 and only the rare
    # values that close to a step; one weight 1% off already moves 10% of them.
    diff = pixel_diff(a, b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_without_t5_warns_and_runs(tmp_path, weights, root):
    model = write_official(tmp_path / "sd3.5_medium.safetensors", weights)
    te = write_text_encoders(tmp_path / "te", weights)
    with pytest.warns(SD35Warning, match="no T5-XXL"):
        pipe = load_pipeline(model, te[:2], tokenizers=root, device="cpu")
    context, _ = pipe.encode_prompt(PROMPT)
    assert context.shape[1] == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = pipe.generate(PROMPT, width=32, height=32, steps=1, seed=1)[0]
    assert isinstance(image, Image.Image)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_in_the_pipeline_and_repeats(tiny_pipe, sampler):
    a = tiny_pipe.generate(PROMPT, width=32, height=32, steps=4, seed=12, sampler=sampler)[0]
    b = tiny_pipe.generate(PROMPT, width=32, height=32, steps=4, seed=12, sampler=sampler)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert f"Sampler: {SAMPLER_NAMES[sampler]}" in a.info["parameters"]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs_in_the_pipeline(tiny_pipe, scheduler):
    calls = []
    image = tiny_pipe.generate(
        PROMPT,
        width=32,
        height=32,
        steps=5,
        seed=1,
        sampler="euler",
        scheduler=scheduler,
        on_progress=lambda p: calls.append(p.step),
    )[0]
    assert calls == list(range(5))
    assert f"Schedule type: {SCHEDULER_NAMES[scheduler]}" in image.info["parameters"]


def test_ancestral_batch_image_i_equals_seed_plus_i(tiny_pipe):
    batch = tiny_pipe.generate(
        PROMPT, width=32, height=32, steps=3, seed=20, sampler="euler_ancestral", num_images=2
    )
    single = tiny_pipe.generate(PROMPT, width=32, height=32, steps=3, seed=21, sampler="euler_ancestral")
    assert np.array_equal(np.asarray(batch[1]), np.asarray(single[0]))  # one by one: the same operations


# --------------------------------------------------------------------------------------------------
# Prompt-embedding cache


class _EncoderCalls:
    """Counts forward calls of the text encoders."""

    def __init__(self, pipe):
        self.n = 0
        encoders = [pipe.text.clip_l, pipe.text.clip_g, pipe.text.t5]
        self.handles = [m.register_forward_hook(self._count) for m in encoders if m is not None]

    def _count(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.fixture
def fresh(root):
    return load_pipeline(root, device="cpu")


def test_repeated_prompt_does_not_run_the_encoders(fresh):
    with _EncoderCalls(fresh) as calls:
        ctx, pooled = fresh.encode_prompt([PROMPT, ""])
        first = calls.n
        assert first >= 3
        again_ctx, again_pooled = fresh.encode_prompt([PROMPT, ""])
        assert calls.n == first  # answered from the cache
        assert torch.equal(again_ctx, ctx) and torch.equal(again_pooled, pooled)
        again_ctx.add_(1.0)  # a caller's in-place edit does not reach the cache
        assert torch.equal(fresh.encode_prompt([PROMPT, ""])[0], ctx)
        for kw in ({"t5_max_tokens": 77}, {"weighting": "comfy"}, {"long_clip": True}):
            n = calls.n
            fresh.encode_prompt([PROMPT, ""], TextOptions(**kw))  # another key: encoded
            assert calls.n > n
        n = calls.n
        fresh.encode_prompt(PROMPT)  # a batch of one is another call than a batch of two
        assert calls.n > n
        n = calls.n
        fresh.generate(PROMPT, width=32, height=32, steps=1, seed=1)
        fresh.generate(PROMPT, width=32, height=32, steps=1, seed=2)
        assert calls.n == n  # generate asks for [prompt, ""], cached above
    assert fresh.prompt_cache.hits >= 4


def test_prompt_cache_is_a_bounded_lru(fresh):
    fresh.prompt_cache.size = 2
    for p in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recently used
        fresh.encode_prompt(p)
    held = fresh.prompt_cache.keys()  # least recently used first
    assert [k[0] for k in held] == [("a",), ("c",)]


def test_cache_hit_repeats_truncation_warnings(fresh):
    long_prompt = " ".join(["red cube"] * 60)
    for _ in range(2):
        with pytest.warns(SD35Warning, match="CLIP reads only the first 75 tokens"):
            fresh.encode_prompt(long_prompt)


def test_text_encoder_lora_clears_the_cache(fresh, tmp_path):
    models = lora_models(fresh)
    sd = mixed_lora(models)
    both = save_lora(tmp_path / "both.safetensors", sd)
    dit_only = save_lora(
        tmp_path / "dit.safetensors", {k: v for k, v in sd.items() if not k.startswith("lora_te")}
    )
    with _EncoderCalls(fresh) as calls:
        base = fresh.encode_prompt(PROMPT)
        n = calls.n
        fresh.load_lora(dit_only)  # the MMDiT-X only: embeddings unchanged, the cache stays
        assert torch.equal(fresh.encode_prompt(PROMPT)[0], base[0]) and calls.n == n
        fresh.load_lora(both, strength=0.5)
        changed = fresh.encode_prompt(PROMPT)
        assert calls.n > n and not torch.allclose(changed[0], base[0])
        n = calls.n
        fresh.unload_lora("dit")
        assert calls.n == n and torch.equal(fresh.encode_prompt(PROMPT)[0], changed[0])  # still cached
        fresh.unload_lora("both")
        restored = fresh.encode_prompt(PROMPT)
        assert calls.n > n and torch.equal(restored[0], base[0])


# --------------------------------------------------------------------------------------------------
# VAE tiling option


def test_vae_tiling_option(root, fresh):
    from sd35.models.vae_tiling import LOW_MEMORY_TILING, Tiling

    assert fresh.vae_tiling == "auto" and fresh.vae_tiling_for(4096, 4096) is None  # auto tiles on CUDA only
    off = load_pipeline(root, device="cpu", vae_tiling="off")
    on = load_pipeline(root, device="cpu", vae_tiling="on")
    low = load_pipeline(root, device="cpu", memory="low")
    assert off.vae_tiling_for(4096, 4096) is None
    assert on.vae_tiling_for(64, 64) == Tiling()
    assert low.vae_tiling_for(64, 64) == LOW_MEMORY_TILING  # "auto" always tiles in the low memory mode
    ref = off.generate(PROMPT, width=64, height=48, steps=2, seed=4)[0]
    on.tiling = Tiling(2)  # 16 px tiles: the 64x48 image is decoded in 4x3 tiles
    tiled = on.generate(PROMPT, width=64, height=48, steps=2, seed=4)[0]
    diff = pixel_diff(tiled, ref)
    assert diff.max() <= 1  # exact tiling: the same image up to float rounding
    with pytest.raises(SD35Error, match="auto, on, off"):
        load_pipeline(root, device="cpu", vae_tiling="yes")


# --------------------------------------------------------------------------------------------------
# run(): the request in, the result out


def test_run_reports_what_it_resolved_and_drew(tiny_pipe):
    from sd35 import GenerateRequest, HiresFix

    seen = []
    request = GenerateRequest(
        prompt=PROMPT, width=32, height=32, steps=2, num_images=2, hires=HiresFix(steps=1)
    )
    result = tiny_pipe.run(request, on_progress=seen.append)
    assert result.request.is_resolved and result.request.seed == result.seeds[0]
    assert result.seeds == [result.seeds[0], result.seeds[0] + 1] and len(result.images) == 2
    assert [im.size for im in result.images] == [(64, 64)] * 2
    assert (
        result.infotexts[1] == result.images[1].info["parameters"]
        and f"Seed: {result.seeds[1]}" in result.infotexts[1]
    )
    assert set(result.timings) == {"encode", "sample", "decode", "total"}
    fractions = [p.fraction for p in seen]
    assert [(p.image, p.stage) for p in seen] == [(0, "base")] * 2 + [(0, "hires")] + [(1, "base")] * 2 + [
        (1, "hires")
    ]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancel_stops_between_steps(tiny_pipe):
    from sd35 import Cancelled, GenerateRequest

    steps = []

    def cancel() -> bool:
        return len(steps) >= 2

    with pytest.raises(Cancelled):
        tiny_pipe.run(
            GenerateRequest(prompt=PROMPT, width=32, height=32, steps=6, seed=1), steps.append, cancel
        )
    assert len(steps) == 2


def test_warnings_reach_the_result_not_the_global_warning_system(tiny_pipe):
    from sd35 import GenerateRequest

    long_prompt = " ".join(["red cube"] * 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # run() itself must not warn: a threaded server reads result.warnings
        result = tiny_pipe.run(GenerateRequest(prompt=long_prompt, width=32, height=32, steps=1, seed=1))
    assert any("CLIP reads only the first 75 tokens" in w for w in result.warnings)
