"""fp8 (e4m3) linear layers for the joint blocks' big matmuls.

62 % of SD3.5 Medium's FLOPs are the joint blocks' linears (qkv, proj, MLP, attn2). On GPUs with fp8
tensor cores (CUDA compute capability 8.9 and up: Ada, Hopper, Blackwell) ``torch._scaled_mm``
multiplies e4m3 operands faster than bf16: 1.4-1.6x on the image stream's GEMMs at 1024x1024 on an
H100, but slower on the text stream's 666-row GEMMs (our kernel timings, unpublished: bf16 matmul against
``torch._scaled_mm`` with row-wise scales, batch 2, on one H100 80GB HBM3 with torch 2.11). So
``skip=("*.context_block.*",)`` may be faster; quantizing both streams (the default) saves 0.66 GB more.

:class:`Fp8Linear` stores the weight in e4m3 with a float32 scale (one per tensor, or one per output row)
and quantizes each activation on the fly with a scale taken from its own absolute maximum ("dynamic"
scaling: no calibration, no sync with the host).

Where fp8 matmuls cannot run (CPU, older GPUs, ROCm, or shapes that are not multiples of 16) the layer
dequantizes its weight and runs an ordinary matmul in the input's dtype: the same numbers except for
the activation quantization, at bf16 speed or slower, but with the weights' memory halved.
:func:`quantize_model_fp8` refuses such a device unless ``allow_fallback=True`` says that the memory
saving alone is wanted (it then warns).

Adaptive norms, embedders and the final layer stay in high precision (their matmuls are small and
the model is sensitive to them), as fp8 recipes for diffusion transformers do (sayakpaul/diffusers-torchao
``training/README.md``: its ``module_filter_fn`` keeps the output layer ``proj_out`` out of fp8).

State-dict keys. A quantized layer keeps ``weight`` (now float8_e4m3fn) and ``bias`` (unchanged dtype)
under the same names and adds ``scale_weight`` (float32, shape [] per tensor or [out, 1] per row), so
``W ~= weight.float() * scale_weight``. These are the names of ComfyUI's "scaled fp8" files: adding the
marker ``scaled_fp8`` (:func:`scaled_fp8_state_dict`) gives a file that sd35's loader (and ComfyUI) reads,
dequantizing as it loads. A quantized model also accepts a high-precision state dict: the float weight
is quantized as it loads and ``scale_weight`` may be missing.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sd35.errors import SD35Error, SD35Warning
from sd35.models.contract import BLOCK_LINEARS, QuantizedLinear, lora_state, matches_suffix

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_TARGETS = BLOCK_LINEARS  # the joint blocks' attention and MLP matrices: most of the FLOPs
GRANULARITIES = ("tensor", "row")
MODES = ("auto", "scaled_mm", "dequant")
_MIN_SCALE = 1e-12  # an all-zero tensor gets this scale instead of 0 (no division by zero)


def fp8_supported(device: torch.device | str, granularity: str = "tensor") -> bool:
    """Whether ``torch._scaled_mm`` runs e4m3 matmuls on ``device`` at fp8 speed.

    Per-tensor scales need CUDA compute capability 8.9 (Ada) or newer; per-row scales are taken to need
    9.0 (Hopper: the row-wise kernels were written for it). ROCm uses a different e4m3 flavour (fnuz)
    and is not covered.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    need = (9, 0) if granularity == "row" else (8, 9)
    return torch.cuda.get_device_capability(device) >= need


def quantize_weight(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8, scale)`` with ``w ~= w_fp8.float() * scale``: scale = amax / 448 per tensor or per row."""
    if granularity not in GRANULARITIES:
        raise SD35Error(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    w = weight.detach().float()
    amax = w.abs().amax() if granularity == "tensor" else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / E4M3_MAX).clamp(min=_MIN_SCALE)
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_activation(x: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scaling of a 2-D activation: per tensor ([] scale) or per row ([M, 1] scale), float32."""
    xf = x.float()
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(dim=1, keepdim=True)
    scale = (amax / E4M3_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(QuantizedLinear):
    """A linear layer with an e4m3 weight and a float32 scale; see the module doc for the keys.

    ``mode``: "auto" runs ``torch._scaled_mm`` where :func:`fp8_supported` says it is fast and the shapes
    allow it (in and out features multiples of 16), else dequantizes; "scaled_mm" always calls
    ``torch._scaled_mm`` (on the CPU too, where this PyTorch build implements it: useful to check its
    arithmetic, not fast); "dequant" never does. The output has the input's dtype; the fp8 matmul itself
    writes ``compute_dtype`` (bf16: what the row-wise kernels produce).
    It is a :class:`~sd35.models.contract.QuantizedLinear` (``in_features``, ``out_features``,
    :meth:`dequantized_weight`), so runtime LoRAs (:mod:`sd35.lora`) apply to it, DoRA included.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        granularity: str = "tensor",
        compute_dtype: torch.dtype = torch.bfloat16,
        bias_dtype: torch.dtype = torch.bfloat16,
        mode: str = "auto",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise SD35Error(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=E4M3, device=device), requires_grad=False
        )
        scale_shape = () if granularity == "tensor" else (out_features, 1)
        self.register_buffer("scale_weight", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.mode = mode
        self.backend = "dequant"  # what forward runs: resolved from mode and the weight's device
        self.set_mode(mode)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: str = "tensor",
        compute_dtype: torch.dtype = torch.bfloat16,
        mode: str = "auto",
    ) -> Fp8Linear:
        """Quantize ``linear`` (its bias is kept as it is)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            granularity=granularity,
            compute_dtype=compute_dtype,
            bias_dtype=linear.bias.dtype if linear.bias is not None else w.dtype,
            mode=mode,
            device=w.device,
        )
        layer.load_float_weight(w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a high-precision [out, in] weight into this layer."""
        q, scale = quantize_weight(weight.to(self.weight.device), self.granularity)
        self.weight.data.copy_(q)
        self.scale_weight.copy_(scale.reshape(self.scale_weight.shape))

    def set_mode(self, mode: str) -> None:
        """Choose "auto", "scaled_mm" or "dequant" (see the class doc)."""
        if mode not in MODES:
            raise SD35Error(f"Fp8Linear mode must be one of {MODES}, got {mode!r}.")
        self.mode = mode
        fits = self.in_features % 16 == 0 and self.out_features % 16 == 0
        if mode == "auto":
            fast = fits and fp8_supported(self.weight.device, self.granularity)
            self.backend = "scaled_mm" if fast else "dequant"
        else:
            self.backend = mode

    def _apply(self, fn, recurse: bool = True):
        """Moves follow the model; casts leave the fp8 weight and its float32 scale alone.

        ``model.to(torch.bfloat16)`` casts every floating tensor, and PyTorch counts fp8 as floating:
        without this the weight would become bf16 (and the scale lose precision).
        """
        weight, scale = self.weight.data, self.scale_weight
        out = super()._apply(fn, recurse)
        device = self.weight.device
        if self.weight.dtype != weight.dtype:
            self.weight.data = weight.to(device)
        if self.scale_weight.dtype != scale.dtype:
            self.scale_weight = scale.to(device)
        self.set_mode(self.mode)  # the device may have changed
        return out

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as ``weight * scale`` in ``dtype`` (default ``compute_dtype``)."""
        return (self.weight.float() * self.scale_weight).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "scaled_mm":
            return self._forward_scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_activation(x.reshape(-1, self.in_features), self.granularity)
        w_scale = self.scale_weight if self.granularity == "tensor" else self.scale_weight.reshape(1, -1)
        out = torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=self.compute_dtype
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Accept a high-precision weight too: it is quantized as it loads (``scale_weight`` then optional)."""
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None and w.is_floating_point() and w.dtype not in FP8_DTYPES:
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, "
                    f"the shape in current model is {(self.out_features, self.in_features)}."
                )
                return
            self.load_float_weight(w)
            local = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
            local[key] = self.weight.detach()
            local.setdefault(prefix + "scale_weight", self.scale_weight.detach().clone())
            state_dict = local
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}, backend={self.backend}"
        )


def fp8_layer_names(
    model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, skip: Iterable[str] = ()
) -> list[str]:
    """The ``nn.Linear`` layers :func:`quantize_model_fp8` would replace: inside ``joint_blocks``, name
    ending with one of ``targets``, not matching any ``skip`` glob (e.g. ``"*.context_block.*"``)."""
    targets, skip = tuple(targets), tuple(skip)
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and name.startswith("joint_blocks.")
        and matches_suffix(name, targets)
        and not any(fnmatch.fnmatchcase(name, pat) for pat in skip)
    ]


def quantize_model_fp8(
    model: nn.Module,
    *,
    targets: Iterable[str] = DEFAULT_TARGETS,
    skip: Iterable[str] = (),
    granularity: str = "tensor",
    compute_dtype: torch.dtype = torch.bfloat16,
    allow_fallback: bool = False,
) -> list[str]:
    """Replace the joint blocks' big linears by :class:`Fp8Linear` in place; returns the names replaced.

    ``targets`` are module-name suffixes (default: qkv, proj, attn2 and MLP layers of both streams);
    ``skip`` are globs on the full names, e.g. ``("*.context_block.*",)`` to keep the text stream in
    bf16 (its matmuls have few rows and gain little) or ``("joint_blocks.0.*",)``. Embedders, adaLN and
    the final layer are never touched. Quantize after moving the model to its GPU: the device decides
    whether fp8 matmuls can run there. Where they cannot, this raises :class:`SD35Error` unless
    ``allow_fallback`` (then the weights are stored in fp8 and dequantized in every matmul: less memory,
    slower; a :class:`SD35Warning` says so). Layers with LoRAs applied are refused: unload them first
    and load them again afterwards (they then run as runtime LoRAs on the fp8 layers).
    """
    if granularity not in GRANULARITIES:
        raise SD35Error(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    names = fp8_layer_names(model, targets, skip)
    if not names:
        raise SD35Error(f"no linear layer of this model matches the fp8 targets {list(targets)}.")
    layers = {name: model.get_submodule(name) for name in names}
    devices = {layer.weight.device for layer in layers.values()}
    if any(d.type == "meta" for d in devices):
        raise SD35Error("quantize_model_fp8 needs a model with real weights (it is on the meta device).")
    for name in names:
        if lora_state(layers[name]) is not None:
            raise SD35Error(
                f"layer {name} has a LoRA applied; unload LoRAs before quantize_model_fp8 and load them again "
                "afterwards (they then run as runtime LoRAs)."
            )
    slow = sorted({str(d) for d in devices if not fp8_supported(d, granularity)})
    if slow and not allow_fallback:
        raise SD35Error(
            f"fp8 matmuls need an NVIDIA GPU of compute capability "
            f"{'9.0 (Hopper)' if granularity == 'row' else '8.9 (Ada, Hopper or newer)'} "
            f"with {granularity}-wise scales; this model's layers are on {', '.join(slow)}. Move the model to "
            "such a GPU first, or pass allow_fallback=True to store the weights in fp8 anyway (half their "
            "memory; every matmul then dequantizes, which is slower than bf16)."
        )
    if slow:
        warnings.warn(
            f"fp8 weights on {', '.join(slow)}: no fast fp8 matmul there, each layer dequantizes its weight "
            "in every call (less memory, slower than bf16).",
            SD35Warning,
            stacklevel=2,
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(layers.pop(name), granularity, compute_dtype))
    return names


def scaled_fp8_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model``'s state dict in ComfyUI's "scaled fp8" layout (the ``scaled_fp8`` marker added).

    With ``prefix="model.diffusion_model."`` it is an official-layout MMDiT-X file that sd35's loader
    reads back, dequantizing the fp8 weights.
    """
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    sd["scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    return sd
