"""The ComfyUI nodes sd35 runs: each node's inputs (a link type or a widget with its limits) and outputs.

The names, input names, defaults and limits are ComfyUI v0.3.64's (``nodes.py``,
``comfy_extras/nodes_sd3.py``, ``comfy_extras/nodes_model_advanced.py``); what each node does is in
:mod:`sd35.workflows.evaluate`. A widget of kind ``MODEL_NAME`` is a file name in one of ComfyUI's model
folders (:mod:`sd35.workflows.models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from sd35.loading.components import CLIP_G, CLIP_L, T5XXL
from sd35.request import MAX_SEED
from sd35.sampling.samplers import SamplerName
from sd35.sampling.schedules import SchedulerName

LINK_TYPES = frozenset({"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "CONTROL_NET"})
"""Values that only travel over links (ComfyUI's socket types)."""

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


@dataclass(frozen=True)
class Input:
    """One input of a node: a link ``type`` from :data:`LINK_TYPES`, or a widget (``INT``, ``FLOAT``,
    ``STRING``, ``BOOLEAN``, ``COMBO`` with ``choices``, ``MODEL_NAME`` in ComfyUI's model ``folder``,
    ``IMAGE_NAME`` in its input folder; ``role``: the text encoder a text-encoder slot holds, for the content
    fallback). ``optional``: ComfyUI's optional inputs, which a workflow may leave out."""

    type: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    folder: str | None = None
    role: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class NodeType:
    """A node's inputs by name, its output types in order, and whether it is an output (a save) node."""

    inputs: dict[str, Input]
    outputs: tuple[str, ...]
    output_node: bool = False


def _link(kind: str) -> Input:
    return Input(kind)


def _int(lo: float, hi: float) -> Input:
    return Input("INT", min=lo, max=hi)


def _float(lo: float, hi: float) -> Input:
    return Input("FLOAT", min=lo, max=hi)


def _model(folder: str, role: str | None = None) -> Input:
    return Input("MODEL_NAME", folder=folder, role=role)


STRING = Input("STRING")


def _sampler_inputs(seed: str) -> dict[str, Input]:
    """The inputs KSampler and KSamplerAdvanced share (``seed``: the seed input's name)."""
    return {
        "model": _link("MODEL"),
        seed: _int(0, MAX_SEED),
        "steps": _int(1, 10000),
        "cfg": _float(0, 100),
        "sampler_name": Input("COMBO", choices=get_args(SamplerName)),
        "scheduler": Input("COMBO", choices=get_args(SchedulerName)),
        "positive": _link("CONDITIONING"),
        "negative": _link("CONDITIONING"),
        "latent_image": _link("LATENT"),
    }


# --- text-encoder loaders, tiled decoding and ControlNets (nodes.py, comfy_extras/nodes_sd3.py,
# comfy_extras/nodes_controlnet.py of v0.3.64)

CLIP_DEVICE = Input("COMBO", choices=("default", "cpu"), optional=True)
UNION_TYPES = (
    "auto",
    "openpose",
    "depth",
    "hed/pidi/scribble/ted",
    "canny/lineart/anime_lineart/mlsd",
    "normal",
    "segment",
    "tile",
    "repaint",
)  # comfy/cldm/control_types.py
_CONTROL_APPLY = {
    "positive": _link("CONDITIONING"),
    "negative": _link("CONDITIONING"),
    "control_net": _link("CONTROL_NET"),
    "image": _link("IMAGE"),
    "strength": _float(0, 10),
    "start_percent": _float(0, 1),
    "end_percent": _float(0, 1),
}
CONTROL_NODES: dict[str, NodeType] = {
    "CLIPLoader": NodeType(
        {
            "clip_name": _model("text_encoders"),
            "type": Input(
                "COMBO",
                choices=(
                    "stable_diffusion",
                    "stable_cascade",
                    "sd3",
                    "stable_audio",
                    "mochi",
                    "ltxv",
                    "pixart",
                    "cosmos",
                    "lumina2",
                    "wan",
                    "hidream",
                    "chroma",
                    "ace",
                    "omnigen2",
                    "qwen_image",
                    "hunyuan_image",
                ),
            ),  # fmt: skip
            "device": CLIP_DEVICE,
        },
        ("CLIP",),
    ),
    "DualCLIPLoader": NodeType(
        {
            "clip_name1": _model("text_encoders"),
            "clip_name2": _model("text_encoders"),
            "type": Input(
                "COMBO", choices=("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image")
            ),
            "device": CLIP_DEVICE,
        },
        ("CLIP",),
    ),
    "VAEDecodeTiled": NodeType(
        {
            "samples": _link("LATENT"),
            "vae": _link("VAE"),
            "tile_size": _int(64, 4096),
            "overlap": Input("INT", min=0, max=4096, optional=True),  # older workflows lack these three
            "temporal_size": Input("INT", min=8, max=4096, optional=True),
            "temporal_overlap": Input("INT", min=4, max=4096, optional=True),
        },
        ("IMAGE",),
    ),
    "ControlNetLoader": NodeType({"control_net_name": _model("controlnet")}, ("CONTROL_NET",)),
    "ControlNetApplyAdvanced": NodeType(
        {**_CONTROL_APPLY, "vae": Input("VAE", optional=True)}, ("CONDITIONING", "CONDITIONING")
    ),
    "ControlNetApplySD3": NodeType({**_CONTROL_APPLY, "vae": _link("VAE")}, ("CONDITIONING", "CONDITIONING")),
    "SetUnionControlNetType": NodeType(
        {"control_net": _link("CONTROL_NET"), "type": Input("COMBO", choices=UNION_TYPES)}, ("CONTROL_NET",)
    ),
}

NODES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": NodeType({"ckpt_name": _model("checkpoints")}, ("MODEL", "CLIP", "VAE")),
    "UNETLoader": NodeType(
        {
            "unet_name": _model("diffusion_models"),
            "weight_dtype": Input("COMBO", choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")),
        },
        ("MODEL",),
    ),
    "TripleCLIPLoader": NodeType(
        {
            f"clip_name{i}": _model("text_encoders", role)
            for i, role in ((1, CLIP_L), (2, CLIP_G), (3, T5XXL))
        },
        ("CLIP",),
    ),
    "VAELoader": NodeType({"vae_name": _model("vae")}, ("VAE",)),
    "LoraLoader": NodeType(
        {
            "model": _link("MODEL"),
            "clip": _link("CLIP"),
            "lora_name": _model("loras"),
            "strength_model": _float(-100, 100),
            "strength_clip": _float(-100, 100),
        },
        ("MODEL", "CLIP"),
    ),
    "LoraLoaderModelOnly": NodeType(
        {"model": _link("MODEL"), "lora_name": _model("loras"), "strength_model": _float(-100, 100)},
        ("MODEL",),
    ),
    "CLIPTextEncode": NodeType({"text": STRING, "clip": _link("CLIP")}, ("CONDITIONING",)),
    "CLIPTextEncodeSD3": NodeType(
        {
            "clip": _link("CLIP"),
            "clip_l": STRING,
            "clip_g": STRING,
            "t5xxl": STRING,
            "empty_padding": Input("COMBO", choices=("none", "empty_prompt")),
        },
        ("CONDITIONING",),
    ),
    "ConditioningZeroOut": NodeType({"conditioning": _link("CONDITIONING")}, ("CONDITIONING",)),
    "ConditioningSetTimestepRange": NodeType(
        {"conditioning": _link("CONDITIONING"), "start": _float(0, 1), "end": _float(0, 1)},
        ("CONDITIONING",),
    ),
    "ConditioningCombine": NodeType(
        {"conditioning_1": _link("CONDITIONING"), "conditioning_2": _link("CONDITIONING")},
        ("CONDITIONING",),
    ),
    "ModelSamplingSD3": NodeType({"model": _link("MODEL"), "shift": _float(0, 100)}, ("MODEL",)),
    "SkipLayerGuidanceSD3": NodeType(
        {
            "model": _link("MODEL"),
            "layers": STRING,
            "scale": _float(0, 10),
            "start_percent": _float(0, 1),
            "end_percent": _float(0, 1),
        },
        ("MODEL",),
    ),
    "EmptySD3LatentImage": NodeType(
        {"width": _int(16, MAX_RESOLUTION), "height": _int(16, MAX_RESOLUTION), "batch_size": _int(1, 4096)},
        ("LATENT",),
    ),
    "KSampler": NodeType({**_sampler_inputs("seed"), "denoise": _float(0, 1)}, ("LATENT",)),
    "KSamplerAdvanced": NodeType(
        {
            **_sampler_inputs("noise_seed"),
            "add_noise": Input("COMBO", choices=("enable", "disable")),
            "start_at_step": _int(0, 10000),
            "end_at_step": _int(0, 10000),
            "return_with_leftover_noise": Input("COMBO", choices=("disable", "enable")),
        },
        ("LATENT",),
    ),
    "VAEDecode": NodeType({"samples": _link("LATENT"), "vae": _link("VAE")}, ("IMAGE",)),
    "SaveImage": NodeType({"images": _link("IMAGE"), "filename_prefix": STRING}, (), output_node=True),
    "PreviewImage": NodeType({"images": _link("IMAGE")}, (), output_node=True),
    **CONTROL_NODES,
}
"""Every node sd35 runs, by ComfyUI class name."""


# ------------------------------------------------------------------------------- image and latent nodes
# ComfyUI v0.3.64 nodes.py: LoadImage, LoadImageMask, VAEEncode, VAEEncodeForInpaint, SetLatentNoiseMask,
# InpaintModelConditioning, LatentUpscaleBy, ImageScale, ImageScaleBy.

IMAGE_NAME = Input("IMAGE_NAME")
IMAGE_UPSCALE = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_UPSCALE = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")

NODES |= {
    "LoadImage": NodeType({"image": IMAGE_NAME}, ("IMAGE", "MASK")),
    "LoadImageMask": NodeType(
        {"image": IMAGE_NAME, "channel": Input("COMBO", choices=("alpha", "red", "green", "blue"))}, ("MASK",)
    ),
    "VAEEncode": NodeType({"pixels": _link("IMAGE"), "vae": _link("VAE")}, ("LATENT",)),
    "VAEEncodeForInpaint": NodeType(
        {"pixels": _link("IMAGE"), "vae": _link("VAE"), "mask": _link("MASK"), "grow_mask_by": _int(0, 64)},
        ("LATENT",),
    ),
    "SetLatentNoiseMask": NodeType({"samples": _link("LATENT"), "mask": _link("MASK")}, ("LATENT",)),
    "InpaintModelConditioning": NodeType(
        {
            "positive": _link("CONDITIONING"),
            "negative": _link("CONDITIONING"),
            "vae": _link("VAE"),
            "pixels": _link("IMAGE"),
            "mask": _link("MASK"),
            "noise_mask": Input("BOOLEAN"),
        },
        ("CONDITIONING", "CONDITIONING", "LATENT"),
    ),
    "LatentUpscaleBy": NodeType(
        {
            "samples": _link("LATENT"),
            "upscale_method": Input("COMBO", choices=LATENT_UPSCALE),
            "scale_by": _float(0.01, 8),
        },
        ("LATENT",),
    ),
    "ImageScale": NodeType(
        {
            "image": _link("IMAGE"),
            "upscale_method": Input("COMBO", choices=IMAGE_UPSCALE),
            "width": _int(0, MAX_RESOLUTION),
            "height": _int(0, MAX_RESOLUTION),
            "crop": Input("COMBO", choices=("disabled", "center")),
        },
        ("IMAGE",),
    ),
    "ImageScaleBy": NodeType(
        {
            "image": _link("IMAGE"),
            "upscale_method": Input("COMBO", choices=IMAGE_UPSCALE),
            "scale_by": _float(0.01, 8),
        },
        ("IMAGE",),
    ),
}
