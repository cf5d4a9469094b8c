"""One generation request: what every front end builds and the pipeline runs.

``sd35 generate``, ``pipe.generate(...)`` and each HTTP route turn their own field names into one
:class:`GenerateRequest`; nothing else carries a generation's settings. It is frozen, holds no file paths
(images are decoded images; a LoRA is a name that the pipeline's LoRA source resolves), and validates
itself when made, so a request that exists is one the engine can attempt. Checks come in three stages,
each written once:

1. here, model-independent (sizes are multiples of 16, steps >= 1, known sampler names, a mask needs an
   image ...), raised as :class:`~sd35.errors.InvalidRequest` with ``param`` naming the field;
2. :meth:`sd35.pipeline.SD3Pipeline.check`, model-dependent (the size fits the position grid, SLG layers
   exist, LoRA names are known);
3. the server's deployment limits.

``None`` means "not given" and is filled from the loaded model's :class:`~sd35.presets.ModelDefaults` in
one place, :meth:`GenerateRequest.resolved` (never ``x or default``, so 0 is never mistaken for unset).

Field metadata (``help``, ``flag``, ``switch``, ``preset``) is what the CLI builds its options from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from PIL import Image

from sd35.conditioning.tokenize import T5_MAX_TOKENS, Weighting
from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest
from sd35.imaging import outpaint_canvas
from sd35.models.step_cache import parse_step_cache
from sd35.presets import ModelDefaults
from sd35.sampling.guidance import APG, SkipLayerGuidance
from sd35.sampling.samplers import SamplerName
from sd35.sampling.schedules import SchedulerName

SIZE_MULTIPLE = 16  # 8x VAE downsampling times the patch size 2
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed, as ComfyUI's seed widget
RANDOM_SEED = -1  # A1111's "random"
MAX_MASK_BLUR = 1024.0  # pixels; wider is a flat mask anyway, and PIL's blur fails on huge radii
MAX_CANVAS_PIXELS = (
    89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: an outpainted canvas no larger than an image we read
)
MIN_HIRES_STRENGTH = 0.01  # the hires schedule is steps / strength long; A1111's finest denoise step
Upscaler = Literal["latent", "lanczos"]
NoiseMode = Literal["sd35", "comfyui"]
BatchNoise = Literal["per_image", "batch"]
EditMode = Literal["sd35", "comfyui"]


def _meta(help: str, **more: Any) -> dict[str, Any]:
    return {"help": help, **more}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fail(message: str, param: str) -> None:
    raise InvalidRequest(message, param=param)


def check_size(value: object, param: str) -> None:
    """A side in pixels: a positive multiple of :data:`SIZE_MULTIPLE`, with the nearest valid values named."""
    if _is_int(value) and value >= SIZE_MULTIPLE and value % SIZE_MULTIPLE == 0:
        return
    if _is_number(value) and value > 0:
        below = max(SIZE_MULTIPLE, SIZE_MULTIPLE * int(value // SIZE_MULTIPLE))
        options = f"{below} or {below + SIZE_MULTIPLE}" if below < value else f"{below}"
        what = f"a multiple of {SIZE_MULTIPLE}" if _is_int(value) else "a whole number of pixels"
        _fail(f"{param} {value} is not {what}; use {options}.", param)
    _fail(f"{param} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {value!r}.", param)


@dataclass(frozen=True, kw_only=True)
class Edit:
    """img2img, inpainting and outpainting: what to start from and what to repaint.

    ``strength`` is the img2img denoise (None: 0.8, the reference's DENOISE; 1.0 with a mask). With
    ``mask`` (white = repaint, the init image's size) this is inpainting; ``mask_blur`` feathers the
    mask's edge in pixels. ``outpaint`` (left, top, right, bottom pixels) extends the image, fills the new
    borders from its edges and repaints them (its own mask; no ``mask`` with it).
    """

    image: Image.Image = field(metadata=_meta("img2img / inpainting source image", flag="--init-image"))
    strength: float | None = field(
        default=None, metadata=_meta("img2img denoise 0..1 (default 0.8; 1.0 with a mask)", flag="--strength")
    )
    mask: Image.Image | None = field(
        default=None,
        metadata=_meta(
            "inpainting mask, the init image's size: white (or transparent) = repaint", flag="--mask"
        ),
    )
    mask_blur: float = field(
        default=8.0, metadata=_meta("mask feathering radius in pixels", flag="--mask-blur")
    )
    outpaint: tuple[int, int, int, int] | None = field(
        default=None,
        metadata=_meta(
            "extend the init image by LEFT,TOP,RIGHT,BOTTOM pixels and paint the borders", flag="--outpaint"
        ),
    )
    mode: EditMode = field(
        default="sd35",
        metadata=_meta(
            "how strength and mask act: sd35 (the reference's img2img cut of the schedule; a mask averaged "
            "per latent cell, the result composited over the init image) or comfyui (ComfyUI's KSampler "
            "denoise: steps steps from a schedule of steps/strength; the mask resized bilinearly to the "
            "latent, nothing composited; use --mask-blur 0 for ComfyUI's mask)",
            flag="--edit-mode",
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            _fail("the init image must be an image.", "edit.image")
        if self.mask is not None and not isinstance(self.mask, Image.Image):
            _fail("the mask must be an image.", "edit.mask")
        if self.strength is not None and not (_is_number(self.strength) and 0 <= self.strength <= 1):
            _fail(f"strength must be between 0 and 1, got {self.strength!r}.", "edit.strength")
        if not (_is_number(self.mask_blur) and 0 <= self.mask_blur <= MAX_MASK_BLUR):
            _fail(
                f"mask blur must be a number of pixels from 0 to {MAX_MASK_BLUR:g}, got {self.mask_blur!r}.",
                "edit.mask_blur",
            )
        if self.mode not in get_args(EditMode):
            _fail(
                f"unknown edit mode {self.mode!r}; choose one of: {', '.join(get_args(EditMode))}.",
                "edit.mode",
            )
        if self.outpaint is not None:
            borders = tuple(self.outpaint)
            object.__setattr__(self, "outpaint", borders)
            if len(borders) != 4 or not all(_is_int(b) and b >= 0 for b in borders) or not any(borders):
                _fail(
                    "outpainting takes four border sizes LEFT,TOP,RIGHT,BOTTOM in pixels, each >= 0 and not all 0; "
                    f"got {self.outpaint!r}.",
                    "edit.outpaint",
                )
            if self.mask is not None:
                _fail("outpainting makes its own mask; leave the mask out.", "edit.mask")
            width, height = self.canvas_size
            if width * height > MAX_CANVAS_PIXELS:
                _fail(
                    f"outpainting makes a {width}x{height} canvas, more than {MAX_CANVAS_PIXELS} pixels; "
                    "use smaller borders.",
                    "edit.outpaint",
                )

    def canvas(self) -> tuple[Image.Image, Image.Image | None]:
        """The image that is edited and its mask: the init image and ``mask``, or the outpainted canvas and
        its border mask (:func:`sd35.imaging.outpaint_canvas`)."""
        if self.outpaint is None:
            return self.image, self.mask
        return outpaint_canvas(self.image, *self.outpaint)

    @property
    def canvas_size(self) -> tuple[int, int]:
        """The size of the image that is edited: the init image's, plus the outpaint borders."""
        left, top, right, bottom = self.outpaint or (0, 0, 0, 0)
        return self.image.width + left + right, self.image.height + top + bottom


@dataclass(frozen=True, kw_only=True)
class HiresFix:
    """A second pass at ``scale`` times the size: upscale ("latent" or "lanczos" in pixels), then img2img.

    ``steps`` is the number of steps the second pass runs (None: the first pass's), A1111's convention.
    """

    scale: float = field(
        default=2.0, metadata=_meta("second pass at this scale (default 2)", flag="--hires-scale")
    )
    steps: int | None = field(
        default=None,
        metadata=_meta("steps of the second pass (default: the first pass's)", flag="--hires-steps"),
    )
    strength: float = field(
        default=0.5, metadata=_meta("denoise of the second pass", flag="--hires-strength")
    )
    upscaler: Upscaler = field(default="latent", metadata=_meta("how to upscale", flag="--hires-upscaler"))

    def __post_init__(self) -> None:
        if self.upscaler not in get_args(Upscaler):
            _fail(f"unknown hires upscaler {self.upscaler!r}; choose latent or lanczos.", "hires.upscaler")
        if not (_is_number(self.scale) and 1.0 < self.scale <= 4.0):
            _fail(f"hires scale must be above 1 and at most 4, got {self.scale!r}.", "hires.scale")
        if not (_is_number(self.strength) and MIN_HIRES_STRENGTH <= self.strength <= 1.0):
            _fail(
                f"hires strength must be from {MIN_HIRES_STRENGTH} to 1, got {self.strength!r}.",
                "hires.strength",
            )
        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 1):
            _fail(f"hires steps must be a positive integer, got {self.steps!r}.", "hires.steps")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size, rounded to multiples of 16."""
        return (
            int(width * self.scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE,
            int(height * self.scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE,
        )


@dataclass(frozen=True, kw_only=True)
class TextOptions:
    """How the prompt becomes text embeddings (defaults: the reference's)."""

    t5_max_tokens: int = field(
        default=T5_MAX_TOKENS,
        metadata=_meta("T5 prompt limit in tokens; longer prompts are cut with a warning"),
    )
    weighting: Weighting = field(
        default="none",
        metadata=_meta("apply (word:1.2) emphasis: none (the reference: parsed, ignored), comfy or a1111"),
    )
    long_clip: bool = field(default=False, metadata=_meta("encode CLIP prompts past 75 tokens in chunks"))

    def __post_init__(self) -> None:
        if not (_is_int(self.t5_max_tokens) and self.t5_max_tokens >= 1):
            _fail(
                f"t5_max_tokens must be a positive integer, got {self.t5_max_tokens!r}.", "text.t5_max_tokens"
            )
        if self.weighting not in get_args(Weighting):
            _fail(
                f"unknown weighting {self.weighting!r}; choose one of {', '.join(get_args(Weighting))}.",
                "text.weighting",
            )
        if not isinstance(self.long_clip, bool):
            _fail(f"long_clip must be true or false, got {self.long_clip!r}.", "text.long_clip")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA by name (what the pipeline's LoRA source knows it as) and its strength."""

    name: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail(f"a LoRA needs a name, got {self.name!r}.", "loras")
        if not _is_number(self.strength):
            _fail(f"LoRA {self.name!r}: strength must be a finite number, got {self.strength!r}.", "loras")


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """Everything that decides a generation's images. See the module docstring."""

    prompt: str = field(metadata=_meta("what to draw"))
    negative_prompt: str = field(default="", metadata=_meta("what to steer away from"))
    width: int | None = field(
        default=None,
        metadata=_meta("multiple of 16 (default: the model's, or the init image's)", preset="width"),
    )
    height: int | None = field(
        default=None,
        metadata=_meta("multiple of 16 (default: the model's, or the init image's)", preset="height"),
    )
    steps: int | None = field(default=None, metadata=_meta("sampling steps", preset="steps"))
    cfg: float | None = field(default=None, metadata=_meta("classifier-free guidance scale", preset="cfg"))
    sampler: SamplerName | None = field(
        default=None, metadata=_meta("sampler (ComfyUI's names)", preset="sampler")
    )
    scheduler: SchedulerName | None = field(
        default=None, metadata=_meta("sigma schedule (ComfyUI's names)", preset="scheduler")
    )
    shift: float | None = field(default=None, metadata=_meta("flow shift", preset="shift"))
    seed: int | None = field(default=None, metadata=_meta("random if omitted or -1; image i uses seed+i"))
    negative_until: float | None = field(
        default=None,
        metadata=_meta(
            "zero the negative after this fraction of the model's time (by sigma), as ComfyUI's SD3 example "
            "graphs do (ConditioningZeroOut + ConditioningSetTimestepRange); 0: zeroed throughout"
        ),
    )
    num_images: int = field(default=1, metadata=_meta("images to make (seeds seed, seed+1, ...)"))
    noise: NoiseMode = field(
        default="sd35",
        metadata=_meta(
            "step noise of the stochastic samplers: sd35 (each image's seeded generator draws on) or comfyui "
            "(ComfyUI's: a fresh generator seeded with the seed; a Brownian tree for the SDE samplers)"
        ),
    )
    batch_noise: BatchNoise = field(
        default="per_image",
        metadata=_meta(
            "per_image: image i from seed+i (A1111's way); batch: ComfyUI's, one generator seeded with the "
            "seed draws the noise of the whole batch"
        ),
    )
    slg: SkipLayerGuidance | None = field(
        default=None,
        metadata=_meta(
            "Skip Layer Guidance with the model's settings", switch="--slg", prefix="slg", preset="slg"
        ),
    )
    apg: APG | None = field(
        default=None,
        metadata=_meta("adaptive projected guidance instead of plain CFG", switch="--apg", prefix="apg"),
    )
    edit: Edit | None = field(default=None, metadata=_meta("img2img / inpainting / outpainting", prefix=""))
    hires: HiresFix | None = field(
        default=None,
        metadata=_meta("hires fix: an upscaled img2img second pass", switch="--hires", prefix="hires"),
    )
    loras: tuple[LoraRef, ...] = field(default=(), metadata=_meta("LoRAs to apply, with strengths"))
    controls: tuple[ControlUnit, ...] = field(
        default=(), metadata=_meta("ControlNets, each with its image, strength and step window")
    )
    text: TextOptions = field(default_factory=TextOptions, metadata=_meta("prompt encoding", prefix=""))
    cache: str | None = field(
        default=None,
        metadata=_meta(
            "step cache, off by default: fbcache:THRESHOLD (e.g. 0.1) reuses the later blocks' work on steps "
            "where the first block's output barely changed: faster, a slightly different image"
        ),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The model-independent checks; each failure is an InvalidRequest naming its field."""
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                _fail(f"{name} must be text, got {type(getattr(self, name)).__name__}.", name)
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                check_size(getattr(self, name), name)
        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 1):
            _fail(f"steps must be a positive integer, got {self.steps!r}.", "steps")
        if self.cfg is not None and not (_is_number(self.cfg) and self.cfg >= 0):
            _fail(f"cfg must be a finite number >= 0, got {self.cfg!r}.", "cfg")
        if self.shift is not None and not (_is_number(self.shift) and self.shift > 0):
            _fail(f"shift must be a positive number (SD3.5 Medium uses 3.0), got {self.shift!r}.", "shift")
        if self.negative_until is not None and not (
            _is_number(self.negative_until) and 0 <= self.negative_until <= 1
        ):
            _fail(
                f"negative_until must be a fraction of the model's time from 0 to 1, got {self.negative_until!r}.",
                "negative_until",
            )
        for name, kind in (("sampler", SamplerName), ("scheduler", SchedulerName)):
            value = getattr(self, name)
            if value is not None and value not in get_args(kind):
                _fail(f"unknown {name} {value!r}; choose one of: {', '.join(get_args(kind))}.", name)
        for name, kind in (("noise", NoiseMode), ("batch_noise", BatchNoise)):
            if getattr(self, name) not in get_args(kind):
                _fail(
                    f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(get_args(kind))}.",
                    name,
                )
        if not (_is_int(self.num_images) and self.num_images >= 1):
            _fail(f"num_images must be a positive integer, got {self.num_images!r}.", "num_images")
        if self.seed is not None:
            if not (_is_int(self.seed) and (self.seed == RANDOM_SEED or 0 <= self.seed <= MAX_SEED)):
                _fail(
                    f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for random; got {self.seed!r}.",
                    "seed",
                )
            if self.seed + self.num_images - 1 > MAX_SEED:
                _fail(
                    f"seed {self.seed} + {self.num_images} images runs past the largest seed {MAX_SEED}.",
                    "seed",
                )
        for name, kind in (
            ("slg", SkipLayerGuidance),
            ("apg", APG),
            ("edit", Edit),
            ("hires", HiresFix),
            ("text", TextOptions),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                _fail(f"{name} must be a {kind.__name__}, got {type(value).__name__}.", name)
        if self.cache is not None and not isinstance(self.cache, str):
            _fail(f"cache must be a string like fbcache:0.1, got {type(self.cache).__name__}.", "cache")
        parse_step_cache(self.cache)
        loras = tuple(self.loras)
        object.__setattr__(self, "loras", loras)
        if not all(isinstance(ref, LoraRef) for ref in loras):
            _fail("loras must be LoraRef(name, strength) values.", "loras")
        if len({ref.name for ref in loras}) != len(loras):
            _fail("a LoRA is named twice; give each LoRA once with its strength.", "loras")
        controls = tuple(self.controls)
        object.__setattr__(self, "controls", controls)
        if not all(isinstance(unit, ControlUnit) for unit in controls):
            _fail("controls must be ControlUnit(model, image, ...) values.", "controls")
        if (
            self.hires is not None
            and self.edit is not None
            and (self.edit.mask is not None or self.edit.outpaint)
        ):
            _fail("hires fix and inpainting cannot be combined; inpaint at the final size instead.", "hires")

    def resolved(self, defaults: ModelDefaults, *, rng: random.Random | None = None) -> GenerateRequest:
        """This request with every setting filled: from the request, the init image, or ``defaults``.

        Width and height come from the request, else from the edited image (its size rounded down to a
        multiple of 16), else from the model. A missing or -1 seed is drawn here, once, so the result
        can report it. SLG fields not given take the model's; the edit strength its documented default;
        the hires steps the first pass's.
        """
        width, height = self.width, self.height
        if self.edit is not None:
            canvas_w, canvas_h = self.edit.canvas_size
            width = canvas_w // SIZE_MULTIPLE * SIZE_MULTIPLE if width is None else width
            height = canvas_h // SIZE_MULTIPLE * SIZE_MULTIPLE if height is None else height
        seed = self.seed
        if seed is None or seed == RANDOM_SEED:
            seed = (rng or random).randrange(2**32)
        steps = defaults.steps if self.steps is None else self.steps
        edit = self.edit
        if edit is not None and edit.strength is None:
            edit = replace(edit, strength=1.0 if edit.mask is not None or edit.outpaint else 0.8)
        hires = self.hires
        if hires is not None and hires.steps is None:
            hires = replace(hires, steps=steps)
        return replace(
            self,
            width=defaults.width if width is None else width,
            height=defaults.height if height is None else height,
            steps=steps,
            cfg=defaults.cfg if self.cfg is None else self.cfg,
            sampler=defaults.sampler if self.sampler is None else self.sampler,
            scheduler=defaults.scheduler if self.scheduler is None else self.scheduler,
            shift=defaults.shift if self.shift is None else self.shift,
            seed=seed,
            slg=None if self.slg is None else self.slg.filled(defaults.slg),
            edit=edit,
            hires=hires,
        )

    @property
    def is_resolved(self) -> bool:
        """Whether every model-dependent setting is filled (what :meth:`resolved` returns)."""
        return None not in (
            self.width, self.height, self.steps, self.cfg, self.sampler, self.scheduler, self.shift, self.seed
        ) and (self.slg is None or self.slg.complete)  # fmt: skip

    @property
    def seeds(self) -> list[int]:
        """The seed of each image (a resolved request's): ``seed + i``. (With ``batch_noise="batch"``
        every image's noise comes from ``seed`` alone, as one batch; the list still names the images.)"""
        assert self.seed is not None and self.seed != RANDOM_SEED
        return [self.seed + i for i in range(self.num_images)]
