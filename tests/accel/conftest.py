"""Shared fixtures of the accel tests: one thread (tiny models gain nothing from more on a loaded machine)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every accel test runs on one torch thread (the suite's ``one_thread`` fixture)."""
