"""The training configuration: one :class:`TrainConfig` read from a TOML file and overridden by CLI flags.

The TOML file may be flat (``learning_rate = 1e-4`` at the top) or grouped in sections; the sections
only group keys for the reader, every key name is unique across them::

    [model]
    model = "stable-diffusion-3.5-medium/"      # diffusers folder or sd3.5_medium.safetensors
    text_encoders = ["text_encoders/"]          # optional, as for `sd35 generate`

    [data]
    data_dir = "my_images/"                     # images with same-named .txt captions
    resolution = 1024
    batch_size = 1

    [train]
    mode = "lora"                               # or "full"
    max_steps = 2000

    [optimizer]
    learning_rate = 1e-4

    [lora]
    lora_rank = 16

    [validation]
    validation_prompts = ["a photo of sks dog"]
    validation_every = 250

    [output]
    output_dir = "runs/dog"

The sections are ``[model] [data] [train] [optimizer] [loss] [lora] [validation] [output]``; a key is accepted
in its own section or at the top level, and a key in another section is an error that names the right one.
Relative paths in the file are relative to the file's folder. Every key is also a command-line flag: ``learning_rate`` is ``--learning-rate 1e-4``; flags win
over the file. Booleans take ``true``/``false`` (a bare ``--flag`` means true), lists take several values
(``--validation-prompts "a cat" "a dog"``), and ``none`` clears an optional value. Unknown keys or flags and
out-of-range values raise one :class:`~sd35.errors.SD35Error` naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35.errors import SD35Error
from sd35.models.contract import BLOCK_LINEARS

if TYPE_CHECKING:
    from sd35.request import GenerateRequest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport, if installed
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

SECTIONS = ("model", "data", "train", "optimizer", "loss", "lora", "validation", "output")

MODES = ("lora", "full")
MIXED_PRECISION = ("bf16", "no")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "cosine")
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
DTYPES = ("fp32", "bf16", "fp16")
LOG_WITH = ("none", "tensorboard")


def _opt(default: Any, section: str, kind: str, help: str, choices: tuple[str, ...] | None = None):
    """A config field: its TOML section, value kind (str, int, float, bool, list[str], list[int]) and help."""
    meta = {"section": section, "kind": kind, "help": help, "choices": choices}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of ``sd35 train`` (see the module doc for the file format)."""

    # [model]
    model: str | None = _opt(
        None, "model", "str", "base model: sd3.5_medium.safetensors (or all-in-one) or a diffusers folder"
    )
    text_encoders: list[str] = _opt(
        [], "model", "list[str]", "clip_l/clip_g/t5xxl .safetensors files or a folder of them"
    )
    tokenizers: str | None = _opt(
        None, "model", "str", "folder with tokenizer/, tokenizer_2/, tokenizer_3/ (default: found in model)"
    )
    device: str | None = _opt(
        None, "model", "str", "cuda or cpu (default: cuda if present; under torchrun cuda:LOCAL_RANK)"
    )
    model_dtype: str = _opt(
        "fp32",
        "model",
        "str",
        "dtype the base weights are loaded in; bf16/fp16 only for mode = lora (frozen base)",
        DTYPES,
    )

    # [data]
    data_dir: str | None = _opt(
        None, "data", "str", "training images: a folder with same-name .txt captions, or a .jsonl file"
    )
    cache_dir: str | None = _opt(
        None, "data", "str", "latent/text-embedding cache (default OUTPUT_DIR/cache)"
    )
    resolution: int | None = _opt(
        None,
        "data",
        "int",
        "training resolution, pixels per side of the square bucket (default: the model's image size, "
        "1024 for SD3.5 Medium, 64 for the demo)",
    )
    batch_size: int = _opt(1, "data", "int", "images per micro-batch on each process")
    caption_t5_tokens: int = _opt(
        77, "data", "int", "T5 token limit of cached captions (77: every context 154 rows, no padding)"
    )
    shuffle: bool = _opt(True, "data", "bool", "shuffle samples and batches each epoch (seeded)")
    random_crop: bool = _opt(
        False, "data", "bool", "crop images to their bucket at a seeded random offset instead of the centre"
    )
    bucket_min_side: int = _opt(256, "data", "int", "shortest bucket side in pixels")
    bucket_step: int = _opt(64, "data", "int", "bucket sides are multiples of this (a multiple of 16)")
    bucket_max_aspect: float = _opt(
        4.0, "data", "float", "largest bucket aspect ratio (1 = square buckets only)"
    )

    # [train]
    mode: str = _opt("lora", "train", "str", "lora (adapters only) or full (every MMDiT-X weight)", MODES)
    seed: int = _opt(0, "train", "int", "seed of everything random (LoRA init, data order, noise, timesteps)")
    max_steps: int = _opt(1000, "train", "int", "optimizer steps to train")
    gradient_accumulation: int = _opt(1, "train", "int", "micro-batches per optimizer step")
    mixed_precision: str = _opt(
        "bf16", "train", "str", "bf16 autocast (fp32 master weights) or no", MIXED_PRECISION
    )
    gradient_checkpointing: bool = _opt(
        False, "train", "bool", "recompute each joint block in backward (less memory)"
    )
    ema: bool = _opt(
        False, "train", "bool", "keep an EMA of the trained weights (used for validation and saved)"
    )
    ema_decay: float = _opt(0.999, "train", "float", "EMA decay per optimizer step")
    fsdp: bool = _opt(
        False, "train", "bool", "shard weights, grads and optimizer state with FSDP (mode = full, torchrun)"
    )

    # [optimizer]
    optimizer: str = _opt("adamw", "optimizer", "str", "adamw, or adamw8bit (bitsandbytes)", OPTIMIZERS)
    learning_rate: float = _opt(1e-4, "optimizer", "float", "peak learning rate")
    lr_scheduler: str = _opt(
        "constant", "optimizer", "str", "constant or cosine (to 0), after the warmup", LR_SCHEDULERS
    )
    lr_warmup_steps: int = _opt(0, "optimizer", "int", "linear warmup steps")
    adam_beta1: float = _opt(0.9, "optimizer", "float", "AdamW beta1")
    adam_beta2: float = _opt(0.999, "optimizer", "float", "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "optimizer", "float", "AdamW epsilon")
    weight_decay: float = _opt(1e-2, "optimizer", "float", "AdamW decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "optimizer", "float", "gradient clipping norm (0 = off)")

    # [loss]
    timestep_sampling: str = _opt(
        "logit_normal",
        "loss",
        "str",
        "sigma density: logit_normal (SD3 paper), uniform, mode",
        TIMESTEP_SAMPLING,
    )
    logit_mean: float = _opt(0.0, "loss", "float", "logit-normal mean")
    logit_std: float = _opt(1.0, "loss", "float", "logit-normal standard deviation")
    mode_scale: float = _opt(1.29, "loss", "float", "scale of the 'mode' density")
    shift: float = _opt(
        1.0, "loss", "float", "flow shift applied to sampled sigmas: s' = shift*s/(1+(shift-1)*s) (1 = off)"
    )
    loss_weighting: str = _opt(
        "none", "loss", "str", "per-sigma loss weight: none, sigma_sqrt, cosmap", LOSS_WEIGHTING
    )
    caption_dropout: float = _opt(
        0.0, "loss", "float", "probability of training a sample on the empty caption"
    )
    pos_embed_crop: bool = _opt(
        False, "loss", "bool", "random position-grid crop instead of the centred one (augmentation)"
    )

    # [lora]
    lora_rank: int = _opt(16, "lora", "int", "LoRA rank")
    lora_alpha: float | None = _opt(None, "lora", "float", "LoRA alpha (default = rank, scale 1)")
    lora_targets: list[str] = _opt(
        list(BLOCK_LINEARS),  # sd35.lora.add_lora's default: every attention and MLP matrix, attn2 included
        "lora",
        "list[str]",
        "layer-name suffixes given adapters (sd35.lora.add_lora)",
    )
    lora_blocks: list[int] | None = _opt(
        None, "lora", "list[int]", "joint blocks that get adapters (default all)"
    )
    dora: bool = _opt(False, "lora", "bool", "weight-decomposed LoRA (DoRA)")

    # [validation]
    validation_prompts: list[str] = _opt([], "validation", "list[str]", "prompts rendered at validation")
    validation_negative_prompt: str = _opt("", "validation", "str", "negative prompt for validation")
    validation_every: int = _opt(
        0, "validation", "int", "validate every N optimizer steps (0 = only at the end)"
    )
    validation_steps: int | None = _opt(
        None, "validation", "int", "sampling steps of validation images (default: the model's)"
    )
    validation_cfg: float | None = _opt(
        None, "validation", "float", "CFG scale of validation images (default: the model's)"
    )
    validation_width: int | None = _opt(None, "validation", "int", "default: resolution")
    validation_height: int | None = _opt(None, "validation", "int", "default: resolution")
    validation_seed: int | None = _opt(None, "validation", "int", "default: seed")
    validation_slg: bool = _opt(True, "validation", "bool", "Skip Layer Guidance on validation images")
    validation_slg_layers: list[int] | None = _opt(
        None, "validation", "list[int]", "SLG blocks (default: the model's, 7 8 9 for SD3.5 Medium)"
    )
    validation_slg_scale: float | None = _opt(None, "validation", "float", "SLG scale (default: the model's)")

    # [output]
    output_dir: str | None = _opt(None, "output", "str", "folder of the run: checkpoints, samples, weights")
    output_name: str | None = _opt(
        None, "output", "str", "stem of the final files (default sd35_lora / sd35_full)"
    )
    save_every: int = _opt(0, "output", "int", "checkpoint every N optimizer steps (0 = off)")
    keep_checkpoints: int = _opt(0, "output", "int", "keep only the newest N checkpoints (0 = all)")
    resume: str | None = _opt(None, "output", "str", "checkpoint folder to resume from, or 'latest'")
    save_dtype: str = _opt("bf16", "output", "str", "dtype of the final weight files", DTYPES)
    log_with: str = _opt("none", "output", "str", "none or tensorboard", LOG_WITH)
    logging_dir: str | None = _opt(None, "output", "str", "TensorBoard folder (default OUTPUT_DIR/logs)")

    # ---------------------------------------------------------------- derived values

    @property
    def name(self) -> str:
        return self.output_name or ("sd35_lora" if self.mode == "lora" else "sd35_full")

    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def buckets(self) -> list[tuple[int, int]]:
        """The training buckets (width, height): about resolution**2 pixels each (sd35.train.data.make_buckets).

        Needs ``resolution``; the trainer fills it from the model's defaults when the config leaves it out.
        """
        from sd35.train.data import make_buckets

        if self.resolution is None:
            raise ValueError("resolution is not set yet: it comes from the model's defaults once loaded")
        step = min(self.bucket_step, self.resolution)
        return make_buckets(
            max_side=self.resolution,
            min_side=min(max(self.bucket_min_side, step), self.resolution),
            step=step,
            max_aspect=self.bucket_max_aspect,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the configuration") -> TrainConfig:
        """A validated config from flat key -> value (unknown keys and wrong types raise SD35Error)."""
        fields = FIELDS
        unknown = sorted(k for k in values if k not in fields)
        if unknown:
            raise SD35Error(f"{where}: unknown key(s) {', '.join(unknown)}{_suggest(unknown[0])}.")
        cfg = cls(**{k: _coerce(k, v, where) for k, v in values.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise one SD35Error for the first bad value."""
        for key in ("model", "data_dir", "output_dir"):
            if not getattr(self, key):
                raise SD35Error(f"{key} is required (--{_flag(key)} or `{key} = ...` in the config file).")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise SD35Error(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}."
                )
        positive_ints = (
            "batch_size",
            "caption_t5_tokens",
            "max_steps",
            "gradient_accumulation",
            "lora_rank",
        )
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise SD35Error(f"{key} must be at least 1, got {getattr(self, key)}.")
        for key in ("lr_warmup_steps", "save_every", "keep_checkpoints", "validation_every"):
            if getattr(self, key) < 0:
                raise SD35Error(f"{key} must be >= 0, got {getattr(self, key)}.")
        for key in (
            "learning_rate",
            "adam_epsilon",
            "logit_std",
            "shift",
        ):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise SD35Error(f"{key} must be a finite number > 0, got {value}.")
        for key in ("weight_decay", "max_grad_norm", "mode_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise SD35Error(f"{key} must be a finite number >= 0, got {value}.")
        if not math.isfinite(self.logit_mean):
            raise SD35Error(f"logit_mean must be finite, got {self.logit_mean}.")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise SD35Error(f"{key} must be in [0, 1), got {getattr(self, key)}.")
        if not 0 < self.ema_decay < 1:
            raise SD35Error(f"ema_decay must be in (0, 1), got {self.ema_decay}.")
        if not 0 <= self.caption_dropout <= 1:
            raise SD35Error(f"caption_dropout must be in [0, 1], got {self.caption_dropout}.")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise SD35Error(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}.")
        if self.mode == "lora" and not self.lora_targets:
            raise SD35Error("lora_targets is empty: name at least one module group to train.")
        if self.lora_blocks is not None and not self.lora_blocks:
            raise SD35Error("lora_blocks is empty; list block indices, or leave it out for all blocks.")
        if self.lora_blocks is not None and any(b < 0 for b in self.lora_blocks):
            raise SD35Error(f"lora_blocks must be block indices >= 0, got {self.lora_blocks}.")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise SD35Error(f"resolution must be a multiple of 16 (at least 16), got {self.resolution}.")
        if not self.bucket_max_aspect >= 1:
            raise SD35Error(f"bucket_max_aspect must be at least 1, got {self.bucket_max_aspect}.")
        if self.resolution is not None:
            self.buckets()  # the bucket settings' own errors, before any model is loaded
        self.validation_request("")  # the validation settings' errors, named by their keys
        if self.mode == "full" and self.model_dtype != "fp32":
            raise SD35Error(
                f"mode = full keeps fp32 master weights; model_dtype {self.model_dtype} is for LoRA only "
                "(use mixed_precision = bf16 for speed)."
            )
        if self.fsdp and self.mode != "full":
            raise SD35Error("fsdp = true is for mode = full; LoRA training uses DDP (fsdp = false).")
        if self.output_name is not None and (not self.output_name or "/" in self.output_name):
            raise SD35Error(f"output_name must be a plain file stem, got {self.output_name!r}.")

    def validation_request(self, prompt: str) -> GenerateRequest:
        """The request that renders one validation prompt (unset values are the model's, as in generate).

        A bad value raises an SD35Error naming its config key (``validation_steps``, not ``steps``).
        """
        from sd35.request import GenerateRequest
        from sd35.sampling.guidance import SkipLayerGuidance

        try:
            slg = None
            if self.validation_slg:
                layers = None if self.validation_slg_layers is None else tuple(self.validation_slg_layers)
                slg = SkipLayerGuidance(layers=layers, scale=self.validation_slg_scale)
            return GenerateRequest(
                prompt=prompt,
                negative_prompt=self.validation_negative_prompt,
                width=self.validation_width or self.resolution,
                height=self.validation_height or self.resolution,
                steps=self.validation_steps,
                cfg=self.validation_cfg,
                seed=self.seed if self.validation_seed is None else self.validation_seed,
                slg=slg,
            )
        except SD35Error as e:
            raise validation_error(e) from None


VALIDATION_KEYS = {
    "width": "validation_width",
    "height": "validation_height",
    "steps": "validation_steps",
    "cfg": "validation_cfg",
    "seed": "validation_seed",
    "slg.layers": "validation_slg_layers",
    "slg.scale": "validation_slg_scale",
}
"""Request field -> the config key that sets it for validation images."""


def validation_error(e: SD35Error) -> SD35Error:
    """A request error about the validation images, reworded to name the config key to change."""
    key = VALIDATION_KEYS.get(e.param or "", "validation settings")
    return type(e)(f"{key}: {e}")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
OPTIONAL = {
    "model",
    "tokenizers",
    "device",
    "data_dir",
    "cache_dir",
    "lora_alpha",
    "lora_blocks",
    "resolution",
    "validation_steps",
    "validation_cfg",
    "validation_slg_layers",
    "validation_slg_scale",
    "validation_width",
    "validation_height",
    "validation_seed",
    "output_dir",
    "output_name",
    "resume",
    "logging_dir",
}
PATH_KEYS = ("model", "tokenizers", "data_dir", "cache_dir", "output_dir", "logging_dir")


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check a TOML value's type against the key's kind (ints are accepted for floats)."""
    kind = FIELDS[key].metadata["kind"]
    if value is None and key in OPTIONAL:
        return None

    def bad() -> SD35Error:
        return SD35Error(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {value!r}.")

    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    item = str if kind == "list[str]" else int
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]  # a single value where a list is expected
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item) for v in value):
        raise bad()
    return list(value)


_KIND_NAMES = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Flat key -> value from a TOML file with optional ``[section]`` tables (see the module doc)."""
    path = Path(path)
    if tomllib is None:
        raise SD35Error("reading a TOML config needs Python 3.11+, or on Python 3.10: pip install tomli.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SD35Error(f"{path}: config file not found.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SD35Error(f"{path}: cannot read the config file ({e}).") from None
    except tomllib.TOMLDecodeError as e:
        raise SD35Error(f"{path}: not valid TOML ({e}).") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise SD35Error(
                    f"{path}: unknown section [{key}]{_suggest(key) if key in FIELDS else ''}; sections are "
                    f"{', '.join(f'[{s}]' for s in SECTIONS)}."
                )
            for sub, sub_value in value.items():
                if sub not in FIELDS:
                    raise SD35Error(f"{path}: unknown key {sub!r} in [{key}]{_suggest(sub)}.")
                own = FIELDS[sub].metadata["section"]
                if own != key:
                    raise SD35Error(
                        f"{path}: key {sub!r} belongs in [{own}] (or at the top), not in [{key}]."
                    )
                _put(flat, sub, sub_value, path)
        else:
            if key not in FIELDS:
                raise SD35Error(f"{path}: unknown key {key!r}{_suggest(key)}.")
            _put(flat, key, value, path)
    # relative paths in the file are relative to the file's folder
    for key in PATH_KEYS:
        if isinstance(flat.get(key), str) and flat[key]:
            flat[key] = str(_relative_to(path.parent, flat[key]))
    if isinstance(flat.get("text_encoders"), list):
        flat["text_encoders"] = [
            str(_relative_to(path.parent, p)) if isinstance(p, str) else p for p in flat["text_encoders"]
        ]
    if isinstance(flat.get("resume"), str) and flat["resume"] != "latest":
        flat["resume"] = str(_relative_to(path.parent, flat["resume"]))
    return flat


def _relative_to(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _put(flat: dict[str, Any], key: str, value: Any, path: Path) -> None:
    if key in flat:
        raise SD35Error(f"{path}: key {key!r} is given twice.")
    flat[key] = value


# ------------------------------------------------------------------------------------------ CLI flags


class _Parser(argparse.ArgumentParser):
    """argparse that raises SD35Error instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise SD35Error(message)


def _cli_value(key: str):
    kind = FIELDS[key].metadata["kind"]
    base = kind.removeprefix("list[").removesuffix("]")

    def convert(text: str):
        if key in OPTIONAL and text.lower() == "none":
            return None
        try:
            if base == "bool":
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if base == "int":
                return int(text)
            if base == "float":
                return float(text)
            return text
        except ValueError:
            raise SD35Error(f"--{_flag(key)}: expected {_KIND_NAMES[kind]}, got {text!r}.") from None

    return convert


_METAVARS = {"str": "TEXT", "bool": "BOOL", "int": "N", "float": "X", "list[str]": "TEXT", "list[int]": "N"}


def build_parser(prog: str = "sd35 train") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage=f"{prog} [--config FILE.toml] [--key value ...]",
        description="Train a LoRA/DoRA or fine-tune the whole MMDiT-X of SD3.5 Medium on captioned images. "
        "Options come from --config FILE (TOML) and these flags, which override the file.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="TOML config file (see sd35.train.config)"
    )
    groups = {s: parser.add_argument_group(f"[{s}]") for s in SECTIONS}
    for key, f in FIELDS.items():
        kind = f.metadata["kind"]
        extra: dict[str, Any] = {}
        if kind.startswith("list"):
            extra["nargs"] = "*"
        elif kind == "bool":
            extra["nargs"] = "?"
            extra["const"] = "true"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata["choices"]
        text = f.metadata["help"]
        if default not in (None, [], ""):
            text += f"; default {default}"
        metavar = "PATH" if key in PATH_KEYS else _METAVARS[kind]
        if choices:
            metavar = "{" + ",".join(choices) + "}"
        groups[f.metadata["section"]].add_argument(
            f"--{_flag(key)}",
            dest=key,
            metavar=metavar,
            type=_cli_value(key),
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
            **extra,
        )
    return parser


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -1e-4`` -> ``--flag=-1e-4``: argparse would take ``-1e-4`` for an option."""
    out: list[str] = []
    for arg in argv:
        if (
            out
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and arg.startswith("-")
            and _is_number(arg)
        ):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_config(argv: list[str]) -> TrainConfig:
    """``--config FILE`` plus flag overrides -> a validated :class:`TrainConfig`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(_join_negative_numbers(argv))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        hint = _suggest(flags[0].lstrip("-")) if flags[0].startswith("--") else ""
        raise SD35Error(f"unknown option(s) {' '.join(flags)}{hint}; see `sd35 train --help`.")
    values = read_toml(args.config) if args.config is not None else {}
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    for key, value in overrides.items():
        if isinstance(value, list) and FIELDS[key].metadata["kind"] in ("list[int]",) and value == [None]:
            value = None
        values[key] = value
    return TrainConfig.from_dict(values, where=str(args.config) if args.config else "the options")
