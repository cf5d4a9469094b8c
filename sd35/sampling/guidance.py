"""From the MMDiT-X velocity to a guided denoiser: classifier-free guidance, APG and Skip Layer Guidance.

The transformer predicts the flow velocity ``v = noise - x0`` at ``t = 1000 * sigma``; the denoised
estimate is ``x - v * sigma`` (Stability-AI/sd3.5 ``sd3_impls.py``
``ModelSamplingDiscreteFlow.calculate_denoised``). Guidance is combined on denoised tensors in float32,
with the batch ordered [cond ; uncond] as the reference does (``sd3_impls.py`` ``CFGDenoiser``). Because
x and sigma are shared by both halves this equals diffusers' guidance on v up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch

from sd35.errors import InvalidRequest, SD35Error
from sd35.sampling.schedules import percent_to_sigma

if TYPE_CHECKING:
    from sd35.control.apply import Controls
    from sd35.models.mmditx import MMDiTX


@dataclass(frozen=True)
class ControlStep:
    """The ControlNets of a run and the (step, steps) of the current model call, for their windows."""

    controls: Controls
    at: tuple[int, int]


FlowDenoiser = Callable[..., torch.Tensor]
"""``denoise(x, sigma, y, context, skip_layers=()) -> denoised`` for one batch."""

Conditioning = tuple[torch.Tensor, torch.Tensor]
"""``(context, pooled)``: text tokens (B, L, C) and pooled vector (B, P); B may be 1 for any image batch."""

SIGMA_RTOL = 1e-5  # how close a sigma must be to a schedule entry to count as that entry (rounding slack)

SLGWindow = Literal["steps", "sigma"]
"""How the SLG window's ``start`` / ``end`` fractions are read: of the steps (the reference's) or of the
model's time, by sigma (ComfyUI's ``SkipLayerGuidanceSD3`` node)."""


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip Layer Guidance (the reference's ``SkipLayerCFGDenoiser``, Stability-AI/sd3.5 ``sd3_impls.py``).

    On steps where it is :meth:`active`, one extra forward of the cond half with the joint blocks
    ``layers`` bypassed gives ``D_skip``, and the guided result becomes ``D + (D_cond - D_skip) * scale``.

    A field left None means "the model's value": the right blocks to skip depend on the model (SD3.5
    Medium skips 7, 8, 9 with scale 2.5 from 1% to 20% of the steps, ``sd3_infer.py`` CONFIGS; the demo
    model has 4 blocks), so a request says ``SkipLayerGuidance()`` to ask for SLG as the model's preset
    has it (:attr:`sd35.presets.ModelDefaults.slg`) and :meth:`filled` completes it. Guidance runs only
    complete settings. (Diffusers uses the same rule with a default scale of 2.8.)
    """

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "joint blocks to skip, e.g. 7,8,9"}
    )
    scale: float | None = field(default=None, metadata={"help": "SLG scale"})
    start: float | None = field(
        default=None, metadata={"help": "start of the SLG window, a fraction of the steps"}
    )
    end: float | None = field(
        default=None, metadata={"help": "end of the SLG window, a fraction of the steps"}
    )
    window: SLGWindow = field(
        default="steps",
        metadata={
            "help": "read start/end as fractions of the steps (the reference's) or of sigma (ComfyUI's node)"
        },
    )

    def __post_init__(self) -> None:
        if self.window not in get_args(SLGWindow):
            raise InvalidRequest(
                f"Skip Layer Guidance window must be 'steps' or 'sigma', got {self.window!r}.",
                param="slg.window",
            )
        if self.layers is not None:
            layers = tuple(self.layers)
            object.__setattr__(self, "layers", layers)
            if not layers:
                raise InvalidRequest(
                    "Skip Layer Guidance needs at least one layer to skip (SD3.5 Medium uses 7, 8, 9).",
                    param="slg.layers",
                )
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise InvalidRequest(
                    f"Skip Layer Guidance layers must be block indices >= 0, got {layers!r}.",
                    param="slg.layers",
                )
        if self.scale is not None and not (
            isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale >= 0
        ):
            raise InvalidRequest(
                f"Skip Layer Guidance scale must be a number >= 0, got {self.scale!r}.", param="slg.scale"
            )
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise InvalidRequest(
                    f"Skip Layer Guidance {name} must be a fraction of the steps in [0, 1], got {value!r}.",
                    param=f"slg.{name}",
                )
        if self.start is not None and self.end is not None and not self.start < self.end:
            raise InvalidRequest(
                f"Skip Layer Guidance needs start < end (fractions of the steps), "
                f"got start={self.start!r}, end={self.end!r}.",
                param="slg.start",
            )

    @property
    def complete(self) -> bool:
        """Whether every field is set (what guidance needs)."""
        return None not in (self.layers, self.scale, self.start, self.end)

    def filled(self, defaults: SkipLayerGuidance) -> SkipLayerGuidance:
        """These settings with every None taken from ``defaults`` (a model's complete preset)."""
        return SkipLayerGuidance(
            *(getattr(defaults, f) if getattr(self, f) is None else getattr(self, f) for f in _SLG_FIELDS),
            window=self.window,
        )

    def active(self, step: int, steps: int) -> bool:
        """Whether 0-based ``step`` of ``steps`` gets the skip pass: ``start*steps < step < end*steps``.

        Both inequalities are strict, as in the reference (``sd3_impls.py`` ``SkipLayerCFGDenoiser``) and
        diffusers; for 50 steps with SD3.5 Medium's 0.01 and 0.20 that is steps 1..9.
        """
        if not self.complete:
            raise ValueError(
                "incomplete Skip Layer Guidance settings: fill them from the model's preset first"
            )
        return self.scale > 0 and self.start * steps < step < self.end * steps

    def active_at_sigma(self, sigma: float, shift: float) -> bool:
        """Whether a call at ``sigma`` gets the skip pass in the ``"sigma"`` window: ``percent_to_sigma(end)
        <= sigma <= percent_to_sigma(start)`` (ComfyUI ``SkipLayerGuidanceDiT``'s test, made on every model
        call, also a sampler's intermediate ones)."""
        if not self.complete:
            raise ValueError(
                "incomplete Skip Layer Guidance settings: fill them from the model's preset first"
            )
        low, high = percent_to_sigma(self.end, shift), percent_to_sigma(self.start, shift)
        return self.scale > 0 and low <= sigma <= high


_SLG_FIELDS = ("layers", "scale", "start", "end")


def check_slg_layers(slg: SkipLayerGuidance, depth: int) -> None:
    """Refuse SLG blocks a model of ``depth`` joint blocks does not have (they would skip nothing)."""
    if max(slg.layers) >= depth:
        raise InvalidRequest(
            f"Skip Layer Guidance layers {list(slg.layers)} do not exist: this model has joint blocks 0..{depth - 1}.",
            param="slg.layers",
        )


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat, Hilliges & Weber 2024, "Eliminating Oversaturation and Artifacts
    of High Guidance Scales in Diffusion Models", arXiv 2410.02416; ComfyUI ``comfy_extras/nodes_apg.py``).

    It replaces the CFG update on the denoised (x0) predictions. Per call, with ``w`` the CFG scale:

    1. ``G = D_cond - D_uncond``;
    2. momentum (``momentum != 0``): ``M = G + momentum * M_prev`` (``M_prev = 0`` on the first call of a
       generation), and ``G = M``. The paper's "reverse momentum" uses negative values (e.g. -0.5);
       ComfyUI's node allows 0..1. Accepted: -1..1;
    3. norm threshold (``norm_threshold > 0``): ``G = G * min(1, norm_threshold / ||G||)``, the L2 norm taken
       per image over (C, H, W);
    4. split ``G`` along ``D_cond`` per image: ``G_par = (<G, D_cond> / ||D_cond||^2) D_cond`` and
       ``G_orth = G - G_par`` (computed in float64, as the paper's code does);
    5. ``D = D_cond + (w - 1) * (G_orth + eta * G_par)``.

    With ``eta = 1``, no threshold and no momentum this is exactly CFG, ``D_uncond + w (D_cond - D_uncond)``.
    The defaults (eta 0, everything else off) are the paper's main setting, dropping the parallel part
    that causes oversaturation. (ComfyUI's node defaults to eta 1, threshold 5, and in ComfyUI's wiring
    the result is ``D_cond + w * update``, one more unit of guidance than the paper's ``w - 1``; we follow
    the paper, so that eta 1 reproduces CFG.)
    """

    eta: float = field(default=0.0, metadata={"help": "weight of the parallel component (1 = plain CFG)"})
    norm_threshold: float = field(default=0.0, metadata={"help": "cap on the guidance norm (0 = off)"})
    momentum: float = field(default=0.0, metadata={"help": "running-average momentum, -1..1 (0 = off)"})

    def __post_init__(self) -> None:
        for name in ("eta", "norm_threshold", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(
                    f"APG {name} must be a finite number, got {value!r}.", param=f"apg.{name}"
                )
            object.__setattr__(self, name, float(value))
        if self.norm_threshold < 0:
            raise InvalidRequest(
                f"APG norm_threshold must be >= 0 (0 turns it off), got {self.norm_threshold!r}.",
                param="apg.norm_threshold",
            )
        if not -1 <= self.momentum <= 1:
            raise InvalidRequest(
                f"APG momentum must be in [-1, 1] (0 turns it off; the paper uses negative values such as -0.5), "
                f"got {self.momentum!r}.",
                param="apg.momentum",
            )


def _image_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def apg_project(v: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v_parallel, v_orthogonal)``: ``v`` split along ``direction``, per image (all dims but the first).

    ``v_par = (<v, u>) u`` with ``u = direction / ||direction||`` (a zero direction gives ``v_par = 0``), and
    ``v_orth = v - v_par``. Computed in float64 (float32 on MPS, which has no float64), returned in v's dtype.
    """
    wide = torch.float32 if v.device.type == "mps" else torch.float64
    v64, d64 = v.to(wide), direction.to(wide)
    dims = _image_dims(v)
    unit = torch.nn.functional.normalize(d64.flatten(1), dim=1).reshape(d64.shape)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def _sigma_value(sigma: torch.Tensor | float) -> float:
    """A call's sigma as a float (every row of a call shares it)."""
    return float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)


def flow_denoiser(mmditx: MMDiTX) -> FlowDenoiser:
    """Wrap the transformer as ``denoise(x, sigma, y, context, skip_layers=()) -> x - v * sigma``.

    ``sigma`` has shape (B,); the model sees ``t = sigma * 1000``. The subtraction is done in float32
    whatever the model's dtype (the reference's ``calculate_denoised``, which ``sd3_impls.py``
    ``BaseModel.apply_model`` applies to the model output cast ``.float()``).
    """

    def denoise(
        x: torch.Tensor,
        sigma: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor,
        skip_layers: Sequence[int] = (),
        control: ControlStep | None = None,
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        t = sigma * 1000
        extra = {}
        if control is not None and (residuals := control.controls.residuals(x, t, y, context, *control.at)):
            extra["control"] = residuals
        v = mmditx(x, t, y, context, skip_layers=tuple(skip_layers), **extra).to(torch.float32)
        return x - v * sigma.reshape(-1, *([1] * (x.dim() - 1)))

    return denoise


def _batched(cond: Conditioning, batch: int, what: str) -> Conditioning:
    """``(context, pooled)`` with batch ``batch``: a batch of 1 is repeated, any other must match."""
    context, pooled = cond
    if context.dim() != 3 or pooled.dim() != 2 or context.shape[0] != pooled.shape[0]:
        raise SD35Error(
            f"{what} conditioning must be (context (B, L, C), pooled (B, P)), "
            f"got shapes {tuple(context.shape)} and {tuple(pooled.shape)}."
        )
    if context.shape[0] == batch:
        return context, pooled
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1), pooled.expand(batch, -1)
    raise SD35Error(f"{what} conditioning has batch {context.shape[0]} but the latents have batch {batch}.")


class GuidedDenoiser:
    """``denoiser(x, sigma) -> D`` with classifier-free guidance and optional Skip Layer Guidance.

    Per call (Stability-AI/sd3.5 ``sd3_impls.py`` ``CFGDenoiser`` and ``SkipLayerCFGDenoiser``):

    - one forward of the batch [cond ; uncond] (cond first, like the reference; x and sigma duplicated),
      ``D = D_uncond + (D_cond - D_uncond) * cfg``; with ``cfg == 1`` there is no uncond pass at all and
      ``D = D_cond`` (``uncond`` may then be None). If the two contexts differ in length they cannot share
      a batch, and two forwards are made instead (same result);
    - when ``slg`` is active for this step, one more forward of the cond rows only, with the joint
      blocks ``slg.layers`` bypassed: ``D = D + (D_cond - D_skip) * slg.scale``. (Unlike diffusers, SLG
      also applies with ``cfg == 1``; the reference has no such case.)

    ``sigmas`` is the FULL schedule. The step of a call is found from its sigma: the largest ``i`` with
    ``sigmas[i] >= sigma`` (a relative slack of 1e-5 absorbs rounding), which is also right for samplers
    that call the model more than once per step. The SLG window counts ``steps = len(sigmas) - 1``: for
    img2img, pass the full schedule here and sample on its tail (:func:`~sd35.sampling.img2img_sigmas`),
    because the reference counts the window over the full step count (``sd3_infer.py``
    ``SD3Inferencer.do_sampling`` gives ``SkipLayerCFGDenoiser`` ``steps``, not the cut schedule's length).

    ``cond`` and ``uncond`` are ``(context, pooled)`` with batch 1 or the latents' batch B; ``slg`` is
    None for plain CFG.

    ``shift`` (keyword-only) is the model's flow shift, which places a ``window="sigma"`` SLG window.

    ``apg`` (keyword-only) replaces the CFG combination by adaptive projected guidance (:class:`APG`); the
    SLG term is still added after it. APG does nothing when ``cfg == 1`` (there is no uncond pass). Its
    momentum state lives in this object: it is updated on every call (so per model evaluation, as in the
    paper and ComfyUI, also for samplers that evaluate more than once per step), starts empty, and is
    cleared when a call's sigma is higher than the previous call's (a new generation, ComfyUI's rule) or
    by :meth:`reset`. Make one GuidedDenoiser per generation.

    ``negative_until`` (keyword-only, a fraction of the model's time or None) zeroes the negative part way:
    ComfyUI's SD3 example graphs give the sampler the negative text's encoding with the timestep range
    [0, p] combined with its ``ConditioningZeroOut`` (zero context and pooled vector, same shapes) with
    the range [p, 1]. ComfyUI keeps a conditioning whose range covers the call's sigma
    (``comfy/samplers.py`` ``get_area_and_mult``: active while ``sigma_end <= sigma <= sigma_start``, the
    bounds by ``percent_to_sigma``), so the text guides while ``sigma >= percent_to_sigma(p)``, the zeros
    while ``sigma <= percent_to_sigma(p)``, and at that sigma itself (a schedule can hit it exactly) the
    uncond prediction is the mean of both, as ComfyUI averages overlapping conditionings. ``0`` means the
    zeroed negative throughout (``ConditioningZeroOut`` alone); None the text throughout.

    ``control`` (keyword-only, :class:`sd35.control.apply.Controls`): ControlNets whose residuals every model
    call adds, computed on that call's own batch (cond and uncond rows alike, and the SLG pass), each unit
    acting in its window of the step this call belongs to (:meth:`step_index`, over the full schedule).
    """

    def __init__(
        self,
        mmditx: MMDiTX,
        cond: Conditioning,
        uncond: Conditioning | None,
        cfg: float,
        slg: SkipLayerGuidance | None,
        sigmas: torch.Tensor,
        *,
        apg: APG | None = None,
        control: Controls | None = None,
        shift: float = 3.0,
        negative_until: float | None = None,
    ):
        if slg is not None and not (isinstance(slg, SkipLayerGuidance) and slg.complete):
            raise TypeError(f"slg must be a complete SkipLayerGuidance or None, got {slg!r}")
        if apg is not None and not isinstance(apg, APG):
            raise TypeError(f"apg must be an APG or None, got {type(apg).__name__}")
        if not math.isfinite(cfg):
            raise SD35Error(f"the CFG scale must be a finite number, got {cfg!r}.")
        if uncond is None and cfg != 1:
            raise SD35Error(
                f"CFG scale {cfg} needs the negative (uncond) conditioning; only cfg 1 works without."
            )
        sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float32)
        if sigmas.dim() != 1 or len(sigmas) < 2:
            raise SD35Error(
                f"the guidance needs the full 1-D sigma schedule, got shape {tuple(sigmas.shape)}."
            )
        depth = getattr(getattr(mmditx, "config", None), "depth", None)
        if slg is not None and depth is not None:
            check_slg_layers(slg, depth)
        self.mmditx = mmditx
        self.denoise = flow_denoiser(mmditx)
        self.cond = cond
        self.uncond = None if cfg == 1 else uncond
        self.cfg = float(cfg)
        self.sigmas = sigmas
        self.steps = len(sigmas) - 1
        self.slg = slg
        self.apg = apg
        self.control = control
        self.shift = float(shift)
        self.negative_until = negative_until
        self.reset()

    def reset(self) -> None:
        """Forget the APG momentum (done automatically when sigma goes up between calls)."""
        self._apg_running: torch.Tensor | None = None
        self._apg_last_sigma: float | None = None

    def apg_combine(self, d_cond: torch.Tensor, d_uncond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The APG result for one call (see :class:`APG`), updating the momentum state."""
        apg = self.apg
        assert apg is not None
        guidance = d_cond - d_uncond
        if apg.momentum != 0:
            value = float(sigma.reshape(-1)[0])
            running = self._apg_running
            if (
                running is None
                or running.shape != guidance.shape
                or (self._apg_last_sigma is not None and value > self._apg_last_sigma)
            ):
                running = torch.zeros_like(guidance)
            guidance = guidance + apg.momentum * running.to(guidance.device)
            self._apg_running, self._apg_last_sigma = guidance, value
        if apg.norm_threshold > 0:
            norm = torch.linalg.vector_norm(guidance, dim=_image_dims(guidance), keepdim=True)
            guidance = guidance * torch.clamp(apg.norm_threshold / norm, max=1.0)
        parallel, orthogonal = apg_project(guidance, d_cond)
        return d_cond + (self.cfg - 1) * (orthogonal + apg.eta * parallel)

    def step_index(self, sigma: torch.Tensor) -> int:
        """The schedule step a sigma belongs to: the largest ``i`` with ``sigmas[i] >= sigma`` (see class doc)."""
        value = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        at_or_above = torch.nonzero(self.sigmas >= value * (1 - SIGMA_RTOL)).flatten()
        return int(at_or_above[-1]) if len(at_or_above) else 0

    def slg_active(self, sigma: torch.Tensor) -> bool:
        """Whether the call at ``sigma`` gets the Skip Layer Guidance pass (by step or by sigma, as
        ``slg.window`` says)."""
        if self.slg is None:
            return False
        if self.slg.window == "sigma":
            return self.slg.active_at_sigma(_sigma_value(sigma), self.shift)
        return self.slg.active(self.step_index(sigma), self.steps)

    def negative_parts(self, sigma: torch.Tensor) -> tuple[bool, bool]:
        """Whether the call at ``sigma`` uses the negative text, and whether its zeroed form
        (``negative_until``, see the class doc; both: their mean)."""
        p = self.negative_until
        if p is None:
            return True, False
        if p <= 0:
            return False, True
        edge = percent_to_sigma(p, self.shift)
        value = _sigma_value(sigma)
        return value >= edge * (1 - SIGMA_RTOL), value <= edge * (1 + SIGMA_RTOL)

    def _uncond_denoised(
        self, x: torch.Tensor, sigma: torch.Tensor, u_y: torch.Tensor, u_ctx: torch.Tensor, ctl
    ) -> torch.Tensor:
        """``D_uncond`` when the negative is zeroed for part of the time (``negative_until``)."""
        text, zero = self.negative_parts(sigma)
        outs = []
        if text:
            outs.append(self.denoise(x, sigma, u_y, u_ctx, control=ctl))
        if zero:
            outs.append(self.denoise(x, sigma, torch.zeros_like(u_y), torch.zeros_like(u_ctx), control=ctl))
        return outs[0] if len(outs) == 1 else (outs[0] + outs[1]) / 2

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        c_ctx, c_y = (t.to(x.device) for t in _batched(self.cond, batch, "the prompt"))
        ctl = (
            None if self.control is None else ControlStep(self.control, (self.step_index(sigma), self.steps))
        )
        if self.uncond is None:
            d_cond = self.denoise(x, sigma, c_y, c_ctx, control=ctl)
            out = d_cond
        else:
            u_ctx, u_y = (t.to(x.device) for t in _batched(self.uncond, batch, "the negative prompt"))
            if self.negative_until is not None:
                d_cond = self.denoise(x, sigma, c_y, c_ctx, control=ctl)
                d_uncond = self._uncond_denoised(x, sigma, u_y, u_ctx, ctl)
            elif u_ctx.shape[1:] == c_ctx.shape[1:]:
                both = self.denoise(
                    torch.cat([x, x]),
                    torch.cat([sigma, sigma]),
                    torch.cat([c_y, u_y]),
                    torch.cat([c_ctx, u_ctx]),
                    control=ctl,
                )
                d_cond, d_uncond = both.chunk(2)
            else:
                d_cond = self.denoise(x, sigma, c_y, c_ctx, control=ctl)
                d_uncond = self.denoise(x, sigma, u_y, u_ctx, control=ctl)
            if self.apg is None:
                out = d_uncond + (d_cond - d_uncond) * self.cfg
            else:
                out = self.apg_combine(d_cond, d_uncond, sigma)
        if self.slg_active(sigma):
            d_skip = self.denoise(x, sigma, c_y, c_ctx, self.slg.layers, control=ctl)
            out = out + (d_cond - d_skip) * self.slg.scale
        return out
