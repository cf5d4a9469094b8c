"""compile_blocks: per-block torch.compile, traced with the fast CPU backends (eager, aot_eager).

These backends run dynamo's tracing (and AOT autograd's) but no code generation: they check that each
block compiles to the right graph and that the model around it is unchanged, not inductor's kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sd35.accel import compile_blocks, compiled_blocks, uncompile_blocks
from sd35.errors import SD35Error
from sd35.lora.patching import attach, detach
from tests.accel.accel_helpers import inputs, make_model
from tests.helpers import random_lora_patch, rel_err


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_blocks_equal_eager_and_keep_keys(backend):
    model = make_model()  # blocks 0-1 with attn2, block 2 plain, block 3 pre-only
    x, t, y, ctx = inputs(model.config)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x, t, y, ctx)
        ref_skip = model(x, t, y, ctx, skip_layers=[1])
        assert compile_blocks(model, backend=backend) == 4
        out = model(x, t, y, ctx)
        assert counters["stats"]["unique_graphs"] == 3  # one graph per block variant, shared by the blocks
        assert rel_err(out, ref) <= 1e-6
        assert rel_err(model(x, t, y, ctx, skip_layers=[1]), ref_skip) <= 1e-6
    assert compiled_blocks(model) == [0, 1, 2, 3]
    assert list(model.state_dict()) == keys  # no _orig_mod. prefixes
    assert all(type(b).__name__ == "JointBlock" for b in model.joint_blocks)
    model.load_state_dict(model.state_dict())  # still loads under the official names
    assert uncompile_blocks(model) == 4 and compiled_blocks(model) == []


def test_new_size_recompiles_and_stays_right():
    model, eager = make_model(), make_model()
    compile_blocks(model, backend="eager", dynamic=False)
    with torch.no_grad():
        for batch, hw in [(2, (8, 8)), (1, (6, 10)), (3, (8, 8))]:
            args = inputs(model.config, batch=batch, hw=hw)
            assert rel_err(model(*args), eager(*args)) <= 1e-6


def test_runtime_lora_added_after_compile_is_applied():
    model = make_model()
    x, t, y, ctx = inputs(model.config)
    compile_blocks(model, backend="eager")
    lin = model.joint_blocks[1].x_block.attn.qkv
    patch = random_lora_patch(lin, seed=0)
    with torch.no_grad():
        base = model(x, t, y, ctx)
        attach(lin, patch, "runtime")
        with_lora = model(x, t, y, ctx)
        assert rel_err(with_lora, base) > 1e-3  # the hook is part of the recompiled block
        patch.strength = 0.5
        half = model(x, t, y, ctx)
        uncompile_blocks(model)
        assert rel_err(half, model(x, t, y, ctx)) <= 1e-6
        compile_blocks(model, backend="eager")
        detach(lin, "r")
        assert rel_err(model(x, t, y, ctx), base) <= 1e-6


def test_compile_training_step_matches_eager():
    model = make_model().requires_grad_(True)
    x, t, y, ctx = inputs(model.config)

    def grads():
        model.zero_grad()
        model(x, t, y, ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = grads()
    compile_blocks(model, backend="aot_eager")
    compiled = grads()
    for n in eager:
        assert torch.allclose(compiled[n], eager[n], rtol=1e-4, atol=1e-7), n


def test_bad_arguments():
    with pytest.raises(SD35Error, match="joint_blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(SD35Error, match="mode or options"):
        compile_blocks(make_model(), mode="max-autotune", options={"triton.cudagraphs": True})


def test_recompile_limit_is_raised_not_lowered():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    try:
        compile_blocks(make_model(), backend="eager", recompile_limit=100)
        assert getattr(cfg, name) == max(old, 100)
        compile_blocks(make_model(), backend="eager", recompile_limit=2)
        assert getattr(cfg, name) == max(old, 100)
    finally:
        setattr(cfg, name, old)
