"""The diffusers ``AutoencoderKL`` key layout, mapped to the official (ldm) VAE layout and back.

Differences between the two (cf. DIF single_file_utils.py ``convert_ldm_vae_checkpoint``):

=======================================  ====================================================
official (ours)                          diffusers
=======================================  ====================================================
``encoder.down.{l}.block.{i}``           ``encoder.down_blocks.{l}.resnets.{i}``
``encoder.down.{l}.downsample.conv``     ``encoder.down_blocks.{l}.downsamplers.0.conv``
``decoder.up.{l}.block.{i}``             ``decoder.up_blocks.{L-1-l}.resnets.{i}`` (order reversed)
``decoder.up.{l}.upsample.conv``         ``decoder.up_blocks.{L-1-l}.upsamplers.0.conv``
``*.nin_shortcut``                       ``*.conv_shortcut``
``{enc,dec}.mid.block_{1,2}``            ``{enc,dec}.mid_block.resnets.{0,1}``
``{enc,dec}.mid.attn_1.norm``            ``{enc,dec}.mid_block.attentions.0.group_norm``
``mid.attn_1.{q,k,v}`` (1x1 conv)        ``mid_block.attentions.0.to_{q,k,v}`` (Linear, [C, C])
``mid.attn_1.proj_out`` (1x1 conv)       ``mid_block.attentions.0.to_out.0`` (Linear, [C, C])
``{enc,dec}.norm_out``                   ``{enc,dec}.conv_norm_out``
=======================================  ====================================================

Older diffusers files name the attention ``query/key/value/proj_attn``; those are read too. The SD3
VAE has no ``quant_conv`` / ``post_quant_conv``, so files holding them are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from sd35.errors import CheckpointError
from sd35.loading.tensors import LazyTensor, StateDict, lazy, shape_of

_OFFICIAL_RX = re.compile(r"(encoder|decoder)\.(down\.\d+|up\.\d+|mid)\.")
_DIFFUSERS_RX = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")

_PLAIN = {  # top-level layers; only the final norm is renamed
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "norm_out": "conv_norm_out",
}
_ATTN_OURS_TO_DIF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIF_TO_OURS = {v: k for k, v in _ATTN_OURS_TO_DIF.items()} | {
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2"}


def is_official_vae(keys: Iterable[str]) -> bool:
    """Whether ``keys`` (after any ``first_stage_model.`` strip) are in the official ldm VAE layout."""
    return any(_OFFICIAL_RX.match(k) for k in keys)


def is_diffusers_vae(keys: Iterable[str]) -> bool:
    """Whether ``keys`` are in the diffusers ``AutoencoderKL`` layout."""
    return any(_DIFFUSERS_RX.match(k) for k in keys)


def _num_levels(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _reject_quant(keys: Iterable[str]) -> None:
    for k in keys:
        if k.split(".")[0] in ("quant_conv", "post_quant_conv"):
            raise CheckpointError(
                f"VAE: '{k}' is a quant_conv/post_quant_conv weight: this is an SD1/SDXL-style VAE, not the SD3 "
                "16-channel VAE (which has neither). Use the SD3 VAE."
            )


def _resnet_part(part: str, to_diffusers: bool) -> str | None:
    """``norm1``... map to themselves; the shortcut is renamed. ``None`` if ``part`` is not a resnet layer."""
    if part in _RESNET_PARTS:
        return part
    if to_diffusers:
        return "conv_shortcut" if part == "nin_shortcut" else None
    return "nin_shortcut" if part == "conv_shortcut" else None


def _official_to_diffusers_key(key: str, num_up: int) -> tuple[str, bool] | None:
    """Our key -> (diffusers key, is an attention projection weight to flatten), or None."""
    half, _, rest = key.partition(".")
    if half not in ("encoder", "decoder"):
        return None
    parts = rest.split(".")
    leaf = parts[-1]
    if leaf not in ("weight", "bias"):
        return None
    if len(parts) == 2 and parts[0] in _PLAIN:
        return f"{half}.{_PLAIN[parts[0]]}.{leaf}", False
    if parts[0] == "mid" and len(parts) == 4:
        sub, layer = parts[1], parts[2]
        if sub in ("block_1", "block_2") and (name := _resnet_part(layer, True)):
            return f"{half}.mid_block.resnets.{int(sub[-1]) - 1}.{name}.{leaf}", False
        if sub == "attn_1" and layer in _ATTN_OURS_TO_DIF:
            proj = layer != "norm" and leaf == "weight"
            return f"{half}.mid_block.attentions.0.{_ATTN_OURS_TO_DIF[layer]}.{leaf}", proj
        return None
    kind = {"encoder": "down", "decoder": "up"}[half]
    if parts[0] != kind or len(parts) < 4 or not parts[1].isdigit():
        return None
    level = int(parts[1])
    block = f"{kind}_blocks.{level if half == 'encoder' else num_up - 1 - level}"
    if (
        parts[2] == "block"
        and len(parts) == 6
        and parts[3].isdigit()
        and (name := _resnet_part(parts[4], True))
    ):
        return f"{half}.{block}.resnets.{int(parts[3])}.{name}.{leaf}", False
    resample = {"encoder": "downsample", "decoder": "upsample"}[half]
    if parts[2] == resample and len(parts) == 5 and parts[3] == "conv":
        return f"{half}.{block}.{resample}rs.0.conv.{leaf}", False
    return None


def _diffusers_to_official_key(key: str, num_up: int) -> tuple[str, bool] | None:
    """Diffusers key -> (our key, is an attention projection weight to reshape to 1x1 conv), or None."""
    half, _, rest = key.partition(".")
    if half not in ("encoder", "decoder"):
        return None
    parts = rest.split(".")
    leaf = parts[-1]
    if leaf not in ("weight", "bias"):
        return None
    inverse_plain = {v: k for k, v in _PLAIN.items()}
    if len(parts) == 2 and parts[0] in inverse_plain:
        return f"{half}.{inverse_plain[parts[0]]}.{leaf}", False
    if parts[0] == "mid_block" and len(parts) >= 5 and parts[2].isdigit():
        if parts[1] == "resnets" and len(parts) == 5 and parts[2] in ("0", "1"):
            name = _resnet_part(parts[3], False)
            return (f"{half}.mid.block_{int(parts[2]) + 1}.{name}.{leaf}", False) if name else None
        if parts[1] == "attentions" and parts[2] == "0":
            layer = ".".join(parts[3:-1])
            if layer in _ATTN_DIF_TO_OURS:
                ours = _ATTN_DIF_TO_OURS[layer]
                return f"{half}.mid.attn_1.{ours}.{leaf}", ours != "norm" and leaf == "weight"
        return None
    kind = {"encoder": "down", "decoder": "up"}[half]
    if parts[0] != f"{kind}_blocks" or len(parts) < 5 or not parts[1].isdigit():
        return None
    index = int(parts[1])
    level = index if half == "encoder" else num_up - 1 - index
    if level < 0:
        return None
    if (
        parts[2] == "resnets"
        and len(parts) == 6
        and parts[3].isdigit()
        and (name := _resnet_part(parts[4], False))
    ):
        return f"{half}.{kind}.{level}.block.{int(parts[3])}.{name}.{leaf}", False
    resample = {"encoder": "downsample", "decoder": "upsample"}[half]
    if parts[2] == f"{resample}rs" and parts[3:5] == ["0", "conv"] and len(parts) == 6:
        return f"{half}.{kind}.{level}.{resample}.conv.{leaf}", False
    return None


def vae_from_diffusers(sd: StateDict) -> dict[str, LazyTensor]:
    """A diffusers ``AutoencoderKL`` state dict -> the official layout, lazily (nothing is read here)."""
    _reject_quant(sd.keys())
    num_up = _num_levels(sd.keys(), r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, LazyTensor] = {}
    for key, value in sd.items():
        mapped = _diffusers_to_official_key(key, num_up)
        if mapped is None:
            raise CheckpointError(
                f"VAE (diffusers layout): cannot map tensor '{key}' to the SD3 VAE. "
                "The file is not a diffusers AutoencoderKL of the SD3 kind."
            )
        name, is_proj = mapped
        if name in out:
            raise CheckpointError(
                f"VAE (diffusers layout): tensor '{key}' duplicates another one mapped to '{name}'."
            )
        t = lazy(value)
        shape = shape_of(value)
        if is_proj and len(shape) == 2:
            t = t.derive((*shape, 1, 1), lambda x: x.reshape(*x.shape, 1, 1))
        elif is_proj and len(shape) == 3:  # very old files: Conv1d-shaped [C, C, 1]
            t = t.derive((*shape[:2], 1, 1), lambda x: x.reshape(*x.shape[:2], 1, 1))
        out[name] = t
    return out


def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official layout -> diffusers ``AutoencoderKL`` (what ``AutoencoderKL.state_dict()`` holds).

    The exact inverse of :func:`vae_from_diffusers` on current diffusers names.
    """
    _reject_quant(sd.keys())
    num_up = _num_levels(sd.keys(), r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        mapped = _official_to_diffusers_key(key, num_up)
        if mapped is None:
            raise CheckpointError(f"VAE: cannot map tensor '{key}' to the diffusers AutoencoderKL layout.")
        name, is_proj = mapped
        if is_proj and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[name] = value
    return out
