"""Seeded random weights whose every tensor matters: for equivalence tests, benchmarks and the demo's encoders.

Default initialisation leaves norm weights at 1 and many biases at 0, which would hide a swapped or dropped
tensor in an equivalence test (and zero adaLN weights make a transformer an identity). Here every floating
tensor gets distinct random values at a scale that keeps activations O(1) through many blocks: matrices
~ N(0, 1/fan_in), embeddings (positions, tokens) ~ N(0, 0.5^2), norm weights ~ 1 + N(0, 0.1^2), other
vectors ~ N(0, 0.1^2).

Two schemes draw these values (:data:`SCHEMES`):

- ``"stream"``: one CPU float32 generator seeded once, walked over the tensors in name order, each value
  copied into its tensor. Cheap for small models and the scheme every test fixture, the tiny checkpoints
  (:mod:`sd35.testing`) and the demo's frozen text encoders were made with, so their numbers depend on it
  to the bit: an embedding consumes two draws (the first is discarded), and norm *biases* are drawn around
  1 like norm weights.
- ``"per_tensor"``: each tensor filled in place, on its own device and in its own dtype, from a generator
  seeded by (seed, tensor name): a 4.7B-parameter T5 appears in well under a second on a GPU, without a
  float32 copy in host memory, and the same seed gives the same weights to every model built from it
  (``sd35 bench`` builds its model once per variant). Norm biases are drawn like other vectors.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from sd35.models.clip import CLIPTextEncoder
from sd35.models.configs import PipelineConfigs, PipelineWeights
from sd35.models.mmditx import MMDiTX
from sd35.models.t5 import T5Encoder
from sd35.models.vae import VAE

Scheme = Literal["stream", "per_tensor"]
SCHEMES: tuple[Scheme, ...] = ("stream", "per_tensor")
# the network class of each part of PipelineConfigs / PipelineWeights, in the order their seeds are counted
PART_CLASSES: dict[str, type[nn.Module]] = {
    "mmditx": MMDiTX,
    "vae": VAE,
    "clip_l": CLIPTextEncoder,
    "clip_g": CLIPTextEncoder,
    "t5": T5Encoder,
}


def _is_embedding(name: str) -> bool:
    """Position and token tables: rows are looked up, not summed over, so they get the larger N(0, 0.5^2)."""
    return (
        name.endswith("pos_embed")
        or "embedding" in name
        or "embed_tokens" in name
        or name.endswith("shared.weight")
    )


def _is_norm(name: str, scheme: Scheme) -> bool:
    """A norm's vector, drawn around 1 (weights; in the stream scheme biases too, see the module doc)."""
    if "norm" not in name and "ln_" not in name:
        return False
    return scheme == "stream" or name.rsplit(".", 1)[-1] == "weight"


def _fill_stream(named: list[tuple[str, torch.Tensor]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in named:
        if t.dim() >= 2:
            value = torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:]))
            if _is_embedding(name):
                value = torch.randn(t.shape, generator=g) * 0.5
        elif _is_norm(name, "stream"):
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            value = 0.1 * torch.randn(t.shape, generator=g)
        t.copy_(value.to(t.dtype))


def _fill_per_tensor(named: list[tuple[str, torch.Tensor]], seed: int) -> None:
    for name, t in named:
        g = torch.Generator(device=t.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if t.dim() >= 2:
            if _is_embedding(name):
                t.normal_(0.0, 0.5, generator=g)
            else:
                t.normal_(0.0, 1.0 / math.sqrt(math.prod(t.shape[1:])), generator=g)
        elif _is_norm(name, "per_tensor"):
            t.normal_(1.0, 0.1, generator=g)
        else:
            t.normal_(0.0, 0.1, generator=g)


@torch.no_grad()
def randomize_(
    module: nn.Module, seed: int = 0, dtype: torch.dtype | None = None, *, scheme: Scheme = "stream"
) -> nn.Module:
    """Fill every floating parameter and buffer of ``module`` in place, deterministically from ``seed``.

    ``scheme`` chooses how values are drawn (see the module doc); ``dtype``, if given, converts the module
    afterwards. Returns ``module``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown random-weight scheme {scheme!r}; choose from {', '.join(SCHEMES)}.")
    named = list(module.named_parameters()) + list(module.named_buffers())
    floating = [(name, t) for name, t in sorted(named, key=lambda kv: kv[0]) if t.is_floating_point()]
    (_fill_stream if scheme == "stream" else _fill_per_tensor)(floating, seed)
    return module if dtype is None else module.to(dtype)


def random_state_dict(
    module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32, *, scheme: Scheme = "stream"
) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` after :func:`randomize_` (contiguous CPU tensors, ready for safetensors)."""
    randomize_(module, seed, dtype, scheme=scheme)
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(
    cls: type[nn.Module],
    config,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    *,
    scheme: Scheme = "per_tensor",
) -> nn.Module:
    """``cls(config)`` allocated directly on ``device`` in ``dtype`` (no float32 detour), randomly filled,
    in eval mode without gradients: a model to run, not to train."""
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    return randomize_(model, seed, scheme=scheme).eval().requires_grad_(False)


def random_pipeline_weights(
    configs: PipelineConfigs,
    seed: int = 0,
    *,
    scheme: Scheme = "stream",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_part: Callable[[str], None] | None = None,
) -> PipelineWeights:
    """Random state dicts (on the CPU) for every part of ``configs``; part i of :data:`PART_CLASSES` gets
    ``seed + i``. Each part is made on ``device`` and dropped before the next, so a full-size pipeline
    needs the device memory of its largest part only. ``on_part(name)`` is called before each part."""
    state = {}
    for i, (name, cls) in enumerate(PART_CLASSES.items()):
        if on_part is not None:
            on_part(name)
        model = build_random(cls, getattr(configs, name), device, dtype, seed + i, scheme=scheme)
        state[name] = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        del model
    return PipelineWeights(configs=configs, **state)
