"""An exponential moving average of the trained weights.

After every optimizer step ``ema = decay * ema + (1 - decay) * weight`` (float32 copies, on the weights'
device). :meth:`EMA.applied` swaps the averages into the model for validation and saving, and swaps the
live weights back after. Works on plain tensors and on FSDP's sharded DTensor parameters alike (each process
averages its own shard).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sd35.errors import SD35Error


class EMA:
    def __init__(self, named_params: dict[str, nn.Parameter], decay: float = 0.999):
        if not 0 < decay < 1:
            raise SD35Error(f"ema_decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the averages; the trained values come back after."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.shadow[k])
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise SD35Error(
                f"the checkpoint's EMA does not match the trained weights (missing {missing[:3]}, extra {extra[:3]})."
            )
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)
