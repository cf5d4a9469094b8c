"""The tiny model set as a ComfyUI models folder, and its pipelines loaded once per module."""

from __future__ import annotations

import pytest

from sd35.workflows.run import default_loader

TE_NAMES = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A ComfyUI models folder over the tiny set (links, not copies)."""
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    (root / "text_encoders").mkdir()
    (root / "checkpoints" / "sd3.5_medium.safetensors").symlink_to(tiny["official"])
    for name in TE_NAMES:
        (root / "text_encoders" / name).symlink_to(tiny["text_encoders"] / name)
    return root


@pytest.fixture(scope="module")
def loaded(tiny):
    """One pipeline per distinct file set, as ``sd35 run`` loads them; a test reads which sets were asked."""
    cache = {}
    load = default_loader("cpu", "fp32", tiny["diffusers"])

    def loader(spec):
        if spec not in cache:
            cache[spec] = load(spec)
        return cache[spec]

    return loader
