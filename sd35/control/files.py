"""ControlNet files: the layouts SD3-family ControlNets are published in, and the ones made for other models.

Accepted (the two SD3 layouts ComfyUI ``comfy/controlnet.py`` ``load_controlnet_state_dict`` loads as an
MMDiT ControlNet, ``load_controlnet_mmdit``):

- **diffusers** ``SD3ControlNetModel``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (or its shards), or that single file alone, keys ``transformer_blocks.N.attn.to_q...``,
  ``controlnet_blocks.N``, ``pos_embed_input.proj``. Renamed to the official layout with the
  transformer's key table (:func:`sd35.loading.diffusers_mmditx._key_table`, every block with its full
  context stream). ``config.json``, where present, gives ``force_zeros_for_pooled_projection``;
- **official** MMDiT names (``joint_blocks.N.x_block.attn.qkv``, what ComfyUI converts the diffusers
  layout to), loaded as they are.

Refused with one line naming what the file is for: SD 1.x/2.x and SDXL ControlNets (diffusers or
original layout), T2I adapters, ControlLoRAs, Flux ControlNets (XLabs, InstantX, Mistoline), SD3.5 Large
ControlNets (Stability's format and diffusers' 8b one, which borrow the transformer's patch embedding)
and SD3 ControlNets whose width differs from the loaded model's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.errors import CheckpointError, NotFound
from sd35.loading.diffusers_mmditx import COPY, _key_table, from_table
from sd35.loading.safetensors_io import open_safetensors, read_header, shards_of
from sd35.loading.tensors import LazyTensor, StateDict, lazy
from sd35.models.controlnet import ControlNet, ControlNetConfig
from sd35.models.family import mmditx_family
from sd35.models.mmditx import MMDiTXConfig

DIFFUSERS_STEM = "diffusion_pytorch_model"
LARGE_HIDDEN = 2432  # SD3.5 Large: 38 heads of 64


@dataclass(frozen=True)
class ControlNetFile:
    """One ControlNet's tensors in the official layout, with where they came from."""

    path: Path
    layout: str  # "diffusers" or "official"
    tensors: dict[str, LazyTensor]
    force_zeros_for_pooled: bool

    @property
    def config(self) -> ControlNetConfig:
        return ControlNetConfig.from_state_dict(self.tensors, self.force_zeros_for_pooled)


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def foreign_controlnet(keys: set[str]) -> str | None:
    """What a control file of another model family is (for the refusal), or None for an SD3 ControlNet.

    The signs are the keys ComfyUI ``comfy/controlnet.py`` ``load_controlnet_state_dict`` dispatches on.
    """
    if "lora_controlnet" in keys:
        return "a ControlLoRA for SD 1.5/SDXL"
    if "controlnet_cond_embedding.conv_in.weight" in keys:  # diffusers UNet ControlNet
        return "an SDXL ControlNet" if _has(keys, "add_embedding.") else "an SD 1.5/2.x ControlNet"
    for prefix in ("control_model.", ""):
        if f"{prefix}zero_convs.0.0.weight" in keys:  # the original ControlNet layout
            return "an SDXL ControlNet" if _has(keys, f"{prefix}label_emb.") else "an SD 1.5/2.x ControlNet"
    if (
        _has(keys, "double_blocks.")
        or _has(keys, "controlnet_single_blocks.")
        or _has(keys, "single_controlnet_blocks.")
        or "controlnet_x_embedder.weight" in keys
        or "controlnet_blocks.0.linear.weight" in keys
    ):
        return "a Flux ControlNet"
    if "transformer_blocks.0.adaLN_modulation.1.bias" in keys or (
        "pos_embed_input.proj.weight" in keys
        and "controlnet_blocks.0.weight" in keys
        and "context_embedder.weight" not in keys
    ):
        return "an SD3.5 Large ControlNet (it borrows the Large transformer's embeddings)"
    if _has(keys, "adapter.") or _has(keys, "body.0."):
        return "a T2I-Adapter for SD 1.5/SDXL"
    if "controlnet_blocks.0.weight" not in keys or "pos_embed_input.proj.weight" not in keys:
        return "not a ControlNet (no 'controlnet_blocks' and 'pos_embed_input' tensors)"
    return None


CONTROL_MARKERS = ("controlnet_", "control_model.", "zero_convs.", "lora_controlnet")


def is_controlnet(path: str | Path) -> bool:
    """Whether ``path`` (a file or a diffusers ControlNet folder) holds a ControlNet of any family (headers only)."""
    try:
        files, _ = _weights(Path(path))
        keys = read_header(files[0])
    except (CheckpointError, NotFound):
        return False
    return any(k.startswith(CONTROL_MARKERS) for k in keys)


def describe_controlnet(path: str | Path) -> str:
    """One line on what the ControlNet at ``path`` is and what it fits, from its headers (``sd35 inspect``)."""
    files, config = _weights(Path(path))
    sd = open_safetensors(files)
    foreign = foreign_controlnet(set(sd))
    if foreign is not None:
        return f"{foreign}: not for SD3-family models"
    f = read_controlnet(path)
    cfg = f.config
    attn2 = (
        f"dual attention in blocks {', '.join(map(str, cfg.attn2_layers))}"
        if cfg.attn2_layers
        else "no dual attention"
    )
    grid = (
        f"positions {cfg.pos_embed_max_size}x{cfg.pos_embed_max_size}"
        if cfg.pos_embed_max_size
        else "no positions"
    )
    extra = f" + {cfg.extra_channels} extra" if cfg.extra_channels else ""
    pooled = "zeroed" if cfg.force_zeros_for_pooled else "used"
    return (
        f"SD3 ControlNet for {controlnet_family(cfg)} ({f.layout} layout): {cfg.depth} blocks, hidden "
        f"{cfg.hidden_size}, {attn2}, qk-norm {'on' if cfg.qk_norm else 'off'}, {grid}, "
        f"{cfg.control_channels - cfg.extra_channels}{extra} control channels, pooled text {pooled}"
    )


def _diffusers_to_official(sd: StateDict, what: str) -> dict[str, LazyTensor]:
    """Official-layout tensors of a diffusers ``SD3ControlNetModel`` state dict."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"{what}: no 'transformer_blocks' tensors; the ControlNet file is incomplete.")
    attn2 = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))}
    qk = any(".norm_q." in k for k in sd)
    depth = max(blocks) + 1
    table = [
        row
        for row in _key_table(depth, attn2, qk, context_pre_only_last=False)
        if not row[0].startswith("final_layer.") and (row[0] != "pos_embed" or "pos_embed.pos_embed" in sd)
    ]
    for p in ("weight", "bias"):
        table.append((f"pos_embed_input.proj.{p}", (f"pos_embed_input.proj.{p}",), COPY))
        table += [(f"controlnet_blocks.{i}.{p}", (f"controlnet_blocks.{i}.{p}",), COPY) for i in range(depth)]
    used = {k for _, theirs, _ in table for k in theirs}
    unknown = sorted(set(sd) - used)
    if unknown:
        raise CheckpointError(
            f"{what}: tensor(s) {', '.join(unknown[:5])} have no place in an SD3 ControlNet; unknown variant."
        )
    return from_table(sd, table, what)


def _weights(path: Path) -> tuple[list[Path], Path | None]:
    """(the safetensors files, the diffusers config.json or None) of a ControlNet folder or file."""
    if path.is_dir():
        shards = shards_of(path, DIFFUSERS_STEM)
        if shards is None:
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"{path}: a ControlNet folder needs {DIFFUSERS_STEM}.safetensors (diffusers layout)"
                    + (f"; it holds {', '.join(found)}." if found else ", and it holds no .safetensors file.")
                )
            shards = [path / found[0]]
        config = path / "config.json"
        return shards, config if config.is_file() else None
    if not path.exists():
        raise NotFound(f"{path}: no such ControlNet file.")
    config = path.parent / "config.json"
    return [path], config if path.name.startswith(DIFFUSERS_STEM) and config.is_file() else None


def _force_zeros(config: Path | None) -> bool:
    if config is None:
        return True
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{config}: not valid JSON; the ControlNet's config.json is corrupt.") from None
    return bool(data.get("force_zeros_for_pooled_projection", True))


def read_controlnet(path: str | Path, model: MMDiTXConfig | None = None) -> ControlNetFile:
    """The tensors of the ControlNet at ``path`` (folder or file) in the official layout; foreign files refused
    (naming ``model``'s family, when given, as what the file would have had to fit)."""
    path = Path(path)
    files, config = _weights(path)
    sd = open_safetensors(files)
    what = path.name
    foreign = foreign_controlnet(set(sd))
    if foreign is not None:
        model_is = (
            f"the loaded model is {mmditx_family(model)}"
            if model is not None
            else "sd35 runs SD3-family models"
        )
        raise CheckpointError(
            f"{what} is {foreign} and {model_is}; use an SD3-family ControlNet made for this model "
            "(diffusers SD3ControlNetModel layout)."
        )
    if _has(sd, "transformer_blocks."):
        tensors, layout = _diffusers_to_official(sd, what), "diffusers"
    elif _has(sd, "joint_blocks."):
        tensors, layout = {k: lazy(v) for k, v in sd.items()}, "official"
    else:
        raise CheckpointError(
            f"{what}: a ControlNet without joint blocks; the file is incomplete or unknown."
        )
    return ControlNetFile(path, layout, tensors, _force_zeros(config))


def controlnet_family(cfg: ControlNetConfig) -> str:
    """Which base an SD3 ControlNet of this width is for, in the words :func:`mmditx_family` uses."""
    if cfg.hidden_size == 1536:
        return "SD3 / SD3.5 Medium"
    if cfg.hidden_size == LARGE_HIDDEN:
        return "SD3.5 Large"
    return f"an MMDiT-X of width {cfg.hidden_size}"


def check_fits(cfg: ControlNetConfig, model: MMDiTXConfig, what: str) -> None:
    """Refuse a ControlNet whose sizes do not fit the loaded transformer, naming both."""
    mismatches = [
        f"{name} {ours} vs the model's {theirs}"
        for name, ours, theirs in (
            ("width", cfg.hidden_size, model.hidden_size),
            ("text width", cfg.context_dim, model.context_dim),
            ("pooled width", cfg.pooled_dim, model.pooled_dim),
            ("latent channels", cfg.in_channels, model.in_channels),
            ("patch size", cfg.patch_size, model.patch_size),
        )
        if ours != theirs
    ]
    if mismatches:
        raise CheckpointError(
            f"{what} is a ControlNet for {controlnet_family(cfg)} and the loaded model is "
            f"{mmditx_family(model)} ({'; '.join(mismatches)}); use a ControlNet made for this model."
        )
    if cfg.depth > model.depth:
        raise CheckpointError(
            f"{what} has {cfg.depth} blocks, more than the loaded model's {model.depth}; it is not for this model."
        )


def load_controlnet(
    path: str | Path,
    model: MMDiTXConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ControlNet:
    """The ControlNet at ``path``, checked to fit the transformer of config ``model``, built in ``dtype``."""
    f = read_controlnet(path, model)
    what = f.path.name
    check_fits(f.config, model, what)
    return ControlNet.from_state_dict(
        f.tensors,
        dtype=dtype,
        device=device,
        what=f"ControlNet {what}",
        force_zeros_for_pooled=f.force_zeros_for_pooled,
    )
