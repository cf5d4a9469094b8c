"""Our ControlNet against diffusers' SD3ControlNetModel on the files diffusers writes: block residuals in fp32."""

from __future__ import annotations

import pytest
import torch

from sd35.control.files import load_controlnet, read_controlnet
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.configs import tiny_configs
from tests.control.control_helpers import controlnet_inputs, diffusers_controlnet, write_controlnet
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = tiny_configs().mmditx


@pytest.mark.parametrize(
    "dual,pos_embed_type,extra,force_zeros,qk",
    [
        ((0,), "sincos", 0, True, True),
        ((), "sincos", 0, False, True),
        ((0, 1), None, 0, True, True),
        ((), None, 1, True, False),
    ],
)
def test_residuals_match_diffusers(tmp_path, dual, pos_embed_type, extra, force_zeros, qk):
    cfg = tiny_configs(qk_norm=qk).mmditx
    ref = diffusers_controlnet(
        cfg, dual=dual, pos_embed_type=pos_embed_type, extra=extra, force_zeros=force_zeros
    )
    ours = load_controlnet(write_controlnet(ref, tmp_path / "cn"), cfg)
    assert ours.config.attn2_layers == dual and ours.config.extra_channels == extra
    assert ours.config.force_zeros_for_pooled == force_zeros
    assert (ours.config.pos_embed_max_size is None) == (pos_embed_type is None)
    x, t, y, ctx, hint = controlnet_inputs(cfg, channels=cfg.in_channels + extra)
    with torch.no_grad():
        got = ours(x, t, y, ctx, hint)
        want = ref(
            hidden_states=x,
            controlnet_cond=hint,
            timestep=t,
            encoder_hidden_states=ctx,
            pooled_projections=torch.zeros_like(y) if force_zeros else y,
            return_dict=False,
        )[0]
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape == (2, 4 * 6, cfg.hidden_size)
        assert rel_err(a, b) <= 1e-5
        assert b.abs().max() > 0.1  # a residual that matters


def test_single_file_and_official_layout_load_the_same(tmp_path):
    ref = diffusers_controlnet(CFG)
    folder = write_controlnet(ref, tmp_path / "cn")
    single = tmp_path / "canny-sd35m.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    official = tmp_path / "canny-official.safetensors"
    save_file_atomic({k: v.load() for k, v in read_controlnet(folder).tensors.items()}, official)
    assert read_controlnet(single).layout == "diffusers" and read_controlnet(official).layout == "official"
    args = controlnet_inputs(CFG)
    with torch.no_grad():
        outs = [load_controlnet(p, CFG)(*args) for p in (folder, single, official)]
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))
