"""A1111/Forge's ``/sdapi/v1`` bodies, mapped onto :class:`~sd35.request.GenerateRequest` and back.

Only the mapping lives here: A1111 names for samplers and schedules (:mod:`sd35.a1111`), ``batch_size x
n_iter`` images with seeds ``seed, seed+1, ...`` (A1111's ``all_seeds``), ``<lora:name:weight>`` tags in
the prompt, hires fix fields, init images and masks, and the ControlNet extension's units
(``alwayson_scripts.controlnet.args``, as ``webuiapi.ControlNetUnit`` sends them). Every value is checked by
the request itself. A1111 clients send many fields we have no use for (``restore_faces``, ``subseed``, other
scripts...), so unknown fields are accepted and ignored, as A1111 does.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from sd35._version import __version__
from sd35.a1111 import SAMPLER_NAMES, extract_lora_tags, sampler_from_a1111, scheduler_from_a1111
from sd35.control.unit import ControlUnit, Preprocessor, ResizeMode
from sd35.errors import InvalidRequest
from sd35.request import Edit, GenerateRequest, HiresFix
from sd35.server.schemas.native import decode_image

LATENT_UPSCALERS = ("latent", "latent (antialiased)", "latent (bicubic)", "latent (bicubic antialiased)")
PIXEL_UPSCALERS = ("lanczos",)

CONTROLNET_MODULES: dict[str, tuple[Preprocessor, str | None, str | None]] = {
    # A1111 module -> (our preprocessor, the unit field threshold_a sets, the one threshold_b sets)
    "none": ("none", None, None),
    "canny": ("canny", "low_threshold", "high_threshold"),
    "blur_gaussian": ("blur", "blur_sigma", None),
    "tile_resample": ("tile", "tile_factor", None),
    "recolor_luminance": ("grayscale", None, None),
}
"""The sd-webui-controlnet preprocessor ("module") names this server runs, by what they map to; our own
names (blur, tile, grayscale) are accepted too. ``threshold_a``/``threshold_b`` carry a module's sliders."""
CONTROLNET_RESIZE: dict[object, ResizeMode] = {
    "just resize": "just_resize",
    "crop and resize": "crop_and_resize",
    "resize and fill": "resize_and_fill",
    "inner fit (scale to fit)": "crop_and_resize",
    "outer fit (shrink to fit)": "resize_and_fill",
    0: "just_resize",
    1: "crop_and_resize",
    2: "resize_and_fill",
}


def controlnet_modules() -> list[str]:
    """What ``GET /controlnet/module_list`` lists."""
    return list(CONTROLNET_MODULES)


def _controlnet_unit(raw: object, index: int) -> ControlUnit | None:
    """One ``alwayson_scripts.controlnet.args`` entry as a unit, or None for a disabled or model-less one."""
    param = f"alwayson_scripts.controlnet.args.{index}"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{param} must be an object (a ControlNet unit).", param=param)
    model = raw.get("model") or "None"
    if raw.get("enabled", True) is False or not isinstance(model, str) or model == "None":
        return None
    image = raw.get("image", raw.get("input_image"))
    if isinstance(image, dict):  # newer clients: {"image": ..., "mask": ...}
        image = image.get("image")
    if not image:
        raise InvalidRequest(f"ControlNet unit {index} ({model}) has no image.", param=f"{param}.image")
    module = str(raw.get("module") or "none").strip().lower()
    known = {v[0]: v for v in CONTROLNET_MODULES.values()} | CONTROLNET_MODULES
    if module not in known:
        raise InvalidRequest(
            f"unknown ControlNet module {module!r}; this server has {', '.join(CONTROLNET_MODULES)} "
            "(depth and pose maps go in ready-made with module none).",
            param=f"{param}.module",
        )
    preprocess, slider_a, slider_b = known[module]
    fields: dict[str, Any] = {"model": model_name(model), "preprocess": preprocess}
    for name, slider in (("threshold_a", slider_a), ("threshold_b", slider_b)):
        value = raw.get(name)
        if slider is not None and value is not None and value != -1:  # -1: the module's default
            fields[slider] = value
    resize = raw.get("resize_mode", "Crop and Resize")
    key = resize.strip().lower() if isinstance(resize, str) else resize
    if key not in CONTROLNET_RESIZE:
        raise InvalidRequest(
            f"unknown ControlNet resize_mode {resize!r}; use Just Resize, Crop and Resize or Resize and Fill.",
            param=f"{param}.resize_mode",
        )
    for ours, theirs in (("strength", "weight"), ("start", "guidance_start"), ("end", "guidance_end")):
        if raw.get(theirs) is not None:
            fields[ours] = raw[theirs]
    return ControlUnit(
        image=decode_image(image, f"{param}.image"), resize_mode=CONTROLNET_RESIZE[key], **fields
    )


def controlnet_units(scripts: object) -> tuple[ControlUnit, ...]:
    """The units of A1111's ``alwayson_scripts`` (script names match case-insensitively, as A1111 does)."""
    if not isinstance(scripts, dict):
        return ()
    entry = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    args = entry.get("args", []) if isinstance(entry, dict) else []
    if not isinstance(args, list):
        raise InvalidRequest(
            "alwayson_scripts.controlnet.args must be a list of units.", param="alwayson_scripts"
        )
    units = [_controlnet_unit(raw, i) for i, raw in enumerate(args)]
    return tuple(u for u in units if u is not None)


def model_name(title: str) -> str:
    """A checkpoint title as A1111 clients send it back (``name [hash]`` or ``name.safetensors``) -> name."""
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", title.strip())
    return name.removesuffix(".safetensors")


class _A1111Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="deprecated: use sampler_name")
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None

    def model(self) -> str | None:
        """The checkpoint ``override_settings.sd_model_checkpoint`` names, if any."""
        title = (self.override_settings or {}).get("sd_model_checkpoint")
        if title is not None and not isinstance(title, str):
            raise InvalidRequest("override_settings.sd_model_checkpoint must be a model name.", param="model")
        return model_name(title) if title else None

    def _fields(self) -> dict[str, Any]:
        if self.script_name:
            raise InvalidRequest(
                f"scripts are not supported (script_name {self.script_name!r}); leave script_name empty.",
                param="script_name",
            )
        for name in ("batch_size", "n_iter"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1, got {getattr(self, name)}.", param=name)
        prompt, loras = extract_lora_tags(self.prompt)
        sampler = scheduler = None
        name = self.sampler_name or self.sampler_index
        if name:
            sampler, scheduler = sampler_from_a1111(name)
        if self.scheduler is not None:
            scheduler = scheduler_from_a1111(self.scheduler) or scheduler
        return {
            "prompt": prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "sampler": sampler,
            "scheduler": scheduler,
            "num_images": self.batch_size * self.n_iter,
            "steps": self.steps,
            "cfg": self.cfg_scale,
            "width": self.width,
            "height": self.height,
            "loras": loras,
            "controls": controlnet_units((self.model_extra or {}).get("alwayson_scripts")),
        }


class Txt2ImgBody(_A1111Body):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0

    def to_request(self) -> GenerateRequest:
        fields = self._fields()
        if self.enable_hr:
            fields["hires"] = HiresFix(**self._hires())
        return GenerateRequest(**fields)

    def _hires(self) -> dict[str, Any]:
        hires: dict[str, Any] = {"scale": self.hr_scale}
        if self.hr_resize_x or self.hr_resize_y:
            if not (self.width and self.height):
                raise InvalidRequest("hr_resize_x/hr_resize_y need width and height.", param="hr_resize_x")
            scales = [
                t / s for t, s in ((self.hr_resize_x, self.width), (self.hr_resize_y, self.height)) if t
            ]
            hires["scale"] = max(scales)
        if self.hr_second_pass_steps:
            hires["steps"] = self.hr_second_pass_steps
        if self.denoising_strength is not None:
            hires["strength"] = self.denoising_strength
        upscaler = (self.hr_upscaler or "Latent").strip().lower()
        if upscaler in LATENT_UPSCALERS:
            hires["upscaler"] = "latent"
        elif upscaler in PIXEL_UPSCALERS:
            hires["upscaler"] = "lanczos"
        else:
            raise InvalidRequest(
                f"unknown hires upscaler {self.hr_upscaler!r}; this server has Latent and Lanczos.",
                param="hr_upscaler",
            )
        return hires


class Img2ImgBody(_A1111Body):
    """``POST /sdapi/v1/img2img``: the first of ``init_images``, with ``mask`` for inpainting."""

    init_images: list[str] = Field(description="base64 images; the first is used")
    mask: str | None = None
    mask_blur: float | None = None
    inpainting_mask_invert: int = 0

    def to_request(self) -> GenerateRequest:
        if not self.init_images:
            raise InvalidRequest("init_images is empty; give the image to start from.", param="init_images")
        edit: dict[str, Any] = {"image": decode_image(self.init_images[0], "init_images")}
        if self.mask is not None:
            mask = decode_image(self.mask, "mask", mask=True)
            edit["mask"] = ImageOps.invert(mask) if self.inpainting_mask_invert else mask
        if self.denoising_strength is not None:
            edit["strength"] = self.denoising_strength
        if self.mask_blur is not None:
            edit["mask_blur"] = self.mask_blur
        return GenerateRequest(**self._fields(), edit=Edit(**edit))


def info(body: _A1111Body, result: dict[str, Any], model: str) -> str:
    """A1111's ``info`` JSON string for a finished job (``result`` as the job store keeps it)."""
    settings = result["settings"]
    seeds = result["seeds"]
    n = len(seeds)
    prompt = settings["prompt"]
    negative = settings.get("negative_prompt", "")
    edit = settings.get("edit") or {}
    hires = settings.get("hires") or {}
    return json.dumps(
        {
            "prompt": prompt,
            "all_prompts": [prompt] * n,
            "negative_prompt": negative,
            "all_negative_prompts": [negative] * n,
            "seed": seeds[0] if seeds else None,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * n,
            "subseed_strength": 0,
            "width": settings["width"],
            "height": settings["height"],
            "sampler_name": SAMPLER_NAMES[settings["sampler"]],
            "scheduler": settings["scheduler"],
            "cfg_scale": settings["cfg"],
            "steps": settings["steps"],
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": edit.get("strength", hires.get("strength")),
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": result["infotexts"],
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": f"sd35 {__version__}",
            "warnings": result.get("warnings", []),
        }
    )


class PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(description="a base64 PNG")
