"""SD3Pipeline.load_lora / unload_lora on the shared tiny pipeline (which must come back unchanged)."""

from __future__ import annotations

import torch

from sd35.lora import save_lora
from tests.lora.lora_helpers import assert_same, lora_models, mixed_lora, snapshot


def test_pipeline_load_and_unload(tiny_pipe, tmp_path):
    pipe = tiny_pipe
    models = lora_models(pipe)
    snap = snapshot(models)
    path = save_lora(tmp_path / "style.safetensors", mixed_lora(models))
    ctx0, pooled0 = pipe.encode_prompt("a red cube")
    try:
        report = pipe.load_lora(path, strength=0.7)
        assert report.name == "style" and report.modes == {"merge": sum(report.layers.values())}
        assert set(report.layers) == {"mmditx", "clip_l", "clip_g", "t5"}
        ctx1, pooled1 = pipe.encode_prompt("a red cube")
        assert not torch.allclose(ctx0, ctx1) and not torch.allclose(pooled0, pooled1)
        runtime = pipe.load_lora(path, strength=-0.7, mode="runtime", name="undo")
        assert runtime.modes == {"runtime": sum(runtime.layers.values())}
        ctx2, _ = pipe.encode_prompt("a red cube")
        assert (ctx2 - ctx0).abs().max() < (
            ctx1 - ctx0
        ).abs().max()  # the opposite strength (partly) cancels it
        assert pipe.unload_lora("undo") == ["undo"]
    finally:
        removed = pipe.unload_lora()
    assert removed == ["style"]
    assert_same(models, snap)
    ctx3, pooled3 = pipe.encode_prompt("a red cube")
    assert torch.equal(ctx3, ctx0) and torch.equal(pooled3, pooled0)
