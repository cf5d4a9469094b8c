"""sd35.bench.random_models: the inputs are seeded random normal numbers, and a broken output never passes."""

from __future__ import annotations

import math

import torch

from sd35.bench.options import BATCH, TEXT_TOKENS
from sd35.bench.random_models import compare, step_inputs
from sd35.models.configs import scaled_mmditx_config


def test_step_inputs_are_seeded_and_shaped_like_one_cfg_step():
    cfg, cpu = scaled_mmditx_config(), torch.device("cpu")
    a = step_inputs(cfg, 64, cpu, torch.float32, seed=1)
    b = step_inputs(cfg, 64, cpu, torch.float32, seed=1)
    c = step_inputs(cfg, 128, cpu, torch.float32, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.args, b.args, strict=True))
    assert a.x.shape == (BATCH, cfg.in_channels, 8, 8) and c.x.shape[-1] == 16
    assert a.context.shape == (BATCH, TEXT_TOKENS, cfg.context_dim) and a.y.shape == (BATCH, cfg.pooled_dim)
    assert a.x.std() > 0.5 and a.t.min() >= 0 and a.t.max() <= 1000  # never zeros: they can run faster


def test_compare_never_passes_a_non_finite_output():
    ref = torch.ones(4)
    assert compare(ref * 1.5, ref)["rel_l2_diff"] == 0.5
    bad = compare(torch.tensor([1.0, math.nan, 1.0, 1.0]), ref)
    assert math.isnan(bad["rel_l2_diff"]) and not bad["rel_l2_diff"] <= 1.0
