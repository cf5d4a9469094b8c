"""Writing a LoRA (a trained one, from :func:`sd35.lora.patching.add_lora`) in the kohya or diffusers layout.

- **kohya** (sd-scripts ``networks/lora_sd3.py``; ComfyUI, Forge and sd.cpp read it): one adapter per
  layer with our official names, dots as underscores, prefixes ``lora_unet_`` / ``lora_te1_`` (CLIP-L) /
  ``lora_te2_`` (CLIP-G) / ``lora_te3_`` (T5); ``.lora_down.weight`` [r, in], ``.lora_up.weight``
  [out, r], ``.alpha`` (a float32 scalar); the fused qkv stays fused. DoRA adds ``.dora_scale`` [1, in]
  (the layout ComfyUI and LyCORIS ``wd_on_out=False`` read). Metadata: ``ss_network_module``,
  ``ss_network_dim``, ``ss_network_alpha`` as sd-scripts writes them.
- **diffusers** (what ``StableDiffusion3Pipeline.load_lora_weights`` and
  ``SD3Transformer2DModel.load_lora_adapter`` read, diffusers 0.42): PEFT keys ``transformer.<diffusers
  module>.lora_A.weight`` / ``.lora_B.weight``; a fused qkv is split into ``to_q/to_k/to_v`` (or
  ``add_q_proj``... / ``attn2.to_q``...) by cutting ``up`` into thirds and sharing ``down``; the adaLN
  halves diffusers stores as (scale, shift) are swapped. Text encoders: ``text_encoder.`` (CLIP-L),
  ``text_encoder_2.`` (CLIP-G), ``text_encoder_3.`` (T5; diffusers' SD3 loader ignores it, sd35 reads it).
  Rank and alpha go where diffusers reads them: the ``lora_adapter_metadata`` JSON, a flat dict of
  LoraConfig fields prefixed by the component (``{"transformer.r": 16, "transformer.lora_alpha": 8,
  "transformer.target_modules": [...], ...}``; diffusers ``loaders/lora_base.py`` ``write_lora_layers`` and
  ``_load_sft_state_dict_metadata``). diffusers has no DoRA for these files (it drops ``dora_scale``), and
  PEFT's DoRA magnitude is per output row, ours per input column, so DoRA exports only as kohya.

Every file also carries ``sd35_*`` metadata: base model, targets, rank, alpha, dora, format.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from sd35._version import __version__
from sd35.errors import SD35Error
from sd35.loading.diffusers_mmditx import swap_halves
from sd35.lora.adapters import LoRA
from sd35.lora.formats import COMPONENTS, DIFFUSERS_PREFIX, KOHYA_PREFIX, ModelIndex, diffusers_names
from sd35.lora.patching import iter_patches
from sd35.models.clip import CLIPTextEncoder
from sd35.models.family import mmditx_family
from sd35.models.mmditx import MMDiTX
from sd35.models.t5 import T5Encoder

FORMATS = ("kohya", "diffusers")


def _as_models(model_or_models) -> dict[str, nn.Module]:
    if isinstance(model_or_models, dict):
        unknown = set(model_or_models) - set(COMPONENTS)
        if unknown:
            raise SD35Error(f"unknown model component(s) {sorted(unknown)}; use {list(COMPONENTS)}.")
        return {c: m for c, m in model_or_models.items() if m is not None}
    m = model_or_models
    if isinstance(m, MMDiTX):
        return {"mmditx": m}
    if isinstance(m, T5Encoder):
        return {"t5": m}
    if isinstance(m, CLIPTextEncoder):
        return {"clip_g" if m.config.has_projection else "clip_l": m}
    raise SD35Error("pass the models as a dict {'mmditx': ..., 'clip_l': ..., 'clip_g': ..., 't5': ...}.")


def _adapters(models: dict[str, nn.Module], name: str) -> list[tuple[str, str, LoRA]]:
    out = []
    for comp, model in models.items():
        for mname, _, patch, _ in iter_patches(model):
            if patch.name != name:
                continue
            if not isinstance(patch.adapter, LoRA):
                raise SD35Error(
                    f"LoRA {name!r} on '{mname}' is a {patch.adapter.kind} adapter; only plain LoRA/DoRA adapters "
                    "(as add_lora makes them) can be exported."
                )
            out.append((comp, mname, patch.adapter))
    if not out:
        raise SD35Error(f"no LoRA named {name!r} is applied to these models.")
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.to(dtype) if dtype is not None else t).contiguous()


def export_lora(
    model_or_models, name: str = "train", format: str = "kohya", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of LoRA ``name`` in ``format`` "kohya" or "diffusers" (``dtype``: cast, e.g. bfloat16)."""
    if format not in FORMATS:
        raise SD35Error(f"unknown LoRA format {format!r}; choose kohya or diffusers.")
    models = _as_models(model_or_models)
    items = _adapters(models, name)
    out: dict[str, torch.Tensor] = {}
    if format == "kohya":
        for comp, mname, a in items:
            key = KOHYA_PREFIX[comp] + mname.replace(".", "_")
            out[f"{key}.lora_down.weight"] = _cast(a.down, dtype)
            out[f"{key}.lora_up.weight"] = _cast(a.up, dtype)
            if a.mid is not None:
                out[f"{key}.lora_mid.weight"] = _cast(a.mid, dtype)
            out[f"{key}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
            if a.dora_scale is not None:
                out[f"{key}.dora_scale"] = _cast(a.dora_scale, dtype)
        return out
    inverse = diffusers_names(ModelIndex(models)) if "mmditx" in models else {}
    for comp, mname, a in items:
        if a.dora_scale is not None or a.mid is not None:
            raise SD35Error(
                "DoRA (and Tucker) LoRAs can be exported only in the kohya format: diffusers drops DoRA magnitudes."
            )
        prefix = DIFFUSERS_PREFIX[comp]
        if comp != "mmditx":
            out[f"{prefix}.{mname}.lora_A.weight"] = _cast(a.down, dtype)
            out[f"{prefix}.{mname}.lora_B.weight"] = _cast(a.up, dtype)
            continue
        if mname not in inverse:
            raise SD35Error(f"MMDiT-X layer '{mname}' has no diffusers counterpart.")
        for dname, target in inverse[mname]:
            up = swap_halves(a.up) if target.swap else a.up
            if target.part is not None:
                i, count = target.part
                rows = up.shape[0] // count
                up = up[i * rows : (i + 1) * rows]
            out[f"{prefix}.{dname}.lora_A.weight"] = _cast(a.down, dtype).clone()
            out[f"{prefix}.{dname}.lora_B.weight"] = _cast(up, dtype)
    return out


def export_metadata(model_or_models, name: str = "train", format: str = "kohya") -> dict[str, str]:
    """The safetensors metadata to save with :func:`export_lora`'s tensors (rank, alpha, targets, base model)."""
    if format not in FORMATS:
        raise SD35Error(f"unknown LoRA format {format!r}; choose kohya or diffusers.")
    models = _as_models(model_or_models)
    items = _adapters(models, name)
    ranks = [a.rank for _, _, a in items]
    alphas = [a.alpha for _, _, a in items]
    rank = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    config = next((a.config for _, _, a in items if a.config), {})
    dora = any(a.dora_scale is not None for _, _, a in items)
    base = "unknown"
    if "mmditx" in models and getattr(models["mmditx"], "config", None) is not None:
        base = mmditx_family(models["mmditx"].config)
    meta = {
        "sd35_version": __version__,
        "sd35_format": format,
        "sd35_base_model": base,
        "sd35_components": ",".join(sorted({c for c, _, _ in items})),
        "sd35_targets": ",".join(config.get("targets", [])),
        "sd35_rank": str(rank),
        "sd35_alpha": str(alpha),
        "sd35_dora": str(dora).lower(),
    }
    if format == "kohya":
        meta.update(
            {
                "ss_network_module": "networks.lora_sd3",
                "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha),
            }
        )
        if dora:
            meta["ss_network_args"] = json.dumps({"dora_wd": "True"})
        return meta
    inverse = diffusers_names(ModelIndex(models)) if "mmditx" in models else {}
    flat: dict[str, object] = {}
    for comp in sorted({c for c, _, _ in items}, key=COMPONENTS.index):
        prefix = DIFFUSERS_PREFIX[comp]
        modules: dict[str, LoRA] = {}
        for c, mname, a in items:
            if c != comp:
                continue
            names = [d for d, _ in inverse[mname]] if comp == "mmditx" else [mname]
            modules.update(dict.fromkeys(names, a))
        r = max({a.rank for a in modules.values()}, key=[a.rank for a in modules.values()].count)
        al = max({a.alpha for a in modules.values()}, key=[a.alpha for a in modules.values()].count)
        flat.update(
            {
                f"{prefix}.r": r,
                f"{prefix}.lora_alpha": al,
                f"{prefix}.target_modules": sorted(modules),
                f"{prefix}.rank_pattern": {
                    f"^{re.escape(n)}": a.rank for n, a in modules.items() if a.rank != r
                },
                f"{prefix}.alpha_pattern": {
                    f"^{re.escape(n)}": a.alpha for n, a in modules.items() if a.alpha != al
                },
                f"{prefix}.use_dora": False,
                f"{prefix}.lora_bias": False,
            }
        )
    meta["lora_adapter_metadata"] = json.dumps(flat, indent=2, sort_keys=True)
    return meta
