"""MMDiT-X's fused adaLN path (one matmul for every modulation) against the block-by-block path.

The block-by-block path is the one checked against diffusers in test_mmditx.py; ``fused_modulation =
False`` forces it. Each test also checks that the fused path really ran (or really was refused), so no
comparison passes by comparing a path with itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sd35.lora import load_lora, unload_lora
from sd35.lora.patching import attach, detach
from sd35.models.configs import tiny_configs
from sd35.models.mmditx import MMDiTX, attention
from sd35.models.modulation import fused_cache
from sd35.models.random_init import random_state_dict
from tests.helpers import kohya_lora, random_lora_patch, rel_err
from tests.models.models_helpers import CONFIGS, block_by_block, diffusers_pair, inputs

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = 1e-6  # the fused matmul computes the same dot products; only summation order may differ


def _model(name: str = "sd35m-like", dtype: torch.dtype | None = None, seed: int = 0) -> MMDiTX:
    cfg = tiny_configs(**CONFIGS[name]).mmditx
    return MMDiTX.from_state_dict(random_state_dict(MMDiTX(cfg), seed), dtype=dtype).eval()


ADALN = ["joint_blocks.0.x_block.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_modulation_equals_block_by_block(name, dtype):
    model = _model(name, dtype)
    x, t, y, ctx = inputs(model.config, 8, 6)
    with torch.no_grad():
        fused = model(x, t, y, ctx)
        assert fused_cache(model).builds == 1  # the fused path ran
        plain = block_by_block(model, x, t, y, ctx)
        assert model(x, t, y, ctx, skip_layers=[1]).shape == x.shape
        assert (
            rel_err(
                model(x, t, y, ctx, skip_layers=[1]), block_by_block(model, x, t, y, ctx, skip_layers=[1])
            )
            <= EXACT
        )
    assert fused_cache(model).builds == 1  # cached: built once for all these calls
    assert rel_err(fused, plain) <= EXACT


def test_each_modulation_is_its_layers_output():
    model = _model("attn2-subset")
    c = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        mods = model.modulations(c)
        layers = model.modulation_layers()
        assert len(mods) == len(layers) == 2 * model.config.depth + 1
        for mod, lin in zip(mods, layers, strict=True):
            assert mod.shape == (3, lin.out_features)
            assert rel_err(mod, lin(F.silu(c))) <= EXACT


def test_fused_path_matches_diffusers():
    cfg, ours, ref = diffusers_pair("sd35m-like", seed=4)
    x, t, y, ctx = inputs(cfg, 8, 8)
    with torch.no_grad():
        a = ours(x, t, y, ctx)
        b = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert fused_cache(ours).builds == 1
    assert rel_err(a, b) <= 1e-5


def test_cache_follows_lora_merge_and_unload():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.no_grad():
        base = model(x, t, y, ctx)
        load_lora({"mmditx": model}, kohya_lora(model, ADALN), mode="merge", name="m")
        merged = model(x, t, y, ctx)
        assert fused_cache(model).builds == 2  # the merge changed adaLN weights in place: rebuilt
        assert rel_err(merged, base) > 1e-3  # the LoRA does change the result
        assert rel_err(merged, block_by_block(model, x, t, y, ctx)) <= EXACT
        unload_lora({"mmditx": model}, "m")
        assert torch.equal(model(x, t, y, ctx), base)
    assert fused_cache(model).builds == 3


def test_in_place_edit_and_load_state_dict_rebuild():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    other = random_state_dict(MMDiTX(model.config), 9)
    with torch.no_grad():
        model(x, t, y, ctx)
        model.final_layer.adaLN_modulation[1].bias.add_(0.5)
        assert rel_err(model(x, t, y, ctx), block_by_block(model, x, t, y, ctx)) <= EXACT
        model.load_state_dict(other)
        assert rel_err(model(x, t, y, ctx), block_by_block(model, x, t, y, ctx)) <= EXACT
    assert fused_cache(model).builds == 3


def test_replaced_adaln_layer_is_noticed():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.no_grad():
        model(x, t, y, ctx)
        old = model.joint_blocks[1].x_block.adaLN_modulation[1]
        new = torch.nn.Linear(old.in_features, old.out_features)
        model.joint_blocks[1].x_block.adaLN_modulation[1] = new
        assert rel_err(model(x, t, y, ctx), block_by_block(model, x, t, y, ctx)) <= EXACT
        assert fused_cache(model).builds == 2
        assert fused_cache(model).weight[: new.out_features].shape == new.weight.shape


def test_runtime_lora_on_adaln_uses_block_by_block_path():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    lin = model.get_submodule(ADALN[0])
    patch = random_lora_patch(lin, seed=3)
    with torch.no_grad():
        base = model(x, t, y, ctx)
        attach(lin, patch, "runtime")
        assert model.modulations(torch.randn(2, model.config.hidden_size)) is None  # refused
        with_lora = model(x, t, y, ctx)
        assert rel_err(with_lora, base) > 1e-3  # the runtime LoRA is applied
        assert torch.equal(with_lora, block_by_block(model, x, t, y, ctx))
        detach(lin, "r")
        assert torch.equal(model(x, t, y, ctx), base)
        assert model.modulations(torch.randn(2, model.config.hidden_size)) is not None


def test_runtime_lora_elsewhere_keeps_fused_path():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    sd = kohya_lora(model, ["joint_blocks.1.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc2"])
    with torch.no_grad():
        load_lora({"mmditx": model}, sd, mode="runtime", name="r")
        fused = model(x, t, y, ctx)
        assert fused_cache(model).builds == 1
        assert rel_err(fused, block_by_block(model, x, t, y, ctx)) <= EXACT


@pytest.mark.parametrize("where", ["block", "silu", "final"])
def test_hooks_on_the_way_force_block_by_block_path(where):
    model = _model()
    module = {
        "block": model.joint_blocks[2],
        "silu": model.joint_blocks[0].context_block.adaLN_modulation[0],
        "final": model.final_layer,
    }[where]
    c = torch.randn(2, model.config.hidden_size)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(m))
    with torch.no_grad():
        assert model.modulations(c) is None
        x, t, y, ctx = inputs(model.config, 8, 8)
        model(x, t, y, ctx)
        assert seen  # the hooked module was called
        handle.remove()
        assert model.modulations(c) is not None


def test_training_gradients():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    model.requires_grad_(True)

    def grads(fused: bool, checkpointing: bool = False) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.fused_modulation = fused
        model.gradient_checkpointing = checkpointing
        model(x, t, y, ctx).square().mean().backward()
        model.fused_modulation, model.gradient_checkpointing = True, False
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # adaLN trainable: the fused path is refused, so every adaLN weight gets its gradient
    assert model.modulations(torch.randn(2, model.config.hidden_size)) is None
    full = grads(True)
    assert "joint_blocks.0.x_block.adaLN_modulation.1.weight" in full
    # adaLN frozen (a LoRA run): fused, and the gradients that flow through c are the same
    for lin in model.modulation_layers():
        lin.requires_grad_(False)
    builds = fused_cache(model).builds
    fused, plain = grads(True), grads(False)
    assert fused_cache(model).builds == builds + 1
    assert fused.keys() == plain.keys() and "t_embedder.mlp.0.weight" in fused
    for n in fused:
        assert torch.allclose(fused[n], plain[n], rtol=1e-5, atol=1e-7), n
    checkpointed = grads(True, checkpointing=True)
    for n in fused:
        assert torch.allclose(checkpointed[n], fused[n], rtol=1e-5, atol=1e-7), n


def test_moves_and_casts_drop_the_cache():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.no_grad():
        model(x, t, y, ctx)
        assert fused_cache(model).weight is not None
        model.to(torch.float64)
        assert fused_cache(model).weight is None  # freed with the move, not left behind
        out = model(x.double(), t, y.double(), ctx.double())
        assert fused_cache(model).weight.dtype == torch.float64
        assert rel_err(out, block_by_block(model, x.double(), t, y.double(), ctx.double())) <= EXACT


def test_release_caches_frees_the_copy_and_the_next_forward_rebuilds_it():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.no_grad():
        first = model(x, t, y, ctx)
        model.release_caches()
        assert fused_cache(model).weight is None and fused_cache(model).bias is None
        again = model(x, t, y, ctx)
    assert fused_cache(model).builds == 2 and torch.equal(first, again)


def test_in_place_inference_equals_the_autograd_path_and_keeps_inputs():
    """Without autograd, GELU and the later residual updates write into buffers the block made itself."""
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    block = model.joint_blocks[0]
    c = model.conditioning(t, y)
    tokens = model.x_embedder(x) + model.cropped_pos_embed(4, 4)
    context = model.context_embedder(ctx)
    kept = tokens.detach().clone(), context.detach().clone()
    with torch.no_grad():
        fast = model(x, t, y, ctx)
        fast_block = block(context.detach(), tokens.detach(), c.detach())
    assert torch.equal(tokens, kept[0]) and torch.equal(context, kept[1])  # inputs untouched
    recorded = model(x.requires_grad_(), t, y, ctx)  # autograd recording: every update out of place
    slow_block = block(context.requires_grad_(), tokens.requires_grad_(), c)  # inputs need grad: recorded
    assert recorded.requires_grad and all(b.requires_grad for b in slow_block)
    # in place vs out of place, two code paths (autograd may also pick other kernels): equal up to float
    # rounding; a write into a buffer still in use would change the result by far more than EXACT
    assert rel_err(fast, recorded.detach()) <= EXACT
    assert all(rel_err(a, b.detach()) <= EXACT for a, b in zip(fast_block, slow_block, strict=True))


def test_state_dict_and_copies_hold_no_cache():
    model = _model()
    keys = list(model.state_dict())
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.no_grad():
        model(x, t, y, ctx)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert fused_cache(twin).weight is None and fused_cache(model).weight is not None
    with torch.no_grad():
        assert torch.equal(twin(x, t, y, ctx), model(x, t, y, ctx))


def test_inference_mode():
    model = _model()
    x, t, y, ctx = inputs(model.config, 8, 8)
    with torch.inference_mode():
        a = model(x, t, y, ctx)
        b = block_by_block(model, x, t, y, ctx)
    assert fused_cache(model).builds == 1 and not fused_cache(model).weight.is_inference()
    assert rel_err(a, b) <= EXACT
    with torch.no_grad():  # the buffer built under inference mode is rewritable outside it
        model.final_layer.adaLN_modulation[1].weight.mul_(1.5)
        assert rel_err(model(x, t, y, ctx), block_by_block(model, x, t, y, ctx)) <= EXACT


def test_attention_is_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, 3, 64, generator=g) for _ in range(3))
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, dim=-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 13, 192)
    assert rel_err(attention(q, k, v), ref) <= 1e-5
