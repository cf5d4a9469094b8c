"""The opt-in First-Block Cache (``--cache fbcache:T``): off or at threshold 0 it gives the uncached image bit
for bit; on, it skips the later blocks on some steps and stays close to the uncached image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd35 import GenerateRequest, SkipLayerGuidance
from sd35.demo import load_demo_pipeline
from sd35.errors import InvalidRequest
from sd35.models.step_cache import FirstBlockCache, StepCacheSpec, parse_step_cache
from tests.helpers import pixels, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def demo():
    return load_demo_pipeline(dtype="fp32")


def _count_blocks(model) -> dict[str, int]:
    counts = {"first": 0, "last": 0}
    model.joint_blocks[0].register_forward_hook(lambda *_: counts.__setitem__("first", counts["first"] + 1))
    model.joint_blocks[-1].register_forward_hook(lambda *_: counts.__setitem__("last", counts["last"] + 1))
    return counts


def _psnr(a, b) -> float:
    mse = ((pixels(a).astype(np.float64) - pixels(b).astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_parsing():
    assert (
        parse_step_cache(None) is None and parse_step_cache("none") is None and parse_step_cache("") is None
    )
    assert parse_step_cache("fbcache:0.12") == StepCacheSpec("fbcache", 0.12)
    for bad, message in [
        ("teacache:0.1", "unknown step cache"),
        ("fbcache", "has no threshold"),
        ("fbcache:x", "has no threshold"),
        ("fbcache:-0.1", "out of range"),
    ]:
        with pytest.raises(InvalidRequest, match=message) as e:
            GenerateRequest(prompt="x", cache=bad)
        assert e.value.param == "cache" and "fbcache:THRESHOLD" in str(e.value)


def test_the_cli_option(capsys, tmp_path):
    code, _out, err = run_cli(
        capsys, "generate", "--prompt", "x", "--cache", "fbcache", "-o", str(tmp_path / "a.png")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--cache" in err and "fbcache:THRESHOLD" in err


def test_off_and_threshold_zero_give_the_uncached_image_bit_for_bit(demo):
    counts = _count_blocks(demo.mmditx)
    plain = demo.generate(PROMPT, seed=3)[0]
    assert counts["first"] == counts["last"] == 20  # 20 steps, CFG batched: one call each
    zero = demo.generate(PROMPT, seed=3, cache="fbcache:0")[0]
    assert counts["first"] == counts["last"] == 40  # the cache looked every step and never skipped
    assert np.array_equal(pixels(plain), pixels(zero))


def test_a_threshold_skips_blocks_and_stays_close(demo):
    """fbcache:0.1 on the demo model (benchmarks/cpu_quality.py): about a third of the block calls skipped,
    42.8 dB PSNR or more against the uncached image over 6 prompts and seeds; the bound here is 35 dB."""
    plain = demo.generate(PROMPT, seed=2)[0]
    counts = _count_blocks(demo.mmditx)
    cached = demo.generate(PROMPT, seed=2, cache="fbcache:0.1")[0]
    assert counts["first"] == 20 and 0 < counts["last"] < 20
    assert 35 <= _psnr(cached, plain) < float("inf")
    slg = SkipLayerGuidance()  # the demo's own SLG: a second call kind in some steps
    with_slg = demo.generate(PROMPT, seed=2, cache="fbcache:0.1", slg=slg)[0]
    assert 30 <= _psnr(with_slg, demo.generate(PROMPT, seed=2, slg=slg)[0]) < float("inf")


def test_a_hit_adds_the_cached_residual(demo):
    """Two calls with the same inputs: the second reuses the first's later-blocks residual, so its output is
    the full output up to float rounding (first block + (full - first block)); other inputs miss."""
    model = demo.mmditx
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    y = torch.randn(2, cfg.pooled_dim, generator=g)
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    cache = FirstBlockCache(threshold=0.01)
    with torch.no_grad():
        full = model(x, t, y, ctx)
        first = model(x, t, y, ctx, step_cache=cache)
        second = model(x, t, y, ctx, step_cache=cache)
        model(x, t, y, ctx, skip_layers=(1,), step_cache=cache)  # another call kind: its own entry
    assert torch.equal(first, full) and (cache.calls, cache.hits) == (3, 1)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
