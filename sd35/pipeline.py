"""Text to image: tokenize, encode, sample with CFG (and optional Skip Layer Guidance), decode.

The defaults reproduce the official reference's SD3.5 Medium configuration (``sd3_infer.py``
CONFIGS["sd3.5_medium"], REFERENCE.md 2.6): shift 3.0, 50 steps, CFG 5.0, the ``dpmpp_2m``
sampler, SLG off unless asked for. So ``sd35 generate`` with no options makes the image the
reference makes for the same seed (up to floating-point rounding; the reference runs fp16).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from sd35._version import __version__
from sd35.conditioning.encode import TextConditioner
from sd35.conditioning.tokenize import SD3Tokenizer
from sd35.errors import CheckpointError, MissingComponentError, SD35Error, SD35Warning
from sd35.image_io import a1111_parameters
from sd35.imaging import (
    composite,
    image_to_tensor,
    latent_mask,
    load_image,
    load_mask,
    mask_to_tensor,
    tensor_to_image,
)
from sd35.inspect import mmditx_family
from sd35.loading.components import (
    CLIP_G,
    CLIP_L,
    MMDITX,
    T5XXL,
    USUAL_FILES,
    VAE,
    Component,
    assemble,
    load_component,
    scan,
)
from sd35.memory import MemoryPlan, apply_memory_mode, check_memory_mode
from sd35.models.clip import CLIPTextConfig
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAE as VAEModel
from sd35.models.vae import latent_to_model, model_to_latent
from sd35.models.vae_tiling import LOW_MEMORY_TILING, Tiling
from sd35.prompt_cache import PromptCache
from sd35.sampling.guidance import APG, GuidedDenoiser, SkipLayerGuidance
from sd35.sampling.inpaint import MaskedDenoiser
from sd35.sampling.samplers import SAMPLER_DISPLAY_NAMES, get_sampler
from sd35.sampling.schedules import A1111_SCHEDULER_NAMES, get_sigmas, img2img_sigmas

if TYPE_CHECKING:
    from sd35.accel import GraphedDenoiser


@dataclass(frozen=True)
class Defaults:
    """SD3.5 Medium defaults of the official reference (sd3_infer.py CONFIGS["sd3.5_medium"])."""

    steps: int = 50
    cfg: float = 5.0
    sampler: str = "dpmpp_2m"
    scheduler: str = "simple"
    shift: float = 3.0
    width: int = 1024
    height: int = 1024


DEFAULTS = Defaults()
Conditioning = tuple[torch.Tensor, torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GenerationSettings:
    """What every sampling pass of one request shares."""

    steps: int
    cfg: float
    sampler: str
    scheduler: str
    shift: float
    slg: SkipLayerGuidance | None
    apg: APG | None


@dataclass(frozen=True)
class HiresFix:
    """A second pass at ``scale`` times the size: upscale ("latent" or "lanczos" in pixels), then img2img."""

    scale: float = 2.0
    steps: int | None = None  # steps run in the second pass; None = the first pass's
    strength: float = 0.5
    upscaler: str = "latent"

    def __post_init__(self) -> None:
        if self.upscaler not in ("latent", "lanczos"):
            raise SD35Error(f"unknown hires upscaler {self.upscaler!r}; choose latent or lanczos.")
        if not 1.0 < self.scale <= 4.0:
            raise SD35Error(f"hires scale must be above 1 and at most 4, got {self.scale}.")
        if not 0.0 < self.strength <= 1.0:
            raise SD35Error(f"hires strength must be in (0, 1], got {self.strength}.")
        if self.steps is not None and self.steps < 1:
            raise SD35Error(f"hires steps must be a positive integer, got {self.steps}.")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size, rounded to multiples of 16."""
        return (
            int(width * self.scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE,
            int(height * self.scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE,
        )


SIZE_MULTIPLE = 16  # 8x VAE downsampling times the patch size 2
VAE_TILING = ("auto", "on", "off")
# "auto" tiles the VAE above this many pixels on CUDA (or always in the "low" memory mode): at 1024^2 the
# untiled decode's activations (~2 GB in bf16) are the pipeline's memory peak, and they grow with the area
AUTO_TILE_PIXELS = 1024 * 1024
PROMPT_CACHE_SIZE = 32


def check_accelerations(
    device: torch.device, memory: str, *, fp8: bool = False, compile: bool = False, cuda_graphs: bool = False
) -> None:
    """Refuse fast paths that cannot run with this device or memory mode (the CLI calls it before loading)."""
    from sd35.accel.apply import check_accelerations as check

    check(device, memory, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs)


def check_vae_tiling(value: str) -> str:
    """``value`` if it is one of :data:`VAE_TILING`, else an :class:`SD35Error` naming them."""
    if value not in VAE_TILING:
        raise SD35Error(f"unknown vae_tiling {value!r}; choose one of {', '.join(VAE_TILING)}.")
    return value


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the models' official dtype), fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def check_arguments(
    width: int,
    height: int,
    steps: int,
    cfg: float,
    num_images: int,
    sampler: str,
    max_size: int | None = None,
) -> None:
    """Raise one clear SD35Error for an impossible request (the CLI calls this before loading any weights)."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            below = (
                max(SIZE_MULTIPLE, SIZE_MULTIPLE * int(v // SIZE_MULTIPLE))
                if isinstance(v, (int, float))
                else 1024
            )
            options = f"{below} or {below + SIZE_MULTIPLE}" if below < v else f"{below}"
            raise SD35Error(
                f"{name} {v} is not a multiple of {SIZE_MULTIPLE} (of at least {SIZE_MULTIPLE}); use {options}."
            )
        if max_size is not None and v > max_size:
            raise SD35Error(
                f"{name} {v} is larger than this model's position grid allows (at most {max_size} px)."
            )
    if not isinstance(steps, int) or steps < 1:
        raise SD35Error(f"steps must be a positive integer, got {steps}.")
    if not isinstance(num_images, int) or num_images < 1:
        raise SD35Error(f"num_images must be a positive integer, got {num_images}.")
    if not math.isfinite(cfg) or cfg < 0:
        raise SD35Error(f"cfg must be a finite number >= 0, got {cfg}.")
    get_sampler(sampler)


class SD3Pipeline:
    """The loaded models plus the procedure that turns a prompt into images.

    ``memory`` ("high", "balanced", "low"; see :mod:`sd35.memory`) places the models: the compute device
    is ``device``, by default the one the MMDiT-X is on. ``vae_tiling`` ("auto", "on", "off") decodes and
    encodes large images in tiles (:class:`sd35.models.vae_tiling.Tiling`, settable as ``self.tiling``: 1024 px
    tiles, or 512 px in the "low" memory mode); "auto" tiles above 1024x1024 on CUDA, and always in the
    "low" memory mode. An image no larger than one tile is never tiled. Prompt embeddings are cached
    (``prompt_cache_size`` entries, LRU), so a repeated prompt does not run the text encoders again.
    """

    def __init__(
        self,
        mmditx: MMDiTX,
        vae: VAEModel,
        text: TextConditioner,
        tokenizer: SD3Tokenizer,
        model_name: str = "sd3.5_medium",
        *,
        memory: str = "high",
        vae_tiling: str = "auto",
        device: str | torch.device | None = None,
        prompt_cache_size: int = PROMPT_CACHE_SIZE,
    ):
        self.memory = check_memory_mode(memory)
        self.vae_tiling = check_vae_tiling(vae_tiling)
        self.tiling = LOW_MEMORY_TILING if memory == "low" else Tiling()
        self.mmditx, self.vae, self.text, self.tokenizer = mmditx, vae, text, tokenizer
        self.model_name = model_name
        self.loras: dict[str, float] = {}  # name -> strength, for the PNG parameters
        self._text_loras: set[str] = set()  # loaded LoRAs that change a text encoder
        self.family = mmditx_family(mmditx.config)
        self.default_shift = 1.0 if self.family == "SD3 Medium" else DEFAULTS.shift  # reference CONFIGS
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

    def vae_tiling_for(self, width: int, height: int) -> Tiling | None:
        """The tiling the VAE uses for a ``width`` x ``height`` image under ``vae_tiling``, or None (untiled)."""
        if self.vae_tiling == "off":
            return None
        if self.vae_tiling == "on" or self.memory == "low":
            return self.tiling
        big = self.device.type == "cuda" and width * height > AUTO_TILE_PIXELS
        return self.tiling if big else None

    def accelerate(self, *, fp8: bool = False, compile: bool = False, cuda_graphs: bool = False) -> list[str]:
        """Switch on the GPU fast paths of :mod:`sd35.accel`, in the only order that composes.

        ``fp8``: e4m3 weights with per-tensor scales in the joint blocks' big linears, run by
        ``torch._scaled_mm`` (needs compute capability 8.9+). ``compile``: ``torch.compile`` per joint block
        (three graph variants, so compiling takes seconds, not minutes). ``cuda_graphs``: one captured graph
        per (size, batch, skip layers), replayed so small images are not launch-bound. Streaming blocks
        (``memory="low"``) installs hooks on every block, which neither compiling nor graphs can capture.
        """
        from sd35.accel.apply import accelerate

        check_accelerations(self.device, self.memory, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs)
        runner, _ = accelerate(  # extends self.accelerations in place
            self.mmditx, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs, applied=self.accelerations
        )
        if runner is not self.mmditx:  # graphs applied now; a runner from an earlier call stays otherwise
            self.runner = runner
        return list(self.accelerations)

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        t5_max_tokens: int = 256,
        weighting: str = "none",
        long_clip: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context, pooled)`` for one prompt or a list; every row padded to the same length.

        ``weighting`` applies ``(word:1.2)`` emphasis ("comfy" or "a1111"; "none" = the reference, which
        parses and ignores it); ``long_clip`` encodes CLIP prompts past 75 tokens in chunks.
        Results are cached by (prompts, t5_max_tokens, weighting, long_clip); see :mod:`sd35.prompt_cache`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # always tokenized (it is cheap), so that truncation warnings come again on a cache hit
        tokens = self.tokenizer(
            prompts, t5_max_tokens=t5_max_tokens, weighting=weighting, long_clip=long_clip
        )
        for p, dropped in zip(prompts, tokens.t5_dropped, strict=True):
            if dropped:
                warnings.warn(
                    f"the prompt is longer than --t5-max-tokens {t5_max_tokens}: T5 dropped its last {dropped} token(s) "
                    f"({p[:40]!r}...).",
                    SD35Warning,
                    stacklevel=2,
                )
        for p, dropped in zip(prompts, tokens.clip_dropped, strict=True):
            if dropped:
                warnings.warn(
                    f"CLIP reads only the first 75 tokens: {dropped} token(s) of {p[:40]!r}... are not seen by CLIP.",
                    SD35Warning,
                    stacklevel=2,
                )
        key = (tuple(prompts), t5_max_tokens, weighting, long_clip)
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

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (call this after changing a text encoder's weights by hand)."""
        self.prompt_cache.clear()

    def _sample(
        self,
        cond: Conditioning,
        uncond: Conditioning | None,
        settings: GenerationSettings,
        sigmas: torch.Tensor,
        strength: float,
        noise: torch.Tensor,
        generator: torch.Generator,
        init_latent: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """One sampling run from ``noise`` (txt2img) or from ``init_latent`` noised to ``strength`` (img2img)."""
        run = img2img_sigmas(sigmas, strength) if strength < 1.0 else sigmas
        denoiser = GuidedDenoiser(
            self.runner, cond, uncond, settings.cfg, settings.slg, sigmas, apg=settings.apg
        )
        # txt2img starts from pure noise; img2img from the flow forward process (REFERENCE.md 2.7)
        x = noise * run[0] if init_latent is None else run[0] * noise + (1.0 - run[0]) * init_latent
        if mask is not None:
            denoiser = MaskedDenoiser(denoiser, init_latent, noise, mask)
        sample = get_sampler(settings.sampler)
        return sample(denoiser, x, run.to(self.device), callback=callback, generator=generator)

    def _encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Model-space latent of an image (the VAE mean: deterministic, unlike the reference's sample)."""
        pixels = image_to_tensor(image, width, height).to(self.device)
        return latent_to_model(self.vae.encode(pixels, tiling=self.vae_tiling_for(width, height)).float())

    def _decode(self, latent: torch.Tensor) -> Image.Image:
        if self.device.type == "cuda" and "cuda_graphs" not in self.accelerations:
            self.mmditx.release_caches()  # its fused-adaLN copy would add to the decode's peak; graphs keep it
        tiling = self.vae_tiling_for(latent.shape[-1] * 8, latent.shape[-2] * 8)
        return tensor_to_image(self.vae.decode(model_to_latent(latent.float()), tiling=tiling))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = DEFAULTS.steps,
        cfg: float = DEFAULTS.cfg,
        seed: int | None = None,
        sampler: str = DEFAULTS.sampler,
        scheduler: str = DEFAULTS.scheduler,
        shift: float | None = None,
        slg: SkipLayerGuidance | None = None,
        apg: APG | None = None,
        num_images: int = 1,
        t5_max_tokens: int = 256,
        init_image: str | Path | Image.Image | None = None,
        strength: float | None = None,
        mask: str | Path | Image.Image | None = None,
        mask_blur: float = 8.0,
        hires: HiresFix | None = None,
        weighting: str = "none",
        long_clip: bool = False,
        callback: Callback | None = None,
    ) -> list[Image.Image]:
        """Images for ``prompt``; image i uses seed+i. Each image's ``info["parameters"]`` holds its settings.

        txt2img by default; with ``init_image`` img2img (``strength`` in [0, 1], default 0.8 like the
        reference's DENOISE); with ``mask`` too, inpainting (white = repaint; ``mask_blur`` feathers it;
        ``strength`` defaults to 1). ``hires`` adds a second, upscaled img2img pass. Width and height default to
        1024, or to the init image's size. ``weighting`` and ``long_clip``: see :meth:`encode_prompt`.
        """
        init = load_image(init_image, "init image") if init_image is not None else None
        if mask is not None and init is None:
            raise SD35Error("a mask needs an init image to inpaint (--init-image).")
        if hires is not None and mask is not None:
            raise SD35Error("hires fix and inpainting cannot be combined; inpaint at the final size instead.")
        width, height = self._size(width, height, init)
        if strength is None:
            strength = 1.0 if mask is not None else 0.8
        if init is not None and not 0.0 <= strength <= 1.0:
            raise SD35Error(f"strength must be between 0 and 1, got {strength}.")
        settings = GenerationSettings(
            steps, cfg, sampler, scheduler, self.default_shift if shift is None else shift, slg, apg
        )
        check_arguments(width, height, steps, cfg, num_images, sampler, self.mmditx.config.max_image_size)
        if hires is not None:
            check_arguments(
                *hires.size(width, height),
                hires.steps or steps,
                cfg,
                1,
                sampler,
                self.mmditx.config.max_image_size,
            )
        sigmas = get_sigmas(scheduler, steps, settings.shift)
        seed = random.randrange(2**32) if seed is None else int(seed)

        guided = cfg != 1.0
        context, pooled = self.encode_prompt(
            [prompt] + ([negative_prompt] if guided else []), t5_max_tokens, weighting, long_clip
        )
        context, pooled = (
            context.to(self.device, self.mmditx.dtype),
            pooled.to(self.device, self.mmditx.dtype),
        )
        cond = (context[:1], pooled[:1])
        uncond = (context[1:], pooled[1:]) if guided else None

        latent_shape = (1, self.mmditx.config.in_channels, height // 8, width // 8)
        init_latent = self._encode_image(init, width, height) if init is not None else None
        pixel_mask = mask_to_tensor(load_mask(mask), width, height, mask_blur) if mask is not None else None
        lmask = latent_mask(pixel_mask, *latent_shape[2:]).to(self.device) if pixel_mask is not None else None

        images = []
        for i in range(num_images):
            generator = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(latent_shape, generator=generator).to(self.device)
            if init is not None and strength == 0.0:
                latent = init_latent  # nothing to denoise: the input through the VAE
            else:
                latent = self._sample(
                    cond,
                    uncond,
                    settings,
                    sigmas,
                    strength if init is not None else 1.0,
                    noise,
                    generator,
                    init_latent,
                    lmask,
                    callback,
                )
            if hires is not None:
                latent = self._hires_pass(
                    latent, hires, cond, uncond, settings, width, height, generator, callback
                )
            image = self._decode(latent)
            if pixel_mask is not None:
                image = composite(image, init, pixel_mask)
            image.info["parameters"] = self.parameters_text(
                prompt,
                negative_prompt,
                settings,
                seed + i,
                image.width,
                image.height,
                strength if init is not None else None,
                mask_blur if mask is not None else None,
                hires,
            )
            images.append(image)
        return images

    def _size(self, width: int | None, height: int | None, init: Image.Image | None) -> tuple[int, int]:
        if init is None:
            return width or DEFAULTS.width, height or DEFAULTS.height
        w = width or init.width // SIZE_MULTIPLE * SIZE_MULTIPLE
        h = height or init.height // SIZE_MULTIPLE * SIZE_MULTIPLE
        if (width is None and w != init.width) or (height is None and h != init.height):
            warnings.warn(
                f"the init image is {init.width}x{init.height}; sizes must be multiples of {SIZE_MULTIPLE}, so it is "
                f"resized to {w}x{h}. Pass --width/--height to choose.",
                SD35Warning,
                stacklevel=3,
            )
        return w, h

    def _hires_pass(
        self,
        latent: torch.Tensor,
        hires: HiresFix,
        cond: Conditioning,
        uncond: Conditioning | None,
        settings: GenerationSettings,
        width: int,
        height: int,
        generator: torch.Generator,
        callback: Callback | None,
    ) -> torch.Tensor:
        """Upscale (in latent space, or Lanczos in pixels) and refine with img2img at ``hires.strength``.

        ``hires.steps`` is the number of steps actually run (A1111's convention): the schedule has
        ``round(steps / strength)`` steps, of which the last ``steps`` or so remain after the img2img cut.
        """
        w2, h2 = hires.size(width, height)
        if hires.upscaler == "latent":
            big = F.interpolate(latent, size=(h2 // 8, w2 // 8), mode="bicubic", align_corners=False)
        else:
            big = self._encode_image(self._decode(latent).resize((w2, h2), Image.LANCZOS), w2, h2)
        steps = hires.steps or settings.steps
        full = get_sigmas(settings.scheduler, max(steps, round(steps / hires.strength)), settings.shift)
        noise = torch.randn(big.shape, generator=generator).to(self.device)
        return self._sample(
            cond, uncond, settings, full, hires.strength, noise, generator, big, None, callback
        )

    def parameters_text(
        self,
        prompt: str,
        negative_prompt: str,
        settings: GenerationSettings,
        seed: int,
        width: int,
        height: int,
        strength: float | None = None,
        mask_blur: float | None = None,
        hires: HiresFix | None = None,
    ) -> str:
        """The A1111-style ``parameters`` text of one image."""
        info: dict[str, object] = {
            "Steps": settings.steps,
            "Sampler": SAMPLER_DISPLAY_NAMES.get(settings.sampler, settings.sampler),
            "Schedule type": A1111_SCHEDULER_NAMES.get(settings.scheduler, settings.scheduler),
            "CFG scale": settings.cfg,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.model_name,
            "Shift": settings.shift,
            "Denoising strength": strength,
            "Mask blur": mask_blur,
        }
        if hires is not None:
            info.update(
                {
                    "Hires upscale": hires.scale,
                    "Hires steps": hires.steps,
                    "Hires upscaler": "Latent" if hires.upscaler == "latent" else "Lanczos",
                    "Hires strength": hires.strength,
                }
            )
        if settings.slg is not None:
            slg = settings.slg
            info.update(
                {
                    "SLG layers": ",".join(map(str, slg.layers)),
                    "SLG scale": slg.scale,
                    "SLG start": slg.start,
                    "SLG end": slg.end,
                }
            )
        if settings.apg is not None:
            apg = settings.apg
            info.update(
                {"APG eta": apg.eta, "APG norm threshold": apg.norm_threshold, "APG momentum": apg.momentum}
            )
        if self.loras:
            info["LoRA"] = ", ".join(f"{n}:{w:g}" for n, w in self.loras.items())
        info["Version"] = f"sd35 {__version__}"
        return a1111_parameters(prompt, negative_prompt, info)

    def _lora_models(self) -> dict[str, torch.nn.Module | None]:
        t = self.text
        return {"mmditx": self.mmditx, "clip_l": t.clip_l, "clip_g": t.clip_g, "t5": t.t5}

    def load_lora(self, path, strength: float = 1.0, mode: str = "auto", name: str | None = None):
        """Apply a LoRA/LyCORIS/DoRA file to the MMDiT-X and text encoders (see :func:`sd35.lora.load_lora`).

        Loaded LoRAs and their strengths are recorded in the images' ``parameters`` (``LoRA: name:strength``).
        """
        from sd35.lora import load_lora

        if self.plan is not None:
            self.plan.synchronize()  # no asynchronous copy may still read the weights about to change
        report = load_lora(self._lora_models(), path, strength=strength, mode=mode, name=name)
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
        removed = unload_lora(self._lora_models(), name)
        for n in removed:
            self.loras.pop(n, None)
        if self._text_loras.intersection(removed):
            self._text_loras.difference_update(removed)
            self.prompt_cache.clear()
        return removed


def _paths(value: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [Path(value)]
    return [Path(v) for v in value]


def _find_tokenizer_root(candidates: list[Path]) -> Path | None:
    for c in candidates:
        if c.is_dir() and (c / "tokenizer").is_dir():
            return c
    return None


def _check_compatible(parts: dict[str, Component]) -> None:
    """The text encoders' widths must fit the MMDiT-X (read from shapes, before anything is loaded)."""
    cfg = MMDiTXConfig.from_state_dict(parts[MMDITX].tensors)
    l_width = CLIPTextConfig.from_state_dict(parts[CLIP_L].tensors, "quick_gelu").width
    g_width = CLIPTextConfig.from_state_dict(parts[CLIP_G].tensors, "gelu").projection_dim
    if l_width + g_width != cfg.pooled_dim:
        raise CheckpointError(
            f"the text encoders do not fit this MMDiT-X: CLIP-L ({parts[CLIP_L].source}, pooled {l_width}) + CLIP-G "
            f"({parts[CLIP_G].source}, pooled {g_width}) = {l_width + g_width}, but the MMDiT-X expects {cfg.pooled_dim}."
        )
    if T5XXL in parts:
        t5_width = T5Config.from_state_dict(parts[T5XXL].tensors).d_model
        if t5_width != cfg.context_dim:
            raise CheckpointError(
                f"{parts[T5XXL].source}: T5 width {t5_width} does not fit the MMDiT-X's text width "
                f"{cfg.context_dim}; use the T5-XXL encoder."
            )


def load_pipeline(
    model: str | Path,
    text_encoders: str | Path | Sequence[str | Path] | None = None,
    tokenizers: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    memory: str = "high",
    vae_tiling: str = "auto",
) -> SD3Pipeline:
    """Load a pipeline from a single file or diffusers folder, plus text-encoder files or a folder of them.

    Text encoders given in ``text_encoders`` take precedence over any embedded in ``model``. Tokenizer
    files come from ``tokenizers``, else from ``tokenizer*/`` sub-folders of ``model`` or ``text_encoders``.
    ``memory`` ("high", "balanced", "low") and ``vae_tiling`` ("auto", "on", "off"): see :class:`SD3Pipeline`
    and :mod:`sd35.memory`. Weights that a mode keeps off the device are loaded into CPU memory directly,
    never onto the device first.
    """
    check_memory_mode(memory)
    check_vae_tiling(vae_tiling)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model = Path(model)
    te_paths = _paths(text_encoders)

    parts = assemble(
        scan([model]),
        required=(MMDITX, VAE, CLIP_L, CLIP_G),
        overrides=scan(te_paths) if te_paths else (),
        hint=" Pass the text encoder files with --text-encoders." if not te_paths else "",
    )
    _check_compatible(parts)
    root = Path(tokenizers) if tokenizers is not None else _find_tokenizer_root([model, *te_paths])
    if root is None:
        raise MissingComponentError(
            "tokenizer files are needed: pass --tokenizers DIR, a folder holding tokenizer/ (vocab.json, merges.txt), "
            "tokenizer_2/ (the same) and tokenizer_3/ (tokenizer.json), as in the diffusers repository "
            "stabilityai/stable-diffusion-3.5-medium."
        )
    tokenizer = SD3Tokenizer.from_root(root, t5=T5XXL in parts)
    if T5XXL not in parts:
        warnings.warn(
            "no T5-XXL text encoder given: running with CLIP only, so prompt following and text rendering get worse. "
            f"Pass {USUAL_FILES[T5XXL]} with --text-encoders.",
            SD35Warning,
            stacklevel=2,
        )

    text_device = device if memory == "high" else torch.device("cpu")
    mmditx = load_component(parts[MMDITX], dtype, torch.device("cpu") if memory == "low" else device)
    vae = load_component(parts[VAE], dtype, device)
    text = TextConditioner(
        load_component(parts[CLIP_L], dtype, text_device),
        load_component(parts[CLIP_G], dtype, text_device),
        load_component(parts[T5XXL], dtype, text_device) if T5XXL in parts else None,
        context_dim=mmditx.config.context_dim,
    )
    name = model.stem if model.is_file() else model.name
    return SD3Pipeline(
        mmditx, vae, text, tokenizer, model_name=name, memory=memory, vae_tiling=vae_tiling, device=device
    )
