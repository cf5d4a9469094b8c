"""An ``nn.Embedding`` that skips its random initialisation.

Every model here is built under ``torch.device("meta")`` and then filled from a checkpoint (or by
:mod:`sd35.models.random_init`), so the default ``normal_`` init is wasted work, and on the meta device it
is worse than that: ``normal_`` on a meta tensor runs torch's Python reference implementation, whose first
use imports ``torch._dynamo`` (about 2 s of a demo run's start-up, more than its sampling).
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with an uninitialised weight on the current default device and dtype."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
