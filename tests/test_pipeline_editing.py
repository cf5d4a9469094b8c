"""SD3Pipeline's editing (sd35/pipeline.py) on the tiny pipeline: img2img, inpainting, outpainting, hires fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd35.errors import SD35Error, SD35Warning
from sd35.imaging import image_to_tensor, outpaint_canvas, tensor_to_image
from sd35.pipeline import hires_schedule_steps
from sd35.request import Edit, HiresFix
from sd35.sampling.guidance import SkipLayerGuidance
from tests.helpers import pixel_diff, pixels

PROMPT = "a green square at the bottom right"


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    base = np.zeros((64, 64, 3), np.uint8)
    base[:, :32] = (200, 40, 40)
    base[:, 32:] = (30, 60, 220)
    return Image.fromarray(np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8))


def test_img2img_strength_0_is_the_vae_round_trip(tiny_pipe, photo):
    calls = []
    hook = tiny_pipe.mmditx.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = tiny_pipe.generate(PROMPT, edit=Edit(image=photo, strength=0.0), steps=4, seed=1)[0]
    finally:
        hook.remove()
    assert calls == []  # nothing to denoise: the MMDiT-X never runs
    vae = tiny_pipe.vae
    expected = tensor_to_image(vae.decode(vae.encode(image_to_tensor(photo, 64, 64))))
    # Two float paths: generate() also takes the latent to model space and back ((z - shift) * scale, then
    # / scale + shift: not exact in float32), so its decoder sees a latent a few ulps off. tensor_to_image
    # truncates, so that moves a value by at most 1/255, and only the rare values that sit that close to a
    # step (which ones depends on the machine's kernels; 1 of 12288 measured). Any denoising, a scaled latent
    # or a missing VAE round trip moves far more of them, and by more.
    diff = pixel_diff(out, expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert "Denoising strength: 0.0" in out.info["parameters"]


def test_img2img_strength_1_equals_txt2img(tiny_pipe, photo):
    a = tiny_pipe.generate(PROMPT, edit=Edit(image=photo, strength=1.0), steps=3, seed=4)[0]
    b = tiny_pipe.generate(PROMPT, width=64, height=64, steps=3, seed=4)[0]
    # bit-equal by construction: sigma_max is exactly 1, so 1 * noise + 0 * init is the txt2img start exactly,
    # and from there both run the same operations on the same shapes
    assert np.array_equal(pixels(a), pixels(b))


def test_img2img_runs_the_tail_of_the_schedule(tiny_pipe, photo):
    calls = []
    tiny_pipe.generate(
        PROMPT,
        edit=Edit(image=photo, strength=0.5),
        steps=10,
        seed=2,
        on_progress=lambda p: calls.append((p.step, p.steps)),
    )
    assert [c[0] for c in calls] == list(range(5)) and calls[0][1] == 5  # sigmas[int(10 * 0.5):]


def test_slg_acts_in_img2img_and_inpainting(tiny_pipe, photo):
    skips = []
    hook = tiny_pipe.mmditx.register_forward_pre_hook(
        lambda m, args, kwargs: skips.append(bool(kwargs.get("skip_layers"))), with_kwargs=True
    )
    try:
        slg = SkipLayerGuidance(layers=(1,), start=0.0, end=1.0)
        tiny_pipe.generate(PROMPT, edit=Edit(image=photo, strength=0.6), steps=5, seed=3, slg=slg)
        n_img2img = sum(skips)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        tiny_pipe.generate(PROMPT, edit=Edit(image=photo, mask=mask), steps=5, seed=3, slg=slg)
    finally:
        hook.remove()
    assert n_img2img >= 1 and sum(skips) > n_img2img


def test_inpainting_keeps_unmasked_pixels(tiny_pipe, photo):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left 24 columns
    finals = []
    out = tiny_pipe.generate(
        PROMPT,
        edit=Edit(image=photo, mask=mask, mask_blur=2),
        steps=4,
        seed=5,
        on_progress=lambda p: finals.append(p.x.clone()),
    )[0]
    got, src = pixels(out), pixels(photo)
    # far from the feathered edge the mask is exactly 0: the composite's a * 0 + b * 1 returns b exactly
    assert np.array_equal(got[:, 32:], src[:, 32:])
    assert np.abs(got[:, :16] - src[:, :16]).mean() > 5  # the masked part was repainted
    # in latent space the cells outside the mask end exactly at the original latent
    vae = tiny_pipe.vae
    from sd35.models.vae import latent_to_model

    z = latent_to_model(vae.encode(image_to_tensor(photo, 64, 64)))
    assert torch.allclose(finals[-1][..., 5:], z[..., 5:], atol=1e-5)


def test_mask_needs_an_init_image_and_strength_is_checked(tiny_pipe, photo):
    with pytest.raises(SD35Error, match="init image") as e:
        tiny_pipe.generate(PROMPT, edit=Edit(image=None, mask=Image.new("L", (64, 64), 255)), steps=1)
    assert e.value.param == "edit.image"
    with pytest.raises(SD35Error, match="strength") as e:
        tiny_pipe.generate(PROMPT, edit=Edit(image=photo, strength=1.5), steps=1)
    assert e.value.param == "edit.strength"


def test_mask_of_another_size(tiny_pipe, photo):
    """A mask at another scale is resized with a warning; one of another shape is refused."""
    small = Image.new("L", (32, 32), 0)
    small.paste(255, (0, 0, 12, 32))
    with pytest.warns(SD35Warning, match="the mask is 32x32; it is resized"):
        tiny_pipe.generate(PROMPT, edit=Edit(image=photo, mask=small), steps=1, seed=1)
    with pytest.raises(SD35Error, match="another shape") as e:
        tiny_pipe.generate(PROMPT, edit=Edit(image=photo, mask=Image.new("L", (64, 32), 255)), steps=1)
    assert e.value.param == "edit.mask"


def test_outpainting_extends_the_canvas(tiny_pipe, photo):
    canvas, mask = outpaint_canvas(photo, 16, 0, 16, 0, overlap=4)
    assert canvas.size == (96, 64) and mask.size == (96, 64)
    m = np.asarray(mask)
    assert m[:, :20].min() == 255 and m[:, 20:76].max() == 0 and m[:, 76:].min() == 255
    out = tiny_pipe.generate(PROMPT, edit=Edit(image=canvas, mask=mask, mask_blur=0), steps=3, seed=6)[0]
    assert out.size == (96, 64)
    assert np.array_equal(
        pixels(out)[:, 20:76], pixels(canvas)[:, 20:76]
    )  # mask 0: a * 0 + b * 1 is b exactly
    # the request's own outpaint makes the same canvas and mask (its overlap is 8 px)
    borders = tiny_pipe.generate(
        PROMPT, edit=Edit(image=photo, outpaint=(16, 0, 16, 0), mask_blur=0), steps=3, seed=6
    )
    assert borders[0].size == (96, 64) and 'Outpaint: "16,0,16,0"' in borders[0].info["parameters"]
    assert np.array_equal(pixels(borders[0])[:, 24:72], pixels(photo)[:, 8:56])


def test_hires_fix_latent_and_lanczos(tiny_pipe):
    calls = []
    out = tiny_pipe.generate(
        PROMPT,
        width=32,
        height=64,
        steps=4,
        seed=7,
        hires=HiresFix(scale=1.5, steps=3, strength=0.5),
        on_progress=lambda p: calls.append((p.step, p.steps, tuple(p.x.shape))),
    )[0]
    assert out.size == (48, 96)
    assert calls[3][2][-2:] == (8, 4) and calls[-1][2][-2:] == (12, 6)
    assert sum(1 for c in calls if c[2][-2:] == (12, 6)) == 3  # the second pass runs hires.steps steps
    assert "Hires upscale: 1.5" in out.info["parameters"]
    lanczos = tiny_pipe.generate(
        PROMPT, width=32, height=32, steps=2, seed=7, hires=HiresFix(scale=2.0, upscaler="lanczos")
    )[0]
    assert lanczos.size == (64, 64) and "Hires upscaler: Lanczos" in lanczos.info["parameters"]


def test_hires_fix_validation(tiny_pipe):
    with pytest.raises(SD35Error, match="upscaler"):
        HiresFix(upscaler="esrgan")
    with pytest.raises(SD35Error, match="at most 512"):
        tiny_pipe.generate(PROMPT, width=384, height=384, steps=1, hires=HiresFix(scale=2.0))


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 33])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.35, 0.5, 0.7, 0.99, 1.0])
def test_hires_schedule_runs_exactly_the_steps_asked(steps, strength):
    from sd35.sampling.schedules import get_sigmas, img2img_sigmas

    n = hires_schedule_steps(steps, strength)
    assert len(img2img_sigmas(get_sigmas("normal", n, 3.0), strength)) - 1 == steps


def test_hires_second_pass_step_count_at_an_awkward_strength(tiny_pipe):
    """20 steps at strength 0.3: the schedule round(20 / 0.3) = 67 would have run 21 (int(67 * 0.7) = 46)."""
    stages = []
    tiny_pipe.generate(
        PROMPT, width=32, height=32, steps=1, seed=1, hires=HiresFix(scale=2.0, steps=20, strength=0.3),
        on_progress=lambda p: stages.append(p.stage),
    )  # fmt: skip
    assert stages.count("hires") == 20 and stages.count("base") == 1


def test_a_strength_that_leaves_no_step_is_refused_by_check(tiny_pipe, photo):
    """Refused before a server accepts the job (``pipe.check``), naming the field, not inside the run."""
    from sd35.request import GenerateRequest

    # int(steps * (1 - strength)) is the first step run: 1 - 1e-17 rounds to 1.0, leaving none of 4
    too_small = GenerateRequest(prompt="x", steps=4, edit=Edit(image=photo, strength=1e-17))
    with pytest.raises(SD35Error, match="too small to leave a single step of 4") as e:
        tiny_pipe.check(too_small)
    assert e.value.param == "edit.strength"
    enough = GenerateRequest(prompt="x", steps=4, edit=Edit(image=photo, strength=0.01))
    assert tiny_pipe.check(enough).request.edit.strength == 0.01
    assert tiny_pipe.check(GenerateRequest(prompt="x", steps=4, edit=Edit(image=photo, strength=0.0)))
