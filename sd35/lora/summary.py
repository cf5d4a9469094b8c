"""What a LoRA file is, read from its safetensors header: for ``sd35 inspect`` and anyone deciding what to load.

A user holding ``style.safetensors`` wants to know, before loading anything: is it a LoRA, DoRA or a LyCORIS
LoHa/LoKr, of what rank and alpha, which producer's key layout, which networks and layers it changes, and
which model it was made for. :func:`summarize_lora` answers from the header alone (names, shapes, dtypes,
metadata); the only tensor data it reads are the one-element ``.alpha`` scalars, so a LoRA of gigabytes
is described as fast as a small one.

The keys are read exactly as :func:`sd35.lora.formats.parse_lora` reads them (same suffix and prefix
tables, same name resolution, same adapter classes built on shape-only ``meta`` tensors), against a
*skeleton* of each network: a tiny model with our layer names and as many blocks as the file names, so
that what the summary calls ``joint_blocks.3.x_block.attn.qkv`` is the layer the loader would change.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd35.errors import CheckpointError
from sd35.loading.safetensors_io import open_safetensors, read_metadata
from sd35.loading.tensors import LazyTensor, dtype_mix
from sd35.lora.formats import (
    COMPONENTS,
    ModelIndex,
    _adapter_from_fields,
    _split_suffix,
    family_from_width,
    foreign_family,
    group_keys,
    peft_configs,
    route,
    stem_alpha,
)
from sd35.models.clip import CLIPTextConfig, CLIPTextEncoder
from sd35.models.mmditx import HEAD_DIM, MMDiTX, MMDiTXConfig
from sd35.models.t5 import T5Config, T5Encoder

ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "diff": "full diff"}
FOREIGN_FAMILIES = ("Flux", "SDXL", "SD1.x/SD2.x")
_BLOCK = re.compile(r"(?:joint_blocks|transformer_blocks|layers|block)[._](\d+)[._]")
_STREAM = re.compile(r"(x_block|context_block)\.(.+)$")
# Skeletons stop here; a key naming a block past it stays unmatched (no release comes close: Large has 38).
_MAX_BLOCKS = 128


@dataclass
class ComponentUse:
    """The layers a LoRA changes in one network, in our module names."""

    layers: int  # layers changed (a fused qkv counts once, however many q/k/v parts the file stores)
    kinds: list[str]  # layer kinds inside the blocks, e.g. "attn.qkv", "x_block.attn2.proj", "mlp.fc1"
    blocks: list[int]  # joint-block (MMDiT-X), encoder-layer (CLIP) or block (T5) indices
    outside: list[str]  # layers outside the blocks, e.g. "context_embedder", "final_layer.linear"


@dataclass
class LoraSummary:
    """Everything :func:`summarize_lora` found; ``sd35 inspect`` only formats it."""

    path: Path
    layouts: list[str]  # producers' key layouts found, most adapters first: kohya, diffusers, LyCORIS ...
    kinds: dict[str, int]  # adapter kind ("LoRA", "LoHa", "LoKr", "full diff") -> adapters
    dora: int  # adapters with a DoRA magnitude vector
    ranks: list[int]  # one per low-rank adapter
    alphas: list[float | None]  # one per low-rank adapter; None: no alpha stored (= rank, scale 1)
    components: dict[str, ComponentUse]  # "mmditx", "clip_l", "clip_g", "t5" -> layers changed
    base: str | None  # the model it was made for, e.g. "SD3.5 Medium"; None when unknown
    base_evidence: str  # what says so: "sd35_base_model", "hidden size 1536", ...
    # the family of a LoRA made for another model (SDXL, Flux ...), which sd35 cannot apply; None for SD3
    foreign: str | None
    foreign_evidence: str
    dtypes: str
    parameters: int
    unmatched: list[str]  # keys that fit no layer of an SD3-family model
    training: dict[str, str] = field(default_factory=dict)  # what sd35 train recorded, label -> value
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """One name for the file: "LoRA", "DoRA", "LoKr", or the kinds joined ("LoRA + LoHa") when mixed."""
        names = sorted(self.kinds, key=list(ADAPTER_NAMES.values()).index)
        if names == ["LoRA"] and self.dora:
            return "DoRA"
        kind = " + ".join(names) or "LoRA"
        return f"{kind} + DoRA" if self.dora else kind

    @property
    def rank(self) -> int | None:
        """The most common rank (None when every change is full-rank)."""
        return Counter(self.ranks).most_common(1)[0][0] if self.ranks else None


def is_lora_keys(keys) -> bool:
    """Whether tensor names are those of a LoRA-family file: some key ends in an adapter suffix (not just
    ``.alpha``), e.g. ``.lora_down.weight``, ``.lora_A.weight``, ``.hada_w1_a``, ``.lokr_w1``, ``.diff``."""
    return any((split := _split_suffix(k)) is not None and split[1] != "alpha" for k in keys)


def is_lora_file(path: str | Path) -> bool:
    """Whether a ``.safetensors`` file is a LoRA-family file (reads the header; bad files raise CheckpointError)."""
    return is_lora_keys(open_safetensors(path))


def _skeleton(component: str, blocks: int) -> nn.Module:
    """A tiny network with our layer names and ``blocks`` blocks (MMDiT-X: attn2 in each), built in a moment.

    Only its names matter: widths are the smallest the classes allow, so it costs a few kilobytes.
    """
    if component == "mmditx":
        # hidden 64 (one head), then patch size, in/out channels, position grid, pooled, context and MLP widths 1
        return MMDiTX(
            MMDiTXConfig(HEAD_DIM, blocks, *[1] * 7, qk_norm=False, attn2_layers=tuple(range(blocks)))
        )
    if component == "t5":
        return T5Encoder(T5Config(vocab_size=1, d_model=1, heads=1, d_kv=1, d_ff=1, layers=blocks))
    # vocabulary 1, positions 1, width 64 (one head), MLP width 1; the projection only CLIP-G has
    return CLIPTextEncoder(CLIPTextConfig(1, 1, 64, blocks, 1, "gelu", has_projection=True))


def _skeleton_index(rules: dict[str, tuple]) -> ModelIndex:
    """Skeletons of the networks the stems are routed to, one block past the highest the file names.

    The extra block keeps every named block from being the MMDiT-X's last, which lacks the context
    stream's attention output and MLP.
    """
    highest: dict[str, int] = {}
    for stem, rule in rules.items():
        m = _BLOCK.search(stem[len(rule[0]) :])
        block = min(int(m.group(1)), _MAX_BLOCKS) if m else 0
        highest[rule[1]] = max(highest.get(rule[1], 0), block)
    torch_seed = torch.random.get_rng_state()  # the skeletons' random init must not move the user's seed
    try:
        return ModelIndex({c: _skeleton(c, n + 2) for c, n in highest.items()})
    finally:
        torch.random.set_rng_state(torch_seed)


def _meta(t: LazyTensor) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype holding no data: enough for an adapter to know its rank and shape."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _place(name: str) -> tuple[int | None, str, str]:
    """(block, stream, kind) of one of our module names: ``joint_blocks.3.x_block.attn.qkv`` -> (3, "x_block",
    "attn.qkv"); T5's ``encoder.block.0.layer.1.DenseReluDense.wo`` -> (0, "", "DenseReluDense.wo"); a layer
    outside the blocks -> (None, "", its name)."""
    m = re.match(r"(?:joint_blocks|text_model\.encoder\.layers|encoder\.block)\.(\d+)\.(.+)$", name)
    if not m:
        return None, "", name
    rest = re.sub(r"^layer\.\d+\.", "", m.group(2))
    s = _STREAM.match(rest)
    return int(m.group(1)), *((s.group(1), s.group(2)) if s else ("", rest))


def _component_use(modules: set[str], skeleton: list[str]) -> ComponentUse:
    """Blocks, layer kinds and outside layers of one network's changed modules, in the network's own order."""
    position = {name: i for i, name in enumerate(skeleton)}
    kind_position: dict[str, int] = {}
    for name in skeleton:  # block 0 of a skeleton has every kind, so this orders kinds as a block does
        kind_position.setdefault(_place(name)[2], len(kind_position))
    blocks: set[int] = set()
    streams: dict[str, set[str]] = {}  # kind -> the streams it is changed in
    outside: list[str] = []
    for name in sorted(modules, key=position.__getitem__):
        block, stream, kind = _place(name)
        if block is None:
            outside.append(name)
            continue
        blocks.add(block)
        streams.setdefault(kind, set()).add(stream)
    kinds = []
    for kind in sorted(streams, key=kind_position.__getitem__):
        # name the stream only when just one of the two has the change (attn2 exists in the x stream only)
        (first, *more) = streams[kind]
        kinds.append(f"{first}.{kind}" if first and not more and not kind.startswith("attn2.") else kind)
    return ComponentUse(len(modules), kinds, sorted(blocks), outside)


def family_from_name(value: str) -> str | None:
    """The family a ``modelspec.architecture`` / ``ss_base_model_version`` value names, e.g.
    ``stable-diffusion-3-5-large/lora`` -> "SD3.5 Large", ``sdxl_base_v1-0`` -> "SDXL"; None if unknown."""
    v = value.lower()
    if "flux" in v or "chroma" in v:
        return "Flux"
    if "xl" in v:
        return "SDXL"
    large, medium = "large" in v, "medium" in v or re.search(r"[-_]m\b", v) is not None
    if re.search(r"3[-_.]?5", v) and ("stable-diffusion-3" in v or "sd3" in v or "sd35" in v):
        return "SD3.5 Large" if large else "SD3.5 Medium" if medium else "SD3.5"
    if "stable-diffusion-3" in v or "sd3" in v:
        if large:
            return "SD3.5 Large"  # SD3 Large was never released
        if medium:  # kohya's "sd3_m" is written for every SD3-family LoRA
            return "SD3 Medium" if "medium" in v else "SD3 / SD3.5 Medium"
        return "SD3"
    if re.fullmatch(r"5-(large|medium)|medium", v):  # kohya's SD3 model types (sd3_utils.py), bare
        return {"5-large": "SD3.5 Large", "5-medium": "SD3.5 Medium"}.get(v, "SD3 Medium")
    if re.search(r"(stable-diffusion-|sd_?)v?[12]", v):
        return "SD1.x/SD2.x"
    return None


def _base_from_metadata(meta: dict[str, str]) -> tuple[str, str] | None:
    """(model, which metadata says so) from sd35's or kohya's metadata."""
    value = meta.get("sd35_base_model")
    if value and value != "unknown":
        return value, "sd35_base_model"
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = meta.get(key)
        if value:
            return family_from_name(value) or value, f"{key} = {value}"
    return None


def _base_from_shapes(dims: set[int], mmditx: ComponentUse | None) -> tuple[str, str] | None:
    """(model, evidence) from the MMDiT-X changes: hidden width, joint-block count, attn2 layers."""
    if mmditx is None:
        return None
    attn2 = any(k.startswith("attn2.") for k in mmditx.kinds)
    if mmditx.blocks and max(mmditx.blocks) >= 24:
        return "SD3.5 Large", f"joint block {max(mmditx.blocks)}: only Large has more than 24"
    found = family_from_width(dims)
    if found and found[1] == 1536 and attn2:
        return "SD3.5 Medium", "hidden size 1536 and attn2 layers"
    if found:
        return found[0], f"hidden size {found[1]}"
    if attn2:
        return "SD3.5 Medium", "attn2 layers, which only SD3.5 Medium's MMDiT-X has"
    return None


def _training(meta: dict[str, str]) -> dict[str, str]:
    """What ``sd35 train`` recorded (sd35/train/trainer.py ``_metadata``), as short labelled values."""
    if "sd35_steps" not in meta and "sd35_mode" not in meta:
        return {}
    try:
        cfg = json.loads(meta.get("sd35_training") or "{}")
    except json.JSONDecodeError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    out = {
        "sd35": meta.get("sd35_version"),
        "mode": meta.get("sd35_mode"),
        "steps": meta.get("sd35_steps"),
        "learning rate": cfg.get("learning_rate"),
        "batch": cfg.get("batch_size"),
        "resolution": cfg.get("resolution"),
        "EMA": {"true": "on", "false": "off"}.get(meta.get("sd35_ema", ""), meta.get("sd35_ema")),
        "base file": meta.get("sd35_base_file"),
    }
    return {k: str(v) for k, v in out.items() if v not in (None, "")}


def summarize_lora(path: str | Path) -> LoraSummary:
    """Describe a LoRA-family ``.safetensors`` file from its header (see the module doc).

    Raises :class:`CheckpointError` for a file that is no safetensors file or holds no adapter tensors.
    """
    path = Path(path)
    tensors = open_safetensors(path)
    metadata = read_metadata(path)
    keys = list(tensors)
    if not is_lora_keys(keys):
        raise CheckpointError(
            f"{path}: no LoRA tensors (.lora_down/.lora_A/.hada_/.lokr_ ...); not a LoRA file."
        )
    groups, unmatched = group_keys(keys)
    rules = route(groups)
    foreign = foreign_family(keys)
    index = _skeleton_index(rules) if foreign is None else None
    peft = peft_configs(metadata)

    kinds: Counter[str] = Counter()
    layouts: Counter[str] = Counter()
    ranks: list[int] = []
    alphas: list[float | None] = []
    dora = 0
    changed: dict[str, set[str]] = {}  # component -> our modules changed
    dims: set[int] = set()
    for stem, fkeys in groups.items():
        rule = rules.get(stem)
        if rule is None or ("alpha" in fkeys and tensors[fkeys["alpha"]].numel() != 1):
            unmatched += fkeys.values()
            continue
        fields = {f: (tensors[k].load() if f == "alpha" else _meta(tensors[k])) for f, k in fkeys.items()}
        rest = stem[len(rule[0]) :]
        alpha = stem_alpha(fields, rule, rest, peft)
        adapter = _adapter_from_fields(fields, alpha, (0, 0))
        if adapter is None:
            unmatched += fkeys.values()
            continue
        kinds[ADAPTER_NAMES[adapter.kind]] += 1  # what the file holds, whether or not a layer fits it
        layouts[rule[4]] += 1
        dora += adapter.dora_scale is not None
        if adapter.rank is not None:
            ranks.append(adapter.rank)
            alphas.append(alpha)
        target = None if index is None else index.resolve(rule[1], rest, rule[2], rule[3])
        if target is None:
            unmatched += fkeys.values()
            continue
        changed.setdefault(target.component, set()).add(target.module)
        if target.component == "mmditx":
            dims.update(adapter.delta_shape())

    components = {
        comp: _component_use(changed[comp], list(index.layers[comp]))
        for comp in sorted(changed, key=COMPONENTS.index)
    }
    base_meta = _base_from_metadata(metadata)
    if foreign is None and not changed and base_meta and base_meta[0] in FOREIGN_FAMILIES:
        # metadata alone decides only when no key fits an SD3 layer: the keys are what a loader reads
        foreign = base_meta[0], f"its metadata says so ({base_meta[1]}) and no key fits an SD3-family layer"
    base = base_meta or _base_from_shapes(dims, components.get("mmditx"))
    if base is None and components and "mmditx" not in components:
        base = None, "it changes only text encoders, which SD3 and SD3.5 share"
    # kohya stores every alpha as a float32 scalar: no weights, and they would only add "fp32 0%" to a bf16 file
    weights = [t for k, t in tensors.items() if not k.endswith(".alpha")]
    return LoraSummary(
        path=path,
        layouts=[name for name, _ in layouts.most_common()],
        kinds={k: kinds[k] for k in ADAPTER_NAMES.values() if k in kinds},
        dora=dora,
        ranks=ranks,
        alphas=alphas,
        components=components,
        base=base[0] if base else None,
        base_evidence=base[1] if base else "",
        foreign=foreign[0] if foreign else None,
        foreign_evidence=foreign[1] if foreign else "",
        dtypes=dtype_mix(weights),
        parameters=sum(t.numel() for t in weights),
        unmatched=unmatched,
        training=_training(metadata),
        metadata=metadata,
    )
