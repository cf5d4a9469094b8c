"""The native job API's wire format: :class:`~sd35.request.GenerateRequest` as JSON, field for field.

``JobCreate`` has the request's fields under the same names (nested ``slg``, ``apg``, ``edit``, ``hires``,
``text``, ``loras``); images travel as base64 PNG/JPEG/WebP. It only parses the shape: every value check is
:class:`GenerateRequest`'s own (one validation), and a field left out stays unset so the request's (or the
model's) default applies. Unknown fields are refused, so a typo is a 400 naming it. The same JSON is how
the job store keeps a request, so a job read back after a crash is the request that was accepted.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import fields
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest
from sd35.image_io import png_bytes, read_image, read_mask
from sd35.request import Edit, GenerateRequest, HiresFix, LoraRef, TextOptions
from sd35.sampling.guidance import APG, SkipLayerGuidance

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def given(self) -> dict[str, Any]:
        """The fields the client set (and not to null): what overrides the dataclass's defaults."""
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}


def decode_base64(data: str, param: str) -> bytes:
    """The bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{param} must be a base64-encoded image.", param=param)
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} is not valid base64.", param=param) from None


def decode_image(data: str, param: str, *, mask: bool = False) -> Image.Image:
    """A base64 image (or mask) read the one way sd35 reads images (:mod:`sd35.image_io`)."""
    what = "mask" if mask else "image"
    reader = read_mask if mask else read_image
    return reader(decode_base64(data, param), f"{param} ({what})", param=param)


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 of a PNG, with the A1111 ``parameters`` text chunk when given."""
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


class SLGBody(_Body):
    layers: list[int] | None = Field(None, description="joint blocks to skip (default: the model's)")
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    window: str | None = Field(None, description="steps (the reference's, default) or sigma (ComfyUI's node)")


class APGBody(_Body):
    eta: float | None = None
    norm_threshold: float | None = None
    momentum: float | None = None


class EditBody(_Body):
    image: str = Field(description="base64 PNG/JPEG/WebP: the image to start from")
    strength: float | None = Field(None, description="denoise 0..1 (default 0.8; 1.0 with a mask)")
    mask: str | None = Field(None, description="base64 mask: white or transparent = repaint")
    mask_blur: float | None = None
    outpaint: list[int] | None = Field(None, description="LEFT, TOP, RIGHT, BOTTOM border sizes in pixels")
    mode: str | None = Field(
        None, description="sd35 (default) or comfyui: ComfyUI's denoise schedule and mask"
    )


class HiresBody(_Body):
    scale: float | None = None
    steps: int | None = None
    strength: float | None = None
    upscaler: str | None = None


class TextBody(_Body):
    t5_max_tokens: int | None = None
    weighting: str | None = None
    long_clip: bool | None = None


class LoraBody(_Body):
    name: str = Field(description="a name from GET /v1/loras")
    strength: float = 1.0


class ControlBody(_Body):
    model: str = Field(description="a name from GET /v1/controlnets")
    image: str = Field(description="base64 control image (or a ready-made map with preprocess none)")
    strength: float | None = None
    start: float | None = Field(None, description="first fraction of the steps it acts on")
    end: float | None = Field(None, description="last fraction of the steps it acts on")
    window: str | None = Field(None, description="steps (A1111, diffusers) or percent (ComfyUI's)")
    preprocess: str | None = Field(None, description="none, canny, blur, tile, grayscale")
    resize_mode: str | None = Field(None, description="crop_and_resize, just_resize, resize_and_fill")
    low_threshold: float | None = None
    high_threshold: float | None = None
    blur_sigma: float | None = None
    tile_factor: float | None = None


class JobCreate(_Body):
    """``POST /v1/jobs``: a :class:`GenerateRequest` as JSON. Left-out fields take the model's defaults."""

    model: str | None = Field(None, description="a name from GET /v1/models (default: the server's current)")
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = Field(None, description="ComfyUI's sampler names: euler, dpmpp_2m, ...")
    scheduler: str | None = Field(
        None, description="ComfyUI's scheduler names: normal, simple, karras, beta, ..."
    )
    shift: float | None = None
    seed: int | None = Field(None, description="-1 or left out: random; image i uses seed + i")
    num_images: int | None = None
    noise: str | None = Field(
        None, description="sd35 (default) or comfyui: the stochastic samplers' step noise"
    )
    batch_noise: str | None = Field(None, description="per_image (default: seed + i) or batch (ComfyUI's)")
    negative_until: float | None = Field(
        None,
        description="zero the negative after this fraction of the model's time, as ComfyUI's SD3 example "
        "graphs do (0: zeroed throughout)",
    )
    slg: SLGBody | None = None
    apg: APGBody | None = None
    edit: EditBody | None = None
    hires: HiresBody | None = None
    loras: list[LoraBody] | None = None
    controls: list[ControlBody] | None = None
    text: TextBody | None = None
    cache: str | None = Field(
        None,
        description="step cache, off by default: fbcache:THRESHOLD (e.g. 0.1), faster, a slightly different image",
    )

    def to_request(self) -> GenerateRequest:
        """The request these fields describe (every value checked by :class:`GenerateRequest`)."""
        given = self.given()
        given.pop("model", None)
        parts = {
            "slg": lambda b: SkipLayerGuidance(**b.given()),
            "apg": lambda b: APG(**b.given()),
            "edit": _edit,
            "hires": lambda b: HiresFix(**b.given()),
            "text": lambda b: TextOptions(**b.given()),
            "loras": lambda items: tuple(LoraRef(i.name, i.strength) for i in items),
            "controls": lambda items: tuple(_control(i, n) for n, i in enumerate(items)),
        }
        for name, build in parts.items():
            if name in given:
                given[name] = build(getattr(self, name))
        return GenerateRequest(**given)

    @classmethod
    def from_request(cls, request: GenerateRequest, model: str | None = None) -> JobCreate:
        """The JSON form of ``request`` (images as base64 PNG); ``to_request`` gives it back equal."""
        body: dict[str, Any] = {"model": model}
        for f in fields(GenerateRequest):
            value = getattr(request, f.name)
            if value is None:
                continue
            if f.name in ("slg", "apg", "hires", "text"):
                value = {k.name: getattr(value, k.name) for k in fields(value)}
            elif f.name == "edit":
                value = {k.name: getattr(value, k.name) for k in fields(value)}
                value["image"] = encode_png(value["image"])
                if value["mask"] is not None:
                    value["mask"] = encode_png(value["mask"])
            elif f.name == "loras":
                value = [{"name": r.name, "strength": r.strength} for r in value]
            elif f.name == "controls":
                value = [
                    {k.name: getattr(u, k.name) for k in fields(u)} | {"image": encode_png(u.image)}
                    for u in value
                ]
            body[f.name] = value
        return cls.model_validate(body)


def _control(body: ControlBody, index: int) -> ControlUnit:
    given = body.given()
    given["image"] = decode_image(body.image, f"controls.{index}.image")
    return ControlUnit(**given)


def _edit(body: EditBody) -> Edit:
    given = body.given()
    given["image"] = decode_image(body.image, "edit.image")
    if body.mask is not None:
        given["mask"] = decode_image(body.mask, "edit.mask", mask=True)
    return Edit(**given)


def settings_view(request: GenerateRequest) -> dict[str, Any]:
    """A resolved request's settings as JSON, without its images (what a job view reports)."""
    body = JobCreate.from_request(request).model_dump(exclude_none=True)
    body.pop("model", None)
    if "edit" in body:
        body["edit"] = {k: v for k, v in body["edit"].items() if k not in ("image", "mask")}
    for unit in body.get("controls", []):
        unit.pop("image")
    return body


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    url: str = Field(description="GET this for the job's state")


class JobError(BaseModel):
    type: str
    message: str
    param: str | None = None


class JobView(BaseModel):
    """``GET /v1/jobs/{id}``."""

    id: str
    status: JobStatus
    model: str
    progress: float = Field(description="0..1")
    queue_position: int | None = Field(None, description="jobs ahead of this one, while queued")
    images: list[str] = Field(description="URLs of the PNGs, once done")
    seeds: list[int] = []
    infotexts: list[str] = []
    warnings: list[str] = []
    settings: dict[str, Any] | None = Field(None, description="the resolved request (every default filled)")
    error: JobError | None = None
    created: float
    started: float | None = None
    finished: float | None = None


class JobList(BaseModel):
    jobs: list[JobView]


class SizePreset(BaseModel):
    label: str = Field(description='e.g. "16:9"')
    width: int
    height: int


class NamedChoice(BaseModel):
    name: str = Field(description="what a request sends")
    label: str = Field(description="A1111's name for it (what PNG infotexts carry)")


class SLGDefaults(BaseModel):
    layers: list[int]
    scale: float
    start: float
    end: float


class ModelDefaultsView(BaseModel):
    """What a request that leaves a setting out gets from the loaded model."""

    preset: str
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    shift: float
    slg: SLGDefaults
    trained_size: int = Field(description="the largest side the model was trained at")
    max_image_size: int = Field(description="the largest side its position grid allows")
    depth: int = Field(description="joint blocks (SLG layers are 0 .. depth-1)")
    img2img: bool = Field(description="whether the VAE can encode (img2img and inpainting)")


class LimitsView(BaseModel):
    max_size: int
    max_steps: int
    max_batch: int
    max_prompt_chars: int
    max_body_bytes: int


class ServerInfo(BaseModel):
    """``GET /v1/info``: what a client needs to build a form for this server."""

    version: str
    model: str = Field(description="the loaded model")
    variant: str = Field(
        description="the loaded model's release: SD3.5 Medium, SD3.5 Large, SD3.5 Large Turbo, SD3 Medium, "
        "or an MMDiT-X of another configuration"
    )
    default_model: str = Field(description="what a request that names no model gets")
    models: list[str]
    loras: list[str]
    controlnets: list[str] = Field([], description="ControlNets a request's controls may name")
    defaults: ModelDefaultsView
    samplers: list[NamedChoice]
    schedulers: list[NamedChoice]
    upscalers: list[str] = Field(description="hires fix upscalers")
    limits: LimitsView
    size_presets: list[SizePreset] = Field(description="the model's trained aspect ratios, and square sizes")
    clip_max_tokens: int
    t5_max_tokens: int = Field(description="the model card's T5 limit; longer prompts are cut")
    protected: bool = Field(description="whether calls need an API key")


class TokenizeBody(_Body):
    prompt: str
    t5_max_tokens: int | None = Field(None, ge=1, description="default: the model card's 256")


class TokenCount(BaseModel):
    tokens: int = Field(description="the prompt's tokens (T5: with its end token)")
    limit: int
    dropped: int = Field(description="tokens past the limit, which the encoder does not read")


class TokenCounts(BaseModel):
    """``POST /v1/tokenize``: how many tokens each text encoder gets from a prompt."""

    clip: TokenCount
    t5: TokenCount | None = Field(None, description="None without a T5 tokenizer")
