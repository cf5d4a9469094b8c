"""Finding the pipeline's parts in whatever files and folders the user has.

A user may hold the official ``sd3.5_medium.safetensors`` (MMDiT-X + VAE), a ComfyUI all-in-one
file that also carries the text encoders, separate text-encoder files under any name
(``clip_l.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors`` ...), or a diffusers folder. Every file is
recognised by its keys and shapes, never by its name, and split into :class:`Component` objects
whose tensors are lazy and already in our key layout (official for MMDiT-X and VAE,
HF-transformers for CLIP and T5, all without prefixes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd35.errors import CheckpointError, MissingComponentError
from sd35.loading.diffusers_mmditx import is_diffusers_mmditx, mmditx_from_diffusers
from sd35.loading.diffusers_vae import is_diffusers_vae, is_official_vae, vae_from_diffusers
from sd35.loading.gguf_io import is_gguf, lazy_tensors, read_gguf
from sd35.loading.safetensors_io import open_safetensors, read_metadata, shards_of
from sd35.loading.tensors import LazyTensor, dtype_mix, shape_of

MMDITX, VAE, CLIP_L, CLIP_G, T5XXL = "mmditx", "vae", "clip_l", "clip_g", "t5xxl"
KINDS = (MMDITX, VAE, CLIP_L, CLIP_G, T5XXL)
KIND_NAMES = {MMDITX: "MMDiT-X", VAE: "VAE", CLIP_L: "CLIP-L", CLIP_G: "CLIP-G", T5XXL: "T5-XXL"}

# Where users usually get each part (shown when a part is missing).
USUAL_FILES = {
    MMDITX: "sd3.5_medium.safetensors (stabilityai/stable-diffusion-3.5-medium), or a diffusers folder's transformer/",
    VAE: "the VAE inside sd3.5_medium.safetensors, or a diffusers folder's vae/ (SD3 VAE, 16 latent channels)",
    CLIP_L: "clip_l.safetensors (text_encoders/ of stabilityai/stable-diffusion-3.5-medium), or text_encoder/",
    CLIP_G: "clip_g.safetensors (text_encoders/ of stabilityai/stable-diffusion-3.5-medium), or text_encoder_2/",
    T5XXL: "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (text_encoders/), or text_encoder_3/",
}

# Widths of the real encoders, by which an HF-layout CLIP file is recognised whatever its name.
CLIP_WIDTHS = {768: CLIP_L, 1280: CLIP_G}

ALL_IN_ONE_PREFIXES = {
    "model.diffusion_model.": MMDITX,
    "first_stage_model.": VAE,
    "text_encoders.clip_l.transformer.": CLIP_L,
    "text_encoders.clip_g.transformer.": CLIP_G,
    "text_encoders.t5xxl.transformer.": T5XXL,
}
# diffusers folder sub-folders and the weight-file stems they use.
DIFFUSERS_SUBFOLDERS = {
    "transformer": (MMDITX, "diffusion_pytorch_model"),
    "vae": (VAE, "diffusion_pytorch_model"),
    "text_encoder": (CLIP_L, "model"),
    "text_encoder_2": (CLIP_G, "model"),
    "text_encoder_3": (T5XXL, "model"),
}


@dataclass
class Component:
    """One network's weights, in our key layout, with where they came from."""

    kind: str  # one of KINDS, or "clip" while an HF-layout CLIP's role is still open
    tensors: dict[str, LazyTensor]
    source: Path
    layout: str
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # its file's text metadata (safetensors or GGUF)

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, "CLIP (L or G not yet known)")

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def dtypes(self) -> str:
        """The stored dtypes, most common first, e.g. ``bf16`` or ``fp8_e4m3fn 98% / fp32``."""
        return dtype_mix(self.tensors.values())

    def width(self) -> int:
        """Hidden width of a CLIP component."""
        return shape_of(self.tensors["text_model.embeddings.token_embedding.weight"])[1]


# ---------------------------------------------------------------------------------------------
# What a set of keys is


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def foreign_model(keys: set[str]) -> str | None:
    """If the keys belong to a model family we do not run, say which (for the error message)."""
    if any(
        ".lora_down." in k or ".lora_A." in k or ".lora_up." in k or ".hada_w1" in k or ".lokr_w1" in k
        for k in keys
    ):
        return "a LoRA/LyCORIS file, not a base model (LoRA loading is a separate option)"
    if "controlnet_blocks.0.weight" in keys or "pos_embed_input.proj.weight" in keys:
        return "a ControlNet (pass it with --control or in a request's controls, not as the model)"
    if _has_prefix(keys, "double_blocks.") or _has_prefix(keys, "model.diffusion_model.double_blocks."):
        return "a Flux model"
    if _has_prefix(keys, "conditioner.embedders.") or "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "a Stable Diffusion XL checkpoint"
    if _has_prefix(keys, "cond_stage_model.") or _has_prefix(keys, "model.diffusion_model.input_blocks."):
        return "a Stable Diffusion 1.x/2.x checkpoint"
    if _has_prefix(keys, "down_blocks.") and _has_prefix(keys, "time_embedding."):
        return "a diffusers UNet (SD1.x/SDXL family)"
    if _has_prefix(keys, "single_transformer_blocks."):
        return "a diffusers Flux transformer"
    if "model.diffusion_model.joint_blocks.0.x_block.adaLN_modulation.1.weight" not in keys and _has_prefix(
        keys, "model.diffusion_model."
    ):
        return "a diffusion model of another family (its 'model.diffusion_model.' keys are not MMDiT joint blocks)"
    return None


def _is_clip(keys: set[str]) -> bool:
    return "text_model.embeddings.token_embedding.weight" in keys


def _is_t5(keys: set[str]) -> bool:
    return "encoder.block.0.layer.0.SelfAttention.q.weight" in keys


def _dequantize_scaled_fp8(tensors: dict[str, LazyTensor], notes: list[str]) -> dict[str, LazyTensor]:
    """ComfyUI's "fp8 scaled" files store ``W_fp8`` plus ``scale_weight``; the real weight is their product.

    The ``scaled_fp8`` marker and the ``scale_input`` tensors (for fp8 matmuls) are dropped.
    """
    if "scaled_fp8" not in tensors:
        return tensors
    out: dict[str, LazyTensor] = {}
    for key, t in tensors.items():
        if key == "scaled_fp8" or key.endswith(".scale_input") or key.endswith(".scale_weight"):
            continue
        scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        if scale_key and scale_key in tensors:
            scale = tensors[scale_key]
            out[key] = t.derive(t.shape, lambda w, s=scale: w.to(torch.float32) * s.load().to(torch.float32))
        else:
            out[key] = t
    notes.append("fp8 scaled weights (dequantized as they load)")
    return out


def _split_by_prefix(tensors: dict[str, LazyTensor]) -> dict[str, dict[str, LazyTensor]]:
    parts: dict[str, dict[str, LazyTensor]] = {}
    for key, t in tensors.items():
        for prefix, kind in ALL_IN_ONE_PREFIXES.items():
            if key.startswith(prefix):
                parts.setdefault(kind, {})[key[len(prefix) :]] = t
                break
    return parts


def _classify_bare(tensors: dict[str, LazyTensor], path: Path, layout: str) -> Component | None:
    keys = set(tensors)
    if _has_prefix(keys, "joint_blocks."):
        return Component(MMDITX, tensors, path, layout)
    if is_diffusers_mmditx(keys):
        return Component(
            MMDITX, mmditx_from_diffusers(tensors, what=str(path)), path, "diffusers transformer"
        )
    if is_official_vae(keys):
        return Component(VAE, tensors, path, layout)
    if is_diffusers_vae(keys):
        return Component(VAE, vae_from_diffusers(tensors), path, "diffusers VAE")
    if _is_clip(keys):
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        width = shape_of(tensors["text_model.embeddings.token_embedding.weight"])[1]
        return Component(CLIP_WIDTHS.get(width, "clip"), tensors, path, "HF transformers CLIP")
    if _is_t5(keys):
        return Component(T5XXL, tensors, path, "HF transformers T5 encoder")
    return None


GGUF_LAYOUT = "GGUF"


# llama.cpp's names for a T5 encoder (architecture "t5encoder"; ComfyUI-GGUF reads them) -> HF's
T5_GGUF_NAMES = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}


def _t5_from_llama_names(tensors: dict, path: Path) -> dict:
    """A llama.cpp T5 encoder's tensors under HF T5 names (``enc.blk.3.attn_q.weight`` ->
    ``encoder.block.3.layer.0.SelfAttention.q.weight``)."""
    out = {}
    for key, t in tensors.items():
        if key == "token_embd.weight":
            out["encoder.embed_tokens.weight"] = t
        elif key == "enc.output_norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        elif (m := re.fullmatch(r"enc\.blk\.(\d+)\.(\w+)\.weight", key)) and m.group(2) in T5_GGUF_NAMES:
            out[f"encoder.block.{m.group(1)}.{T5_GGUF_NAMES[m.group(2)]}.weight"] = t
        elif not key.startswith("dec."):  # a full T5's decoder is not needed
            raise CheckpointError(
                f"{path}: a T5 GGUF with an unknown tensor '{key}'; the file is of another model."
            )
    return out


def scan_gguf(path: Path) -> list[Component]:
    """An MMDiT-X in a GGUF file: ComfyUI-GGUF's SD3 layout (architecture "sd3", the official keys without
    ``model.diffusion_model.``), or stable-diffusion.cpp's (the official single file's prefixed keys, with the
    VAE and text encoders when it converted them too); or a text encoder alone: a T5 in llama.cpp's names
    (ComfyUI-GGUF's T5 files), a CLIP or T5 under its HF names (stable-diffusion.cpp's converted text-encoder
    files). Other architectures are named and refused."""
    f = read_gguf(path)
    arch = str(f.metadata.get("general.architecture", "unknown"))
    metadata = {k: v for k, v in f.metadata.items() if isinstance(v, str)}
    tensors = lazy_tensors(f)
    keys = set(tensors)
    foreign = foreign_model(keys)
    if arch in ("t5encoder", "t5") and "token_embd.weight" in keys:
        t5 = _t5_from_llama_names(tensors, path)
        return [Component(T5XXL, t5, path, GGUF_LAYOUT, ["kept quantized"], metadata)]
    if arch in ("clip", "t5", "unknown") and (_is_clip(keys) or _is_t5(keys)):
        # a text encoder alone under its HF names: stable-diffusion.cpp's `-M convert` of clip_l/clip_g/t5xxl
        # files writes them so (it adds text_encoders.*.transformer. when it loads one as --clip_l ...)
        comp = _classify_bare(tensors, path, GGUF_LAYOUT)
        how = "kept quantized" if comp.kind == T5XXL else "dequantized as it loads"
        comp.layout, comp.notes, comp.metadata = GGUF_LAYOUT, [how], metadata
        return [comp]
    if arch not in ("sd3", "unknown") or foreign:
        what = foreign or f'a GGUF of architecture "{arch}"'
        raise CheckpointError(
            f"{path}: this is {what}, not an SD3/SD3.5 MMDiT-X. sd35 reads SD3-family GGUF files only."
        )
    # stable-diffusion.cpp converts whole checkpoints and keeps their prefixes (VAE, text encoders beside)
    parts = _split_by_prefix(tensors) if _has_prefix(keys, "model.diffusion_model.") else {MMDITX: tensors}
    if not _has_prefix(parts.get(MMDITX, {}), "joint_blocks."):
        sample = ", ".join(sorted(keys)[:3])
        raise CheckpointError(
            f"{path}: a GGUF file, but not an SD3 MMDiT-X (no joint_blocks; first keys: {sample})."
        )
    out = []
    for kind, sub in parts.items():
        if kind in (CLIP_L, CLIP_G):
            sub = {k: v for k, v in sub.items() if not k.endswith("position_ids")}
        how = "kept quantized" if kind in (MMDITX, T5XXL) else "dequantized as it loads"
        out.append(Component(kind, sub, path, GGUF_LAYOUT, [how], metadata))
    return out


def scan_file(path: str | Path) -> list[Component]:
    """The components inside one safetensors (or GGUF) file."""
    path = Path(path)
    if is_gguf(path):
        return scan_gguf(path)
    tensors = open_safetensors(path)
    keys = set(tensors)
    notes: list[str] = []
    tensors = _dequantize_scaled_fp8(tensors, notes)
    foreign = foreign_model(keys)
    if foreign:
        raise CheckpointError(
            f"{path}: this looks like {foreign}, not an SD3/SD3.5 file. sd35 runs SD3-family models only."
        )
    parts = _split_by_prefix(tensors)
    components: list[Component] = []
    if parts:
        layout = (
            "all-in-one (MMDiT + VAE + text encoders)"
            if any(k in parts for k in (CLIP_L, CLIP_G, T5XXL))
            else ("official single file" if MMDITX in parts else "prefixed components")
        )
        for kind, sub in parts.items():
            part_notes = list(notes)  # a per-network marker (ComfyUI's) notes that network only
            sub = _dequantize_scaled_fp8(sub, part_notes)
            if kind in (CLIP_L, CLIP_G):
                sub = {k: v for k, v in sub.items() if not k.endswith("position_ids")}
            components.append(Component(kind, sub, path, layout, part_notes))
    else:
        comp = _classify_bare(tensors, path, "single component file")
        if comp is None:
            sample = ", ".join(sorted(keys)[:3])
            raise CheckpointError(
                f"{path}: not recognised as any SD3 part (MMDiT-X, VAE, CLIP-L, CLIP-G, T5-XXL); first keys: {sample}."
            )
        comp.notes += notes
        components.append(comp)
    metadata = read_metadata(path)
    for comp in components:
        comp.metadata = metadata
    return components


def _diffusers_weights(folder: Path, stem: str) -> list[Path] | None:
    for s in (stem, f"{stem}.fp16", f"{stem}.bf16"):
        found = shards_of(folder, s)
        if found:
            return found
    if any(folder.glob("*.bin")):
        raise CheckpointError(
            f"{folder}: holds only PyTorch .bin weights; sd35 reads .safetensors. Download the safetensors files."
        )
    return None


def scan_folder(path: str | Path) -> list[Component]:
    """A diffusers folder (``model_index.json``, ``transformer/`` ...) or a folder of loose weight files."""
    path = Path(path)
    if (path / "model_index.json").exists() or any((path / sub).is_dir() for sub in DIFFUSERS_SUBFOLDERS):
        components = []
        for sub, (kind, stem) in DIFFUSERS_SUBFOLDERS.items():
            folder = path / sub
            if not folder.is_dir():
                continue
            files = _diffusers_weights(folder, stem)
            if not files:
                continue
            tensors = open_safetensors(files)
            comp = _classify_bare(tensors, folder, "diffusers folder")
            if comp is None or comp.kind not in (kind, "clip"):
                found = comp.name if comp else "unrecognised weights"
                raise CheckpointError(f"{folder}: expected the {KIND_NAMES[kind]} here but found {found}.")
            comp.kind, comp.layout = kind, "diffusers folder"
            comp.source = folder
            components.append(comp)
        return components
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files and no diffusers sub-folders in this folder.")
    return [c for f in files for c in scan_file(f)]


def scan(paths: Iterable[str | Path]) -> list[Component]:
    """All components of the given files and folders, with CLIP roles resolved (see :func:`resolve_clip_roles`)."""
    components: list[Component] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder. Check the path.")
        found = scan_folder(p) if p.is_dir() else scan_file(p)
        if sum(c.kind == "clip" for c in found) == 2:  # a folder holding one pair
            resolve_clip_roles(found)
        components += found
    resolve_clip_roles(components)
    return components


def resolve_clip_roles(components: list[Component]) -> None:
    """Name HF-layout CLIP files whose width is not a real encoder's (small test models, for instance).

    With two such files the narrower is CLIP-L and the wider CLIP-G (as for the real 768/1280 pair);
    with one, a file name containing ``clip_l``/``clip_g`` (or ``l``/``g``/``bigg`` after ``clip``) decides.
    """
    open_ = [c for c in components if c.kind == "clip"]
    taken = {c.kind for c in components}
    if len(open_) == 2 and open_[0].width() != open_[1].width():
        narrow, wide = sorted(open_, key=Component.width)
        narrow.kind, wide.kind = CLIP_L, CLIP_G
        return
    for c in open_:
        stem = c.source.name.lower() if c.source.is_file() else c.source.name.lower()
        if re.search(r"clip[_-]?(g|bigg)|bigg", stem) and CLIP_G not in taken:
            c.kind = CLIP_G
        elif re.search(r"clip[_-]?l", stem) and CLIP_L not in taken:
            c.kind = CLIP_L
        else:
            raise CheckpointError(
                f"{c.source}: a CLIP text encoder of width {c.width()}, which is neither CLIP-L (768) nor CLIP-G (1280); "
                "name the file clip_l.safetensors or clip_g.safetensors to say which it is."
            )
        taken.add(c.kind)


def assemble(
    components: list[Component],
    required: Iterable[str] = KINDS,
    overrides: Iterable[Component] = (),
    hint: str = "",
) -> dict[str, Component]:
    """One component per kind; a kind given twice or a required kind missing is an error naming the files.

    ``overrides`` (e.g. text encoders passed on their own) replace same-kind parts of ``components``
    (e.g. those embedded in an all-in-one file); ``hint`` is appended to the missing-part message.
    """
    by_kind: dict[str, Component] = {}
    for group in (list(components), list(overrides)):
        seen: dict[str, Component] = {}
        for c in group:
            if c.kind in seen:
                raise CheckpointError(
                    f"two {c.name} weights were given: {seen[c.kind].source} and {c.source}. Pass only one of them."
                )
            seen[c.kind] = c
        by_kind.update(seen)
    missing = [k for k in required if k not in by_kind]
    if missing:
        lines = "; ".join(f"{KIND_NAMES[k]}: {USUAL_FILES[k]}" for k in missing)
        raise MissingComponentError(
            f"missing {', '.join(KIND_NAMES[k] for k in missing)}. Usual files: {lines}.{hint}",
            param="model" if MMDITX in missing or VAE in missing else "text_encoders",
        )
    return by_kind


def load_component(
    c: Component, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Build our module for a component, streaming its tensors from disk (see :mod:`sd35.loading.weights`)."""
    from sd35.models.clip import CLIPTextEncoder
    from sd35.models.mmditx import MMDiTX
    from sd35.models.t5 import T5Encoder
    from sd35.models.vae import VAE as VAEModel

    what = f"{c.name} in {c.source}"
    if c.kind == MMDITX:
        return MMDiTX.from_state_dict(
            c.tensors, dtype=dtype, device=device, what=what, quantized=c.layout == GGUF_LAYOUT
        )
    if c.kind == VAE:
        return VAEModel.from_state_dict(c.tensors, dtype=dtype, device=device, what=what)
    if c.kind in (CLIP_L, CLIP_G):
        return CLIPTextEncoder.from_state_dict(c.tensors, kind=c.kind, dtype=dtype, device=device, what=what)
    if c.kind == T5XXL:
        return T5Encoder.from_state_dict(
            c.tensors, dtype=dtype, device=device, what=what, quantized=c.layout == GGUF_LAYOUT
        )
    raise CheckpointError(f"{c.source}: cannot build a model for an unresolved {c.name}.")


def load_models(
    paths: Iterable[str | Path],
    kinds: Iterable[str] = KINDS,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.nn.Module]:
    """Scan ``paths`` and build the requested parts: ``{"mmditx": MMDiTX, "vae": VAE, "clip_l": ..., ...}``."""
    kinds = tuple(kinds)
    found = assemble(scan(paths), required=kinds)
    return {k: load_component(found[k], dtype, device) for k in kinds}
