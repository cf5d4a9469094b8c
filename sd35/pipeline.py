"""Text to image: a :class:`~sd35.request.GenerateRequest` in, a :class:`~sd35.result.GenerateResult` out.

:class:`SD3Pipeline` holds the loaded models and runs one procedure for every request (tokenize, encode,
sample with CFG and optional Skip Layer Guidance, decode), as the official reference's
``SD3Inferencer.gen_image`` does (Stability-AI/sd3.5 ``sd3_infer.py``). With SD3.5 Medium's defaults
(:data:`sd35.presets.SD35_MEDIUM`) a request with only a prompt makes the image the reference makes for the
same seed, up to floating-point rounding (the reference runs fp16 on GPUs).

:meth:`SD3Pipeline.run_batch` samples several txt2img requests that differ only in prompts, seeds and image
counts (one :func:`batch_key`) as one batch, for a server's throughput; each image equals its :meth:`run`
image up to the rounding of batched matrix products.

Loading lives in :mod:`sd35.loading.assemble`; defaults in :mod:`sd35.presets`; the request and its
model-independent checks in :mod:`sd35.request`; the A1111 infotext in :mod:`sd35.a1111`.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from sd35.a1111 import request_infotext
from sd35.conditioning.encode import TextConditioner
from sd35.conditioning.tokenize import SD3Tokenizer
from sd35.control.apply import ActiveControl, Controls
from sd35.control.files import check_fits, load_controlnet, read_controlnet
from sd35.control.image import fit_image, image_pixels
from sd35.control.preprocess import preprocess
from sd35.control.unit import ControlUnit
from sd35.errors import Cancelled, InvalidRequest, NotFound, SD35Warning, Unsupported
from sd35.imaging import (
    comfy_latent_mask,
    composite,
    image_to_tensor,
    latent_mask,
    mask_to_tensor,
    tensor_to_image,
)
from sd35.memory import BlockStreamer, MemoryPlan, apply_memory_mode, check_memory_mode, move_except
from sd35.models.controlnet import ControlNet
from sd35.models.family import Identity, identify
from sd35.models.mmditx import MMDiTX
from sd35.models.step_cache import CachedRunner, FirstBlockCache, parse_step_cache
from sd35.models.vae import LATENT_SCALE, LATENT_SHIFT, VAE, latent_to_model, model_to_latent
from sd35.models.vae_tiling import LOW_MEMORY_TILING, Tiling
from sd35.presets import ModelDefaults, defaults_for
from sd35.prompt_cache import PromptCache
from sd35.request import Edit, GenerateRequest, HiresFix, LoraRef, TextOptions
from sd35.result import GenerateResult, Progress, Stage
from sd35.sampling.guidance import GuidedDenoiser, check_slg_layers
from sd35.sampling.inpaint import sample_from
from sd35.sampling.noise import BatchRows, Generators, NoiseSampler, stack_rows, stream_noise
from sd35.sampling.schedules import (
    comfy_denoise_sigmas,
    get_sigmas,
    img2img_sigmas,
    img2img_start,
    step_window,
)
from sd35.sampling.stochastic import comfy_noise_sampler

if TYPE_CHECKING:
    from sd35.accel import GraphedDenoiser

Conditioning = tuple[torch.Tensor, torch.Tensor]
ProgressCallback = Callable[[Progress], None]
BatchProgressCallback = Callable[[int, Progress], None]
"""``on_progress(request_index, progress)`` of :meth:`SD3Pipeline.run_batch`."""
WarningCallback = Callable[[str], None]
VAE_TILING = ("auto", "on", "off")
# "auto" tiles the VAE above this many pixels on CUDA (or always in the "low" memory mode): at 1024^2 the
# untiled decode's activations (~2 GB in bf16) are the pipeline's memory peak, and they grow with the area
AUTO_TILE_PIXELS = 1024 * 1024
PROMPT_CACHE_SIZE = 32
ASPECT_SLACK = 0.02  # a mask or init image whose aspect ratio differs by more than this is not just rescaled


@dataclass(frozen=True)
class LatentStart:
    """Internal (ComfyUI workflows, :mod:`sd35.workflows.run`): sample from a LATENT that earlier nodes
    made, as ComfyUI's KSampler and KSamplerAdvanced do (``nodes.common_ksampler``), instead of from noise
    or the request's init image. The request gives everything else; its size and ``num_images`` must be
    the latent's.

    ``latent`` is ``(num_images, C, h, w)`` in the model's space (all zeros: ComfyUI's empty latent, which
    it leaves unshifted); ``mask`` ComfyUI's ``noise_mask`` (``(n, 1, H, W)`` in [0, 1], any size: resized
    bilinearly to the latent, row i of image i, repeated as ComfyUI repeats it). ``denoise`` is KSampler's
    (:func:`~sd35.sampling.schedules.comfy_denoise_sigmas`); ``start_step``, ``last_step``,
    ``force_full_denoise`` KSamplerAdvanced's window (:func:`~sd35.sampling.schedules.step_window`);
    ``add_noise`` False starts from the latent as it is (its leftover noise). A window that ends above
    sigma 0 returns ComfyUI's ``inverse_noise_scaling`` of the result (``x / (1 - sigma)``), which the next
    sampler's ``(1 - sigma) * latent`` start undoes.
    """

    latent: torch.Tensor
    mask: torch.Tensor | None = None
    denoise: float = 1.0
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False
    add_noise: bool = True


class CheckedRequest(NamedTuple):
    """A request resolved against the loaded model and checked to fit it, with what the user should know."""

    request: GenerateRequest
    warnings: tuple[str, ...]


def check_vae_tiling(value: str) -> str:
    """``value`` if it is one of :data:`VAE_TILING`, else an :class:`InvalidRequest` naming them."""
    if value not in VAE_TILING:
        raise InvalidRequest(
            f"unknown vae_tiling {value!r}; choose one of {', '.join(VAE_TILING)}.", param="vae_tiling"
        )
    return value


def hires_schedule_steps(steps: int, strength: float) -> int:
    """The full schedule length whose img2img cut at ``strength`` runs exactly ``steps`` steps.

    The cut keeps ``n - int(n * (1 - strength))`` of ``n`` steps (:func:`~sd35.sampling.img2img_sigmas`,
    the reference's rounding), which grows by 0 or 1 as ``n`` grows; start from ``steps / strength`` and
    walk to the length that gives exactly ``steps`` (A1111's "Hires steps" is the count actually run).
    """
    n = max(steps, round(steps / strength))
    while n - int(n * (1 - strength)) > steps:
        n -= 1
    while n - int(n * (1 - strength)) < steps:
        n += 1
    return n


PER_REQUEST_FIELDS = frozenset({"prompt", "negative_prompt", "seed", "num_images"})
"""The :class:`~sd35.request.GenerateRequest` fields that may differ between the requests of one sampling
batch (:func:`batch_key`); every other field must be equal."""


def batch_key(request: GenerateRequest) -> tuple | None:
    """What must be equal for resolved requests to share one sampling batch (:meth:`SD3Pipeline.run_batch`).

    A hashable tuple of ``(field, value)`` pairs of every request field but :data:`PER_REQUEST_FIELDS`
    (the size, steps, cfg, sampler, scheduler, shift, SLG, APG, LoRAs and text options; a field added to
    the request later joins the key by itself). None for a request that is never batched: img2img,
    inpainting and outpainting (``edit``), ``hires`` and ControlNet (``controls``) requests run one by
    one with :meth:`SD3Pipeline.run`.
    ``request`` must be resolved (:meth:`SD3Pipeline.check` gives that), else ``ValueError``.
    """
    if not request.is_resolved:
        raise ValueError("batch_key needs a resolved request: pass SD3Pipeline.check(request).request.")
    if request.edit is not None or request.hires is not None or request.controls:
        return None
    return tuple(
        (f.name, getattr(request, f.name)) for f in fields(request) if f.name not in PER_REQUEST_FIELDS
    )


def check_batch(requests: Sequence[GenerateRequest]) -> None:
    """Refuse resolved ``requests`` that cannot share one sampling batch, with an :class:`InvalidRequest`
    naming the first request (by index) and setting that stops it."""
    keys = [batch_key(req) for req in requests]
    for i, (req, key) in enumerate(zip(requests, keys, strict=True)):
        if key is None:
            param = "edit" if req.edit is not None else "hires" if req.hires is not None else "controls"
            raise InvalidRequest(
                f"request {i} cannot share a sampling batch: img2img, inpainting, outpainting, hires fix "
                "and ControlNet requests run one by one (SD3Pipeline.run).",
                param=param,
            )
        if key != keys[0]:
            differ = [name for (name, a), (_, b) in zip(keys[0], key, strict=True) if a != b]
            raise InvalidRequest(
                f"the requests of one batch may differ only in {', '.join(sorted(PER_REQUEST_FIELDS))}; "
                f"request {i} differs from request 0 in {', '.join(differ)}.",
                param=differ[0],
            )


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

StepNoise = Callable[[torch.Tensor, torch.Tensor], NoiseSampler | None]
"""``step_noise(x, sigmas) -> noise sampler`` for an image sampled from ``x`` on the schedule ``sigmas``;
None means the generator's own stream (the samplers' default)."""


def _own_step_noise(x: torch.Tensor, sigmas: torch.Tensor) -> None:
    """``noise="sd35"``: the samplers draw on from the image's generator."""
    return None


def _comfy_step_noise(sampler: str, seed: int, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
    """``noise="comfyui"`` for one image with its own seed (ComfyUI's batch of one)."""
    return comfy_noise_sampler(sampler, x, sigmas, seed)


def _step_callback(
    on_progress: ProgressCallback | None,
    cancel: Callable[[], bool] | None,
    image: int,
    images: int,
    stage: Stage,
    stages: int,
) -> StepCallback:
    """The sampler's ``callback(step, total, x, denoised)``: report a :class:`Progress`, then honour ``cancel``."""

    def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if on_progress is not None:
            on_progress(Progress(image, images, stage, stages, step, total, x, denoised))
        _check_cancel(cancel)

    return callback


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    """Raise :class:`Cancelled` if ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise Cancelled("the request was cancelled.")


def _tell(on_warning: WarningCallback | None, notes: Sequence[str]) -> None:
    if on_warning is not None:
        for note in notes:
            on_warning(note)


def _stack(conds: Sequence[Conditioning]) -> Conditioning:
    """One ``(context, pooled)`` batch of per-row conditionings of equal context length."""
    return torch.cat([c[0] for c in conds]), torch.cat([c[1] for c in conds])


def _context_groups(conds: Sequence[tuple[Conditioning, Conditioning | None]]) -> list[list[int]]:
    """The indices of ``conds`` grouped by context shape (contexts of other lengths cannot share a batch),
    groups and members in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (cond, _) in enumerate(conds):
        groups.setdefault(tuple(cond[0].shape[1:]), []).append(i)
    return list(groups.values())


def _row_spans(group: Sequence[int], reqs: Sequence[GenerateRequest]) -> list[tuple[int, int, int]]:
    """``(request index, first row, end row)`` of each request of a group in its sampling batch."""
    spans, row = [], 0
    for r in group:
        spans.append((r, row, row + reqs[r].num_images))
        row += reqs[r].num_images
    return spans


def _fan_out(
    on_progress: BatchProgressCallback, spans: Sequence[tuple[int, int, int]], progress: Progress
) -> None:
    """Report a batch's step to each request of it: its rows, as all of its images advancing together."""
    for r, lo, hi in spans:
        n = hi - lo
        rows = replace(
            progress, image=0, images=n, batch=n, x=progress.x[lo:hi], denoised=progress.denoised[lo:hi]
        )
        on_progress(r, rows)


def _aspect_differs(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) > ASPECT_SLACK * (b[0] / b[1])


class SD3Pipeline:
    """The loaded models plus the procedure that turns a request into images.

    ``defaults`` (:class:`~sd35.presets.ModelDefaults`) are what a request leaves unset means for this model;
    by default those of the release ``identity`` names (:mod:`sd35.models.family`; by default the one the
    MMDiT-X's shapes name). ``memory`` ("high", "balanced", "low"; see
    :mod:`sd35.memory`) places the models: the compute device is ``device``, by default the one the MMDiT-X
    is on. ``vae_tiling`` ("auto", "on", "off") decodes and encodes large images in tiles
    (:class:`sd35.models.vae_tiling.Tiling`, settable as ``self.tiling``: 1024 px tiles, or 512 px in the
    "low" memory mode); "auto" tiles above 1024x1024 on CUDA, and always in the "low" memory mode. Prompt
    embeddings are cached (``prompt_cache_size`` entries, LRU), so a repeated prompt does not run the text
    encoders again. ``lora_source`` turns a request's LoRA name into a file (default: the name is a path;
    a server passes one that looks names up in its models folder and never accepts a path);
    ``control_source`` does the same for ControlNet names. ControlNets are loaded when a request first
    names them, in the MMDiT-X's dtype, placed as ``memory`` places the MMDiT-X (on the device; in "low"
    their joint blocks stream), and kept while requests go on naming them.
    """

    def __init__(
        self,
        mmditx: MMDiTX,
        vae: VAE,
        text: TextConditioner,
        tokenizer: SD3Tokenizer,
        model_name: str = "sd3.5_medium",
        *,
        defaults: ModelDefaults | None = None,
        identity: Identity | None = None,
        memory: str = "high",
        vae_tiling: str = "auto",
        device: str | torch.device | None = None,
        prompt_cache_size: int = PROMPT_CACHE_SIZE,
        lora_source: Callable[[str], Path] | None = None,
        control_source: Callable[[str], Path] | None = None,
    ):
        self.memory = check_memory_mode(memory)
        self.vae_tiling = check_vae_tiling(vae_tiling)
        self.tiling = LOW_MEMORY_TILING if memory == "low" else Tiling()
        self.mmditx, self.vae, self.text, self.tokenizer = mmditx, vae, text, tokenizer
        self.model_name = model_name
        self.identity = identity if identity is not None else identify(mmditx.config)
        self.defaults = (
            defaults if defaults is not None else defaults_for(mmditx.config, None, self.identity.variant)
        )
        self.lora_source = lora_source or lora_file
        self.control_source = control_source or controlnet_file
        self.controlnets: dict[
            Path, ControlNet
        ] = {}  # loaded ControlNets by file, those the last request named
        self._control_streams: dict[Path, BlockStreamer] = {}
        self.loras: dict[str, float] = {}  # name -> strength of every applied LoRA, for the infotext
        self._request_loras: dict[str, LoraRef] = {}  # applied for the current request: loaded name -> ref
        self._text_loras: set[str] = set()  # loaded LoRAs that change a text encoder
        self._device = torch.device(device) if device is not None else mmditx.pos_embed.device
        self.plan: MemoryPlan | None = None
        if memory != "high" or device is not None:
            self.plan = apply_memory_mode(
                memory, self._device, mmditx, vae, [text.clip_l, text.clip_g, text.t5]
            )
        # high mode keeps embeddings where they are made (no copy per image); the others keep device memory free
        self.prompt_cache = PromptCache(prompt_cache_size, device=None if memory == "high" else "cpu")
        self.runner: torch.nn.Module | GraphedDenoiser = mmditx  # what sampling calls; see accelerate()
        self.accelerations: list[str] = []

    @property
    def device(self) -> torch.device:
        """The compute device."""
        return self._device

    @property
    def components(self) -> dict[str, torch.nn.Module | None]:
        """The networks by role: ``mmditx``, ``vae``, ``clip_l``, ``clip_g`` and ``t5`` (None without T5)."""
        t = self.text
        return {"mmditx": self.mmditx, "vae": self.vae, "clip_l": t.clip_l, "clip_g": t.clip_g, "t5": t.t5}

    def vae_tiling_for(self, width: int, height: int) -> Tiling | None:
        """The tiling the VAE uses for a ``width`` x ``height`` image under ``vae_tiling``, or None (untiled)."""
        if self.vae_tiling == "off":
            return None
        if self.vae_tiling == "on" or self.memory == "low":
            return self.tiling
        big = self.device.type == "cuda" and width * height > AUTO_TILE_PIXELS
        return self.tiling if big else None

    def accelerate(self, *, fp8: bool = False, compile: bool = False, cuda_graphs: bool = False) -> list[str]:
        """Switch on the fast paths of :mod:`sd35.accel`, in the only order that composes.

        ``fp8``: e4m3 weights with per-tensor scales in the joint blocks' big linears, run by
        ``torch._scaled_mm`` (needs compute capability 8.9+). ``compile``: ``torch.compile`` per joint block
        (three graph variants, so compiling takes seconds, not minutes; on the GPU or the CPU). ``cuda_graphs``: one captured graph
        per (size, batch, skip layers), replayed so small images are not launch-bound. Streaming blocks
        (``memory="low"``) installs hooks on every block, which neither compiling nor graphs can capture.
        """
        from sd35.accel.apply import accelerate, check_accelerations

        check_accelerations(self.device, self.memory, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs)
        runner, _ = accelerate(  # extends self.accelerations in place
            self.mmditx, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs, applied=self.accelerations
        )
        if runner is not self.mmditx:  # graphs applied now; a runner from an earlier call stays otherwise
            self.runner = runner
        return list(self.accelerations)

    # ------------------------------------------------------------------------------------ prompts

    def _encode(self, prompts: Sequence[str], text: TextOptions, notes: list[str]) -> Conditioning:
        """``(context, pooled)`` for a batch of prompts, cached; truncation notes are appended to ``notes``."""
        prompts = list(prompts)
        # always tokenized (it is cheap), so that truncation notes come again on a cache hit
        tokens = self.tokenizer(
            prompts, t5_max_tokens=text.t5_max_tokens, weighting=text.weighting, long_clip=text.long_clip
        )
        for p, dropped in zip(prompts, tokens.t5_dropped, strict=True):
            if dropped:
                notes.append(
                    f"the prompt is longer than the T5 limit of {text.t5_max_tokens} tokens (t5_max_tokens): "
                    f"T5 dropped its last {dropped} token(s) ({p[:40]!r}...)."
                )
        for p, dropped in zip(prompts, tokens.clip_dropped, strict=True):
            if dropped:
                notes.append(
                    f"CLIP reads only the first 75 tokens: {dropped} token(s) of {p[:40]!r}... are not seen by CLIP."
                )
        key = (tuple(prompts), text.t5_max_tokens, text.weighting, text.long_clip)
        cached = self.prompt_cache.get(key, self.device)
        if cached is not None:
            return cached
        if self.plan is not None:
            with self.plan.text_on_device():
                result = self.text(tokens)
        else:
            result = self.text(tokens)
        self.prompt_cache.put(key, result)
        return result

    def encode_prompt(self, prompt: str | Sequence[str], text: TextOptions | None = None) -> Conditioning:
        """``(context, pooled)`` for one prompt or a list; every row padded to the same length.

        ``text`` (:class:`~sd35.request.TextOptions`) sets the T5 token limit, ``(word:1.2)`` weighting and
        long CLIP prompts. A truncated prompt is reported as an :class:`~sd35.errors.SD35Warning`. Results
        are cached by (prompts, text options); see :mod:`sd35.prompt_cache`.
        """
        notes: list[str] = []
        result = self._encode([prompt] if isinstance(prompt, str) else prompt, text or TextOptions(), notes)
        for note in notes:
            warnings.warn(note, SD35Warning, stacklevel=2)
        return result

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (call this after changing a text encoder's weights by hand)."""
        self.prompt_cache.clear()

    # ------------------------------------------------------------------------------------ requests

    def check(self, request: GenerateRequest) -> CheckedRequest:
        """``request`` resolved against this model's defaults and checked to fit the model.

        Raises an :class:`~sd35.errors.SD35Error` naming the field for what cannot run here (a size beyond
        the position grid, SLG blocks the model lacks, an unknown LoRA, img2img with a decoder-only VAE);
        returns the notes a user should see (a size beyond what the model was trained at, an image resized).
        """
        req = request.resolved(self.defaults)
        notes: list[str] = []
        self._check_size(req.width, req.height, ("width", "height"), notes)
        if req.hires is not None:
            self._check_size(*req.hires.size(req.width, req.height), ("hires.scale", "hires.scale"), notes)
        if req.slg is not None:
            check_slg_layers(req.slg, self.mmditx.config.depth)
        if req.edit is not None:
            notes += self._check_edit(req.edit, req.width, req.height)
            if req.edit.strength > 0 and req.edit.mode == "sd35":  # 0: a VAE round trip, no sampling
                img2img_start(req.steps, req.edit.strength, param="edit.strength")
        for ref in req.loras:
            self.lora_source(ref.name)  # raises NotFound for an unknown name
        for unit in req.controls:  # names and files checked from their headers: nothing loads here
            self._check_controlnet(self.control_source(unit.model))
        return CheckedRequest(req, tuple(notes))

    def _check_size(self, width: int, height: int, params: tuple[str, str], notes: list[str]) -> None:
        """A pass's size must fit the position grid; beyond the trained size it runs, with a note."""
        largest = self.mmditx.config.max_image_size
        for param, side in zip(params, (width, height), strict=True):
            if side > largest:
                what = "the hires pass's size" if param.startswith("hires") else param
                raise InvalidRequest(
                    f"{what} {side} is larger than this model's position grid allows (at most {largest} px).",
                    param=param,
                )
        if max(width, height) > self.defaults.trained_size:
            notes.append(
                f"{width}x{height} is beyond the {self.defaults.trained_size} px this model ({self.defaults.name}) "
                "was trained at; expect repeated or broken shapes."
            )

    def _check_edit(self, edit: Edit, width: int, height: int) -> list[str]:
        if not self.vae.config.has_encoder:
            raise Unsupported(
                "img2img and inpainting need the VAE's encoder, and the loaded VAE has only a decoder; "
                "load the full SD3 VAE.",
                param="edit",
            )
        notes = []
        size = edit.canvas_size
        if size != (width, height):
            stretched = " (its aspect ratio changes)" if _aspect_differs(size, (width, height)) else ""
            notes.append(
                f"the init image is {size[0]}x{size[1]}; it is resized to {width}x{height}{stretched}."
            )
        if edit.mask is not None and edit.mask.size != edit.image.size:
            if _aspect_differs(edit.mask.size, edit.image.size):
                raise InvalidRequest(
                    f"the mask is {edit.mask.width}x{edit.mask.height} but the init image is "
                    f"{edit.image.width}x{edit.image.height}, another shape; give a mask of the image's size.",
                    param="edit.mask",
                )
            notes.append(
                f"the mask is {edit.mask.width}x{edit.mask.height}; it is resized to the init image's "
                f"{edit.image.width}x{edit.image.height}."
            )
        return notes

    def infotext(self, request: GenerateRequest, seed: int, width: int, height: int) -> str:
        """The A1111-style ``parameters`` text of one image of a resolved request (with the applied LoRAs)."""
        return request_infotext(request, seed, (width, height), self.model_name, self.loras)

    @torch.no_grad()
    def run(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        on_warning: Callable[[str], None] | None = None,
        *,
        start: LatentStart | None = None,
    ) -> GenerateResult:
        """The images of ``request``; image i uses seed+i (or, with ``batch_noise="batch"``, row i of the
        batch's noise drawn from ``seed``, ComfyUI's way: :meth:`_image_noises`).

        txt2img by default; with ``request.edit`` img2img (from the init image noised to the strength),
        inpainting (with a mask: masked latent blending at every step, then a pixel composite) or
        outpainting; ``request.hires`` adds a second, upscaled img2img pass. ``on_progress`` gets a
        :class:`~sd35.result.Progress` after every step; ``cancel()`` is asked after every step and a true
        answer stops the run with :class:`~sd35.errors.Cancelled`; ``on_warning`` gets each note as it
        arises (they are also in the result). ``start`` (internal, for ComfyUI workflows: :class:`LatentStart`)
        samples from a latent made elsewhere. The result's ``latents`` hold each image's final latent.
        """
        timings: dict[str, float] = {}
        begin = time.perf_counter()
        checked = self.check(request)
        req, notes = checked.request, list(checked.warnings)
        _tell(on_warning, notes)
        self._apply_request_loras(req.loras)
        cond, uncond = self._conditioning(req, notes, on_warning)
        timings["encode"] = time.perf_counter() - begin

        width, height = req.width, req.height
        latent_shape = self._latent_shape(width, height)
        canvas, mask = req.edit.canvas() if req.edit is not None else (None, None)
        comfy = start is not None or (req.edit is not None and req.edit.mode == "comfyui")
        init_latent = self.encode_image(canvas, width, height) if canvas is not None else None
        pixel_mask = mask_to_tensor(mask, width, height, req.edit.mask_blur) if mask is not None else None
        if start is not None:
            self._check_start(start, req, latent_shape)
            init_latent, pixel_mask = start.latent.to(self.device), start.mask
        lmask = None
        if pixel_mask is not None:
            resize = comfy_latent_mask if comfy else latent_mask
            lmask = resize(pixel_mask, *latent_shape[2:]).to(self.device)
        sigmas, run_sigmas = self._schedule(req, start)
        stages = 2 if req.hires is not None else 1
        self._load_controlnets(req.controls)  # in the run, never in check(): a server checks on other threads
        control = (
            functools.cache(functools.partial(self._controls, req.controls, req.shift))
            if req.controls
            else None
        )

        images, infotexts, latents = [], [], []
        sample_time = decode_time = 0.0
        noises = self._image_noises(req, latent_shape)
        for i, seed in enumerate(req.seeds):
            _check_cancel(cancel)
            t0 = time.perf_counter()
            noise, generator, step_noise = noises[i]
            init = init_latent if start is None else init_latent[i : i + 1]
            row_mask = None if lmask is None else lmask[i % len(lmask) : i % len(lmask) + 1]
            if start is not None and not start.add_noise:
                noise = torch.zeros_like(noise)

            def report(stage: Stage, image: int = i) -> StepCallback:
                return _step_callback(on_progress, cancel, image, req.num_images, stage, stages)

            if init is not None and len(run_sigmas) < 2:
                latent = init  # nothing to denoise: the input as it came (through the VAE for an edit)
            else:
                latent = self._sample(
                    req, cond, uncond, sigmas, run_sigmas, noise, generator, init, row_mask, report("base"),
                    control, step_noise,
                )  # fmt: skip
                if start is not None and run_sigmas[-1] != 0:
                    latent = latent / (1.0 - run_sigmas[-1].to(latent))  # ComfyUI's leftover noise
            if req.hires is not None:
                latent = self._hires_pass(req, latent, cond, uncond, generator, report("hires"), control)
            latents.append(latent)
            t1 = time.perf_counter()
            image = self.decode_latent(latent)
            if pixel_mask is not None and not comfy:
                image = composite(image, canvas, pixel_mask)
            images.append(self._labelled(image, req, seed))
            infotexts.append(image.info["parameters"])
            sample_time += t1 - t0
            decode_time += time.perf_counter() - t1
        timings.update(sample=sample_time, decode=decode_time, total=time.perf_counter() - begin)
        return GenerateResult(images, req.seeds, req, infotexts, notes, timings, latents)

    def _schedule(self, req: GenerateRequest, start: LatentStart | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full schedule (what the guidance counts steps over) and the sigmas sampled: the request's
        schedule, cut at the edit strength the reference's way or ComfyUI's (``edit.mode``), or a
        :class:`LatentStart`'s denoise and step window, as ComfyUI's KSampler (Advanced) cuts it."""
        name, steps, shift, sampler = req.scheduler, req.steps, req.shift, req.sampler
        if start is not None:
            full = comfy_denoise_sigmas(name, steps, start.denoise, shift, sampler=sampler)
            return full, step_window(full, start.start_step, start.last_step, start.force_full_denoise)
        strength = req.edit.strength if req.edit is not None else 1.0
        if req.edit is not None and req.edit.mode == "comfyui":
            full = comfy_denoise_sigmas(name, steps, strength, shift, sampler=sampler)
            return full, full
        full = get_sigmas(name, steps, shift, sampler=sampler)
        if strength == 0.0:
            return full, full[:0]  # a VAE round trip
        return full, img2img_sigmas(full, strength) if strength < 1.0 else full

    def _check_start(self, start: LatentStart, req: GenerateRequest, shape: tuple[int, ...]) -> None:
        """A :class:`LatentStart` must be the request's latent: its size and image count, nothing else."""
        expected = (req.num_images, *shape[1:])
        if tuple(start.latent.shape) != expected:
            raise InvalidRequest(
                f"the start latent is {tuple(start.latent.shape)}, but the request makes {expected}.",
                param="start",
            )
        if req.edit is not None or req.hires is not None:
            raise InvalidRequest(
                "a start latent replaces the edit and the hires pass; give neither.", param="edit"
            )

    @torch.no_grad()
    def run_batch(
        self,
        requests: Sequence[GenerateRequest],
        on_progress: BatchProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        on_warning: Callable[[int, str], None] | None = None,
    ) -> list[GenerateResult]:
        """The results of several txt2img requests sampled together: one per request, as :meth:`run` gives.

        Each request is checked as :meth:`run` checks it; together they must have one :func:`batch_key`
        (only prompts, seeds and image counts differ), else :class:`~sd35.errors.InvalidRequest`. Every
        image of every request (request r's image i from seed ``r.seed + i``, its own generator as in
        :meth:`run`) is a row of one sampling batch, conditioned on its request's prompts, encoded for that
        request alone as :meth:`run` encodes them. Requests whose contexts differ in length (a prompt past
        T5's 77 tokens) cannot share a batch: each context length is sampled as its own batch, in order.
        An image equals :meth:`run`'s up to the rounding of batched matrix products.

        ``on_progress(r, progress)`` is called for each request r of the batch after every step, with all
        of r's images in one :class:`~sd35.result.Progress` (``image=0``, ``batch=num_images``, ``x`` and
        ``denoised`` their rows), so ``progress.fraction`` goes from 0 to 1 for every request.
        ``cancel()`` is asked after every step and before each batch; a true answer stops the whole batch
        with :class:`~sd35.errors.Cancelled`. ``on_warning(r, note)`` gets each note of request r as it
        arises (they are also in its result). Per result, ``timings`` are the request's own encode and
        decode seconds, its batch's sample seconds, and the seconds from the call until its images were
        done (``total``).
        """
        start = time.perf_counter()
        if not requests:
            return []
        checked = [self.check(request) for request in requests]
        reqs = [c.request for c in checked]
        check_batch(reqs)
        notes = [list(c.warnings) for c in checked]
        tell = [None if on_warning is None else functools.partial(on_warning, r) for r in range(len(reqs))]
        for r in range(len(reqs)):
            _tell(tell[r], notes[r])
        first = reqs[0]  # the settings of all
        self._apply_request_loras(first.loras)
        conds, encode_times = [], []
        for r, req in enumerate(reqs):
            t0 = time.perf_counter()
            conds.append(self._conditioning(req, notes[r], tell[r]))
            encode_times.append(time.perf_counter() - t0)

        results: dict[int, GenerateResult] = {}
        for group in _context_groups(conds):
            _check_cancel(cancel)
            t0 = time.perf_counter()
            spans = _row_spans(group, reqs)
            report = None if on_progress is None else functools.partial(_fan_out, on_progress, spans)
            callback = _step_callback(report, cancel, 0, spans[-1][2], "base", 1)
            rows = [(seed, conds[r]) for r in group for seed in reqs[r].seeds]
            latents = self._sample_rows(first, [reqs[r] for r in group], rows, callback)
            sample_time = time.perf_counter() - t0
            for r, lo, _ in spans:
                t1 = time.perf_counter()
                req = reqs[r]
                images = [
                    self._labelled(self.decode_latent(latents[lo + i : lo + i + 1]), req, seed)
                    for i, seed in enumerate(req.seeds)
                ]
                end = time.perf_counter()
                timings = dict(encode=encode_times[r], sample=sample_time, decode=end - t1, total=end - start)
                infotexts = [image.info["parameters"] for image in images]
                results[r] = GenerateResult(images, req.seeds, req, infotexts, notes[r], timings)
        return [results[r] for r in range(len(reqs))]  # every request is in one group

    def _sample_rows(
        self,
        req: GenerateRequest,
        requests: Sequence[GenerateRequest],
        rows: Sequence[tuple[int, tuple[Conditioning, Conditioning | None]]],
        callback: StepCallback,
    ) -> torch.Tensor:
        """The latents of one txt2img batch at ``req``'s settings, a row per ``(seed, (cond, uncond))`` of
        ``requests`` (in order): each row starts from the noise :meth:`run` gives that image and draws the
        step noise :meth:`run` draws for it (:meth:`_image_noises`)."""
        shape = self._latent_shape(req.width, req.height)
        per_row = [row for r in requests for row in self._image_noises(r, shape)]
        noises, generators, factories = zip(*per_row, strict=True)
        cond = _stack([c for _, (c, _) in rows])
        uncond = None if rows[0][1][1] is None else _stack([u for _, (_, u) in rows])
        sigmas = get_sigmas(req.scheduler, req.steps, req.shift, sampler=req.sampler)
        noise = torch.cat(noises)

        def step_noise(x: torch.Tensor, run: torch.Tensor) -> NoiseSampler | None:
            samplers = [make(x[i : i + 1], run) for i, make in enumerate(factories)]
            return None if samplers[0] is None else stack_rows(samplers)

        return self._sample(
            req,
            cond,
            uncond,
            sigmas,
            sigmas,
            noise,
            list(generators),
            None,
            None,
            callback,
            step_noise=step_noise,
        )

    def _conditioning(
        self, req: GenerateRequest, notes: list[str], on_warning: WarningCallback | None
    ) -> tuple[Conditioning, Conditioning | None]:
        """``(cond, uncond)`` of a resolved request on the compute device (uncond None without CFG);
        encoding notes are appended to ``notes`` and told to ``on_warning``."""
        guided = req.cfg != 1.0
        encode_notes: list[str] = []
        context, pooled = self._encode(
            [req.prompt] + ([req.negative_prompt] if guided else []), req.text, encode_notes
        )
        notes += encode_notes
        _tell(on_warning, encode_notes)
        context, pooled = (
            context.to(self.device, self.mmditx.dtype),
            pooled.to(self.device, self.mmditx.dtype),
        )
        cond = (context[:1], pooled[:1])
        uncond = (context[1:], pooled[1:]) if guided else None
        return cond, uncond

    def _latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The shape of one image's latent."""
        return (1, self.mmditx.config.in_channels, height // 8, width // 8)

    def _image_noises(
        self, req: GenerateRequest, shape: tuple[int, ...]
    ) -> list[tuple[torch.Tensor, torch.Generator, StepNoise]]:
        """Per image of a resolved request: its starting noise (on the compute device), the seeded CPU
        generator that drew it (a hires pass draws on from it) and its step noise (:data:`StepNoise`).

        ``batch_noise="per_image"``: image i's noise is ``randn`` from a generator seeded with ``seed + i``
        (A1111's way); ``"batch"``: one generator seeded with ``seed`` draws the whole batch's noise at once
        (ComfyUI's ``prepare_noise``), and image i takes row i of it. The step noise is the generator's
        stream (``noise="sd35"``; None, the samplers' default) or ComfyUI's
        (:func:`~sd35.sampling.stochastic.comfy_noise_sampler`, seeded per image or per batch alike); in
        batch mode each image gets its row of the batch's draws (:class:`~sd35.sampling.noise.BatchRows`).
        """
        sampler = req.sampler
        if req.batch_noise == "per_image":
            out = []
            for seed in req.seeds:
                generator = torch.Generator().manual_seed(seed)
                noise = torch.randn(shape, generator=generator).to(self.device)
                if req.noise == "comfyui":
                    out.append((noise, generator, functools.partial(_comfy_step_noise, sampler, seed)))
                else:
                    out.append((noise, generator, _own_step_noise))
            return out
        count, seed = req.num_images, req.seed
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, *shape[1:]), generator=generator).to(self.device)
        rows: list[BatchRows] = []

        def row_noise(i: int, x: torch.Tensor, run: torch.Tensor) -> NoiseSampler:
            if not rows:  # the first image to sample sets the batch's draws up
                whole = x.new_zeros((count, *x.shape[1:]))
                if req.noise == "comfyui":
                    rows.append(BatchRows(lambda: comfy_noise_sampler(sampler, whole, run, seed)))
                else:
                    rows.append(BatchRows(lambda: stream_noise(whole, generator)))
            return rows[0].row(i)

        return [(noise[i : i + 1], generator, functools.partial(row_noise, i)) for i in range(count)]

    def _labelled(self, image: Image.Image, req: GenerateRequest, seed: int) -> Image.Image:
        """``image`` with its infotext in ``info["parameters"]``."""
        image.info["parameters"] = self.infotext(req, seed, image.width, image.height)
        return image

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        on_progress: ProgressCallback | None = None,
        **fields: object,
    ) -> list[Image.Image]:
        """The images for ``prompt``: ``run(GenerateRequest(prompt=prompt, **fields)).images``.

        The Python convenience: any :class:`~sd35.request.GenerateRequest` field is a keyword (``steps=20``,
        ``edit=Edit(image=im, strength=0.6)``, ``slg=SkipLayerGuidance()``); notes are reported as
        :class:`~sd35.errors.SD35Warning`. Each image's ``info["parameters"]`` holds its settings.
        """
        request = GenerateRequest(prompt=prompt, negative_prompt=negative_prompt, **fields)
        result = self.run(request, on_progress=on_progress)
        for note in result.warnings:
            warnings.warn(note, SD35Warning, stacklevel=2)
        return result.images

    # ------------------------------------------------------------------------------------ sampling

    def _sample(
        self,
        req: GenerateRequest,
        cond: Conditioning,
        uncond: Conditioning | None,
        sigmas: torch.Tensor,
        run: torch.Tensor,
        noise: torch.Tensor,
        generator: Generators,
        init_latent: torch.Tensor | None,
        mask: torch.Tensor | None,
        callback: StepCallback,
        control: Callable[[int, int], Controls] | None = None,
        step_noise: StepNoise | None = None,
    ) -> torch.Tensor:
        """One sampling run over ``run`` (the whole schedule ``sigmas`` or its tail) from ``noise``
        (txt2img) or from ``init_latent`` noised to ``run[0]`` (img2img); ``generator`` may be one per row of
        ``noise`` (see :data:`~sd35.sampling.noise.Generators`); ``control(width, height)`` gives the
        request's ControlNets at this pass's size, and ``step_noise`` the stochastic samplers' noise (None:
        ``generator``'s stream)."""
        controls = None if control is None else control(noise.shape[-1] * 8, noise.shape[-2] * 8)
        denoiser = GuidedDenoiser(
            self._step_model(req),
            cond,
            uncond,
            req.cfg,
            req.slg,
            sigmas,
            apg=req.apg,
            control=controls,
            shift=req.shift,
            negative_until=req.negative_until,
        )
        return sample_from(
            req.sampler,
            denoiser,
            noise,
            run.to(self.device),
            shift=req.shift,
            latent=init_latent,
            mask=mask,
            step_noise=step_noise,
            callback=callback,
            generator=generator,
        )

    def _step_model(self, req: GenerateRequest):
        """What the sampler calls: the runner, or the MMDiT-X with a fresh step cache (``req.cache``)."""
        spec = parse_step_cache(req.cache)
        if spec is None:
            # ControlNet residuals go into the MMDiT-X's forward, which a captured CUDA graph cannot take
            return self.mmditx if req.controls else self.runner
        if self.runner is not self.mmditx:
            raise Unsupported(
                f"the step cache ({req.cache}) does not combine with {', '.join(self.accelerations)}; "
                "load the pipeline without CUDA graphs to use it.",
                param="cache",
            )
        return CachedRunner(self.mmditx, FirstBlockCache(spec.threshold))

    def _hires_pass(
        self,
        req: GenerateRequest,
        latent: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        generator: torch.Generator,
        callback: StepCallback,
        control: Callable[[int, int], Controls] | None = None,
    ) -> torch.Tensor:
        """Upscale (in latent space, or Lanczos in pixels) and refine with img2img at ``hires.strength``;
        the ControlNets (A1111's "Both" hires option) read their images at the second pass's size.

        ``hires.steps`` is the number of steps actually run (A1111's convention), see
        :func:`hires_schedule_steps`.
        """
        hires: HiresFix = req.hires
        w2, h2 = hires.size(req.width, req.height)
        if hires.upscaler == "latent":
            big = F.interpolate(latent, size=(h2 // 8, w2 // 8), mode="bicubic", align_corners=False)
        else:
            big = self.encode_image(self.decode_latent(latent).resize((w2, h2), Image.LANCZOS), w2, h2)
        full = get_sigmas(
            req.scheduler, hires_schedule_steps(hires.steps, hires.strength), req.shift, sampler=req.sampler
        )
        noise = torch.randn(big.shape, generator=generator).to(self.device)
        run = img2img_sigmas(full, hires.strength)
        return self._sample(req, cond, uncond, full, run, noise, generator, big, None, callback, control)

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """The model-space latent of ``image`` Lanczos-resized to ``width`` x ``height``: the VAE mean
        (deterministic, unlike the reference's sample), as img2img and the training cache use it."""
        return self.encode_pixels(image_to_tensor(image, width, height))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model-space latent (the VAE mean) of ``(n, 3, H, W)`` pixels in [-1, 1]."""
        tiling = self.vae_tiling_for(pixels.shape[-1], pixels.shape[-2])
        return latent_to_model(self.vae.encode(pixels.to(self.device), tiling=tiling).float())

    def decode_latent(self, latent: torch.Tensor) -> Image.Image:
        """The image of a model-space latent (the first of a batch), tiled as :meth:`vae_tiling_for` says."""
        return tensor_to_image(self.decode_pixels(latent[:1]))

    def decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        """The ``(n, 3, H, W)`` pixels in [-1, 1] of a model-space latent batch, unrounded."""
        if self.device.type == "cuda" and "cuda_graphs" not in self.accelerations:
            self.mmditx.release_caches()  # its fused-adaLN copy would add to the decode's peak; graphs keep it
        tiling = self.vae_tiling_for(latent.shape[-1] * 8, latent.shape[-2] * 8)
        return self.vae.decode(model_to_latent(latent.float()), tiling=tiling)

    # ------------------------------------------------------------------------------------ ControlNet

    def _check_controlnet(self, path: Path) -> None:
        """Refuse a ControlNet file that is foreign, broken or does not fit the MMDiT-X (its header only)."""
        if path in self.controlnets:
            return
        f = read_controlnet(path, self.mmditx.config)
        config = f.config
        check_fits(config, self.mmditx.config, path.name)
        if config.extra_channels:
            raise Unsupported(
                f"{path.name} reads {config.extra_channels} channel(s) besides the control image's latent "
                "(an inpainting ControlNet); sd35 feeds ControlNets a control image only.",
                param="controls",
            )

    def _load_controlnets(self, units: Sequence[ControlUnit]) -> None:
        """Make :attr:`controlnets` exactly the files ``units`` name: load the new ones (checked to fit the
        MMDiT-X, placed for the memory mode), drop the others."""
        paths = [self.control_source(unit.model) for unit in units]
        for path in [p for p in self.controlnets if p not in paths]:
            stream = self._control_streams.pop(path, None)
            if stream is not None:
                stream.remove()
            del self.controlnets[path]
        for path in paths:
            if path in self.controlnets:
                continue
            self._check_controlnet(path)
            storage = "cpu" if self.memory == "low" else self.device
            net = load_controlnet(path, self.mmditx.config, dtype=self.mmditx.dtype, device=storage)
            net.fused_modulation = self.memory == "high"  # its stacked adaLN copy is memory, as the MMDiT-X's
            if self.memory == "low":
                move_except(net, self.device, net.joint_blocks)
                self._control_streams[path] = BlockStreamer(net.joint_blocks, self.device, root=net)
            self.controlnets[path] = net

    def _controls(self, units: Sequence[ControlUnit], shift: float, width: int, height: int) -> Controls:
        """The ControlNets of ``units`` (loaded) with their control latents at ``width`` x ``height``."""
        active = []
        for unit in units:
            net = self.controlnets[self.control_source(unit.model)]
            active.append(ActiveControl(net, unit, self.control_latent(unit, net, width, height)))
        return Controls(active, shift)

    def control_latent(self, unit: ControlUnit, net: ControlNet, width: int, height: int) -> torch.Tensor:
        """The control image of ``unit`` fitted to the size, preprocessed and through the VAE (its mean).

        Scaled into the model's latent space; ControlNets that take zeros for the pooled text (the InstantX
        family) were trained without the VAE's shift (diffusers ``StableDiffusion3ControlNetPipeline``; ComfyUI
        drops the shift for every SD3 ControlNet), the others with it.
        """
        pixels = preprocess(image_pixels(fit_image(unit.image, width, height, unit.resize_mode)), unit)
        z = self.vae.encode((pixels * 2.0 - 1.0).to(self.device), tiling=self.vae_tiling_for(width, height))
        shift = 0.0 if net.config.force_zeros_for_pooled else LATENT_SHIFT
        return (z.float() - shift) * LATENT_SCALE

    # ------------------------------------------------------------------------------------ LoRA

    def load_lora(self, path, strength: float = 1.0, mode: str = "auto", name: str | None = None):
        """Apply a LoRA/LyCORIS/DoRA file to the MMDiT-X and text encoders (see :func:`sd35.lora.load_lora`).

        It stays until :meth:`unload_lora`; a request's own ``loras`` come and go with each request.
        Applied LoRAs and their strengths are recorded in the images' ``parameters`` (``LoRA: name:strength``).
        """
        from sd35.lora import load_lora

        if self.plan is not None:
            self.plan.synchronize()  # no asynchronous copy may still read the weights about to change
        models = {k: v for k, v in self.components.items() if k != "vae"}
        report = load_lora(models, path, strength=strength, mode=mode, name=name)
        self.loras[report.name] = report.strength
        if any(component != "mmditx" for component in report.layers):
            self._text_loras.add(report.name)
            self.prompt_cache.clear()  # the text encoders now give other embeddings
        return report

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Take LoRA ``name`` (all if None) off again; the weights come back bit for bit."""
        from sd35.lora import unload_lora

        if self.plan is not None:
            self.plan.synchronize()
        models = {k: v for k, v in self.components.items() if k != "vae"}
        removed = unload_lora(models, name)
        for n in removed:
            self.loras.pop(n, None)
            self._request_loras.pop(n, None)
        if self._text_loras.intersection(removed):
            self._text_loras.difference_update(removed)
            self.prompt_cache.clear()
        return removed

    def _apply_request_loras(self, refs: Sequence[LoraRef]) -> None:
        """Make the LoRAs applied for requests exactly ``refs`` (LoRAs loaded by :meth:`load_lora` stay).

        Each is known by its file's stem (as :meth:`load_lora` names them), so the infotext reads
        ``LoRA: style:0.8`` whether the request named a path or a server's model name.
        """
        if list(self._request_loras.values()) == list(refs):
            return
        for name in list(self._request_loras):
            self.unload_lora(name)
        for ref in refs:
            report = self.load_lora(self.lora_source(ref.name), ref.strength)
            self._request_loras[report.name] = ref


def controlnet_file(name: str) -> Path:
    """The library's ControlNet source: the name is a path to a file or a diffusers folder."""
    path = Path(name)
    if not path.exists():
        raise NotFound(f"{path}: no such ControlNet file or folder.", param="controls")
    return path


def lora_file(name: str) -> Path:
    """The library's LoRA source: the name is a path to a file (the CLI checks it before loading the model)."""
    path = Path(name)
    if not path.is_file():
        raise NotFound(f"{path}: no such LoRA file.", param="loras")
    return path
