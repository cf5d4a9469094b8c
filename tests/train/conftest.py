"""Shared fixtures of the training tests."""

from __future__ import annotations

import pytest

from sd35.testing import torch_threads


@pytest.fixture(scope="module")
def one_thread_per_module():
    """torch on one intra-op thread for a whole module, its module-scoped fixtures (data, caches) included."""
    with torch_threads(1):
        yield
