"""``sd35 convert``: any model files sd35 reads, written again in another layout users' tools read.

Every input is scanned as :func:`sd35.loading.components.scan` scans a model, so whatever loads converts, and the
tensors arrive in our layout; the targets are

- ``official``: one ``.safetensors`` file. The official single file's keys (``model.diffusion_model.*``,
  ``first_stage_model.*``), with ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` when the inputs carry
  text encoders (ComfyUI's all-in-one layout); one text encoder or one VAE alone is written bare, as the
  separate ``clip_l.safetensors`` / ``t5xxl_fp16.safetensors`` / ``models/vae/`` files are;
- ``diffusers``: a diffusers folder (:func:`sd35.loading.writers.write_diffusers`); it needs all five parts;
  the inputs' ``tokenizer*/`` folders are copied into it when they have them;
- ``gguf``: one network per file, in the layout tools read: the MMDiT-X as ComfyUI-GGUF's SD3 files
  (``general.architecture`` "sd3", the official keys without ``model.diffusion_model.``), a T5-XXL alone in
  llama.cpp's T5 names ("t5encoder", as ComfyUI-GGUF's ``t5-v1_1-xxl-encoder-*.gguf``), a CLIP alone in
  stable-diffusion.cpp's naming (its HF keys as they are). Which tensors keep a float type follows ComfyUI-GGUF
  (``tools/convert.py``: 1-D tensors and those of at most 1024 values in F32; its llama.cpp patch: SD3's
  ``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer`` and ``pos_embed``
  unquantized, a row that fills no whole block in F16) and llama.cpp (T5's ``attn_rel_b`` unquantized). A
  K-quant file holds every other weight in that one type (llama.cpp's ``_M`` mixes, which give some layers a
  larger type, are not made);
- ``scaled_fp8``: ComfyUI's "fp8 scaled" layout, as ``official`` but every linear weight of the MMDiT-X and
  the T5 stored as ``float8_e4m3fn`` with a per-tensor ``.scale_weight`` (the weight is their product) and a
  ``scaled_fp8`` marker per network (ComfyUI's ``model_detection`` reads the marker's dtype). CLIPs and VAE
  keep their dtype (as ComfyUI's ``..._incl_clips_t5xxlfp8scaled`` files).

Every output is written whole or not at all and never over an existing file or folder.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.accel.fp8 import E4M3, quantize_weight
from sd35.devices import resolve_dtype
from sd35.errors import CheckpointError, MissingComponentError, SD35Error
from sd35.loading.assemble import find_tokenizer_root
from sd35.loading.components import (
    ALL_IN_ONE_PREFIXES,
    CLIP_G,
    CLIP_L,
    KIND_NAMES,
    KINDS,
    MMDITX,
    T5_GGUF_NAMES,
    T5XXL,
    USUAL_FILES,
    VAE,
    Component,
    assemble,
    scan,
)
from sd35.loading.gguf_io import BLOCKS, is_gguf
from sd35.loading.gguf_quantize import WRITABLE, quantize
from sd35.loading.gguf_writer import TensorOut, write_gguf
from sd35.loading.safetensors_io import read_metadata, save_file_atomic
from sd35.loading.tensors import LazyTensor, materialize
from sd35.loading.writers import t5_with_embedding, write_diffusers
from sd35.models.clip import CLIPTextConfig
from sd35.models.configs import PipelineConfigs, PipelineWeights
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.t5 import T5Config
from sd35.models.vae import VAEConfig

TARGETS = ("official", "diffusers", "gguf", "scaled_fp8")
SUFFIXES = {".gguf": "gguf", ".safetensors": "official"}
FOREIGN_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx")
PREFIXES = {kind: prefix for prefix, kind in ALL_IN_ONE_PREFIXES.items()}

# llama.cpp's general.file_type (enum llama_ftype) for each type the writer makes; a file of one K-quant is
# llama.cpp's _S mix (Q6_K has one type only)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
FILE_TYPES |= {"Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
GGUF_ARCH = {MMDITX: "sd3", T5XXL: "t5encoder", CLIP_L: "clip", CLIP_G: "clip"}
# ComfyUI-GGUF's llama.cpp patch keeps these SD3 tensors unquantized (first and last layers, embedders)
SD3_UNQUANTIZED = (
    "x_embedder.",
    "t_embedder.",
    "y_embedder.",
    "context_embedder.",
    "final_layer.",
    "pos_embed",
)
SMALL = 1024  # ComfyUI-GGUF's QUANTIZATION_THRESHOLD: tensors of at most this many values stay F32
_QUANT_IN_NAME = re.compile(r"(?i)(?:^|[-_.])((?:[QF]\d+|BF16)(?:_[0-9K])?(?:_[SML])?)$")


@dataclass(frozen=True)
class Conversion:
    """What to write: ``target`` (one of :data:`TARGETS`), the GGUF ``quant`` type, the safetensors ``dtype``
    (None: each tensor keeps the dtype it is stored in)."""

    target: str
    quant: str | None = None
    dtype: torch.dtype | None = None


def plan(out: Path, to: str | None = None, quant: str | None = None, dtype: str | None = None) -> Conversion:
    """The conversion that ``OUT``, ``--to``, ``--quant`` and ``--dtype`` ask for, or one clear error."""
    suffix = out.suffix.lower()
    if suffix in FOREIGN_SUFFIXES:
        raise SD35Error(
            f"{out}: sd35 convert writes .safetensors, .gguf or a diffusers folder, not {suffix}."
        )
    target = to or SUFFIXES.get(suffix, "diffusers")
    if target not in TARGETS:
        raise SD35Error(f"--to {target}: unknown target; use one of {', '.join(TARGETS)}.")
    wants = {"gguf": ".gguf", "official": ".safetensors", "scaled_fp8": ".safetensors"}.get(target)
    if wants and suffix != wants:
        raise SD35Error(f"{out}: --to {target} writes a {wants} file; name the output ...{wants}.")
    if target == "diffusers" and suffix in SUFFIXES:
        raise SD35Error(f"{out}: --to diffusers writes a folder; give a folder name without {suffix}.")
    if target != "gguf":
        if quant:
            raise SD35Error(
                f"--quant {quant} applies to GGUF output only; name a .gguf output or use --dtype."
            )
        return Conversion(target, None, resolve_dtype(dtype, torch.device("cpu")) if dtype else None)
    if dtype:
        raise SD35Error(f"--dtype {dtype} applies to safetensors output; for GGUF pick a type with --quant.")
    named = _QUANT_IN_NAME.search(out.stem)
    quant = (quant or (named.group(1) if named else "F16")).upper()
    if quant not in WRITABLE:
        raise SD35Error(
            f"GGUF type {quant} is not one sd35 convert writes (it writes {', '.join(WRITABLE)}); pick one with "
            "--quant or name the output like model-Q8_0.gguf."
        )
    return Conversion("gguf", quant)


def check_output_free(out: Path) -> None:
    """An existing output is never replaced; its folder must exist."""
    if out.exists():
        raise SD35Error(f"{out} already exists; sd35 convert never overwrites. Move it or pick another name.")
    if not out.parent.is_dir():
        raise SD35Error(f"{out.parent}: the output's folder does not exist; create it first.")


def _load(t: LazyTensor | torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    x = materialize(t)
    return materialize(x, dtype) if dtype is not None and x.is_floating_point() else x


def _t5_embedding(tensors: dict) -> dict:
    """T5 tensors with the embedding as ``encoder.embed_tokens.weight`` only (files carry it as ``shared``,
    ``embed_tokens`` or both)."""
    out = dict(tensors)
    shared = out.pop("shared.weight", None)
    if "encoder.embed_tokens.weight" not in out:
        out["encoder.embed_tokens.weight"] = shared
    return out


def _tensors(c: Component, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    tensors = _t5_embedding(c.tensors) if c.kind == T5XXL else c.tensors
    return {k: _load(t, dtype) for k, t in tensors.items()}


def _file_keys(kind: str, sd: dict[str, torch.Tensor], alone: bool) -> dict[str, torch.Tensor]:
    """A network's tensors under the keys of a single file: prefixed, or bare for a lone text encoder or VAE."""
    if kind == T5XXL:
        sd = t5_with_embedding(sd, "both" if alone else "shared")
    if kind == CLIP_L and alone:  # the separate clip_l file has no projection (its pooled output is unused)
        sd = {k: v for k, v in sd.items() if not k.startswith("text_projection")}
    if alone and kind != MMDITX:
        return sd
    return {PREFIXES[kind] + k: v for k, v in sd.items()}


def _is_linear_weight(key: str, value: torch.Tensor) -> bool:
    """A weight that ComfyUI's scaled-fp8 layers (``scaled_fp8_ops``: its Linear only) read with a scale."""
    embedding = ("embed_tokens", "shared.", "relative_attention_bias", "embedding")
    return key.endswith(".weight") and value.dim() == 2 and not any(e in key for e in embedding)


def scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 scaled storage of one network: each linear weight as e4m3 with its per-tensor
    ``.scale_weight`` (sd35's one fp8 quantizer, :func:`sd35.accel.fp8.quantize_weight`), and the ``scaled_fp8``
    marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for key, value in sd.items():
        if _is_linear_weight(key, value):
            out[key], scale = quantize_weight(value, "tensor")
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    return out


def _source_metadata(parts: dict[str, Component]) -> dict[str, str] | None:
    """The safetensors metadata of the file the MMDiT-X came from (its name, modelspec ...), kept as it was."""
    c = parts.get(MMDITX)
    if c is None or not c.source.is_file() or is_gguf(c.source):
        return None
    return read_metadata(c.source) or None


def write_single_file(out: Path, parts: dict[str, Component], conv: Conversion) -> list[str]:
    """The ``official`` and ``scaled_fp8`` targets: every part in one safetensors file. A network stored in fp8
    is quantized from its weights as stored; ``--dtype`` then casts what stays in high precision (not the
    float32 scales)."""
    fp8 = [k for k in (MMDITX, T5XXL) if k in parts] if conv.target == "scaled_fp8" else []
    if conv.target == "scaled_fp8" and not fp8:
        raise SD35Error(
            "--to scaled_fp8 stores the MMDiT-X and the T5-XXL in fp8, and the inputs hold neither."
        )
    alone = len(parts) == 1
    tensors: dict[str, torch.Tensor] = {}
    for kind, c in parts.items():
        if kind in fp8:
            sd = {
                k: v if v.dtype == E4M3 or k.endswith("scale_weight") else _load(v, conv.dtype)
                for k, v in scaled_fp8(_tensors(c, None)).items()
            }
        else:
            sd = _tensors(c, conv.dtype)
        tensors.update(_file_keys(kind, sd, alone))
    save_file_atomic(tensors, out, _source_metadata(parts), overwrite=False)
    note = f"; fp8 scaled: {', '.join(KIND_NAMES[k] for k in fp8)}" if fp8 else ""
    return [f"wrote {out}: {_names(parts)} ({_dtype_words(conv.dtype)}{note})"]


def _configs(parts: dict[str, Component]) -> PipelineConfigs:
    return PipelineConfigs(
        MMDiTXConfig.from_state_dict(parts[MMDITX].tensors),
        VAEConfig.from_state_dict(parts[VAE].tensors),
        CLIPTextConfig.from_state_dict(parts[CLIP_L].tensors, "quick_gelu"),
        CLIPTextConfig.from_state_dict(parts[CLIP_G].tensors, "gelu"),
        T5Config.from_state_dict(parts[T5XXL].tensors),
    )


def _write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``out``, then give it its name (refused if the name appeared meanwhile)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            raise SD35Error(f"{out} already exists (it appeared while being written); not replaced.")
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_diffusers_folder(
    out: Path, parts: dict[str, Component], conv: Conversion, inputs: Sequence[Path]
) -> list[str]:
    missing = [KIND_NAMES[k] for k in KINDS if k not in parts]
    if missing:
        raise MissingComponentError(
            f"a diffusers folder holds all five parts, and the inputs lack {', '.join(missing)}; add their files "
            f"as inputs (usually {'; '.join(USUAL_FILES[k] for k in KINDS if k not in parts)})."
        )
    w = PipelineWeights(
        _configs(parts),
        *(_tensors(parts[k], conv.dtype) for k in (MMDITX, VAE, CLIP_L, CLIP_G, T5XXL)),
    )
    tokenizers = find_tokenizer_root(list(inputs))

    def fill(folder: Path) -> None:
        write_diffusers(folder, w, tokenizers=False)
        if tokenizers is not None:
            for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
                if (tokenizers / sub).is_dir():
                    shutil.copytree(tokenizers / sub, folder / sub)

    _write_folder(out, fill)
    how = f"tokenizers copied from {tokenizers}" if tokenizers else "no tokenizer folders (sd35 uses its own)"
    return [f"wrote {out}: diffusers folder ({_dtype_words(conv.dtype)}; {how})"]


def gguf_type(kind: str, name: str, shape: Sequence[int], stored: torch.dtype, quant: str) -> str:
    """The GGUF type one tensor is written in when the file's type is ``quant`` (see the module docstring)."""
    if len(shape) <= 1 or math.prod(shape) <= SMALL:
        return "F32"
    if quant in ("F32", "F16", "BF16"):
        return quant
    base = "BF16" if stored == torch.bfloat16 else "F16"
    keep = (
        (kind == MMDITX and name.startswith(SD3_UNQUANTIZED))
        or (kind == T5XXL and ".attn_rel_b." in name)
        or (kind in (CLIP_L, CLIP_G) and "embedding" in name)
    )
    return base if keep or len(shape) != 2 or shape[-1] % BLOCKS[quant][0] else quant


def _llama_t5_name(key: str) -> str:
    """Our (HF) T5 key -> llama.cpp's name: ``encoder.block.3.layer.0.SelfAttention.q.weight`` ->
    ``enc.blk.3.attn_q.weight`` (the inverse of what the loader maps)."""
    if key == "encoder.embed_tokens.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", key)
    llama = {hf: short for short, hf in T5_GGUF_NAMES.items()}
    if not m or m.group(2) not in llama:
        raise CheckpointError(f"T5 tensor '{key}' has no name in llama.cpp's T5 layout.")
    return f"enc.blk.{m.group(1)}.{llama[m.group(2)]}.weight"


def write_gguf_file(out: Path, parts: dict[str, Component], conv: Conversion) -> list[str]:
    kind = next((k for k in (MMDITX, T5XXL, CLIP_L, CLIP_G) if k in parts), None)
    if kind is None or (kind != MMDITX and len(parts) > 1):
        held = _names(parts)
        raise SD35Error(
            f"a GGUF file holds one network: the MMDiT-X (ComfyUI-GGUF's layout), or a T5-XXL or CLIP on its own; "
            f"the inputs hold {held}. Give the MMDiT-X file, or one text-encoder file."
        )
    c = parts[kind]
    tensors = _t5_embedding(c.tensors) if kind == T5XXL else dict(c.tensors)
    quant = conv.quant or "F16"
    planned = []
    for key, t in tensors.items():
        name = _llama_t5_name(key) if kind == T5XXL else key
        type_name = gguf_type(kind, name, t.shape, t.dtype, quant)
        planned.append(
            TensorOut(name, tuple(t.shape), type_name, lambda t=t, ty=type_name: quantize(_load(t, None), ty))
        )
    metadata = {
        "general.architecture": GGUF_ARCH[kind],
        "general.name": c.source.stem if c.source.is_file() else c.source.name,
        "general.quantization_version": 2,
        "general.file_type": FILE_TYPES[quant],
    }
    try:
        write_gguf(out, metadata, planned)
    except ValueError as e:
        raise CheckpointError(f"{c.source}: cannot be written as GGUF: {e}.") from None
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.type_name] = counts.get(p.type_name, 0) + 1
    types = ", ".join(f"{n} {ty}" for ty, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines = [f"wrote {out}: {KIND_NAMES[kind]} as GGUF {quant} ({len(planned)} tensors: {types})"]
    left = [KIND_NAMES[k] for k in parts if k != kind]
    if left:
        lines.append(
            f"not written: {', '.join(left)} (a GGUF MMDiT-X file holds the MMDiT-X alone; keep those files, "
            "and pass the VAE with --vae)"
        )
    return lines


def _names(parts: dict[str, Component]) -> str:
    return ", ".join(KIND_NAMES[k] for k in KINDS if k in parts) or "nothing"


def _dtype_words(dtype: torch.dtype | None) -> str:
    return f"as {str(dtype).removeprefix('torch.')}" if dtype else "dtypes as stored"


def convert(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    to: str | None = None,
    quant: str | None = None,
    dtype: str | None = None,
) -> list[str]:
    """Write the networks found in ``inputs`` (files or folders sd35 reads) to ``out`` in the layout ``to`` (else
    inferred from ``out``: ``.gguf``, ``.safetensors``, or a folder name for diffusers). Returns the lines that
    say what was written. Raises :class:`~sd35.errors.SD35Error` with one clear message for what cannot be done."""
    if not inputs:
        raise SD35Error(
            "name the model files or folders to convert, then the output: sd35 convert IN [IN ...] OUT."
        )
    out = Path(out)
    conv = plan(out, to, quant, dtype)
    check_output_free(out)
    paths = [Path(p) for p in inputs]
    if any(p.resolve() == out.resolve() for p in paths):
        raise SD35Error(f"{out}: the output cannot be one of the inputs.")
    parts = assemble(scan(paths), required=())
    if conv.target == "gguf":
        return write_gguf_file(out, parts, conv)
    if conv.target == "diffusers":
        return write_diffusers_folder(out, parts, conv, paths)
    return write_single_file(out, parts, conv)
