"""A LoRA we save in the diffusers layout loads in diffusers (PEFT) and gives the same outputs as ours."""

from __future__ import annotations

import pytest
import torch

from sd35.lora import DEFAULT_TARGETS, add_lora, export_lora, export_metadata, save_lora
from sd35.models.configs import tiny_configs
from tests.helpers import mmditx_inputs, rel_err, tiny_models

pytest.importorskip("peft")
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402

TARGETS = (
    *DEFAULT_TARGETS,
    "adaLN_modulation.1",
    "final_layer.linear",
    "context_embedder",
    "x_embedder.proj",
)
TARGETS += ("t_embedder.mlp.0", "y_embedder.mlp.2")


def _trained(rank=4, alpha=2.0):
    # the weights sd35.testing.write_tiny_set (the `tiny` fixture) writes, seed 0
    ours = tiny_models(0, "mmditx", "clip_l", "clip_g")
    g = torch.Generator().manual_seed(0)
    params = add_lora(ours["mmditx"], rank, alpha, targets=TARGETS, generator=g)
    params += add_lora(ours["clip_l"], rank, alpha, targets=("self_attn.q_proj", "mlp.fc2"), generator=g)
    params += add_lora(
        ours["clip_g"], 2, 1.0, targets=("self_attn.v_proj", "self_attn.out_proj"), generator=g
    )
    with torch.no_grad():
        for p in params:
            if not p.abs().sum():
                p.normal_(0, 0.05, generator=g)
    return ours


def _inputs():
    return mmditx_inputs(tiny_configs().mmditx, torch.tensor([900.0, 35.0]), (8, 10), n_ctx=9)


def _compare_transformer(ours, ref):
    x, t, y, ctx = _inputs()
    with torch.no_grad():
        a = ours(x, t, y, ctx)
        b = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert rel_err(a, b) <= 1e-4
    return a


def test_transformer_load_lora_adapter(tiny, tmp_path):
    ours = _trained()
    mm = ours["mmditx"]
    path = save_lora(
        tmp_path / "l.safetensors",
        export_lora(mm, format="diffusers"),
        export_metadata(mm, format="diffusers"),
    )
    ref = SD3Transformer2DModel.from_pretrained(tiny["diffusers"] / "transformer").eval()
    x, t, y, ctx = _inputs()
    with torch.no_grad():
        before = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    ref.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="sd35")
    n_lora = sum(1 for name, _ in ref.named_modules() if name.endswith(".lora_A.sd35"))
    n_ours = sum(1 for k in export_lora(mm, format="diffusers") if k.endswith("lora_A.weight"))
    assert n_lora == n_ours
    a = _compare_transformer(mm, ref)
    assert rel_err(a, before) > 1e-2  # the LoRA matters


def test_pipeline_load_lora_weights_with_text_encoders(tiny, tmp_path):
    ours = _trained()
    path = save_lora(
        tmp_path / "p.safetensors",
        export_lora(ours, format="diffusers"),
        export_metadata(ours, format="diffusers"),
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["diffusers"])
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.randint(0, 900, (2, 12), generator=g), torch.full((2, 1), 999)], dim=1)
    encoders = {"clip_l": pipe.text_encoder.eval(), "clip_g": pipe.text_encoder_2.eval()}

    def hf_hidden(comp):
        with torch.no_grad():
            return encoders[comp](ids, output_hidden_states=True).hidden_states[-2]

    before = {c: hf_hidden(c) for c in encoders}
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="sd35")
    _compare_transformer(ours["mmditx"], pipe.transformer.eval())
    for comp in encoders:
        with torch.no_grad():
            hidden, _ = ours[comp](ids)
        assert rel_err(hidden, hf_hidden(comp)) <= 1e-4, comp
        assert rel_err(hidden, before[comp]) > 1e-3, comp  # diffusers did apply the text-encoder LoRA
