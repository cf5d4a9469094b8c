"""A small LRU cache of prompt embeddings, so that a repeated prompt never runs the text encoders.

Encoding a prompt runs CLIP-L, CLIP-G and T5-XXL (4.8 B parameters; in the offloading memory modes
it also moves them over PCIe), while the result is only ``(context, pooled)``: 2 x 333 x 4096 float32,
11 MB for a CFG pair. Sampling the same prompt again (new seeds, other settings) is the common case.

Entries are keyed by the whole encoder call (every prompt of the batch, in order, plus the settings
that change the tokens), never by single prompts: encoders batch rows together, and a row encoded in
another batch can differ in the last bits, so a hit returns exactly what encoding again would.
The owner clears the cache whenever the encoders' weights change (a LoRA on a text encoder).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

Embedding = tuple[torch.Tensor, torch.Tensor]


class PromptCache:
    """Least-recently-used ``key -> (context, pooled)``, at most ``size`` entries (0 disables it).

    Values are stored on ``device`` (None: where they were computed; the offloading memory modes keep
    them in CPU memory) and handed out as fresh copies, so a caller that edits its tensors in place
    cannot change the cache.
    """

    def __init__(self, size: int = 32, device: torch.device | str | None = None):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"cache size must be a non-negative integer, got {size!r}")
        self.size = size
        self.device = torch.device(device) if device is not None else None
        self._entries: OrderedDict[Hashable, Embedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first (the next to be dropped when the cache is full)."""
        return list(self._entries)

    def get(self, key: Hashable, device: torch.device | str | None = None) -> Embedding | None:
        """The entry for ``key`` (copied to ``device``, default where it is stored), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return tuple(t.to(device, copy=True) for t in entry)  # type: ignore[return-value]

    def put(self, key: Hashable, value: Embedding) -> None:
        if self.size == 0:
            return
        self._entries[key] = tuple(t.detach().to(self.device, copy=True) for t in value)  # type: ignore[assignment]
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
