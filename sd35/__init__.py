"""sd35: a from-scratch PyTorch engine for Stable Diffusion 3.5 Medium."""

from sd35.errors import SD35Error
from sd35.models.mmditx import MMDiTX, MMDiTXConfig

__all__ = ["MMDiTX", "MMDiTXConfig", "SD35Error"]
__version__ = "0.1.0"
