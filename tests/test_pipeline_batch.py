"""SD3Pipeline.run_batch: several requests sampled as one batch give each request what run() gives it.

A batch runs the MMDiT-X on more rows at once, and a batched matrix product may sum in another order than a
batch of one, so images are compared with a stated tolerance, not bit for bit: TOLERANCE (in pixel values of
0..255) is the largest difference allowed anywhere and the mean difference allowed over the image. Every
comparison also checks that the tolerance tells images apart: a batch image is farther than it from run()'s
image of another seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from sd35 import Cancelled, Edit, GenerateRequest, HiresFix, InvalidRequest, LoraRef, TextOptions
from sd35.pipeline import batch_key
from sd35.sampling.guidance import APG, SkipLayerGuidance
from tests.helpers import noise_image, pixel_diff

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = (2, 0.1)  # (max, mean) |batch - run| per pixel value, of 255
SETTINGS = dict(width=32, height=32, steps=4, cfg=4.0)
LONG_PROMPT = " ".join(["red circle blue square"] * 40)  # past T5's 77 tokens: a longer context


def _requests(**settings) -> list[GenerateRequest]:
    """Two requests of other prompts and seeds, the first with two images."""
    settings = SETTINGS | settings
    return [
        GenerateRequest(prompt="a red circle", negative_prompt="blurry", seed=5, num_images=2, **settings),
        GenerateRequest(prompt="a blue square on green grass", seed=40, **settings),
    ]


def _close(a, b) -> bool:
    diff = pixel_diff(a, b)
    return diff.max() <= TOLERANCE[0] and diff.mean() < TOLERANCE[1]


def _assert_close(a, b) -> None:
    diff = pixel_diff(a, b)
    assert _close(a, b), f"|batch - run|: max {diff.max()}, mean {diff.mean():.3f}"


def _assert_like_run(pipe, requests, batch) -> None:
    """Each result of ``batch`` has run()'s images (within TOLERANCE), seeds and infotexts for its request."""
    alone = [pipe.run(request) for request in requests]
    assert len(batch) == len(alone)
    for got, want in zip(batch, alone, strict=True):
        assert got.seeds == want.seeds and got.infotexts == want.infotexts and got.request == want.request
        for image, expected in zip(got.images, want.images, strict=True):
            _assert_close(image, expected)
    # the tolerance tells seeds apart: request 0's two images, and request 0 against request 1
    assert not _close(batch[0].images[0], alone[0].images[1])
    assert not _close(batch[0].images[1], alone[1].images[0])


@pytest.mark.parametrize(
    "sampler,slg",
    [
        ("euler", None),
        ("euler_ancestral", None),
        ("dpmpp_2m_sde", None),
        ("dpmpp_2m_sde", SkipLayerGuidance(layers=(1,), scale=2.5, start=0.0, end=0.8)),
    ],
)
def test_batch_images_equal_each_request_run_alone(tiny_pipe, sampler, slg):
    requests = _requests(sampler=sampler, slg=slg)
    _assert_like_run(tiny_pipe, requests, tiny_pipe.run_batch(requests))


def test_batch_with_apg_equals_each_request_run_alone(tiny_pipe):
    requests = _requests(sampler="euler", apg=APG(eta=0.5, norm_threshold=3.0, momentum=-0.5))
    _assert_like_run(tiny_pipe, requests, tiny_pipe.run_batch(requests))


def test_contexts_of_other_lengths_are_sampled_as_separate_batches(tiny_pipe):
    short, other = _requests(sampler="euler_ancestral")
    long = GenerateRequest(prompt=LONG_PROMPT, seed=77, **SETTINGS, sampler="euler_ancestral")
    requests = [short, long, other]
    seen, notes = [], []
    batch = tiny_pipe.run_batch(
        requests,
        on_progress=lambda r, p: seen.append((r, p.x.shape[0])),
        on_warning=lambda r, n: notes.append(r),
    )
    alone = [tiny_pipe.run(r) for r in requests]
    for got, want in zip(batch, alone, strict=True):
        assert got.seeds == want.seeds
        for image, expected in zip(got.images, want.images, strict=True):
            _assert_close(image, expected)
    # the two short prompts first (3 rows in one batch), then the long one alone
    assert [r for r, _ in seen] == [0, 2] * 4 + [1] * 4
    assert {r: rows for r, rows in seen} == {0: 2, 1: 1, 2: 1}
    # the long prompt's truncation note goes to its own request, and to its result
    assert set(notes) == {1} and batch[1].warnings == alone[1].warnings and batch[1].warnings
    assert batch[0].warnings == batch[2].warnings == []


def test_results_carry_their_seeds_infotexts_and_timings(tiny_pipe):
    requests = [
        *_requests(sampler="euler"),
        GenerateRequest(prompt="random seed", **SETTINGS, sampler="euler"),
    ]
    results = tiny_pipe.run_batch(requests)
    assert [r.seeds for r in results[:2]] == [[5, 6], [40]]
    drawn = results[2].request.seed
    assert results[2].seeds == [drawn] and drawn is not None
    for result, request in zip(results, requests, strict=True):
        assert result.request.is_resolved and result.request.prompt == request.prompt
        assert len(result.images) == request.num_images
        for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
            assert image.info["parameters"] == text and text.startswith(request.prompt)
            assert f"Seed: {seed}," in text and "Sampler: Euler," in text
            assert image.size == (32, 32)
        assert set(result.timings) == {"encode", "sample", "decode", "total"}
        assert result.timings["total"] >= result.timings["sample"] > 0
    assert not np.array_equal(np.asarray(results[0].images[0]), np.asarray(results[0].images[1]))


def test_batch_key(tiny_pipe):
    def key(**fields):
        return batch_key(
            GenerateRequest(**(dict(prompt="p") | SETTINGS | fields)).resolved(tiny_pipe.defaults)
        )

    base = key()
    hash(base)  # a dict key for a server's queue
    # prompts, seeds and image counts may differ
    assert key(prompt="another", negative_prompt="n", seed=9, num_images=3) == base
    for change in (
        dict(width=48),
        dict(height=48),
        dict(steps=5),
        dict(cfg=1.0),
        dict(sampler="euler"),
        dict(scheduler="beta"),
        dict(shift=2.0),
        dict(slg=SkipLayerGuidance()),
        dict(apg=APG()),
        dict(text=TextOptions(t5_max_tokens=100)),
        dict(loras=(LoraRef("style"),)),
    ):
        assert key(**change) != base, change
    image = noise_image(32, 32, 1)
    assert key(edit=Edit(image=image)) is None
    assert key(hires=HiresFix(steps=1)) is None
    with pytest.raises(ValueError, match="resolved"):
        batch_key(GenerateRequest(prompt="p"))


def test_a_batch_of_other_settings_is_refused(tiny_pipe):
    a, b = _requests()
    with pytest.raises(InvalidRequest, match="request 1 differs from request 0 in steps") as refused:
        tiny_pipe.run_batch([a, GenerateRequest(prompt=b.prompt, **(SETTINGS | dict(steps=3)))])
    assert refused.value.param == "steps"
    with pytest.raises(InvalidRequest, match="request 1 cannot share a sampling batch") as refused:
        tiny_pipe.run_batch(
            [a, GenerateRequest(prompt="p", **SETTINGS, edit=Edit(image=noise_image(32, 32, 1)))]
        )
    assert refused.value.param == "edit"
    with pytest.raises(InvalidRequest, match="request 0 cannot share") as refused:
        tiny_pipe.run_batch([GenerateRequest(prompt="p", **SETTINGS, hires=HiresFix(steps=1))])
    assert refused.value.param == "hires"
    assert tiny_pipe.run_batch([]) == []


def test_progress_reaches_every_request_and_goes_to_one(tiny_pipe):
    seen = []
    tiny_pipe.run_batch(_requests(steps=3), on_progress=lambda r, p: seen.append((r, p)))
    assert [r for r, _ in seen] == [0, 1] * 3
    for r, images in ((0, 2), (1, 1)):
        mine = [p for i, p in seen if i == r]
        fractions = [p.fraction for p in mine]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
        assert [p.step for p in mine] == [0, 1, 2] and {p.steps for p in mine} == {3}
        assert all(p.image == 0 and p.images == p.batch == images and p.stage == "base" for p in mine)
        assert all(p.x.shape[0] == p.denoised.shape[0] == images for p in mine)


def test_cancel_stops_the_batch(tiny_pipe):
    steps = []

    def cancel() -> bool:
        return len(steps) >= 4  # two requests report each step: after the second step

    with pytest.raises(Cancelled):
        tiny_pipe.run_batch(_requests(steps=6), on_progress=lambda r, p: steps.append(p.step), cancel=cancel)
    assert steps == [0, 0, 1, 1]
    with pytest.raises(Cancelled):
        tiny_pipe.run_batch(_requests(), cancel=lambda: True)


@pytest.mark.parametrize(
    "sampler,noise",
    [("euler_ancestral", "comfyui"), ("dpmpp_2m_sde", "comfyui"), ("euler_ancestral", "sd35")],
)
def test_comfyui_batch_noise_is_the_same_sampled_one_by_one_or_as_a_batch(tiny_pipe, sampler, noise):
    """batch_noise="batch" (one generator for the batch, ComfyUI's): run() samples image by image, each on
    its row of the batch's draws, and run_batch() samples the rows together: the same images."""
    requests = _requests(sampler=sampler, noise=noise, batch_noise="batch")
    _assert_like_run(tiny_pipe, requests, tiny_pipe.run_batch(requests))


def test_batch_noise_and_comfyui_noise_change_what_they_should(tiny_pipe):
    """batch mode: image 0's noise is the first row of one draw, i.e. the per-image draw of the seed, and
    image 1 another; ComfyUI's step noise changes a stochastic sampler's image, not a deterministic one's."""
    base = dict(SETTINGS, prompt="a red circle", seed=5, num_images=2)
    per_image = tiny_pipe.run(GenerateRequest(**base, sampler="euler")).images
    batch = tiny_pipe.run(GenerateRequest(**base, sampler="euler", batch_noise="batch")).images
    assert pixel_diff(per_image[0], batch[0]).max() == 0
    assert not _close(per_image[1], batch[1])
    for sampler, changes in (("euler_ancestral", True), ("dpmpp_3m_sde", True), ("heun", False)):
        ours = tiny_pipe.run(GenerateRequest(**base, sampler=sampler)).images[0]
        comfy = tiny_pipe.run(GenerateRequest(**base, sampler=sampler, noise="comfyui")).images[0]
        assert bool(pixel_diff(ours, comfy).max() > 0) is changes, sampler
