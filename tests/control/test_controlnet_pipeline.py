"""Whole images with ControlNets against diffusers' StableDiffusion3ControlNetPipeline on the same tiny files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from sd35 import TextOptions, load_pipeline
from sd35.control.unit import ControlUnit
from sd35.loading.writers import write_diffusers
from sd35.testing import tiny_weights
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.helpers import generate_with_latent, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a blue background, photo"
W, H = 64, 48


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SD3.5 folder and three ControlNets for it: 2 blocks with dual attention, 1 block without (and
    without positions), 3 blocks that read the pooled text."""
    weights = tiny_weights(seed=11)
    tmp = tmp_path_factory.mktemp("cnpipe")
    root = write_diffusers(tmp / "sd35-tiny", weights)
    cfg = weights.configs.mmditx
    a = write_controlnet(diffusers_controlnet(cfg, layers=2, dual=(0,), seed=5), tmp / "cn-a")
    b = write_controlnet(
        diffusers_controlnet(cfg, layers=1, dual=(), pos_embed_type=None, seed=6), tmp / "cn-b"
    )
    # one that reads the pooled text and was trained on shifted latents (force_zeros_for_pooled_projection false)
    c = write_controlnet(
        diffusers_controlnet(cfg, layers=3, dual=(1,), force_zeros=False, seed=7), tmp / "cn-c"
    )
    return root, a, b, c


@pytest.fixture(scope="module")
def ours(files):
    return load_pipeline(files[0], device="cpu")


def control_image(seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (H, W, 3), dtype=np.uint8))


def _ours(pipe, units, steps=4, cfg=4.0, seed=42):
    return generate_with_latent(
        pipe,
        PROMPT,
        width=W,
        height=H,
        steps=steps,
        cfg=cfg,
        seed=seed,
        sampler="euler",
        scheduler="normal",
        text=TextOptions(t5_max_tokens=77),
        controls=tuple(units),
    )


def _theirs(root, nets, images, scales, starts, ends, steps=4, cfg=4.0, seed=42, monkeypatch=None):
    # diffusers samples the control latent from the VAE posterior with the global RNG; ours takes its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    controlnet = [SD3ControlNetModel.from_pretrained(n) for n in nets]
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        root, controlnet=controlnet if len(controlnet) > 1 else controlnet[0]
    )
    common = dict(
        prompt=PROMPT,
        negative_prompt="",
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=cfg,
        max_sequence_length=77,
        control_image=images if len(images) > 1 else images[0],
        controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0],
        control_guidance_start=starts,
        control_guidance_end=ends,
    )
    latents = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    image = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return image, latents


def _close(ours_image, ours_latent, ref_image, ref_latent):
    assert rel_err(ours_latent, ref_latent) <= 1e-4
    px = np.asarray(ours_image).astype(np.float32) / 255.0
    assert px.shape == ref_image.shape == (H, W, 3)
    assert np.abs(px - ref_image).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("which", [1, 3])
def test_one_controlnet_matches_diffusers(files, ours, monkeypatch, which):
    root, net = files[0], files[which]
    image = control_image(1)
    unit = ControlUnit(model=str(net), image=image, strength=0.8, start=0.0, end=0.75)
    got = _ours(ours, [unit])
    ref = _theirs(root, [net], [image], [0.8], [0.0], [0.75], monkeypatch=monkeypatch)
    _close(*got, *ref)
    _, plain = _ours(ours, [])
    assert rel_err(got[1], plain) > 1e-3  # the ControlNet really acted


def test_two_controlnets_match_diffusers(files, ours, monkeypatch):
    root, a, b, _ = files
    images = [control_image(2), control_image(3)]
    units = [
        ControlUnit(model=str(a), image=images[0], strength=0.7, start=0.25, end=1.0),
        ControlUnit(model=str(b), image=images[1], strength=1.2),
    ]
    got = _ours(ours, units)
    ref = _theirs(root, [a, b], images, [0.7, 1.2], [0.25, 0.0], [1.0, 1.0], monkeypatch=monkeypatch)
    _close(*got, *ref)


def test_strength_zero_is_the_image_without_controlnet(files, ours):
    a = files[1]
    off = ControlUnit(model=str(a), image=control_image(4), strength=0.0)
    image, latent = _ours(ours, [off])
    plain_image, plain = _ours(ours, [])
    assert torch.equal(latent, plain) and np.array_equal(np.asarray(image), np.asarray(plain_image))
