"""Shared fixtures: one tiny random SD3.5 set in every layout, and a pipeline loaded from it."""

from __future__ import annotations

import pytest

from sd35.testing import write_tiny_set


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny set: official, all_in_one, text_encoders, diffusers (see sd35.testing)."""
    return write_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    from sd35 import load_pipeline

    return load_pipeline(tiny["diffusers"], device="cpu")
