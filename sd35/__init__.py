"""sd35: a from-scratch PyTorch engine for Stable Diffusion 3.5 Medium.

The public API::

    import sd35

    pipe = sd35.load_pipeline("sd3.5_medium.safetensors", text_encoders="text_encoders/")
    images = pipe.generate("a photo of a cat", steps=28, seed=1)                   # the convenience
    result = pipe.run(sd35.GenerateRequest(prompt="a photo of a cat", seed=1))     # the request object
    result.images, result.seeds, result.warnings

Nothing in the package imports ``sd35`` itself; this module only re-exports.
"""

from sd35._version import __version__
from sd35.errors import (
    Busy,
    Cancelled,
    CheckpointError,
    InvalidRequest,
    MissingComponentError,
    NotFound,
    SD35Error,
    SD35Warning,
    Unsupported,
)

# Everything below imports torch, so it loads on first use (PEP 562): ``sd35 --help`` and the command
# line's thread setup (:mod:`sd35.cpu_threads`, which must run before torch starts its OpenMP pool) come
# first, and ``import sd35`` stays cheap for code that only needs the errors.
_LAZY: dict[str, str] = {
    "load_pipeline": "sd35.loading.assemble",
    **dict.fromkeys(
        ["Component", "assemble", "load_component", "load_models", "scan"], "sd35.loading.components"
    ),
    **dict.fromkeys(["CLIPTextConfig", "CLIPTextEncoder"], "sd35.models.clip"),
    **dict.fromkeys(["MMDiTX", "MMDiTXConfig"], "sd35.models.mmditx"),
    **dict.fromkeys(["T5Config", "T5Encoder"], "sd35.models.t5"),
    **dict.fromkeys(["VAE", "VAEConfig"], "sd35.models.vae"),
    "SD3Pipeline": "sd35.pipeline",
    "ModelDefaults": "sd35.presets",
    **dict.fromkeys(["Edit", "GenerateRequest", "HiresFix", "LoraRef", "TextOptions"], "sd35.request"),
    **dict.fromkeys(["GenerateResult", "Progress"], "sd35.result"),
    **dict.fromkeys(["APG", "SkipLayerGuidance"], "sd35.sampling.guidance"),
    "ControlUnit": "sd35.control.unit",
    **dict.fromkeys(["ControlNet", "ControlNetConfig"], "sd35.models.controlnet"),
    "load_controlnet": "sd35.control.files",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sd35' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "APG",
    "VAE",
    "Busy",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "Cancelled",
    "CheckpointError",
    "Component",
    "ControlNet",
    "ControlNetConfig",
    "ControlUnit",
    "Edit",
    "GenerateRequest",
    "GenerateResult",
    "HiresFix",
    "InvalidRequest",
    "LoraRef",
    "MMDiTX",
    "MMDiTXConfig",
    "MissingComponentError",
    "ModelDefaults",
    "NotFound",
    "Progress",
    "SD35Error",
    "SD35Warning",
    "SD3Pipeline",
    "SkipLayerGuidance",
    "T5Config",
    "T5Encoder",
    "TextOptions",
    "Unsupported",
    "VAEConfig",
    "__version__",
    "assemble",
    "load_component",
    "load_controlnet",
    "load_models",
    "load_pipeline",
    "scan",
]
