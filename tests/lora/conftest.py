"""Shared fixtures of the LoRA tests: one torch thread for every test, and fresh tiny models."""

from __future__ import annotations

import pytest

from tests.lora.lora_helpers import make_models


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every LoRA test runs on one torch thread (the suite's ``one_thread`` fixture)."""


@pytest.fixture
def models():
    return make_models()
