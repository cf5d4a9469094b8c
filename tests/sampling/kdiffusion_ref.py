"""k-diffusion's real ``sampling.py``, loaded without the rest of the package, as a test reference.

k-diffusion is installed without its dependencies, and its package ``__init__`` imports modules we do
not have (torchvision, wandb, ...). ``sampling.py`` itself only needs torch, scipy, torchdiffeq, torchsde,
tqdm and one helper from ``k_diffusion.utils``. So we register a private package holding a minimal
``utils`` with just that helper (:func:`append_dims`, written here), then execute the installed
``sampling.py`` file as that package's submodule. Every sampler used in the tests is k-diffusion's own code.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

PACKAGE = "_kdiffusion_ref"


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions added until it has ``target_dims`` dimensions."""
    return x.reshape(*x.shape, *([1] * (target_dims - x.ndim)))


def load_sampling() -> types.ModuleType:
    """The installed ``k_diffusion/sampling.py`` as module ``_kdiffusion_ref.sampling`` (cached)."""
    name = f"{PACKAGE}.sampling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"

    package = types.ModuleType(PACKAGE)
    package.__path__ = []  # a package, so that sampling.py's ``from . import utils`` resolves here
    utils = types.ModuleType(f"{PACKAGE}.utils")
    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[PACKAGE] = package
    sys.modules[utils.__name__] = utils

    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module
