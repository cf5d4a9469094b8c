"""sd35.models.random_init: seeded weights with no zero tensor, in two schemes that keep their numbers."""

from __future__ import annotations

import pytest
import torch

from sd35.models.configs import scaled_mmditx_config, tiny_configs
from sd35.models.mmditx import MMDiTX
from sd35.models.random_init import PART_CLASSES, build_random, random_pipeline_weights, random_state_dict
from sd35.models.vae import VAE

CPU = torch.device("cpu")


def test_per_tensor_weights_are_seeded_nonzero_and_shared_by_every_build():
    cfg = scaled_mmditx_config()
    a = build_random(MMDiTX, cfg, CPU, torch.float32, seed=3)
    b = build_random(MMDiTX, cfg, CPU, torch.float32, seed=3)
    c = build_random(MMDiTX, cfg, CPU, torch.float32, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["context_embedder.weight"], sc["context_embedder.weight"])
    for k, v in sa.items():
        assert v.abs().max() > 0, k  # no zero tensor anywhere (adaLN included)
    ada = sa["joint_blocks.0.x_block.adaLN_modulation.1.weight"]
    assert 0.5 < ada.std().item() * cfg.hidden_size**0.5 < 2  # N(0, 1/fan_in)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_per_tensor_weights_are_made_in_the_requested_dtype():
    model = build_random(MMDiTX, scaled_mmditx_config(), CPU, torch.bfloat16, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("scheme,bias_mean", [("stream", 1.0), ("per_tensor", 0.0)])
def test_the_schemes_differ_only_where_documented(scheme, bias_mean):
    """Norm biases: around 1 in the stream scheme (the fixtures' numbers depend on it), around 0 otherwise."""
    sd = random_state_dict(VAE(tiny_configs().vae), seed=1, scheme=scheme)
    assert abs(sd["decoder.norm_out.bias"].mean().item() - bias_mean) < 0.1
    assert abs(sd["decoder.norm_out.weight"].mean().item() - 1.0) < 0.1
    assert sd["encoder.conv_in.weight"].std().item() == pytest.approx(1 / 27**0.5, rel=0.3)  # 3x3x3 fan-in


def test_stream_weights_are_seeded():
    cfg = tiny_configs().mmditx
    a, b = random_state_dict(MMDiTX(cfg), seed=2), random_state_dict(MMDiTX(cfg), seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.abs().max() > 0 for v in a.values())


def test_pipeline_parts_get_consecutive_seeds():
    c = tiny_configs()
    w = random_pipeline_weights(c, seed=5)
    for i, (name, cls) in enumerate(PART_CLASSES.items()):
        alone = random_state_dict(cls(getattr(c, name)), seed=5 + i)
        assert all(torch.equal(alone[k], getattr(w, name)[k]) for k in alone), name
    assert w.configs is c


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="stream, per_tensor"):
        random_state_dict(MMDiTX(tiny_configs().mmditx), scheme="fast")
