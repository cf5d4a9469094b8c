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
from sd35.loading.assemble import load_pipeline
from sd35.loading.components import Component, assemble, load_component, load_models, scan
from sd35.models.clip import CLIPTextConfig, CLIPTextEncoder
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config, T5Encoder
from sd35.models.vae import VAE, VAEConfig
from sd35.pipeline import SD3Pipeline
from sd35.presets import ModelDefaults
from sd35.request import Edit, GenerateRequest, HiresFix, LoraRef, TextOptions
from sd35.result import GenerateResult, Progress
from sd35.sampling.guidance import APG, SkipLayerGuidance

__all__ = [
    "APG",
    "VAE",
    "Busy",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "Cancelled",
    "CheckpointError",
    "Component",
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
    "load_models",
    "load_pipeline",
    "scan",
]
