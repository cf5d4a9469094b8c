"""A plan's descriptions made real: images, masks and latents as tensors, each computed once.

Every sampler node runs through :meth:`sd35.pipeline.SD3Pipeline.run`, the one sampling path: a txt2img
sampler with its request alone (so its image is ``sd35 generate``'s), a sampler over a latent other nodes
made with a :class:`~sd35.pipeline.LatentStart` holding that latent and its noise mask. Latents are kept
in the model's space; LatentUpscaleBy resizes them in the VAE's, where ComfyUI's LATENT lives (``bislerp``
is not linear, so the space matters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from sd35.models.vae import latent_to_model, model_to_latent
from sd35.models.vae_tiling import Tiling
from sd35.pipeline import LatentStart, SD3Pipeline
from sd35.result import GenerateResult, Progress
from sd35.workflows.evaluate import (
    EncodedLatent,
    ImageValue,
    LatentValue,
    LoadedImage,
    LoadedMask,
    LoadSpec,
    MaskedLatent,
    Sampling,
    ScaledImage,
    UpscaledLatent,
    with_vae,
)
from sd35.workflows.pixels import (
    DOWNSCALE,
    crop_image,
    fill_masked,
    from_vae,
    grow_mask,
    load_image,
    load_mask,
    mask_at,
    to_pil,
    to_vae,
    upscale,
)

Loader = Callable[[LoadSpec], SD3Pipeline]
Latent = tuple[torch.Tensor, torch.Tensor | None]
"""A LATENT's samples ``(b, c, h, w)`` in the model's space and its noise mask ``(b, 1, H, W)`` or None."""


class SamplerRun(NamedTuple):
    """A sampler node's run: the pipeline it ran on, the tiling its images were decoded in, its result."""

    spec: LoadSpec
    tiling: Tiling | None
    result: GenerateResult


@dataclass(frozen=True)
class RunHooks:
    """What a server follows while a workflow runs (``sd35 run`` needs none): each sampler node as it
    starts, its steps (``cancel()`` asked after each: true stops the run with Cancelled), and each output
    node's files once written."""

    on_node: Callable[[str], None] | None = None
    on_progress: Callable[[str, Progress], None] | None = None
    cancel: Callable[[], bool] | None = None
    on_output: Callable[[str, list[Path]], None] | None = None


@contextmanager
def decoding(pipe: SD3Pipeline, tiling: Tiling | None) -> Iterator[None]:
    """``pipe`` decoding (and encoding) in ``tiling``'s tiles inside the block (VAEDecodeTiled); as set
    before otherwise."""
    if tiling is None:
        yield
        return
    before = pipe.vae_tiling, pipe.tiling
    pipe.vae_tiling, pipe.tiling = "on", tiling
    try:
        yield
    finally:
        pipe.vae_tiling, pipe.tiling = before


class Executor:
    """Runs what a plan's outputs need: loads each :class:`LoadSpec` once (a sampler reuses any pipeline
    with its model and text encoders, whatever its VAE, unless it has ControlNets, whose images its own
    VAE encodes), runs each sampler node once (its ControlNets' images made first), and keeps every
    tensor it made for the nodes that read it again. ``notes`` collects the pipeline's warnings; ``hooks``
    follow the sampler nodes."""

    def __init__(
        self, loader: Loader, on_note: Callable[[str], None] | None = None, hooks: RunHooks | None = None
    ):
        self.loader, self.on_note, self.hooks = loader, on_note, hooks or RunHooks()
        self.pipes: dict[LoadSpec, SD3Pipeline] = {}
        self.runs: dict[str, SamplerRun] = {}
        self.notes: list[str] = []
        self._made: dict[Any, Any] = {}

    def pipe(self, spec: LoadSpec) -> SD3Pipeline:
        if spec not in self.pipes:
            self.pipes[spec] = self.loader(spec)
        return self.pipes[spec]

    def _sampler_spec(self, load: LoadSpec) -> LoadSpec:
        same = (load.model, load.text_encoders)
        return next((s for s in self.pipes if (s.model, s.text_encoders) == same), load)

    def run(self, sampling: Sampling, tiling: Tiling | None = None) -> SamplerRun:
        """A sampler node's run: once, on the first pipeline that fits, its images decoded in ``tiling``'s
        tiles (VAEDecodeTiled's) when the first to ask for it decodes so, so no image is decoded twice."""
        if sampling.node not in self.runs:
            spec = sampling.load if sampling.controls else self._sampler_spec(sampling.load)
            request = sampling.request
            if sampling.controls:
                units = tuple(c.unit(self.images(c.image)[0]) for c in sampling.controls)
                request = replace(request, controls=units)
            start = None
            if sampling.start is not None:
                s = sampling.start
                samples, mask = self.latent(s.latent, sampling.load)
                start = LatentStart(
                    samples, mask, s.denoise, s.start_step, s.last_step, s.force_full_denoise, s.add_noise
                )
            hooks, node = self.hooks, sampling.node
            if hooks.on_node is not None:
                hooks.on_node(node)
            on_step = None
            if hooks.on_progress is not None:
                on_progress = hooks.on_progress

                def on_step(progress: Progress) -> None:
                    on_progress(node, progress)

            pipe = self.pipe(spec)
            with decoding(pipe, tiling):
                result = pipe.run(request, on_step, hooks.cancel, on_warning=self.on_note, start=start)
            self.notes += result.warnings
            self.runs[sampling.node] = SamplerRun(spec, tiling, result)
        return self.runs[sampling.node]

    def images(self, value: Any) -> list[Image.Image]:
        """An output node's pictures: a sampler's decoded images as ``sd35 generate`` makes them, or the
        8-bit pictures of any other IMAGE (as SaveImage writes them)."""
        if not isinstance(value, ImageValue):
            return to_pil(self.image(value))
        spec, tiling, result = self.run(value.sampling, value.tiling)
        if spec == value.sampling.load and tiling == value.tiling:
            return result.images
        pipe = self.pipe(value.sampling.load)  # another VAE than the sampler's pipeline has, or tiles
        with decoding(pipe, value.tiling):
            images = [pipe.decode_latent(latent) for latent in result.latents]
        for image, text in zip(images, result.infotexts, strict=True):
            image.info["parameters"] = text
        return images

    def image(self, value: Any) -> torch.Tensor:
        """An IMAGE ``(b, h, w, 3)`` in [0, 1]."""
        if value not in self._made:
            if isinstance(value, LoadedImage):
                made = load_image(value.file)[0]
            elif isinstance(value, ImageValue):
                result = self.run(value.sampling).result
                pipe = self.pipe(value.sampling.load)
                with decoding(pipe, value.tiling):
                    made = from_vae(pipe.decode_pixels(torch.cat(result.latents)))
            else:
                assert isinstance(value, ScaledImage)
                source = self.image(value.image).movedim(-1, 1)
                made = upscale(source, value.width, value.height, value.method, value.crop).movedim(1, -1)
            self._made[value] = made
        return self._made[value]

    def mask(self, value: LoadedMask) -> torch.Tensor:
        """A MASK ``(b, h, w)`` in [0, 1]."""
        if value not in self._made:
            if value.channel is None:
                self._made[value] = load_image(value.file)[1]
            else:
                self._made[value] = load_mask(value.file, value.channel)
        return self._made[value]

    def latent(self, value: Any, load: LoadSpec) -> Latent:
        """A LATENT for a sampler loaded as ``load`` (whose model encodes with the LATENT's VAE)."""
        key = (value, load)
        if key not in self._made:
            self._made[key] = self._latent(value, load)
        return self._made[key]

    def _latent(self, value: Any, load: LoadSpec) -> Latent:
        if isinstance(value, LatentValue):  # ComfyUI's empty latent: zeros, which it leaves unshifted
            channels = self.pipe(self._sampler_spec(load)).mmditx.config.in_channels
            shape = (value.batch, channels, value.height // DOWNSCALE, value.width // DOWNSCALE)
            return torch.zeros(shape), None
        if isinstance(value, Sampling):  # a sampler's output keeps its input's noise mask, as in ComfyUI
            result = self.run(value).result
            mask = None if value.start is None else self.latent(value.start.latent, load)[1]
            return torch.cat(result.latents).cpu(), mask
        if isinstance(value, EncodedLatent):
            image = self.image(value.image)
            pixels = crop_image(image)
            if value.fill is not None:
                pixels = fill_masked(pixels, mask_at(self.mask(value.fill), image.shape[1], image.shape[2]))
            pipe = self.pipe(with_vae(load, value.vae))
            return pipe.encode_pixels(to_vae(pixels)).cpu(), None
        if isinstance(value, MaskedLatent):
            samples, _ = self.latent(value.latent, load)
            mask = self.mask(value.mask)
            if value.image_size is None:
                return samples, mask.reshape(-1, 1, *mask.shape[-2:])
            width, height = value.image_size
            mask = mask_at(mask, height, width)
            return samples, mask if value.grow is None else grow_mask(mask, value.grow)
        assert isinstance(value, UpscaledLatent)
        samples, mask = self.latent(value.latent, load)
        size = (value.width // DOWNSCALE, value.height // DOWNSCALE)
        return latent_to_model(upscale(model_to_latent(samples), *size, value.method)), mask
