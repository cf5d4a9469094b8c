"""CUDA-graph runner: the key and cache logic on the CPU, the graphs themselves only where CUDA is.

Only the tests marked ``needs_cuda`` capture and replay real CUDA graphs. The others check the plain-Python
bookkeeping around them (which call triggers a capture, what invalidates graphs) with a fake capture
function that records its calls and runs the model eagerly; they do not test CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from sd35.accel.cuda_graphs import GraphCache, GraphedDenoiser, ModelSnapshot, graph_key, model_fingerprint
from sd35.errors import SD35Error, SD35Warning
from sd35.lora import load_lora, set_lora_strength, unload_lora
from sd35.models.modulation import fused_cache
from tests.accel.accel_helpers import inputs, make_model
from tests.helpers import kohya_lora, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- GraphCache with a fake capture (plain Python) ------------------------------------------------------


def test_graph_cache_captures_once_per_key_and_evicts_least_recent():
    made = []
    cache = GraphCache(lambda key: made.append(key) or f"entry{len(made)}", max_entries=2)
    assert cache.get("a") == ("entry1", True)
    assert cache.get("a") == ("entry1", False)
    assert cache.get("b") == ("entry2", True)
    cache.get("a")  # a is now the most recent
    assert cache.get("c") == ("entry3", True)
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    assert cache.get("b") == ("entry4", True)  # captured again
    assert made == ["a", "b", "c", "b"] and cache.captures == 4
    cache.keep_only("b")
    assert list(cache.entries) == ["b"]
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(SD35Error, match="at least one"):
        GraphCache(lambda k: k, max_entries=0)


def test_graph_key_separates_what_a_graph_depends_on():
    cfg = make_model().config
    base = inputs(cfg)
    k = graph_key(*base)
    assert graph_key(*inputs(cfg, seed=5)) == k  # other values, same shapes: the same graph
    assert graph_key(*inputs(cfg, batch=1)) != k  # SLG's batch 1 vs CFG's batch 2
    assert graph_key(*inputs(cfg, hw=(8, 10))) != k  # another resolution
    assert graph_key(*inputs(cfg, n_ctx=12)) != k  # another text length
    assert graph_key(*base[:3], base[3].double()) != k  # another dtype
    assert graph_key(*base, skip_layers=[2, 1, 1]) == graph_key(*base, skip_layers=(1, 2)) != k


def test_model_fingerprint_sees_what_graphs_bake_in():
    model = make_model()
    args = inputs(model.config)
    with torch.no_grad():
        model(*args)
    fp = model_fingerprint(model)
    with torch.no_grad():
        model(*args)
        model.joint_blocks[0].x_block.attn.qkv.weight.mul_(1.1)  # in place: graphs read it where it is
    assert model_fingerprint(model) == fp
    load_lora(
        {"mmditx": model}, kohya_lora(model, ["joint_blocks.1.x_block.mlp.fc1"]), mode="runtime", name="r"
    )
    with_lora = model_fingerprint(model)
    assert with_lora != fp  # a new hook
    set_lora_strength({"mmditx": model}, "r", 0.5)
    assert model_fingerprint(model) != with_lora  # the strength is a Python constant in the graph
    unload_lora({"mmditx": model}, "r")
    assert model_fingerprint(model) == fp
    model.to(torch.float64)
    assert model_fingerprint(model) != fp  # new addresses


def test_snapshot_notices_replaced_modules():
    model = make_model()
    snap = ModelSnapshot(model)
    assert snap.valid()
    model.joint_blocks[2].x_block.mlp.fc2 = torch.nn.Linear(512, 128)
    assert not snap.valid()


def test_refuses_a_model_off_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SD35Error, match="CUDA"):
        GraphedDenoiser(make_model())


class FakeGraphs(GraphedDenoiser):
    """GraphedDenoiser's bookkeeping with the capture replaced: each 'capture' makes one eager warm-up call
    (as the real one does before recording) and returns an entry that replays by calling the model, so
    results stay right while the test counts captures. Nothing here is a CUDA graph.
    """

    @staticmethod
    def supported(model):
        return True

    def _capture(self, key):
        *args, skip = self._pending  # what GraphedDenoiser stages for its capture (the real one reads it too)
        self.captured.append(key)
        model = self.model
        model(*args, skip_layers=skip)  # the warm-up call the real capture makes

        class Entry:
            def replay(self, *inputs):
                return model(*inputs, skip_layers=skip)

        return Entry()


def _fake(model, **kw):
    runner = FakeGraphs(model, **kw)
    runner.captured = []
    return runner


def test_bookkeeping_recaptures_only_on_new_keys_or_model_changes():
    model = make_model()
    runner = _fake(model)
    cfg = model.config
    with torch.no_grad():
        cond = inputs(cfg)
        runner(*cond)
        runner(*inputs(cfg, seed=3))
        runner(*cond, skip_layers=[1])  # SLG
        runner(*inputs(cfg, batch=1), skip_layers=[1])
        assert len(runner.captured) == 3
        runner(*cond)  # nothing new
        assert len(runner.captured) == 3
        lin = model.final_layer.adaLN_modulation[1]
        lin.weight.mul_(0.5)  # in place: no recapture, the fused adaLN copy is refreshed in place
        before = fused_cache(model).weight.data_ptr()
        out = runner(*cond)
        assert len(runner.captured) == 3 and fused_cache(model).weight.data_ptr() == before
        model.fused_modulation = False
        assert rel_err(out, model(*cond)) <= 1e-6
        model.fused_modulation = True
        load_lora(
            {"mmditx": model},
            kohya_lora(model, ["joint_blocks.0.x_block.attn.qkv"]),
            mode="runtime",
            name="r",
        )
        runner(*cond)
        assert len(runner.captured) == 4 and len(runner.cache) == 1  # all graphs dropped, one captured
    runner_unchecked = _fake(model, check_model=False)
    with torch.no_grad():
        runner_unchecked(*cond)
        set_lora_strength({"mmditx": model}, "r", 0.0)
        runner_unchecked(*cond)
        assert len(runner_unchecked.captured) == 1  # not seen without check_model ...
        runner_unchecked.reset()
        runner_unchecked(*cond)
        assert len(runner_unchecked.captured) == 2  # ... until reset()


def test_bookkeeping_gradients_and_devices():
    model = make_model()
    runner = _fake(model)
    args = inputs(model.config)
    with pytest.warns(SD35Warning, match="gradients enabled"):
        runner(*args)  # eager, no capture
    assert runner.captured == []
    with torch.no_grad(), pytest.raises(SD35Error, match="is on meta"):
        runner(args[0].to("meta"), *args[1:])


# --- real CUDA graphs --------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_result(dtype):
    model = make_model(dtype=dtype).cuda()
    runner = GraphedDenoiser(model)
    with torch.no_grad():
        for batch, hw, skip in [(2, (8, 8), ()), (1, (8, 8), (1,)), (2, (6, 10), ()), (2, (8, 8), ())]:
            args = [a.cuda() for a in inputs(model.config, batch=batch, hw=hw, seed=batch + hw[1])]
            out = runner(*args, skip_layers=skip)
            assert rel_err(out, model(*args, skip_layers=skip)) <= (1e-5 if dtype == torch.float32 else 1e-2)
        assert runner.cache.captures == 3
        args = [a.cuda() for a in inputs(model.config)]
        load_lora(
            {"mmditx": model}, kohya_lora(model, ["joint_blocks.0.x_block.adaLN_modulation.1"]), mode="merge"
        )
        model.cpu().cuda()  # the round trip changes every address: the graphs are captured again
        assert rel_err(runner(*args), model(*args)) <= (1e-5 if dtype == torch.float32 else 1e-2)
        assert runner.cache.captures == 4


@needs_cuda
def test_cuda_graphs_follow_an_in_place_lora_merge():
    model = make_model().cuda()
    runner = GraphedDenoiser(model)
    args = [a.cuda() for a in inputs(model.config)]
    with torch.no_grad():
        runner(*args)
        load_lora(
            {"mmditx": model},
            kohya_lora(model, ["final_layer.adaLN_modulation.1", "joint_blocks.1.x_block.attn.qkv"]),
            mode="merge",
        )
        out = runner(*args)
        assert runner.cache.captures == 1  # same addresses: replayed, with the fused adaLN copy refreshed
        assert rel_err(out, model(*args)) <= 1e-5
