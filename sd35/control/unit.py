"""One ControlNet unit of a request: which ControlNet, its control image, how strongly and when.

Part of :class:`sd35.request.GenerateRequest` (``controls``), so the CLI, the Python API, the jobs API, the
A1111 route and the page all carry the same thing. ``model`` is a name the pipeline's ControlNet source
resolves (a path for the library and CLI; a file name in the models folder for a server, never a path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from PIL import Image

from sd35.errors import InvalidRequest
from sd35.sampling.schedules import percent_to_sigma

Preprocessor = Literal["none", "canny", "blur", "tile", "grayscale"]
Window = Literal["steps", "percent"]
ResizeMode = Literal["crop_and_resize", "just_resize", "resize_and_fill"]
MAX_STRENGTH = 10.0


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class ControlUnit:
    """A ControlNet with its image. ``start``/``end``: the fraction of the sampling steps it acts on.

    With ``window="steps"`` (the default) that is diffusers' and A1111's rule
    (``StableDiffusion3ControlNetPipeline``: step ``i`` of ``n`` keeps the ControlNet unless ``i / n < start``
    or ``(i + 1) / n > end``); with ``window="percent"`` ComfyUI's ``start_percent``/``end_percent``, fractions
    of the denoising turned into sigmas by the model's shift (:meth:`active`). ``preprocess`` turns the image
    into the map the ControlNet reads (:mod:`sd35.control.preprocess`; "none" for a ready-made depth or pose
    map); its knobs are ``low_threshold``/``high_threshold`` (canny, 0..255), ``blur_sigma`` (blur, pixels)
    and ``tile_factor`` (tile: downsample by this factor and back). ``resize_mode`` fits the image to the
    generation's size as A1111 does (:mod:`sd35.control.image`).
    """

    model: str = field(metadata={"help": "ControlNet file (a server: its name in the models folder)"})
    image: Image.Image = field(metadata={"help": "control image (or a ready-made map with preprocess none)"})
    strength: float = field(default=1.0, metadata={"help": "residual scale (0 = off)"})
    start: float = field(default=0.0, metadata={"help": "first fraction of the steps it acts on"})
    end: float = field(default=1.0, metadata={"help": "last fraction of the steps it acts on"})
    window: Window = field(
        default="steps",
        metadata={"help": "steps (A1111, diffusers) or percent (ComfyUI's start/end percent)"},
    )
    preprocess: Preprocessor = field(default="none", metadata={"help": "what the image becomes first"})
    resize_mode: ResizeMode = field(
        default="crop_and_resize", metadata={"help": "how the image is fitted to the size (A1111's modes)"}
    )
    low_threshold: float = field(
        default=100.0, metadata={"help": "canny: weak-edge gradient threshold, 0..255"}
    )
    high_threshold: float = field(
        default=200.0, metadata={"help": "canny: strong-edge gradient threshold, 0..255"}
    )
    blur_sigma: float = field(default=5.0, metadata={"help": "blur: Gaussian sigma in pixels"})
    tile_factor: float = field(default=4.0, metadata={"help": "tile: downsample by this factor and back"})

    def __post_init__(self) -> None:
        def fail(message: str, name: str) -> None:
            raise InvalidRequest(message, param=f"controls.{name}")

        if not isinstance(self.model, str) or not self.model:
            fail(f"a ControlNet unit needs a model name, got {self.model!r}.", "model")
        if not isinstance(self.image, Image.Image):
            fail("a ControlNet unit needs a control image.", "image")
        if not (_number(self.strength) and 0 <= self.strength <= MAX_STRENGTH):
            fail(
                f"ControlNet strength must be from 0 to {MAX_STRENGTH:g}, got {self.strength!r}.", "strength"
            )
        for name in ("start", "end"):
            if not (_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                fail(
                    f"ControlNet {name} must be a fraction of the steps in [0, 1], got {getattr(self, name)!r}.",
                    name,
                )
        if not self.start < self.end:
            fail(f"ControlNet start must be below end, got start={self.start!r}, end={self.end!r}.", "start")
        if self.preprocess not in get_args(Preprocessor):
            fail(
                f"unknown ControlNet preprocessor {self.preprocess!r}; choose one of {', '.join(get_args(Preprocessor))}.",
                "preprocess",
            )
        if self.window not in get_args(Window):
            fail(f"unknown ControlNet window {self.window!r}; choose steps or percent.", "window")
        if self.resize_mode not in get_args(ResizeMode):
            fail(
                f"unknown resize mode {self.resize_mode!r}; choose one of {', '.join(get_args(ResizeMode))}.",
                "resize_mode",
            )
        if not (
            _number(self.low_threshold)
            and _number(self.high_threshold)
            and 0 <= self.low_threshold <= self.high_threshold <= 255
        ):
            fail(
                f"canny thresholds must satisfy 0 <= low <= high <= 255, got {self.low_threshold!r}, {self.high_threshold!r}.",
                "low_threshold",
            )
        if not (_number(self.blur_sigma) and 0 < self.blur_sigma <= 100):
            fail(f"blur sigma must be above 0 and at most 100 pixels, got {self.blur_sigma!r}.", "blur_sigma")
        if not (_number(self.tile_factor) and 1 <= self.tile_factor <= 64):
            fail(f"tile factor must be from 1 to 64, got {self.tile_factor!r}.", "tile_factor")

    def keeps(self, step: int, steps: int) -> bool:
        """Whether 0-based ``step`` of ``steps`` is in the step window (diffusers' ``controlnet_keep``)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def active(self, step: int, steps: int, sigma: float, shift: float) -> bool:
        """Whether the model call at ``sigma`` (in step ``step`` of ``steps``) gets this unit's residuals.

        The percent window is ComfyUI's (``comfy/controlnet.py`` ``ControlBase.get_control`` with the flow
        model's ``percent_to_sigma``: 0 -> sigma 1, 1 -> sigma 0, else the shifted sigma at ``1 - percent``):
        active while ``sigma(end) <= sigma <= sigma(start)``.
        """
        if self.window == "steps":
            return self.keeps(step, steps)
        return percent_to_sigma(self.end, shift) <= sigma <= percent_to_sigma(self.start, shift)
