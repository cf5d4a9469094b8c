"""Memory modes (sd35.memory): block streaming, on-demand modules, and whole pipelines in every mode.

Everything runs on the CPU with storage and compute both "cpu": the weights are still packed into
storage, copied into the compute buffers and bound block by block, so the outputs must be bit-identical
to the plain models, and after every forward the weights must be views of their storage again.
(Bit-identical is fair: the same kernels on the same shapes, and packed entries start at 256-byte offsets,
aligned like the plain models' own 64-byte-aligned allocations; a matmul's summation order can follow the
alignment, which is why the pipeline tests below, whose plain weights sit at file offsets, compare to rounding.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd35 import load_pipeline
from sd35.errors import SD35Error

# the packing internals (_Entry, _Pack, arenas) and BlockStreamer's slot bookkeeping have no public API: these
# tests check them directly, since what they must prove is where each weight lives between and during passes
from sd35.memory import (
    MEMORY_MODES,
    BlockStreamer,
    Offloaded,
    OnDemand,
    _allocate,
    _arena_plan,
    _entries,
    _Entry,
    _Pack,
    apply_memory_mode,
    move_except,
    stream_plan,
)
from sd35.models.clip import CLIPTextEncoder
from sd35.models.configs import medium_configs
from sd35.models.mmditx import MMDiTX
from sd35.models.modulation import has_hooks
from sd35.models.t5 import T5Encoder
from sd35.models.vae import VAE
from sd35.models.vae_tiling import LOW_MEMORY_TILING, Tiling
from tests.helpers import generate_with_latent, pixel_diff, tiny_models
from tests.lora.lora_helpers import assert_same, lora_models, mixed_lora, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    start = buf.data_ptr()
    return start <= t.data_ptr() < start + buf.numel() * buf.element_size()


class Block(nn.Module):
    """A block with a parameter, a buffer and a weight shared with another module (tied)."""

    def __init__(self, dim: int, tied: nn.Linear | None = None):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("gain", torch.rand(dim) + 0.5)
        self.tied = tied

    def forward(self, x):
        x = x + torch.tanh(self.fc(self.norm(x))) * self.gain
        return x if self.tied is None else x + 0.1 * self.tied(x)


class Toy(nn.Module):
    def __init__(self, depth: int = 5, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        last = self.blocks[-1]
        last.tied = last.fc  # the same Linear registered twice inside one block
        self.skip: set[int] = set()

    def forward(self, x):
        x = self.inp(x)
        for i, b in enumerate(self.blocks):
            if i not in self.skip:
                x = b(x)
        return x


def _storage_bound(streamer: BlockStreamer) -> bool:
    return all(
        _inside(t, pack.storage) for pack in streamer.packs for t in (e.current() for e in pack.entries)
    )


@pytest.mark.parametrize("root", [True, False])
def test_block_streamer_same_outputs_and_no_copies_left(root):
    model = Toy()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
        model.skip = {2}
        ref_skip = model(x)
        model.skip = set()
    streamer = BlockStreamer(model.blocks, "cpu", root=model if root else None)
    assert _storage_bound(streamer)
    seen = []

    def probe(block):
        def hook(module, args):  # runs inside the block's call, after the streamer's pre-hook bound it
            bufs = [s.buf for s in streamer.slots if s.buf is not None]
            seen.append(any(_inside(block.fc.weight, b) for b in bufs))
            seen.append(any(_inside(block.gain, b) for b in bufs))

        return hook

    for b in model.blocks:
        b.norm.register_forward_pre_hook(probe(b))
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, ref)
        model.skip = {2}
        assert torch.equal(model(x), ref_skip)  # a block that is not called (its prefetch is wasted)
        model.skip = set()
        assert torch.equal(model(x), ref)  # and the pass after that
    assert seen and all(seen)  # each block ran from a compute slot
    assert _storage_bound(streamer)  # ... and points back at its storage afterwards
    assert not streamer._active
    held = [s.buf is not None for s in streamer.slots]
    assert held == ([False, False] if root else [True, True])  # with a root, slots exist only during a pass
    assert model.blocks[-1].tied.weight is model.blocks[-1].fc.weight
    streamer.remove()
    assert not any(has_hooks(b) for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_block_streamer_unbinds_after_an_error():
    model = Toy()
    streamer = BlockStreamer(model.blocks, "cpu", root=model)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(torch.randn(2, 7))  # wrong width: fails inside the first block
    with pytest.raises(RuntimeError), torch.no_grad():
        model.blocks[0](torch.randn(2, 7))
    assert _storage_bound(streamer) and not streamer._active


def test_block_streamer_refuses_autograd():
    model = Toy(depth=2)
    BlockStreamer(model.blocks, "cpu", root=model)
    with pytest.raises(SD35Error, match="inference only"):
        model(torch.randn(2, 16))  # the Toy's parameters require grad
    model.requires_grad_(False)
    model(torch.randn(2, 16))  # nothing to differentiate: allowed with grad mode on
    with pytest.raises(SD35Error, match="inference only"):
        model(torch.randn(2, 16, requires_grad=True))
    with torch.inference_mode():
        model(torch.randn(2, 16, requires_grad=False))


def test_block_streamer_without_prefetch_and_weight_edits_between_passes():
    """Weights written in storage between passes (what a LoRA merge does) are what the next pass uses."""
    model = Toy()
    x = torch.randn(2, 16)
    streamer = BlockStreamer(model.blocks, "cpu", root=model, prefetch=False)
    with torch.no_grad():
        before = model(x)
        model.blocks[1].fc.weight.add_(0.5)  # in place, into the storage view
        after = model(x)
        streamer.remove()
        assert torch.equal(model(x), after)
        model.blocks[1].fc.weight.sub_(0.5)
        assert torch.allclose(model(x), before)
    assert not torch.equal(before, after)


def test_on_demand_nested_uses_share_one_copy():
    model = Toy(depth=2)
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = model(x)
    od = OnDemand(model, "cpu")
    storage = od.pack.storage
    assert _inside(model.inp.weight, storage)
    with od:
        inside = model.inp.weight.data_ptr()
        assert not _inside(model.inp.weight, storage)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
            assert torch.equal(model(x), ref)
        assert model.inp.weight.data_ptr() == inside  # the forwards reused the held copy
    assert _inside(model.inp.weight, storage) and not od.on_device
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # hooks alone (no context)
    assert not od.on_device


def test_pack_layout_alignment_and_arenas():
    entries = [
        _Entry([(nn.Linear(1, 1), "weight", True)], torch.Size([n]), torch.float16) for n in (3, 130, 1)
    ]
    pack = _Pack(entries)
    assert [e.offset for e in entries] == [0, 256, 768] and pack.nbytes == 1024  # 256-byte aligned
    assert _arena_plan([100, 100, 100, 250, 10], 256) == [[0, 1], [2], [3], [4]]
    layers = [nn.Linear(40, 40) for _ in range(7)]
    packs = [_Pack(_entries([m], set())) for m in layers]
    x = torch.randn(2, 40)
    ref = [m(x) for m in layers]
    _allocate(packs, torch.device("cpu"), pin=False)
    assert len({p.storage.untyped_storage().data_ptr() for p in packs}) == 1  # small packs share one arena
    for m, r in zip(layers, ref, strict=True):
        assert torch.equal(m(x), r)  # values copied into the arena


def test_streamed_models_match():
    mmditx, clip_l, clip_g, t5 = tiny_models(5).values()
    # the streamer's hooks on the blocks force the per-layer adaLN path; take it for the reference too, so that
    # both sides run the same kernels on the same shapes and bit-equality is what streaming must give
    mmditx.fused_modulation = False
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([700.0, 20.0])
    y, ctx = torch.randn(2, 192, generator=g), torch.randn(2, 12, 256, generator=g)
    tok = torch.randint(0, 500, (2, 77), generator=g)
    with torch.no_grad():
        ref = [
            mmditx(x, t, y, ctx),
            mmditx(x, t, y, ctx, skip_layers=[1]),
            *clip_l(tok),
            *clip_g(tok),
            t5(tok),
        ]
        plans = []
        for model in (clip_l, clip_g, t5):
            blocks, keep = stream_plan(model)
            plans.append(Offloaded(model, "cpu", blocks, keep=keep))
        blocks, _ = stream_plan(mmditx)
        streamer = BlockStreamer(blocks, "cpu", root=mmditx)
        out = [
            mmditx(x, t, y, ctx),
            mmditx(x, t, y, ctx, skip_layers=[1]),
            *clip_l(tok),
            *clip_g(tok),
            t5(tok),
        ]
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    assert _storage_bound(streamer)
    for p in plans:
        assert _storage_bound(p.streamer) and not p.rest.on_device
    # T5's relative-position table is read before block 0 runs: it moves with the rest, not with block 0
    table = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert _inside(table, plans[2].rest.pack.storage)


def test_move_except():
    model = Toy(depth=3)
    move_except(model, "meta", [model.blocks[1]])
    assert model.inp.weight.is_meta and model.blocks[0].gain.is_meta
    assert not model.blocks[1].fc.weight.is_meta


def test_apply_memory_mode_rejects_unknown_mode():
    with pytest.raises(SD35Error, match="high, balanced, low"):
        apply_memory_mode("medium", "cpu", nn.Linear(1, 1), nn.Linear(1, 1), [])


# --------------------------------------------------------------------------------------------------
# Whole pipelines


PROMPT = "a red circle on a blue background"


ROUNDING = dict(rtol=1e-5, atol=1e-5)  # float32 rounding, for torch.testing.assert_close


def _run(pipe):
    """(final latent, image) of one short generation."""
    image, latent = generate_with_latent(pipe, PROMPT, width=32, height=32, steps=2, seed=3, sampler="euler")
    return latent, image


@pytest.fixture(scope="module")
def high(tiny):
    return load_pipeline(tiny["diffusers"], device="cpu")


@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_pipeline_modes_match_high(tiny, high, mode):
    pipe = load_pipeline(tiny["diffusers"], device="cpu", memory=mode)
    assert pipe.memory == mode and pipe.device == torch.device("cpu")
    assert (pipe.plan.mmditx is not None) == (mode == "low")
    streamed_text = [t.streamer is not None for t in pipe.plan.text]
    assert streamed_text == ([False, False, True] if mode == "balanced" else [True, True, True])
    if mode == "low":  # tiles small enough to tile this test's 32 px images (activations wait on the CPU)
        assert pipe.vae_tiling_for(32, 32) == LOW_MEMORY_TILING
        pipe.tiling = Tiling(2, store="cpu")
    ref_ctx, ref_pooled = high.encode_prompt(PROMPT)
    ctx, pooled = pipe.encode_prompt(PROMPT)
    # same kernels on the same values; only the weights' memory alignment differs (packed storage is
    # 256-byte aligned, the high pipeline's weights sit wherever the file put them), which can change
    # a CPU matmul's summation order: equal up to float32 rounding
    torch.testing.assert_close(ctx, ref_ctx, **ROUNDING)
    torch.testing.assert_close(pooled, ref_pooled, **ROUNDING)
    ref_latent, ref_image = _run(high)
    latent, image = _run(pipe)
    torch.testing.assert_close(latent, ref_latent, **ROUNDING)
    assert pixel_diff(image, ref_image).max() <= 1
    for t in pipe.plan.text:
        assert not t.rest.on_device


@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_pipeline_modes_with_lora(tiny, high, tmp_path, mode):
    """Merge and runtime LoRAs on offloaded and streamed weights act as on resident ones, and unload exactly."""
    pipe = load_pipeline(tiny["diffusers"], device="cpu", memory=mode)
    models = lora_models(pipe)
    snap = snapshot(models)
    from sd35.lora import save_lora

    path = save_lora(tmp_path / "mix.safetensors", mixed_lora(models))
    results = {}
    for p in (high, pipe):
        try:
            p.load_lora(path, strength=0.8)
            p.load_lora(path, strength=-0.3, mode="runtime", name="rt")
            results[p.memory] = (p.encode_prompt(PROMPT), _run(p)[0])
        finally:
            p.unload_lora()
    (ctx_a, pooled_a), lat_a = results["high"]
    (ctx_b, pooled_b), lat_b = results[mode]
    torch.testing.assert_close(ctx_b, ctx_a, **ROUNDING)
    torch.testing.assert_close(pooled_b, pooled_a, **ROUNDING)
    torch.testing.assert_close(lat_b, lat_a, **ROUNDING)
    assert_same(models, snap)  # every stored weight is back bit for bit
    torch.testing.assert_close(_run(pipe)[0], _run(high)[0], **ROUNDING)


def test_load_pipeline_validates_modes(tiny):
    with pytest.raises(SD35Error, match="high, balanced, low"):
        load_pipeline(tiny["diffusers"], device="cpu", memory="tiny")
    with pytest.raises(SD35Error, match="auto, on, off"):
        load_pipeline(tiny["diffusers"], device="cpu", vae_tiling="sometimes")
    assert MEMORY_MODES == ("high", "balanced", "low")


# --------------------------------------------------------------------------------------------------
# The documented table's inputs


def test_documented_parameter_counts():
    """The counts the sd35.memory table is derived from, recomputed from SD3.5 Medium's shapes."""
    c = medium_configs()
    with torch.device("meta"):
        models = {
            "mmditx": MMDiTX(c.mmditx),
            "t5": T5Encoder(c.t5),
            "clip_g": CLIPTextEncoder(c.clip_g),
            "clip_l": CLIPTextEncoder(c.clip_l),
            "vae": VAE(c.vae),
        }

    def n(m):
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())

    def m_(x):
        return round(x / 1e6, 1)

    assert round(n(models["mmditx"]) / 1e9, 3) == 2.470
    blocks, _ = stream_plan(models["mmditx"])
    assert round(sum(n(b) for b in blocks) / 1e9, 3) == 2.224
    assert m_(max(n(b) for b in blocks)) == 101.5
    assert round((n(models["mmditx"]) - sum(n(b) for b in blocks)) / 1e9, 3) == 0.246
    for name, total, layer, rest in (
        ("t5", 4762.3, 192.9, 131.6),
        ("clip_g", 694.7, 19.7, 65.0),
        ("clip_l", 123.1, 7.1, 38.0),
    ):
        layers, _ = stream_plan(models[name])
        assert m_(n(models[name])) == total
        assert m_(n(layers[-1])) == layer
        assert m_(n(models[name]) - sum(n(b) for b in layers)) == rest
    assert m_(n(models["vae"])) == 83.8


# --------------------------------------------------------------------------------------------------
# The CUDA ordering protocol, checked on the CPU with recording stand-ins for streams and events


class _Log:
    def __init__(self):
        self.ops: list[tuple] = []
        self.current = "compute"


class _FakeEvent:
    def __init__(self, log: _Log):
        self.log, self.at = log, None

    def record(self, stream=None):
        self.at = len(self.log.ops)
        self.log.ops.append(("record", self.log.current if stream is None else stream.name, id(self)))


class _FakeStream:
    def __init__(self, log: _Log, name: str):
        self.log, self.name = log, name

    def wait_event(self, event):
        self.log.ops.append(("wait", self.name, id(event), event.at))


def test_block_streamer_cuda_event_protocol(monkeypatch):
    """Every block computes only after its copy finished, and no copy overwrites a slot still being read."""
    log = _Log()
    compute, side = _FakeStream(log, "compute"), _FakeStream(log, "side")

    class _Ctx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev, log.current = log.current, self.s.name

        def __exit__(self, *exc):
            log.current = self.prev

    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", _Ctx)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    model = Toy(depth=6)
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = model(x)
        model.skip = {3}
        ref_skip = model(x)
        model.skip = set()
    streamer = BlockStreamer(model.blocks, "cpu", root=model)
    streamer.cuda, streamer._stream = True, side  # the CUDA code path, on CPU tensors

    original_load = streamer._load

    def load(i, slot):
        log.ops.append(("copy", i, id(slot)))
        original_load(i, slot)

    streamer._load = load

    def probe(i):
        def hook(module, args):
            slot = streamer._active[i]
            log.ops.append(("use", i, id(slot), id(slot.ready), id(slot.free)))

        return hook

    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(probe(i))
        b.register_forward_hook(lambda m, a, o, i=i: log.ops.append(("done", i)))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        model.skip = {3}
        assert torch.equal(model(x), ref_skip)
    _check_protocol(log.ops)


def _check_protocol(ops: list[tuple]) -> None:
    """Replay the log with CUDA semantics: a stream that waits on an event runs on only after the event's
    latest record (at the time of the wait) has executed on the recording stream."""
    latest_record: dict[int, int] = {}  # event id -> log index of its latest record
    compute_waited: dict[int, int] = {}  # event id -> record index the compute stream last waited for
    content: dict[int, int] = {}  # slot id -> block its latest copy loaded
    last_use: dict[int, int] = {}  # slot id -> log index of its latest use
    uses = 0
    for k, op in enumerate(ops):
        if op[0] == "copy":
            _, block, slot = op
            wait, rec = (
                ops[k + 1],
                ops[k + 2],
            )  # _load: side waits on the slot's free event, copies, records ready
            assert wait[:2] == ("wait", "side") and rec[:2] == ("record", "side")
            assert wait[3] is not None, "the side stream writes a slot without waiting for the compute stream"
            assert wait[3] > last_use.get(slot, -1), "a copy would overwrite a slot still being read"
            content[slot] = block
        elif op[0] == "record":
            latest_record[op[2]] = k
        elif op[0] == "wait" and op[1] == "compute":
            compute_waited[op[2]] = op[3]
        elif op[0] == "use":
            _, block, slot, ready, _free = op
            assert content[slot] == block, "a block runs on another block's weights"
            assert compute_waited.get(ready) == latest_record[ready], "a block runs before its copy is done"
            last_use[slot] = k
            uses += 1
    assert uses == 6 + 5  # the second pass skipped block 3
