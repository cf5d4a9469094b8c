"""What a generation gives back, and what it reports while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from sd35.request import GenerateRequest

Stage = Literal["base", "hires"]


@dataclass(frozen=True)
class Progress:
    """One finished sampling step, as reported to ``on_progress`` (a progress bar, SSE, a live preview).

    ``step`` is the 0-based index of the step just taken in this ``stage`` of image ``image`` (``step + 1``
    of ``steps`` are done); ``x`` is the current sample and ``denoised`` the model's x0 prediction, both in
    the model's latent space (:func:`sd35.preview.latent_preview` turns one into a picture).

    ``batch`` is how many of the request's images, from ``image`` on, this step advanced together: 1 when
    images are made one by one (:meth:`~sd35.pipeline.SD3Pipeline.run`), all of a request's images in
    :meth:`~sd35.pipeline.SD3Pipeline.run_batch`, where ``x`` and ``denoised`` then hold those ``batch`` rows.
    """

    image: int
    images: int
    stage: Stage
    stages: int
    step: int
    steps: int
    x: torch.Tensor
    denoised: torch.Tensor
    batch: int = 1

    @property
    def fraction(self) -> float:
        """How much of the whole request is done, in [0, 1] (stages of one image count alike)."""
        stage = 0 if self.stage == "base" else 1
        per_image = (stage + (self.step + 1) / self.steps) / self.stages
        return (self.image + self.batch * per_image) / self.images


@dataclass
class GenerateResult:
    """The images of one request, with what made them.

    ``request`` is the resolved request (every default filled, the seed drawn); ``seeds[i]`` and
    ``infotexts[i]`` belong to ``images[i]`` (the infotext is also in ``images[i].info["parameters"]``).
    ``warnings`` are this request's notes (a prompt cut short, an image resized), which a threaded server
    returns to its client instead of printing; ``timings`` are seconds per phase; ``latents[i]`` is image i's final latent in the model's space
    (what a ComfyUI workflow's next node reads; empty from :meth:`~sd35.pipeline.SD3Pipeline.run_batch`).
    """

    images: list[Image.Image]
    seeds: list[int]
    request: GenerateRequest
    infotexts: list[str]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    latents: list[torch.Tensor] = field(default_factory=list, repr=False)
