"""Many linears that read one input, run as one matmul: the adaLN modulations of MMDiT-X.

Every joint block's ``adaLN_modulation`` (SiLU then Linear(dim, n * dim)) and the final layer's read the
same vector ``silu(c)``. Stacking their weights row-wise gives one (sum n_i * dim, dim) matrix, and one
``silu(c) @ W_all.T + b_all`` computes every modulation at once: the same dot products as the separate
calls (exact up to float summation order), one launch instead of ~50, and one pass over the weights.

The stacked copy is a cache. It is rebuilt when any weight changes, noticed through each tensor's
``data_ptr()`` (a weight replaced or moved) and ``_version`` (a weight changed in place: a LoRA merge,
``load_state_dict``, an optimizer step), plus device and dtype. A rebuild that keeps the total shape
writes into the same buffer, so a CUDA graph that captured it stays valid after :func:`refresh`.

The fused path is refused (the caller then calls each layer, the exact original path) wherever it would
not give the layers' own result or gradients:

- a layer is not a plain ``nn.Linear`` (a quantized layer computes something else), or a module on the
  way to it was replaced since the last call (the layout is looked up again);
- a layer, or a module on the way to it (whose forward the fused path bypasses or feeds), has hooks: a
  runtime LoRA (:mod:`sd35.lora` applies it through a forward hook and the state under
  :data:`sd35.models.contract.LORA_STATE_ATTR`), an offloading hook that moves weights in, a cache; any of
  these must see the module's own call;
- gradients are on and some weight or bias requires grad (training the adaLN): the stacked copy is
  detached, so their gradients would be lost. Gradients with respect to the input still flow, so
  training a LoRA elsewhere with frozen adaLN weights keeps the fused path;
- the weights are not all on the input's device in its dtype (offloaded, meta, mixed precision), or
  are inference tensors (they keep no version counter, so a change could not be seen);
- ``torch.compile`` is tracing (the bookkeeping is Python-side state; the per-layer path traces).

The checks run on every call, so they avoid ``nn.Module.__getattr__`` and read ``__dict__`` directly:
they cost tens of microseconds for SD3.5 Medium's 49 layers.

This is part of the model (:class:`sd35.models.mmditx.MMDiTX` uses it by default), not an opt-in
acceleration; :mod:`sd35.accel.cuda_graphs` uses :func:`refresh` and :func:`hook_dicts` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from sd35.models.contract import LORA_STATE_ATTR, lora_state


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does anything besides its ``forward`` (hooks of any kind, a LoRA state)."""
    d = module.__dict__
    return bool(
        d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d.get("_backward_pre_hooks")
        or d.get(LORA_STATE_ATTR) is not None
    )


def _runtime_lora(module: nn.Module) -> bool:
    state = lora_state(module)
    return state is not None and bool(getattr(state, "runtime", None))


def hook_dicts(module: nn.Module) -> list[dict]:
    """The dicts that hold ``module``'s hooks (stable objects: hooks are added to and removed from them)."""
    d = module.__dict__
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [d[n] for n in names if n in d]


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
    )


class _Layout:
    """Where the layers sit in the module tree: every (parent's ``_modules``, name, child) edge on the way.

    :meth:`valid` re-checks the edges by identity, so replacing any module on a path is noticed at the
    price of a dict lookup per edge. ``also`` are further modules whose hooks matter (a bypassed SiLU).
    The hook dicts of every module on the way and the layers' parameter dicts are kept, so the per-call
    checks read them without attribute lookups.
    """

    def __init__(self, root: nn.Module, paths: Sequence[str], also: Sequence[str] = ()):
        edges: dict[tuple[int, str], tuple[dict, str, nn.Module]] = {}
        self.layers: list[nn.Module] = []
        for path in (*paths, *also):
            node = root
            for name in path.split("."):
                child = node._modules[name]
                edges[(id(node), name)] = (node._modules, name, child)
                node = child
            self.layers.append(node)
        del self.layers[len(paths) :]
        self.edges = list(edges.values())
        self.owners = [child for _, _, child in self.edges]  # every module on the paths, root excluded
        self.hooks = [d for m in self.owners for d in hook_dicts(m)]
        self.params = [lin._parameters for lin in self.layers]
        self.root_id = id(root)
        # plain linears, all with a bias or all without: else the layout never fuses
        self.fusable = all(type(lin) is nn.Linear for lin in self.layers) and (
            len({p.get("bias") is None for p in self.params}) == 1
        )

    def valid(self, root: nn.Module) -> bool:
        return id(root) == self.root_id and all(d.get(name) is child for d, name, child in self.edges)

    def hooked(self) -> bool:
        """Whether any module on the way has hooks, or a layer a runtime LoRA (which also comes with a hook)."""
        return any(self.hooks) or any(_runtime_lora(lin) for lin in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.params for t in (p["weight"], p.get("bias")) if t is not None]


class FusedLinears:
    """A cache of ``[W_1; ...; W_n]`` and ``[b_1; ...; b_n]`` for the linears at ``paths`` under a root module.

    Call it with the root and the input: it returns each layer's output (views into one result), or None
    where the fused product does not apply (see the module doc); the caller then calls the layers.
    ``also``: paths of further modules the fused path bypasses (their hooks force the per-layer path).
    Copying or pickling the owner does not copy the stacked weights (they are rebuilt on first use).
    """

    def __init__(self, paths: Sequence[str], also: Sequence[str] = ()) -> None:
        self.paths, self.also = tuple(paths), tuple(also)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.sizes: tuple[int, ...] = ()
        self.key: tuple | None = None
        self.builds = 0  # how many times the stacked weights were (re)computed, for tests and diagnostics
        self._layout: _Layout | None = None

    def clear(self) -> None:
        """Free the stacked copy."""
        self.weight = self.bias = self.key = None
        self.sizes = ()

    def __deepcopy__(self, memo: dict) -> FusedLinears:
        return type(self)(self.paths, self.also)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "also": self.also}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["also"])

    def _current_layout(self, root: nn.Module) -> _Layout | None:
        """The layout of the modules at ``paths`` now (looked up again if the tree changed), None if absent."""
        layout = self._layout
        if layout is None or not layout.valid(root):
            try:
                layout = self._layout = _Layout(root, self.paths, self.also)
            except KeyError:
                self._layout = None
        return self._layout

    def layers(self, root: nn.Module) -> list[nn.Module] | None:
        """The modules at ``paths``, or None if they are absent or not all plain ``nn.Linear`` with alike biases."""
        layout = self._current_layout(root)
        return layout.layers if layout is not None and layout.fusable else None

    def _key(self, layout: _Layout, device: torch.device, dtype: torch.dtype, dim: int) -> tuple | None:
        """The weights' addresses and versions, or None where the fused product does not apply.

        The full checks (device, dtype, width, inference tensors) run only when the addresses or versions
        differ from the cached key's: an unchanged tensor cannot have moved or changed type.
        """
        tensors = layout.tensors()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: a change could not be seen
            return None
        key = (device, dtype, tuple(t.data_ptr() for t in tensors), versions)
        if key == self.key:
            return key
        for p in layout.params:
            w = p["weight"]
            if w.shape[1] != dim:
                return None
        if any(t.device != device or t.dtype != dtype for t in tensors):
            return None
        return key

    def usable(self, root: nn.Module, x: torch.Tensor) -> bool:
        """Whether the fused product gives what calling the layers on ``x`` would (see the module doc)."""
        return self._usable_key(root, x) is not None

    def _usable_key(self, root: nn.Module, x: torch.Tensor) -> tuple | None:
        if torch.compiler.is_compiling() or _global_hooks():
            return None
        layout = self._current_layout(root)
        if layout is None or not layout.fusable or layout.hooked():
            return None
        return self._key(layout, x.device, x.dtype, x.shape[-1])

    def _build(self, layers: Sequence[nn.Module], key: tuple) -> None:
        sizes = tuple(lin.weight.shape[0] for lin in layers)
        w0 = layers[0].weight
        shape = (sum(sizes), w0.shape[1])
        reuse = (
            self.weight is not None
            and tuple(self.weight.shape) == shape
            and self.weight.device == w0.device
            and self.weight.dtype == w0.dtype
        )
        # never build inside inference_mode: the buffer must stay writable in place by later refreshes
        with torch.inference_mode(False), torch.no_grad():
            if reuse:
                torch.cat([lin.weight for lin in layers], dim=0, out=self.weight)
                if self.bias is not None:
                    torch.cat([lin.bias for lin in layers], dim=0, out=self.bias)
            else:
                self.clear()  # free the old copy before making the new one
                self.weight = torch.cat([lin.weight.detach() for lin in layers], dim=0)
                has_bias = layers[0].bias is not None
                self.bias = torch.cat([lin.bias.detach() for lin in layers]) if has_bias else None
        self.sizes, self.key = sizes, key
        self.builds += 1

    def __call__(
        self,
        root: nn.Module,
        x: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor] | None:
        """Each layer's output on ``activation(x)`` from one matmul, or None (then call the layers)."""
        key = self._usable_key(root, x)
        if key is None:
            return None
        if key != self.key:
            self._build(self._layout.layers, key)
        if activation is not None:
            x = activation(x)
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))

    def refresh(self, root: nn.Module) -> bool:
        """Rewrite a live stacked copy in place if the weights changed in place; False (and cleared) if it
        no longer applies. Nothing is built where there was no copy."""
        if self.key is None:
            return False
        layout = self._current_layout(root)
        key = None
        if layout is not None and layout.fusable:
            with torch.no_grad():
                key = self._key(layout, self.weight.device, self.weight.dtype, self.weight.shape[1])
        if key is None:
            self.clear()
            return False
        if key != self.key:
            self._build(layout.layers, key)
        return True


def fused_cache(model: nn.Module) -> FusedLinears | None:
    """``model``'s fused-adaLN cache (the ``_adaln`` attribute :class:`sd35.models.mmditx.MMDiTX` keeps), or None.

    One reader of that attribute, for :func:`refresh` and for the CUDA-graph fingerprint (which must notice
    the stacked copy moving), so neither needs to know where the model keeps it.
    """
    cache = model.__dict__.get("_adaln")
    return cache if isinstance(cache, FusedLinears) else None


def refresh(model: nn.Module) -> bool:
    """Update ``model``'s fused-adaLN cache in place after its weights changed in place (a LoRA merge).

    An eager forward does this by itself; a CUDA graph replay runs no Python, so
    :class:`sd35.accel.cuda_graphs.GraphedDenoiser` calls this before each replay. Returns whether the
    model has a live cache.
    """
    cache = fused_cache(model)
    return cache is not None and cache.refresh(model)


__all__ = ["FusedLinears", "fused_cache", "has_hooks", "hook_dicts", "refresh"]
