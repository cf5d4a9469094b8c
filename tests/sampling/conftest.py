"""Shared fixtures of the sampling tests."""

from __future__ import annotations

import pytest

from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX
from sd35.models.random_init import random_state_dict


@pytest.fixture(scope="module")
def mmditx() -> MMDiTX:
    """A tiny random MMDiT-X with 4 joint blocks (built once per test module)."""
    cfg = tiny_configs(depth=4).mmditx
    return MMDiTX.from_state_dict(random_state_dict(MMDiTX(cfg), seed=3)).eval()
