"""Helpers shared by the test packages: comparisons with a stated tolerance, pixel arrays of images, the ``sd35``
command as a user runs it, and tiny models and inputs built the same way everywhere.

A helper that only one sub-package uses stays in that package (``tests/lora/lora_helpers.py``, ...).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import sd35
from sd35.cli import main
from sd35.errors import SD35Warning
from sd35.lora.adapters import LoRA
from sd35.lora.patching import Patch
from sd35.models.clip import CLIPTextEncoder
from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Encoder
from sd35.testing import tiny_weights

# --------------------------------------------------------------------------------------------- tensors


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float32 (a bf16 difference would be rounded before it counts)."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``actual`` has ``expected``'s shape and dtype, and its largest error is at most ``rel`` times the largest
    magnitude of ``expected`` (one scale for the whole tensor: near-zero entries get no relative slack)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    )
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


# --------------------------------------------------------------------------------------------- images


def pixels(image: Image.Image) -> np.ndarray:
    """The image's pixel values as int16, so that the difference of two images cannot wrap around."""
    return np.asarray(image).astype(np.int16)


def pixel_diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    """|a - b| per pixel value."""
    return np.abs(pixels(a) - pixels(b))


def noise_image(width: int, height: int, seed: int, high: int = 256) -> Image.Image:
    """An RGB image of seeded uniform random pixel values in [0, high)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, high, (height, width, 3), dtype=np.uint8))


def sd35_warnings(record) -> list[str]:
    """The messages of the :class:`~sd35.errors.SD35Warning` among recorded warnings."""
    return [str(w.message) for w in record if issubclass(w.category, SD35Warning)]


# --------------------------------------------------------------------------------------------- the command


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``sd35 ARGS`` in this process, as a user runs it: (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports the sd35 under test, whatever the current folder holds."""
    path = os.pathsep.join(filter(None, [str(Path(sd35.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


# --------------------------------------------------------------------------------------------- models and inputs

COMPONENTS = ("mmditx", "clip_l", "clip_g", "t5")


@functools.cache
def _weights(seed: int, attn2: tuple[int, ...]):
    return tiny_weights(seed, tiny_configs(attn2_layers=attn2))


def tiny_models(seed: int, *components: str, attn2: tuple[int, ...] = (0, 1)) -> dict[str, nn.Module]:
    """Fresh tiny models of :func:`sd35.testing.tiny_weights` ``(seed)``, by name (default: all of
    :data:`COMPONENTS`); the MMDiT-X has 3 joint blocks, attn2 in blocks ``attn2``, block 2 pre-only."""
    w = _weights(seed, attn2)
    build = {
        "mmditx": MMDiTX.from_state_dict,
        "clip_l": lambda sd: CLIPTextEncoder.from_state_dict(sd, "clip_l"),
        "clip_g": lambda sd: CLIPTextEncoder.from_state_dict(sd, "clip_g"),
        "t5": T5Encoder.from_state_dict,
    }
    # the loaders keep the tensors they are given, and tests change models: every model gets its own copies
    return {c: build[c]({k: v.clone() for k, v in getattr(w, c).items()}) for c in components or COMPONENTS}


def mmditx_inputs(
    cfg: MMDiTXConfig, t: torch.Tensor, hw: tuple[int, int] = (8, 8), n_ctx: int = 11, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (x, t, y, context) for an MMDiT-X of ``cfg``, one row per timestep of ``t``."""
    g = torch.Generator().manual_seed(seed)
    batch = len(t)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    y = torch.randn(batch, cfg.pooled_dim, generator=g)
    ctx = torch.randn(batch, n_ctx, cfg.context_dim, generator=g)
    return x, t, y, ctx


def kohya_lora(model: nn.Module, names: list[str], rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA of seeded random factors (scale 0.2) on the linears ``names`` of an MMDiT-X;
    alpha = rank, so each layer changes by exactly up @ down."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        out_dim, in_dim = model.get_submodule(name).weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.2
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def random_lora_patch(lin: nn.Linear, seed: int) -> Patch:
    """A rank-2 LoRA patch named "r" for ``lin``, of seeded standard-normal factors (large: its effect shows)."""
    g = torch.Generator().manual_seed(seed)
    return Patch(
        "r", LoRA(torch.randn(lin.out_features, 2, generator=g), torch.randn(2, lin.in_features, generator=g))
    )


def generate_with_latent(pipe, prompt: str, **kwargs) -> tuple[Image.Image, torch.Tensor]:
    """The first image of ``pipe.generate(prompt, **kwargs)`` and the latent of its last sampling step."""
    final = {}

    def grab(progress):
        final["x"] = progress.x.clone()

    image = pipe.generate(prompt, on_progress=grab, **kwargs)[0]
    return image, final["x"]
