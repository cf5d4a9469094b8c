"""sd35: a from-scratch PyTorch engine for Stable Diffusion 3.5 Medium."""

from sd35._version import __version__
from sd35.errors import CheckpointError, MissingComponentError, SD35Error
from sd35.loading.components import Component, assemble, load_component, load_models, scan
from sd35.models.clip import CLIPTextConfig, CLIPTextEncoder
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config, T5Encoder
from sd35.models.vae import VAE, VAEConfig
from sd35.pipeline import SD3Pipeline, load_pipeline

__all__ = [
    "__version__",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CheckpointError",
    "Component",
    "MMDiTX",
    "MMDiTXConfig",
    "MissingComponentError",
    "SD35Error",
    "SD3Pipeline",
    "T5Config",
    "T5Encoder",
    "VAE",
    "VAEConfig",
    "assemble",
    "load_component",
    "load_models",
    "load_pipeline",
    "scan",
]
