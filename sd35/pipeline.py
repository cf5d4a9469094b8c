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

import numpy as np
import torch
from PIL import Image

from sd35 import __version__
from sd35.conditioning.encode import TextConditioner
from sd35.conditioning.tokenize import SD3Tokenizer
from sd35.errors import CheckpointError, MissingComponentError, SD35Error, SD35Warning
from sd35.image_io import a1111_parameters
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
from sd35.models.clip import CLIPTextConfig
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAE as VAEModel
from sd35.models.vae import model_to_latent
from sd35.sampling.guidance import GuidedDenoiser, SkipLayerGuidance
from sd35.sampling.samplers import get_sampler
from sd35.sampling.schedules import reference_sigmas


@dataclass(frozen=True)
class Defaults:
    """SD3.5 Medium defaults of the official reference (sd3_infer.py CONFIGS["sd3.5_medium"])."""

    steps: int = 50
    cfg: float = 5.0
    sampler: str = "dpmpp_2m"
    shift: float = 3.0
    width: int = 1024
    height: int = 1024


DEFAULTS = Defaults()
# A1111/Forge names of our samplers, for the PNG parameters.
A1111_SAMPLER_NAMES = {"euler": "Euler", "dpmpp_2m": "DPM++ 2M"}
SIZE_MULTIPLE = 16  # 8x VAE downsampling times the patch size 2


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


def latents_to_images(latents: torch.Tensor, vae: VAEModel) -> list[Image.Image]:
    """Decode and convert to 8-bit RGB, truncating like the reference (``astype(uint8)``, sd3_infer.py 414-426)."""
    images = []
    for z in latents:
        decoded = vae.decode(model_to_latent(z[None].float())).float()
        pixels = (255.0 * torch.clamp((decoded[0] + 1.0) / 2.0, 0.0, 1.0)).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    return images


class SD3Pipeline:
    """The loaded models plus the procedure that turns a prompt into images."""

    def __init__(
        self,
        mmditx: MMDiTX,
        vae: VAEModel,
        text: TextConditioner,
        tokenizer: SD3Tokenizer,
        model_name: str = "sd3.5_medium",
    ):
        self.mmditx, self.vae, self.text, self.tokenizer = mmditx, vae, text, tokenizer
        self.model_name = model_name
        self.family = mmditx_family(mmditx.config)
        self.default_shift = 1.0 if self.family == "SD3 Medium" else DEFAULTS.shift  # reference CONFIGS

    @property
    def device(self) -> torch.device:
        return self.mmditx.pos_embed.device

    def encode_prompt(
        self, prompt: str | Sequence[str], t5_max_tokens: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context, pooled)`` for one prompt or a list; every row padded to the same length."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(prompts, t5_max_tokens=t5_max_tokens)
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
        return self.text(tokens)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int = DEFAULTS.width,
        height: int = DEFAULTS.height,
        steps: int = DEFAULTS.steps,
        cfg: float = DEFAULTS.cfg,
        seed: int | None = None,
        sampler: str = DEFAULTS.sampler,
        shift: float | None = None,
        slg: SkipLayerGuidance | None = None,
        num_images: int = 1,
        t5_max_tokens: int = 256,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> list[Image.Image]:
        """Images for ``prompt``; image i uses seed+i. Each image's ``info["parameters"]`` holds its settings."""
        check_arguments(width, height, steps, cfg, num_images, sampler, self.mmditx.config.max_image_size)
        sample = get_sampler(sampler)
        shift = self.default_shift if shift is None else shift
        sigmas = reference_sigmas(steps, shift)
        seed = random.randrange(2**32) if seed is None else int(seed)

        n = num_images
        guided = cfg != 1.0
        context, pooled = self.encode_prompt(
            [prompt] * n + ([negative_prompt] * n if guided else []), t5_max_tokens
        )
        dtype = self.mmditx.dtype
        context, pooled = context.to(self.device, dtype), pooled.to(self.device, dtype)
        cond = (context[:n], pooled[:n])
        uncond = (context[n:], pooled[n:]) if guided else None
        denoiser = GuidedDenoiser(self.mmditx, cond, uncond, cfg, slg, sigmas)

        latent_shape = (1, self.mmditx.config.in_channels, height // 8, width // 8)
        noise = torch.cat(
            [torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]
        )
        x = noise.to(self.device) * sigmas[0]
        latents = sample(denoiser, x, sigmas.to(self.device), callback=callback)
        images = latents_to_images(latents, self.vae)
        for i, image in enumerate(images):
            image.info["parameters"] = self.parameters_text(
                prompt, negative_prompt, steps, sampler, cfg, seed + i, width, height, shift, slg
            )
        return images

    def parameters_text(
        self, prompt, negative_prompt, steps, sampler, cfg, seed, width, height, shift, slg
    ) -> str:
        settings: dict[str, object] = {
            "Steps": steps,
            "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler),
            "Schedule type": "Simple",
            "CFG scale": cfg,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.model_name,
            "Shift": shift,
        }
        if slg is not None:
            settings.update(
                {
                    "SLG layers": ",".join(map(str, slg.layers)),
                    "SLG scale": slg.scale,
                    "SLG start": slg.start,
                    "SLG end": slg.end,
                }
            )
        settings["Version"] = f"sd35 {__version__}"
        return a1111_parameters(prompt, negative_prompt, settings)


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
) -> SD3Pipeline:
    """Load a pipeline from a single file or diffusers folder, plus text-encoder files or a folder of them.

    Text encoders given in ``text_encoders`` take precedence over any embedded in ``model``. Tokenizer
    files come from ``tokenizers``, else from ``tokenizer*/`` sub-folders of ``model`` or ``text_encoders``.
    """
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

    mmditx = load_component(parts[MMDITX], dtype, device)
    vae = load_component(parts[VAE], dtype, device)
    text = TextConditioner(
        load_component(parts[CLIP_L], dtype, device),
        load_component(parts[CLIP_G], dtype, device),
        load_component(parts[T5XXL], dtype, device) if T5XXL in parts else None,
        context_dim=mmditx.config.context_dim,
    )
    name = model.stem if model.is_file() else model.name
    return SD3Pipeline(mmditx, vae, text, tokenizer, model_name=name)
