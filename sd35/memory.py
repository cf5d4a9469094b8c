"""Memory modes: where each model's weights live, and when they come to the compute device.

SD3.5 Medium in bf16 is 16.3 GB of weights, 9.5 GB of them T5-XXL, which runs once per new prompt.
Three modes trade speed for GPU memory (``load_pipeline(..., memory=...)``):

- ``high``: every model on the compute device (the fastest; the default).
- ``balanced``: the MMDiT-X and the VAE on the device; the text encoders in (pinned) CPU memory.
  CLIP-L and CLIP-G (0.8 B parameters) are copied to the device for each prompt encode and dropped after;
  T5-XXL is *streamed* there one layer at a time (:class:`BlockStreamer`). Each T5 weight still crosses
  PCIe once per encode, as moving the whole T5 would (9.5 GB, ~0.4 s at ~25 GB/s pinned), but only two
  layers (0.77 GB) are ever on the device. Running T5 on the CPU instead costs 2 * 4.76e9 * 512 tokens
  ~ 4.9 TFLOP per CFG encode, 5-30 s on a CPU, so T5 is never run there. With the pipeline's prompt cache a
  repeated prompt does not touch the encoders at all.
- ``low``: as balanced, and the MMDiT-X joint blocks (90 % of its weights) stream from pinned CPU memory
  block by block, the next block copied on a side CUDA stream while the current one computes; all three
  text encoders stream by layer; the VAE works in 512 px tiles whose whole-image activations wait in CPU
  memory (exact tiling: the same image, see :mod:`sd35.models.vae_tiling`).

Peak GPU memory, SD3.5 Medium, bf16, 1024x1024, CFG (batch 2), T5 at 256 tokens. DERIVED from parameter
counts (MMDiT-X 2.470 B of which joint blocks 2.224 B, largest block 101.5 M, the rest 0.246 B incl. the
0.226 B pos-embed; CLIP-L 0.123 B, layer 7.1 M, rest 38 M; CLIP-G 0.695 B, layer 19.7 M, rest 65 M;
T5-XXL 4.762 B, layer 192.9 M, rest 131.6 M; VAE 0.084 B) and activation estimates (MMDiT-X at 4429
tokens ~0.3 GB; VAE decode ~2 GB untiled, ~0.5 GB for one 512 px tile's work; text encoders < 0.1 GB);
NOT measured.
GB = 1e9 bytes; the CUDA context (~0.5 GB) and allocator slack come on top:

=========  ==========================  =======================  ===========  ===========
mode       resident between images     encoding a new prompt    sampling     VAE decode
=========  ==========================  =======================  ===========  ===========
high       16.3 (+1.5 fused adaLN)     16.4 (+1.5)              16.6 (+1.5)  18.3
balanced   5.1 (MMDiT-X 4.94, VAE)     7.9 (+CLIPs 1.64, T5     5.4          7.1 (untiled
                                       rest 0.26 + 2 layers)                 up to 1024^2)
low        0.66 (MMDiT-X rest 0.49,    2.0 (+ rests 0.47,       1.4 (+2      1.2 (tiled)
           VAE 0.17)                   T5 2 layers 0.77)        blocks 0.41)
=========  ==========================  =======================  ===========  ===========

"+1.5 fused adaLN": where present, :mod:`sd35.models.modulation` keeps a stacked copy of the 0.77 B adaLN weights on the
device while sampling (the pipeline frees it before the VAE decode, unless CUDA graphs hold it); balanced
and low switch it off. Offloaded weights sit in page-locked host memory, so that
copies run asynchronously: ~11.2 GB of CPU RAM in balanced, ~15.6 GB in low (a few % more for arenas).
Speed, derived: low moves the 4.45 GB of joint blocks over PCIe on every MMDiT-X forward (~0.18 s at
25 GB/s) while their compute at 1024^2 takes ~0.07 s on an H100, so sampling is transfer-bound there,
roughly 2-3x slower than high; its tiled VAE moves ~10 GB of activations to the CPU and back per 1024^2
image (~0.5 s). Balanced costs ~0.4 s per new prompt and nothing per step.

The machinery is generic and runs on the CPU too (storage and compute both "cpu"): weights are then
still packed, copied into the compute buffers and bound, exactly as on a GPU, so the tests check the
same code. Weights live in one packed storage buffer per unit; while a unit is not in use its
parameters are views of that storage, so a LoRA merge (which writes ``weight.copy_``) changes the
stored weights. Call :meth:`MemoryPlan.synchronize` before writing weights on CUDA: an asynchronous copy
may still be reading them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sd35.errors import SD35Error
from sd35.models.clip import CLIPTextEncoder
from sd35.models.mmditx import MMDiTX
from sd35.models.t5 import T5Encoder

MEMORY_MODES = ("high", "balanced", "low")
_ALIGN = 256  # byte alignment of every tensor in a packed buffer (what CUDA kernels like best)
_ARENA_MIN = 1 << 28  # 256 MiB: smallest arena tried when grouping packs into pinned buffers


def check_memory_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MEMORY_MODES`, else an :class:`SD35Error` naming them."""
    if mode not in MEMORY_MODES:
        raise SD35Error(f"unknown memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}.")
    return mode


# --------------------------------------------------------------------------------------------------
# Packing a module's tensors into one buffer


@dataclass
class _Entry:
    """One distinct tensor of a pack and every place it is registered (tied weights appear twice)."""

    places: list[tuple[nn.Module, str, bool]]  # (owner module, attribute name, is a parameter)
    shape: torch.Size
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def current(self) -> torch.Tensor:
        module, name, is_param = self.places[0]
        return module._parameters[name] if is_param else module._buffers[name]

    def set(self, value: torch.Tensor) -> None:
        for module, name, is_param in self.places:
            if is_param:
                param = module._parameters[name]
                try:
                    param.data = value  # the same Parameter object: optimizers and LoRA states keep it
                except RuntimeError:  # a device .data cannot move to (meta): a new Parameter
                    module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
            else:
                module._buffers[name] = value


def tensor_ids(modules: Iterable[nn.Module]) -> set[int]:
    """ids of every parameter and buffer of ``modules`` (recursively)."""
    out: set[int] = set()
    for m in modules:
        out.update(id(t) for t in m.parameters())
        out.update(id(t) for t in m.buffers())
    return out


def _entries(modules: Iterable[nn.Module], exclude: set[int]) -> list[_Entry]:
    """The distinct tensors of ``modules`` (recursively), minus those whose id is in ``exclude``."""
    found: dict[int, _Entry] = {}
    for root in modules:
        for module in root.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in table.items():
                    if t is None or id(t) in exclude:
                        continue
                    if t.is_meta:
                        raise SD35Error("cannot offload a model on the meta device; load its weights first.")
                    entry = found.get(id(t))
                    if entry is None:
                        found[id(t)] = _Entry([(module, name, is_param)], t.shape, t.dtype)
                    elif (module, name, is_param) not in entry.places:
                        entry.places.append((module, name, is_param))
    return list(found.values())


class _Pack:
    """Some modules' tensors laid out in one flat byte buffer: one copy moves them all.

    ``storage`` is where they live (CPU, pinned for CUDA); :meth:`bind` makes the tensors views of a
    buffer with the same layout (a compute-device copy) and :meth:`unbind` makes them views of the
    storage again.
    """

    def __init__(self, entries: list[_Entry]):
        self.entries = entries
        offset = 0
        for e in entries:
            e.offset = offset
            offset += -(-e.nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.storage: torch.Tensor | None = None

    def ids(self) -> set[int]:
        return {id(e.current()) for e in self.entries}

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    @torch.no_grad()
    def place(self, storage: torch.Tensor) -> None:
        """Copy the tensors' current values into ``storage`` (``nbytes`` long) and bind them to it."""
        for e, view in zip(self.entries, self.views(storage), strict=True):
            view.copy_(e.current())
            e.set(view)
        self.storage = storage

    def bind(self, buffer: torch.Tensor) -> None:
        for e, view in zip(self.entries, self.views(buffer), strict=True):
            e.set(view)

    def unbind(self) -> None:
        assert self.storage is not None
        self.bind(self.storage)


def _pinnable(device: torch.device, storage_device: torch.device) -> bool:
    return device.type == "cuda" and storage_device.type == "cpu" and torch.cuda.is_available()


def _arena_plan(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack indices grouped in order into arenas of at most ``capacity`` bytes (a pack larger gets its own)."""
    groups: list[list[int]] = []
    used = capacity
    for i, n in enumerate(sizes):
        if used + n > capacity:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _allocate(packs: Sequence[_Pack], storage_device: torch.device, pin: bool) -> None:
    """Give every pack its storage, grouping packs into a few large buffers ("arenas").

    PyTorch's pinned-memory allocator rounds every request up to a power of two, so one buffer per
    T5 layer (386 MB -> 512 MB) would waste a third. The arena size is chosen among powers of two so
    that the rounded total is smallest; pageable storage uses the same grouping (exact sizes).
    """
    sizes = [p.nbytes for p in packs]
    if not sizes or max(sizes) == 0:
        for p in packs:
            p.place(torch.empty(0, dtype=torch.uint8, device=storage_device))
        return
    best: list[list[int]] | None = None
    best_total = None
    start = max(_ARENA_MIN, _pow2(max(sizes)))
    for k in range(6):
        groups = _arena_plan(sizes, start << k)
        total = sum(_pow2(sum(sizes[i] for i in g)) for g in groups)
        if best_total is None or total < best_total:
            best, best_total = groups, total
    assert best is not None
    for group in best:
        total = sum(sizes[i] for i in group)
        arena = _empty(total, storage_device, pin)
        offset = 0
        for i in group:
            packs[i].place(arena[offset : offset + sizes[i]])
            offset += sizes[i]


def _empty(nbytes: int, device: torch.device, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=True)
        except RuntimeError:  # not enough lockable memory: correct but synchronous copies
            pass
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def move_except(module: nn.Module, device: torch.device | str, exclude: Iterable[nn.Module]) -> None:
    """Move ``module``'s tensors to ``device``, except those of the ``exclude`` submodules."""
    device = torch.device(device)
    with torch.no_grad():
        for e in _entries([module], tensor_ids(exclude)):
            t = e.current()
            if t.device != device:
                e.set(t.to(device))


# --------------------------------------------------------------------------------------------------
# Streaming blocks


@dataclass
class _Slot:
    """One compute-device buffer that holds a copy of one block's pack."""

    buf: torch.Tensor | None = None
    block: int | None = None  # whose weights it holds (valid within one forward pass)
    ready: object | None = None  # CUDA event: the copy into it is done
    free: object | None = None  # CUDA event: the last computation reading it is done


class BlockStreamer:
    """Keep ``blocks``' weights in storage and copy each block to ``device`` just before it runs.

    Each block's parameters and buffers are packed into one contiguous storage buffer (pinned CPU memory
    when ``device`` is CUDA). Two compute-device slots, each as large as the largest block, take turns: a
    forward pre-hook makes block ``i`` run from its slot (its parameters become views of the slot) and
    starts copying block ``i + 1`` into the other slot; on CUDA that copy runs on a side stream, ordered
    by events (the copy waits until the slot's previous block finished computing; the block waits until
    its copy is done), so it overlaps block ``i``'s compute. The post-hook points the parameters back
    at the storage, so after a forward no block keeps a device copy.

    With ``root`` (the model that calls the blocks) the slots are allocated when ``root``'s forward
    starts and released when it ends, and the first block is prefetched; without it they stay allocated
    until :meth:`remove`. ``keep``: submodules of the blocks whose tensors are not streamed (they stay
    where they are, e.g. a table the model reads before the first block runs).

    Blocks called out of order (skipped layers) work: a block not prefetched is copied when called.
    Inference only: a forward that autograd would record through a streamed block is refused.
    Hooks make ``torch.compile`` and CUDA graphs of the whole model inapplicable; stream or compile, not
    both.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        storage_device: torch.device | str = "cpu",
        *,
        root: nn.Module | None = None,
        keep: Iterable[nn.Module] = (),
        pin: bool | None = None,
        prefetch: bool = True,
    ):
        self.device = torch.device(device)
        self.storage_device = torch.device(storage_device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        self.root = root
        kept = tensor_ids(keep)
        self.blocks = list(blocks)
        self.packs = [_Pack(_entries([b], kept)) for b in self.blocks]
        pin = _pinnable(self.device, self.storage_device) if pin is None else pin
        _allocate(self.packs, self.storage_device, pin)
        self.slot_bytes = max((p.nbytes for p in self.packs), default=0)
        self.slots = [_Slot(), _Slot()]
        self._active: dict[int, _Slot] = {}
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._post_hook(i), always_call=True))
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(lambda m, a: self.begin()))
            self._handles.append(root.register_forward_hook(lambda m, a, o: self.end(), always_call=True))

    def ids(self) -> set[int]:
        """ids of every tensor this streamer manages."""
        return set().union(*(p.ids() for p in self.packs)) if self.packs else set()

    @property
    def storage_bytes(self) -> int:
        return sum(p.nbytes for p in self.packs)

    # slots

    def _ensure_slots(self) -> None:
        for s in self.slots:
            if s.buf is None:
                s.buf = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                if self.cuda:
                    s.ready, s.free = torch.cuda.Event(), torch.cuda.Event()
                    # the allocator may hand out memory that work queued on the compute stream still uses;
                    # the side stream's first copy into it must wait for that work
                    s.free.record(torch.cuda.current_stream(self.device))

    def _release_slots(self) -> None:
        """Drop the slot buffers; on CUDA first make the compute stream wait for copies still in flight."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            for s in self.slots:
                if s.ready is not None:
                    current.wait_event(s.ready)
        for s in self.slots:
            s.buf = s.block = s.ready = s.free = None

    def _load(self, i: int, slot: _Slot) -> None:
        pack = self.packs[i]
        assert slot.buf is not None and pack.storage is not None
        if self.cuda:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(slot.free)  # the slot's previous block has finished computing
                slot.buf[: pack.nbytes].copy_(pack.storage, non_blocking=True)
                slot.ready.record(self._stream)
        else:
            slot.buf[: pack.nbytes].copy_(pack.storage)
        slot.block = i

    # hooks

    def begin(self) -> None:
        """A new pass: forget what the slots hold (weights may have changed) and prefetch block 0."""
        self._ensure_slots()
        for s in self.slots:
            s.block = None
        if self.prefetch and self.packs:
            self._load(0, self.slots[0])

    def end(self) -> None:
        if self.root is not None and not self._active:
            self._release_slots()

    def _check_no_grad(self, i: int, args: tuple) -> None:
        """Autograd would keep views of a slot that the next copies overwrite: streaming is for inference."""
        if not torch.is_grad_enabled():
            return
        wants = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
            e.current().requires_grad for e in self.packs[i].entries
        )
        if wants:
            raise SD35Error(
                "streamed blocks run inference only (gradients cannot flow through them); "
                "call the model under torch.no_grad(), or use memory='high'/'balanced' to train."
            )

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._check_no_grad(i, args)
            self._ensure_slots()
            busy = list(self._active.values())
            slot = next((s for s in self.slots if s.block == i), None)
            if slot is None:
                slot = next((s for s in self.slots if all(s is not b for b in busy)), None)
                if slot is None:
                    raise SD35Error(
                        "BlockStreamer: a streamed block called another one (nesting is not supported)."
                    )
                self._load(i, slot)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
            self.packs[i].bind(slot.buf)
            self._active[i] = slot
            # anything else a slot holds was prefetched for a block that did not come next: forget it
            for s in self.slots:
                if s is not slot:
                    s.block = None
            nxt = i + 1
            if self.prefetch and nxt < len(self.packs):
                other = next((s for s in self.slots if all(s is not b for b in self._active.values())), None)
                if other is not None:
                    self._load(nxt, other)

        return hook

    def _post_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            slot = self._active.pop(i, None)
            if slot is None:
                return
            if self.cuda:
                slot.free.record(torch.cuda.current_stream(self.device))
            slot.block = None
            self.packs[i].unbind()

        return hook

    def remove(self) -> None:
        """Take the hooks off; the blocks' weights stay in storage (call ``.to(device)`` to bring them back)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in list(self._active):
            self.packs[i].unbind()
        self._active.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._release_slots()


# --------------------------------------------------------------------------------------------------
# Moving a module on demand


class OnDemand:
    """A module's weights kept in storage and copied to ``device`` while it is in use.

    In use means inside its forward (hooks) or inside ``with on_demand:``; nested uses share one copy, so
    a caller that calls the module several times (chunks of a long prompt) can hold it for all of them.
    The forward pre-hook also moves tensor arguments to ``device``. The device copy is dropped when the
    last use ends: nothing is copied back, so weights must not be changed while in use.
    ``exclude``: ids of tensors not managed (e.g. those a :class:`BlockStreamer` streams).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device | str,
        storage_device: torch.device | str = "cpu",
        *,
        exclude: set[int] | None = None,
        pin: bool | None = None,
    ):
        self.module = module
        self.device = torch.device(device)
        storage_device = torch.device(storage_device)
        self.pack = _Pack(_entries([module], exclude or set()))
        pin = _pinnable(self.device, storage_device) if pin is None else pin
        _allocate([self.pack], storage_device, pin)
        self._depth = 0
        self._buf: torch.Tensor | None = None
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(lambda m, a, o: self.release(), always_call=True),
        ]

    @property
    def on_device(self) -> bool:
        return self._depth > 0

    def acquire(self) -> None:
        if self._depth == 0:
            pack = self.pack
            assert pack.storage is not None
            buf = torch.empty(pack.nbytes, dtype=torch.uint8, device=self.device)
            buf.copy_(pack.storage, non_blocking=self.device.type == "cuda")
            pack.bind(buf)
            self._buf = buf
        self._depth += 1

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self.pack.unbind()
            self._buf = None  # back to the allocator; later work on this stream is ordered after its readers

    def __enter__(self) -> OnDemand:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.acquire()
        dev = self.device

        def move(v: object) -> object:
            return v.to(dev) if isinstance(v, torch.Tensor) and v.device != dev else v

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0
        self.pack.unbind()
        self._buf = None


class Offloaded:
    """A model whose weights live in storage: ``blocks`` stream one by one, the rest moves on for each call."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        blocks: Sequence[nn.Module] = (),
        *,
        keep: Iterable[nn.Module] = (),
        storage_device: torch.device | str = "cpu",
        pin: bool | None = None,
    ):
        self.model = model
        self.streamer = (
            BlockStreamer(blocks, device, storage_device, root=model, keep=keep, pin=pin) if blocks else None
        )
        exclude = self.streamer.ids() if self.streamer is not None else set()
        self.rest = OnDemand(model, device, storage_device, exclude=exclude, pin=pin)

    def __enter__(self) -> Offloaded:
        self.rest.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rest.release()

    def remove(self) -> None:
        if self.streamer is not None:
            self.streamer.remove()
        self.rest.remove()


def stream_plan(model: nn.Module) -> tuple[Sequence[nn.Module], list[nn.Module]]:
    """(the layers to stream, submodules of them that must stay with the rest) for sd35's models."""
    if isinstance(model, MMDiTX):
        return model.joint_blocks, []
    if isinstance(model, T5Encoder):
        blocks = model.encoder.block
        # T5Encoder.forward reads block 0's relative-position table before any block runs
        return blocks, [blocks[0].layer[0].SelfAttention.relative_attention_bias]
    if isinstance(model, CLIPTextEncoder):
        return model.text_model.encoder.layers, []
    raise SD35Error(f"no streaming plan for a {type(model).__name__}.")


# --------------------------------------------------------------------------------------------------
# A pipeline's memory mode


@dataclass
class MemoryPlan:
    """What a memory mode did to a pipeline's models (see the module doc); :meth:`remove` undoes the hooks."""

    mode: str
    device: torch.device
    text: list[Offloaded] = field(default_factory=list)
    mmditx: BlockStreamer | None = None

    @property
    def streams(self) -> bool:
        return self.mmditx is not None or any(t.streamer is not None for t in self.text)

    @contextlib.contextmanager
    def text_on_device(self) -> Iterator[None]:
        """Hold the text encoders' non-streamed weights on the device for one whole prompt encode."""
        with contextlib.ExitStack() as stack:
            for t in self.text:
                stack.enter_context(t)
            yield

    def synchronize(self) -> None:
        """Wait for asynchronous weight copies (do this before changing weights, e.g. loading a LoRA)."""
        if self.device.type == "cuda" and (self.text or self.mmditx is not None):
            torch.cuda.synchronize(self.device)

    def remove(self) -> None:
        for t in self.text:
            t.remove()
        if self.mmditx is not None:
            self.mmditx.remove()
        self.text, self.mmditx = [], None


def apply_memory_mode(
    mode: str,
    device: torch.device | str,
    mmditx: nn.Module,
    vae: nn.Module,
    text_encoders: Sequence[nn.Module | None],
    *,
    pin: bool | None = None,
) -> MemoryPlan:
    """Place ``mmditx``, ``vae`` and the text encoders (CLIP-L, CLIP-G, T5 or None) for ``mode``.

    high: all moved to ``device``. balanced: MMDiT-X and VAE to ``device``; CLIPs on demand, T5 streamed
    by layer. low: VAE to ``device``; MMDiT-X joint blocks streamed, the rest of it on ``device``; all
    text encoders streamed by layer. Returns the plan (hooks to remove, contexts to enter).
    """
    check_memory_mode(mode)
    device = torch.device(device)
    plan = MemoryPlan(mode, device)
    vae.to(device)
    if mode == "high":
        mmditx.to(device)
        for enc in text_encoders:
            if enc is not None:
                enc.to(device)
        return plan
    if hasattr(mmditx, "fused_modulation"):
        mmditx.fused_modulation = False  # its stacked copy of the adaLN weights costs 1.5 GB (bf16)
    if mode == "balanced":
        mmditx.to(device)
    else:
        blocks, _ = stream_plan(mmditx)
        move_except(mmditx, device, blocks)
        plan.mmditx = BlockStreamer(blocks, device, root=mmditx, pin=pin)
    for enc in text_encoders:
        if enc is None:
            continue
        blocks, keep = stream_plan(enc)
        stream = mode == "low" or isinstance(enc, T5Encoder)
        plan.text.append(Offloaded(enc, device, blocks if stream else (), keep=keep, pin=pin))
    return plan
