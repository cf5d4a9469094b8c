"""First-Block Cache: skip the MMDiT-X's later blocks on a step where the first block barely changed.

Between neighbouring sampling steps a diffusion transformer's hidden states change slowly. The first joint
block's residual (its image-token output minus its input) is a cheap probe of how much: when it differs
from the one of the last fully computed call by less than ``threshold`` (mean absolute difference over
the mean absolute value), the remaining blocks' residual from that call is added instead of running them.
This is the idea of First-Block Cache (ParaAttention, Cache-DiT) and TeaCache, written from their
descriptions. The comparison is always against the last *computed* call, so skipped steps cannot drift
away unnoticed: the difference grows until a call runs in full again.

Opt-in (``--cache fbcache:THRESHOLD``): with it off nothing here runs and the image is the reference's.
A threshold of 0 never skips (a difference is never below 0), so it runs the bookkeeping and gives the
uncached image bit for bit, which the tests use. One cache lives for one sampling run; calls that see
different inputs (the CFG batch, the Skip Layer Guidance pass) keep separate entries. The decision is taken
for a whole batch at once (its mean difference), so with the cache on, an image sampled in a batch with
others (``num_images``, the server's batching) may differ slightly from the same image sampled alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd35.errors import InvalidRequest

KINDS = ("fbcache",)


@dataclass(frozen=True)
class StepCacheSpec:
    """A parsed ``--cache`` value: the method and its threshold."""

    kind: str
    threshold: float


def parse_step_cache(value: str | None, param: str = "cache") -> StepCacheSpec | None:
    """``"fbcache:0.12"`` -> the spec; None, ``""`` or ``"none"`` -> None (off)."""
    if value is None or value.strip().lower() in ("", "none", "off"):
        return None
    kind, _, threshold = value.strip().partition(":")
    hint = "write fbcache:THRESHOLD, e.g. fbcache:0.1 (0.05-0.2 is the useful range), or none"
    if kind not in KINDS:
        raise InvalidRequest(f"unknown step cache {value!r}; {hint}.", param=param)
    try:
        t = float(threshold)
    except ValueError:
        raise InvalidRequest(f"step cache {value!r} has no threshold; {hint}.", param=param) from None
    if not (0 <= t < 10):
        raise InvalidRequest(f"step cache threshold {t} is out of range; {hint}.", param=param)
    return StepCacheSpec(kind, t)


@dataclass
class _Entry:
    first_residual: torch.Tensor
    rest_residual: torch.Tensor


@dataclass
class FirstBlockCache:
    """The state of one sampling run: per call kind, the last computed call's residuals; and counts."""

    threshold: float
    calls: int = 0
    hits: int = 0
    _entries: dict[tuple, _Entry] = field(default_factory=dict)

    def reusable(self, key: tuple, first_residual: torch.Tensor) -> torch.Tensor | None:
        """The cached rest-of-model residual if ``first_residual`` is close to the last computed one."""
        self.calls += 1
        entry = self._entries.get(key)
        if entry is None or entry.first_residual.shape != first_residual.shape:
            return None
        prev = entry.first_residual.float()
        diff = (first_residual.float() - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
        if diff.item() < self.threshold:
            self.hits += 1
            return entry.rest_residual
        return None

    def store(self, key: tuple, first_residual: torch.Tensor, rest_residual: torch.Tensor) -> None:
        self._entries[key] = _Entry(first_residual, rest_residual)


class CachedRunner:
    """``model`` called with ``step_cache=cache``: what sampling calls in place of the model for one run."""

    def __init__(self, model: torch.nn.Module, cache: FirstBlockCache):
        self.model, self.cache = model, cache
        self.config = getattr(model, "config", None)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, step_cache=self.cache, **kwargs)
