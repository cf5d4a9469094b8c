"""What the workflow tests share: a ComfyUI models folder over the tiny set and ``sd35 run``'s loading."""

from __future__ import annotations

import pytest

from sd35.workflows.run import default_loader

TE_NAMES = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A ComfyUI models folder over the tiny set (links, not copies): the checkpoint as
    ``checkpoints/sd3.5_medium.safetensors``, the text encoders under their own names (:data:`TE_NAMES`
    among them) in ``text_encoders/``."""
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    (root / "text_encoders").mkdir()
    (root / "checkpoints" / "sd3.5_medium.safetensors").symlink_to(tiny["official"])
    for path in tiny["text_encoders"].iterdir():
        (root / "text_encoders" / path.name).symlink_to(path)
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
