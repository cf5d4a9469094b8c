"""The image and latent nodes mean what ComfyUI v0.3.64's mean: checked against its own output.

``tests/fixtures/comfyui/edits.*`` were written by ``scripts/comfy_fixtures.py --only edits``, which ran
ComfyUI's ``KSampler.set_steps`` (denoise below 1), ``nodes.common_ksampler`` over a made latent (denoise,
a noise mask blended by ``KSamplerX0Inpaint``, KSamplerAdvanced's step windows and leftover noise) with the
stand-in transformer, and its LoadImage, LoadImageMask, VAEEncodeForInpaint, InpaintModelConditioning,
LatentUpscaleBy, ImageScale and ImageScaleBy nodes on seeded inputs. Our schedule, sampling start, mask
blending and pixel functions must give the same: sigmas to 1e-6, latents to 1e-5 relative (float32
sampler arithmetic), pixel ops exactly or to float rounding where stated.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd35.imaging import comfy_latent_mask
from sd35.sampling.guidance import GuidedDenoiser
from sd35.sampling.inpaint import sample_from
from sd35.sampling.schedules import comfy_denoise_sigmas, step_window
from sd35.sampling.stochastic import comfy_noise_sampler
from sd35.testing.standin import StandInVelocity
from sd35.workflows import pixels as px

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui"
SEED, SHIFT, CFG = 42, 3.0, 4.5
RTOL = 1e-5


@cache
def _edits() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "edits.safetensors")


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))


def test_denoise_sigmas_equal_ksampler_set_steps():
    table = json.loads((FIXTURES / "edits.json").read_text())
    assert table["comfyui_version"] == "0.3.64"
    for key, theirs in table["denoise_sigmas"].items():
        scheduler, sampler, steps, denoise = key.split("/")
        ours = comfy_denoise_sigmas(scheduler, int(steps), float(denoise), SHIFT, sampler=sampler)
        torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-6, atol=1e-7, msg=key)
        assert len(ours) == int(steps) + 1 or scheduler == "beta"  # ComfyUI always runs `steps` steps


def test_step_window_is_ksampler_advanced_cut():
    full = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert step_window(full, 0, 2, False).tolist() == pytest.approx([1.0, 0.8, 0.6])
    assert step_window(full, 0, 2, True).tolist() == pytest.approx([1.0, 0.8, 0.0])
    assert step_window(full, 2, 10000, True).tolist() == pytest.approx([0.6, 0.4, 0.2, 0.0])
    assert len(step_window(full, 5, 10000, True)) == 0  # nothing left: ComfyUI returns the latent
    assert full[2] == pytest.approx(0.6)  # the cut never writes into the schedule it was given


def _run(sampler, steps, denoise, latent, *, mask=None, window=None, add_noise=True):
    """Our sampling of ComfyUI's KSampler(Advanced) settings over ``latent``: the pipeline's pieces (the
    schedule, the start, the mask blend, ComfyUI's step noise and leftover-noise scaling)."""
    e = _edits()
    standin = StandInVelocity(**{k[len("standin.") :]: v for k, v in e.items() if k.startswith("standin.")})
    cond, uncond = (e["cond.context"], e["cond.pooled"]), (e["cond.neg_context"], e["cond.neg_pooled"])
    full = comfy_denoise_sigmas("normal", steps, denoise, SHIFT, sampler=sampler)
    run = full if window is None else step_window(full, *window)
    denoiser = GuidedDenoiser(standin, cond, uncond, CFG, None, full, shift=SHIFT)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    if not add_noise:
        noise = torch.zeros_like(noise)
    lmask = None if mask is None else comfy_latent_mask(mask, *latent.shape[-2:])
    out = sample_from(
        sampler,
        denoiser,
        noise,
        run,
        shift=SHIFT,
        latent=latent,
        mask=lmask,
        step_noise=lambda x, sigmas: comfy_noise_sampler(sampler, x, sigmas, SEED),
    )
    return out / (1.0 - run[-1]) if run[-1] != 0 else out


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
@pytest.mark.parametrize("denoise", [0.6, 1.0])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_denoise_and_noise_mask_equal_comfyui(sampler, denoise, masked):
    e = _edits()
    mask = e["edit.mask"] if masked else None
    ours = _run(sampler, 6, denoise, e["edit.latent"], mask=mask)
    theirs = e[f"denoise/{sampler}/{denoise:g}/{'mask' if masked else 'plain'}"]
    assert _rel(ours, theirs) < RTOL
    if masked:  # where the mask is 0 the latent is kept exactly
        keep = comfy_latent_mask(mask, 4, 4)[0, 0] == 0
        assert keep.any() and torch.equal(ours[0][:, keep], e["edit.latent"][0][:, keep])


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_ksampler_advanced_windows_and_leftover_noise_equal_comfyui(sampler):
    e = _edits()
    latent = e["edit.latent"]
    one = _run(sampler, 8, 1.0, latent, window=(0, 3, False))
    assert _rel(one, e[f"advanced/{sampler}/stage1"]) < RTOL
    two = _run(sampler, 8, 1.0, one, window=(3, 10000, True), add_noise=False)
    assert _rel(two, e[f"advanced/{sampler}/stage2"]) < RTOL
    cut = _run(sampler, 8, 1.0, latent, window=(2, 5, True))
    assert _rel(cut, e[f"advanced/{sampler}/window"]) < RTOL


@pytest.mark.parametrize("grow", [0, 5, 6])
def test_vae_encode_for_inpaint_pixels_and_noise_mask(grow):
    e = _edits()
    image, mask = e["nodes.image"], e["nodes.mask"]
    at = px.mask_at(mask, image.shape[1], image.shape[2])
    assert torch.equal(px.fill_masked(px.crop_image(image), at), e[f"inpaint/{grow}/pixels"])
    assert torch.equal(px.grow_mask(at, grow), e[f"inpaint/{grow}/noise_mask"])


def test_inpaint_model_conditioning_encodes_the_image_with_the_mask_as_noise_mask():
    e = _edits()
    image, mask = e["nodes.image"], e["nodes.mask"]
    assert torch.equal(px.crop_image(image), e["model_conditioning/pixels"])
    assert torch.equal(px.mask_at(mask, image.shape[1], image.shape[2]), e["model_conditioning/noise_mask"])


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"])
def test_latent_upscale_by(method):
    latent = _edits()["nodes.latent"]
    ours = px.upscale(latent, round(6 * 1.5), round(5 * 1.5), method)
    assert torch.equal(ours, _edits()[f"latent_upscale/{method}"])


@pytest.mark.parametrize(
    "method, width, height, crop",
    [
        ("lanczos", 24, 24, "center"),
        ("bicubic", 50, 0, "disabled"),
        ("area", 20, 16, "center"),
        ("nearest-exact", 0, 30, "disabled"),
    ],
)
def test_image_scale(method, width, height, crop):
    image = _edits()["nodes.image"]
    size = px.scale_size(image.shape[2], image.shape[1], width, height)
    ours = px.upscale(image.movedim(-1, 1), *size, method, crop).movedim(1, -1)
    assert torch.equal(ours, _edits()[f"image_scale/{method}/{width}/{height}/{crop}"])


def test_image_scale_by():
    image = _edits()["nodes.image"]
    ours = px.upscale(image.movedim(-1, 1), round(44 * 1.5), round(36 * 1.5), "bilinear").movedim(1, -1)
    assert torch.equal(ours, _edits()["image_scale_by/bilinear/1.5"])


@pytest.mark.parametrize("name", ["rgba", "rgb", "palette"])
def test_load_image(name):
    image, mask = px.load_image(FIXTURES / f"load_{name}.png")
    assert torch.equal(image, _edits()[f"load_image/{name}/image"])
    # (255 - alpha) / 255 is ComfyUI's 1 - alpha / 255 up to float rounding
    torch.testing.assert_close(mask, _edits()[f"load_image/{name}/mask"], rtol=0, atol=1e-7)
    assert mask.shape[-2:] == ((64, 64) if name == "rgb" else (12, 20))


@pytest.mark.parametrize("channel", ["alpha", "red", "green", "blue"])
def test_load_image_mask(channel):
    ours = px.load_mask(FIXTURES / "load_rgba.png", channel)
    torch.testing.assert_close(ours, _edits()[f"load_mask/rgba/{channel}"], rtol=0, atol=1e-7)
