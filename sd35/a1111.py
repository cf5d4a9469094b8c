"""The A1111/Forge vocabulary: their names for our samplers and schedulers, and the ``parameters`` infotext.

Forge, A1111, Civitai and most image browsers read a generation's settings from a PNG ``parameters`` text
chunk of the form::

    a photo of a cat
    Negative prompt: blurry
    Steps: 50, Sampler: DPM++ 2M, Schedule type: Simple, CFG scale: 5.0, Seed: 1, Size: 1024x1024, Model: sd3.5_medium

and their HTTP API names samplers the same way ("Euler a", "DPM++ 2M"). The names here are the ones A1111
writes (``modules/sd_samplers_kdiffusion.py`` ``samplers_k_diffusion``, ``modules/sd_schedulers.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from sd35._version import __version__
from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest
from sd35.request import GenerateRequest, LoraRef, TextOptions
from sd35.sampling.samplers import SAMPLERS
from sd35.sampling.schedules import SCHEDULERS

SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "heunpp2": "Heun++ 2",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_gpu": "DPM++ SDE GPU",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE GPU",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_2m_sde_heun_gpu": "DPM++ 2M SDE Heun GPU",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_gpu": "DPM++ 3M SDE GPU",
    "ddpm": "DDPM",
    "lcm": "LCM",
    "ipndm": "IPNDM",
    "ipndm_v": "IPNDM_V",
    "deis": "DEIS",
    "res_multistep": "Res Multistep",
    "res_multistep_ancestral": "Res Multistep a",
    "gradient_estimation": "Gradient Estimation",
    "er_sde": "ER SDE",
    "seeds_2": "SEEDS 2",
    "seeds_3": "SEEDS 3",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "uni_pc_bh2": "UniPC BH2",
}
"""Our (ComfyUI's) sampler name -> A1111's (Forge/reForge's where A1111 has none; each label maps back to one
sampler)."""

SCHEDULER_NAMES: dict[str, str] = {
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM",
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    "linear_quadratic": "Linear Quadratic",
    "kl_optimal": "KL Optimal",
}
"""Our scheduler name -> A1111's label (``Schedule type: Karras``). A1111's Simple, Normal and DDIM
schedules are ComfyUI's simple, normal and ddim_uniform (``modules/sd_schedulers.py``)."""

assert set(SAMPLER_NAMES) == set(SAMPLERS) and set(SCHEDULER_NAMES) == set(SCHEDULERS)


def _quote(value: str) -> str:
    """A1111 quotes values that contain a comma, colon or quote (``modules/generation_parameters_copypaste.py``)."""
    if any(c in value for c in ',:"'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def infotext(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs (None left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def request_infotext(
    request: GenerateRequest, seed: int, size: tuple[int, int], model: str, loras: Mapping[str, float]
) -> str:
    """The infotext of one image of a resolved request: every setting that changes its pixels, so the image
    can be made again from its own metadata (``loras``: applied LoRA name -> strength)."""
    info: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": SAMPLER_NAMES[request.sampler],
        "Schedule type": SCHEDULER_NAMES[request.scheduler],
        "CFG scale": request.cfg,
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model,
        "Shift": request.shift,
    }
    edit = request.edit
    if edit is not None:
        info["Denoising strength"] = edit.strength
        if edit.mask is not None or edit.outpaint is not None:
            info["Mask blur"] = edit.mask_blur
        if edit.outpaint is not None:
            info["Outpaint"] = ",".join(map(str, edit.outpaint))
    hires = request.hires
    if hires is not None:
        info["Hires upscale"] = hires.scale
        info["Hires steps"] = hires.steps
        info["Hires upscaler"] = "Latent" if hires.upscaler == "latent" else "Lanczos"
        info["Hires strength"] = hires.strength
    slg = request.slg
    if slg is not None:
        info["SLG layers"] = ",".join(map(str, slg.layers))
        info.update({"SLG scale": slg.scale, "SLG start": slg.start, "SLG end": slg.end})
        if slg.window != "steps":
            info["SLG window"] = slg.window
    if request.negative_until is not None:
        info["Negative until"] = request.negative_until
    if request.noise != "sd35":
        info["Noise"] = request.noise
    if request.batch_noise != "per_image":
        info["Batch noise"] = request.batch_noise
    apg = request.apg
    if apg is not None:
        info.update(
            {"APG eta": apg.eta, "APG norm threshold": apg.norm_threshold, "APG momentum": apg.momentum}
        )
    text = request.text
    if text.weighting != TextOptions.weighting:
        info["Prompt weighting"] = text.weighting
    if text.long_clip:
        info["Long CLIP"] = "True"
    if text.t5_max_tokens != TextOptions.t5_max_tokens:
        info["T5 max tokens"] = text.t5_max_tokens
    if loras:
        info["LoRA"] = ", ".join(f"{n}:{w:g}" for n, w in loras.items())
    if request.cache is not None:
        info["Step cache"] = request.cache
    for i, unit in enumerate(request.controls):  # sd-webui-controlnet's "ControlNet N" entries
        info[f"ControlNet {i}"] = controlnet_infotext(unit)
    info["Version"] = f"sd35 {__version__}"
    return infotext(request.prompt, request.negative_prompt, info)


CONTROLNET_RESIZE_NAMES = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_fill": "Resize and Fill",
}


def controlnet_infotext(unit: ControlUnit) -> str:
    """One unit as sd-webui-controlnet writes it (``Module: canny, Model: ..., Weight: ...``); the model by
    its name (a file's stem), never a path."""
    knobs = {
        "canny": f", Low Threshold: {unit.low_threshold:g}, High Threshold: {unit.high_threshold:g}",
        "blur": f", Sigma: {unit.blur_sigma:g}",
        "tile": f", Down Sampling Rate: {unit.tile_factor:g}",
    }
    return (
        f"Module: {unit.preprocess}, Model: {Path(unit.model).stem}, Weight: {unit.strength:g}, "
        f"Resize Mode: {CONTROLNET_RESIZE_NAMES[unit.resize_mode]}, Guidance Start: {unit.start:g}, "
        f"Guidance End: {unit.end:g}{knobs.get(unit.preprocess, '')}"
    )


SAMPLERS_BY_A1111_NAME: dict[str, str] = {v.lower(): k for k, v in SAMPLER_NAMES.items()}
SCHEDULERS_BY_A1111_NAME: dict[str, str] = {v.lower(): k for k, v in SCHEDULER_NAMES.items()}


def sampler_from_a1111(name: str) -> tuple[str, str | None]:
    """(our sampler, our scheduler or None) for an A1111 sampler name.

    Accepts A1111's names ("Euler a", "DPM++ 2M"), ours ("euler_ancestral"), and the pre-1.9 names that
    carry their schedule ("DPM++ 2M Karras" = DPM++ 2M with the Karras schedule). Raises ``InvalidRequest``
    naming A1111's choices for anything else.
    """
    key = name.strip().lower()
    if key in SAMPLERS_BY_A1111_NAME:
        return SAMPLERS_BY_A1111_NAME[key], None
    if key in SAMPLERS:
        return key, None
    for label, scheduler in SCHEDULERS_BY_A1111_NAME.items():
        if key.endswith(" " + label) and key[: -len(label) - 1] in SAMPLERS_BY_A1111_NAME:
            return SAMPLERS_BY_A1111_NAME[key[: -len(label) - 1]], scheduler
    raise InvalidRequest(
        f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES.values())}.", param="sampler_name"
    )


def scheduler_from_a1111(label: str) -> str | None:
    """Our scheduler for an A1111 schedule label ("Karras") or our name; None for "Automatic" (the model's)."""
    key = label.strip().lower()
    if key in ("", "automatic"):
        return None
    if key in SCHEDULERS_BY_A1111_NAME:
        return SCHEDULERS_BY_A1111_NAME[key]
    if key in SCHEDULERS:
        return key
    raise InvalidRequest(
        f"unknown scheduler {label!r}; choose one of: Automatic, {', '.join(SCHEDULER_NAMES.values())}.",
        param="scheduler",
    )


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
"""A1111's prompt tag ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>`` (a third ``:te:unet`` part is ignored)."""


def extract_lora_tags(prompt: str) -> tuple[str, tuple[LoraRef, ...]]:
    """The prompt without its ``<lora:name:weight>`` tags, and the LoRAs they name (A1111's
    ``extra_networks.parse_prompt``). A name given twice keeps its weights summed, as A1111 applies both."""
    strengths: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            strength = 1.0 if weight in (None, "") else float(weight)
        except ValueError:
            raise InvalidRequest(
                f"{match.group(0)}: the LoRA weight must be a number, e.g. <lora:{name}:0.8>.", param="prompt"
            ) from None
        strengths[name] = strengths.get(name, 0.0) + strength
    cleaned = re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip()
    return cleaned, tuple(LoraRef(name, s) for name, s in strengths.items())


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) read back from a ``parameters`` text (the inverse of
    :func:`infotext`: quoted values unquoted)."""
    lines = text.rstrip().split("\n")  # a leading empty line is an empty prompt
    last = lines[-1] if lines and re.match(r"^\s*\w[\w ]*: ", lines[-1]) and len(lines) > 1 else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    settings: dict[str, str] = {}
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        settings[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), settings
