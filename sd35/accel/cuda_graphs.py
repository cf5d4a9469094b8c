"""The transformer call replayed as a CUDA graph, one graph per (shapes, dtypes, skip_layers).

At 512x512 one eager CFG step is launch-bound (diffusers' eager step took 66.9 ms in our H100 anchor run,
:data:`sd35.bench.report.ANCHORS`, against a 6.4 ms kernel floor: the step's 4.9 TFLOP at the 767 TF/s a
bf16 matmul reaches on that card): hundreds of small kernels whose launches cost more than their work.
A CUDA graph records the kernels of one call once and replays them with a single launch.

A graph replays fixed kernels on fixed addresses, so :class:`GraphedDenoiser` keeps, per key, static
input buffers (each call copies its inputs in), the output buffer, and the graph. The key
(:func:`graph_key`) is everything the recorded kernels depend on: the inputs' shapes, dtypes and device,
and ``skip_layers`` (which blocks run). A new size, batch (CFG's 2, SLG's extra 1) or skip set captures a
new graph; the ``max_graphs`` most recently used are kept.

What a replay cannot see is Python: the addresses of the weights and the decisions hooks make. So the
model's fingerprint (:func:`model_fingerprint`: every parameter's and buffer's address, the fused adaLN
cache's, every module's hook ids and the runtime LoRA patches with their strengths) is checked on every
call; any change drops all graphs, which are then captured again. Weights changed in place (a LoRA
merge) need no recapture: the graph reads them where they are; the fused adaLN copy of them is brought
up to date in place (:func:`sd35.models.modulation.refresh`) before each replay. Other Python-side
switches flipped after a capture (``fused_modulation``, an ``Fp8Linear`` mode) are not seen; call
:meth:`GraphedDenoiser.reset`.

The key and cache logic (:class:`GraphCache`) is plain Python, separate from the capture, so it can be
tested without a GPU; the capture itself needs CUDA, and :class:`GraphedDenoiser` refuses other devices.
Graphs are for inference: with gradients enabled the call runs the model eagerly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from sd35.errors import SD35Error, SD35Warning
from sd35.models.contract import lora_state
from sd35.models.modulation import fused_cache, hook_dicts, refresh

T = TypeVar("T")


def graph_key(
    x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor, skip_layers: Iterable[int] = ()
) -> tuple:
    """What a captured call is specialised on: (shape, dtype, device) of each input, and the skipped blocks."""
    inputs = tuple((tuple(a.shape), a.dtype, a.device) for a in (x, t, y, context))
    return inputs, tuple(sorted({int(i) for i in skip_layers}))


class ModelSnapshot:
    """A model's module tree, kept so that :meth:`fingerprint` is cheap enough to take on every call.

    The fingerprint is what a captured graph has baked in: the address of every parameter and buffer
    (a reload or a move changes them), every hook (by handle id), the runtime LoRA patches of hooked
    modules with their strengths, and the addresses of the fused adaLN copy. :meth:`valid` tells whether
    the tree is still the one recorded (a replaced module is noticed by identity).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        modules = list(model.modules())
        self.edges = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        # modules without tensors of their own (containers, activations) are left out of the per-call walk
        self.tensor_dicts = [d for m in modules for d in (m._parameters, m._buffers) if d]
        self.hooks = [(m, hook_dicts(m)) for m in modules]
        self.all_hook_dicts = [d for _, dicts in self.hooks for d in dicts]

    def valid(self) -> bool:
        return all(d.get(name) is child for d, name, child in self.edges)

    def fingerprint(self) -> tuple:
        tensors = tuple(t.data_ptr() for d in self.tensor_dicts for t in d.values() if t is not None)
        hooks = []
        if any(self.all_hook_dicts):
            for i, (m, dicts) in enumerate(self.hooks):
                if any(dicts):
                    state = lora_state(m)
                    runtime = getattr(state, "runtime", ())
                    patches = tuple((p.name, id(p.adapter), p.strength) for p in runtime)
                    hooks.append((i, tuple(k for d in dicts for k in d), patches))
        cache = fused_cache(self.model)
        fused = tuple(
            None if a is None else a.data_ptr()
            for a in (getattr(cache, "weight", None), getattr(cache, "bias", None))
        )
        return tensors, tuple(hooks), fused


def model_fingerprint(model: nn.Module) -> tuple:
    """:meth:`ModelSnapshot.fingerprint` of ``model`` as it is now."""
    return ModelSnapshot(model).fingerprint()


class GraphCache(Generic[T]):
    """Entries by key, made on a miss by ``capture(key)``; the least recently used dropped past ``max_entries``.

    Plain Python: :class:`GraphedDenoiser` uses it with a CUDA-graph capture, tests with a fake one.
    """

    def __init__(self, capture: Callable[[Hashable], T], max_entries: int = 4):
        if max_entries < 1:
            raise SD35Error(f"a graph cache needs room for at least one graph, got {max_entries}.")
        self.capture = capture
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, T] = OrderedDict()
        self.captures = 0  # how many entries were ever made

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable) -> tuple[T, bool]:
        """``(entry, captured_now)``."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key], False
        entry = self.capture(key)
        self.entries[key] = entry
        self.captures += 1
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry, True

    def keep_only(self, key: Hashable) -> None:
        """Drop every entry but ``key``'s."""
        self.entries = OrderedDict((k, v) for k, v in self.entries.items() if k == key)

    def clear(self) -> None:
        self.entries.clear()


@dataclass
class CapturedCall:
    """One recorded model call: its graph, the static inputs it reads and the output it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, a in zip(self.inputs, inputs, strict=True):
            static.copy_(a)
        self.graph.replay()
        return self.output


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise SD35Error("GraphedDenoiser needs a model with parameters.")


class GraphedDenoiser:
    """``model(x, t, y, context, skip_layers)`` with each distinct call shape captured once as a CUDA graph.

    Called like the model (``flow_denoiser(GraphedDenoiser(pipe.mmditx))`` works). ``warmup`` eager
    calls on a side stream precede each capture (they build lazy state such as the fused adaLN cache and
    cuBLAS/cuDNN workspaces outside the graph). The output is a fresh tensor (``clone_output=True``),
    since the graph writes the same buffer on every replay; pass False to get that buffer and save a
    copy, if the caller consumes it before the next call. Each graph keeps its own activation memory
    (about one forward's worth), so ``max_graphs`` bounds the memory this takes.

    ``check_model`` (default True) takes the model's fingerprint on every call (about 0.3 ms of Python
    for SD3.5 Medium's ~700 tensors). Pass False to skip it when nothing changes the model between
    calls, or when whoever changes it (loads, unloads or re-weights a runtime LoRA, moves or reloads
    weights) calls :meth:`reset`; in-place weight changes (merged LoRAs) need neither.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_graphs: int = 4,
        warmup: int = 2,
        clone_output: bool = True,
        check_model: bool = True,
    ):
        if not self.supported(model):
            raise SD35Error(
                "CUDA graphs need the model on a CUDA GPU "
                f"(this one is on {_model_device(model)}; CUDA available: {torch.cuda.is_available()}). "
                "Run the model directly instead."
            )
        self.model = model
        self.device = _model_device(model)
        self.warmup = warmup
        self.clone_output = clone_output
        self.check_model = check_model
        self.cache: GraphCache[CapturedCall] = GraphCache(self._capture, max_graphs)
        self._fingerprint: tuple | None = None
        self._snapshot = ModelSnapshot(model)
        self._pending: tuple[torch.Tensor, ...] = ()
        self._warned = False

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """Whether ``model`` sits on a CUDA device where graphs can be captured."""
        return torch.cuda.is_available() and _model_device(model).type == "cuda"

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def reset(self) -> None:
        """Drop every graph (they are captured again on the next calls)."""
        self.cache.clear()
        self._fingerprint = None

    def fingerprint(self) -> tuple:
        """The model's :class:`ModelSnapshot` fingerprint (the snapshot is retaken if the tree changed)."""
        if not self._snapshot.valid():
            self._snapshot = ModelSnapshot(self.model)
        return self._snapshot.fingerprint()

    def _capture(self, key: Hashable) -> CapturedCall:
        *inputs, skip = self._pending
        static = tuple(a.detach().clone() for a in inputs)
        model, device = self.model, self.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                model(*static, skip_layers=skip)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                output = model(*static, skip_layers=skip)
        except RuntimeError as e:
            raise SD35Error(
                f"capturing the transformer as a CUDA graph failed ({e}); run it without GraphedDenoiser."
            ) from e
        return CapturedCall(graph, static, output)

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor,
        skip_layers: Iterable[int] = (),
        pos_offset: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        skip = tuple(sorted({int(i) for i in skip_layers}))
        if torch.is_grad_enabled() or pos_offset is not None:  # training-time calls: no graphs
            if pos_offset is None and not self._warned:
                self._warned = True
                warnings.warn(
                    "GraphedDenoiser called with gradients enabled: running the model eagerly (graphs are for "
                    "inference; call it under torch.no_grad() or torch.inference_mode()).",
                    SD35Warning,
                    stacklevel=2,
                )
            return self.model(x, t, y, context, skip_layers=skip, pos_offset=pos_offset)
        for name, a in (("x", x), ("t", t), ("y", y), ("context", context)):
            if a.device != self.device:
                raise SD35Error(
                    f"GraphedDenoiser: input {name} is on {a.device}, the model on {self.device}."
                )
        refresh(self.model)
        if not self.check_model and self._fingerprint is not None:
            fingerprint = self._fingerprint
        else:
            fingerprint = self.fingerprint()
        if fingerprint != self._fingerprint:
            self.cache.clear()
            self._fingerprint = fingerprint
        key = graph_key(x, t, y, context, skip)
        self._pending = (x, t, y, context, skip)
        try:
            entry, captured = self.cache.get(key)
        finally:
            self._pending = ()
        if captured and self.check_model:  # the warm-up may have (re)built lazy state older graphs read
            after = self.fingerprint()
            if after != fingerprint:
                self.cache.keep_only(key)
                self._fingerprint = after
        out = entry.replay(x, t, y, context)
        return out.clone() if self.clone_output else out
