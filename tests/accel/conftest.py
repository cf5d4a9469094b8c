"""Shared fixtures of the accel tests: one thread (tiny models gain nothing from more on a loaded machine)."""

from __future__ import annotations

import pytest

from sd35.testing import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield
