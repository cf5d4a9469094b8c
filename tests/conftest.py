"""Shared fixtures: one tiny random SD3.5 set in every layout, a pipeline loaded from it, and one torch thread."""

from __future__ import annotations

import os

import pytest

# The suite's expected values (and its comparisons with diffusers and transformers) are fp32 ones, so the
# CPU's default dtype is pinned to fp32 here, for this process and every command it starts. On a CPU with
# bf16 instructions the default is otherwise bf16 (sd35.devices.default_dtype); tests/test_cpu_dtype.py
# unsets this pin to test that default.
os.environ["SD35_CPU_DTYPE"] = "fp32"

from sd35.testing import torch_threads, write_tiny_set


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny set: official, all_in_one, text_encoders, diffusers (see sd35.testing)."""
    return write_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    from sd35 import load_pipeline

    return load_pipeline(tiny["diffusers"], device="cpu")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread during the test (sd35.testing.torch_threads): tiny models gain nothing from
    more, and spinning threads crawl on a loaded machine. Modules take it with ``pytest.mark.usefixtures``."""
    with torch_threads(1):
        yield
