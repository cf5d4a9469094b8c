"""LoRA file layouts: every producer's key names, mapped onto our module names, and back.

Key formats read (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` /
``model_lora_keys_clip`` and ``comfy/utils.py`` ``mmdit_to_diffusers``; kohya-ss/sd-scripts
``networks/lora_sd3.py``; diffusers ``loaders/lora_pipeline.py`` ``SD3LoraLoaderMixin``):

=========================  ==========================================================================
producer                   example key (component: mmditx, clip_l, clip_g, t5)
=========================  ==========================================================================
kohya sd-scripts           ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`` (fused qkv),
                           ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5 (``.alpha``)
diffusers / PEFT           ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (split q/k/v),
                           ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.``; alpha in the
                           ``lora_adapter_metadata`` JSON (or ``.alpha``; absent = rank)
raw PEFT                   ``base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight``
OneTrainer                 ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``, ``lora_te1_``...
LyCORIS / SimpleTuner      ``lycoris_transformer_blocks_0_attn2_to_q.lokr_w1``
generic                    ``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight``,
                           ``model.diffusion_model.``, bare official names, ``text_encoders.clip_l.transformer.``
=========================  ==========================================================================

Adapter suffixes (ComfyUI ``LoRAAdapter.load``): ``.lora_up/.lora_down(.weight)``, ``_lora.up/down.weight``,
``.lora_B/.lora_A(.weight, .default.weight)``, ``.lora.up/down.weight``, ``.lora_linear_layer.up/down.weight``,
``.lora_mid.weight``; LoHa ``hada_w1_a`` ...; LoKr ``lokr_w1`` ...; ``diff``, ``diff_b``; ``dora_scale`` and PEFT's
``lora_magnitude_vector``.

Underscored names (kohya, OneTrainer, LyCORIS) are resolved by matching against the real module names
with dots replaced, never by guessing where the dots were. diffusers names go through the same table
the base-weight loader uses (:func:`sd35.loading.diffusers_mmditx._key_table`): ``to_q/to_k/to_v`` become
row blocks of our fused ``qkv`` and the adaLN weights diffusers stores as (scale, shift) are swapped.
Keys that match nothing are returned, never dropped silently; a LoRA made for another model is refused
with an :class:`SD35Error` that names the model it seems made for.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd35.errors import SD35Error
from sd35.loading.safetensors_io import save_file_atomic
from sd35.lora.adapters import Adapter, Diff, LoHa, LoKr, LoRA, RowStack, SwapHalves, dora_axis
from sd35.lora.patching import is_target, weight_shape
from sd35.models.family import mmditx_family

COMPONENTS = ("mmditx", "clip_l", "clip_g", "t5")
KOHYA_PREFIX = {"mmditx": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5": "lora_te3_"}
DIFFUSERS_PREFIX = {
    "mmditx": "transformer",
    "clip_l": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5": "text_encoder_3",
}
COMPONENT_NAMES = {"mmditx": "MMDiT-X", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}

# (suffix, field), longest first so that ".lora_B.weight" wins over ".lora_B"
_SUFFIXES = sorted(
    [
        (".lora_up.weight", "up"),
        (".lora_down.weight", "down"),
        (".lora_mid.weight", "mid"),
        ("_lora.up.weight", "up"),
        ("_lora.down.weight", "down"),
        (".lora_B.default.weight", "up"),
        (".lora_A.default.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora_A.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_B", "up"),
        (".lora_A", "down"),
        (".lora_magnitude_vector.default.weight", "dora_scale"),
        (".lora_magnitude_vector.default", "dora_scale"),
        (".lora_magnitude_vector.weight", "dora_scale"),
        (".lora_magnitude_vector", "dora_scale"),
        (".dora_scale", "dora_scale"),
        (".alpha", "alpha"),
        (".hada_w1_a", "hada_w1_a"),
        (".hada_w1_b", "hada_w1_b"),
        (".hada_w2_a", "hada_w2_a"),
        (".hada_w2_b", "hada_w2_b"),
        (".hada_t1", "hada_t1"),
        (".hada_t2", "hada_t2"),
        (".lokr_w1", "lokr_w1"),
        (".lokr_w1_a", "lokr_w1_a"),
        (".lokr_w1_b", "lokr_w1_b"),
        (".lokr_w2", "lokr_w2"),
        (".lokr_w2_a", "lokr_w2_a"),
        (".lokr_w2_b", "lokr_w2_b"),
        (".lokr_t2", "lokr_t2"),
        (".diff", "diff"),
        (".diff_b", "diff_b"),
    ],
    key=lambda s: -len(s[0]),
)

# (key prefix, component, naming, producer). naming: "us" = dots replaced by underscores, "dot" = dotted;
# for the MMDiT-X, "official"/"diffusers" says which module names to try first.
_PREFIXES = [
    ("lora_unet_", "mmditx", "us", ("official", "diffusers"), "kohya"),
    ("lora_te1_", "clip_l", "us", ("hf",), "kohya"),
    ("lora_te2_", "clip_g", "us", ("hf",), "kohya"),
    ("lora_te3_", "t5", "us", ("hf",), "kohya"),
    ("lora_transformer_", "mmditx", "us", ("diffusers", "official"), "OneTrainer"),
    ("lycoris_", "mmditx", "us", ("diffusers", "official"), "LyCORIS"),
    ("transformer.", "mmditx", "dot", ("diffusers", "official"), "diffusers"),
    ("base_model.model.", "mmditx", "dot", ("diffusers", "official"), "PEFT"),
    ("text_encoder.", "clip_l", "dot", ("hf",), "diffusers"),
    ("text_encoder_2.", "clip_g", "dot", ("hf",), "diffusers"),
    ("text_encoder_3.", "t5", "dot", ("hf",), "diffusers"),
    ("model.diffusion_model.", "mmditx", "dot", ("official",), "generic"),
    ("diffusion_model.", "mmditx", "dot", ("official",), "generic"),
    ("text_encoders.clip_l.transformer.", "clip_l", "dot", ("hf",), "generic"),
    ("text_encoders.clip_g.transformer.", "clip_g", "dot", ("hf",), "generic"),
    ("text_encoders.t5xxl.transformer.", "t5", "dot", ("hf",), "generic"),
    ("text_encoders.clip_l.", "clip_l", "dot", ("hf",), "generic"),
    ("text_encoders.clip_g.", "clip_g", "dot", ("hf",), "generic"),
    ("text_encoders.t5xxl.", "t5", "dot", ("hf",), "generic"),
    ("", "mmditx", "dot", ("official", "diffusers"), "generic"),
]
_DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class Target:
    """Where an adapter goes: a layer, optionally one of ``count`` equal row blocks of it, optionally swapped."""

    component: str
    module: str
    part: tuple[int, int] | None = None  # (index, count): q/k/v of a fused qkv
    swap: bool = False  # the adapter was made for the (scale, shift) half order


@dataclass
class ParsedLoRA:
    """A LoRA state dict read against the loaded models."""

    adapters: dict[tuple[str, str], Adapter] = field(default_factory=dict)  # (component, module) -> adapter
    unmatched: list[str] = field(default_factory=list)  # keys that fit no layer
    skipped: list[str] = field(default_factory=list)  # keys for a component that is not loaded
    formats: list[str] = field(default_factory=list)  # producers recognised


# ---------------------------------------------------------------------------------------------
# Name tables


def _diffusers_table(depth: int, attn2: set[int], qk_norm: bool) -> dict[str, Target]:
    """diffusers module name -> our layer (q/k/v as row blocks, swapped adaLN), from the base-weight table."""
    from sd35.loading.diffusers_mmditx import QKV, SWAP, _key_table

    out: dict[str, Target] = {}
    for ours, theirs, op in _key_table(depth, attn2, qk_norm):
        if not ours.endswith(".weight"):
            continue
        for i, t in enumerate(theirs):
            out[t[: -len(".weight")]] = Target(
                "mmditx", ours[: -len(".weight")], (i, len(theirs)) if op == QKV else None, op == SWAP
            )
    return out


class ModelIndex:
    """The target layers of each loaded component, by dotted and underscored name, plus the diffusers table."""

    def __init__(self, models: dict[str, nn.Module | None]):
        self.models = {c: m for c, m in models.items() if m is not None and c in COMPONENTS}
        self.layers: dict[str, dict[str, nn.Module]] = {}
        self.underscored: dict[str, dict[str, str]] = {}
        for comp, model in self.models.items():
            layers = {n: m for n, m in model.named_modules() if n and is_target(m)}
            self.layers[comp] = layers
            self.underscored[comp] = {n.replace(".", "_"): n for n in layers}
        self.depth, self.attn2 = 0, set()
        self.diffusers: dict[str, Target] = {}
        self.diffusers_underscored: dict[str, str] = {}
        mm = self.models.get("mmditx")
        if mm is not None:
            names = [n for n, _ in mm.named_modules()]
            blocks = {int(m.group(1)) for n in names if (m := re.match(r"joint_blocks\.(\d+)$", n))}
            self.depth = max(blocks) + 1 if blocks else 0
            self.attn2 = {
                int(m.group(1)) for n in names if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2$", n))
            }
            if self.depth:
                self.diffusers = _diffusers_table(
                    self.depth, self.attn2, qk_norm=False
                )  # norms are no targets
                self.diffusers_underscored = {n.replace(".", "_"): n for n in self.diffusers}

    def family(self) -> str:
        mm = self.models.get("mmditx")
        config = getattr(mm, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return mmditx_family(config)
        return "this model"

    def hidden(self) -> int | None:
        config = getattr(self.models.get("mmditx"), "config", None)
        return getattr(config, "hidden_size", None)

    def resolve(self, comp: str, rest: str, naming: str, order: tuple[str, ...]) -> Target | None:
        layers = self.layers.get(comp, {})
        for kind in order:
            if kind in ("official", "hf"):
                name = rest if naming == "dot" else self.underscored[comp].get(rest)
                if name in layers:
                    return Target(comp, name)
            else:
                name = rest if naming == "dot" else self.diffusers_underscored.get(rest)
                target = self.diffusers.get(name) if name else None
                if target is not None and target.module in layers:
                    return target
        return None

    def expected_shape(self, target: Target) -> tuple[int, ...]:
        shape = weight_shape(self.layers[target.component][target.module])
        if target.part is None:
            return shape
        _, count = target.part
        return (shape[0] // count, *shape[1:])


# ---------------------------------------------------------------------------------------------
# Foreign LoRAs


_UNET_PREFIXES = (
    "lora_unet_input_blocks",
    "lora_unet_output_blocks",
    "lora_unet_middle_block",
    "lora_unet_down_blocks",
    "lora_unet_up_blocks",
    "lora_unet_mid_block",
    "unet.",
    "diffusion_model.input_blocks",
    "model.diffusion_model.input_blocks",
    "down_blocks.",
    "up_blocks.",
)


def foreign_family(keys: list[str]) -> tuple[str, str] | None:
    """(family, the keys' evidence) for a LoRA made for another model family than SD3, else None."""
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "Flux", "its keys name double_blocks / single_blocks"
    if any(k.startswith(_UNET_PREFIXES) for k in keys):
        sdxl = any(
            k.startswith(("lora_te2_", "text_encoder_2.")) or re.search(r"transformer_blocks[._][1-9]", k)
            for k in keys
        )
        return "SDXL" if sdxl else "SD1.x/SD2.x", "its keys name a UNet: input_blocks / down_blocks"
    return None


def foreign_model(keys: list[str]) -> str | None:
    """The model family a LoRA's key names belong to, if it is not the SD3 family (with the evidence)."""
    found = foreign_family(keys)
    return f"{found[0]} ({found[1]})" if found else None


# The MMDiT hidden widths of the releases: a LoRA's tensor shapes name the model it was made for.
WIDTH_FAMILIES = {1536: "SD3 / SD3.5 Medium", 2432: "SD3.5 Large"}


def family_from_width(dims) -> tuple[str, int] | None:
    """(release, width) of the release whose hidden width is among ``dims`` (Large first: 1536 never occurs
    in it), else None."""
    for width in sorted(WIDTH_FAMILIES, reverse=True):
        if width in dims:
            return WIDTH_FAMILIES[width], width
    return None


def _guess_from_width(dims: tuple[int, ...]) -> str:
    found = family_from_width(dims)
    return f" It seems made for {found[0]} (hidden size {found[1]})." if found else ""


def _check_structure(stems: dict[str, tuple[str, str]], index: ModelIndex, what: str) -> None:
    """Refuse a LoRA whose joint blocks or attn2 layers our MMDiT-X does not have."""
    if "mmditx" not in index.models or not index.depth:
        return
    blocks: set[int] = set()
    attn2: set[int] = set()
    for comp, rest in stems.values():
        if comp != "mmditx":
            continue
        m = re.match(r"(joint_blocks|transformer_blocks)[._](\d+)[._](.*)$", rest)
        if not m:
            continue
        i = int(m.group(2))
        blocks.add(i)
        if re.match(r"(x_block[._])?attn2[._]", m.group(3)):
            attn2.add(i)
    family = index.family()
    if blocks and max(blocks) >= index.depth:
        n = max(blocks) + 1
        if n > 24:
            guess = "SD3.5 Large (38 joint blocks)"
        elif n == 24:
            guess = "SD3 / SD3.5 Medium (24 joint blocks)"
        else:
            guess = f"an MMDiT with at least {n} joint blocks"
        raise SD35Error(
            f"{what}: this LoRA seems made for {guess}: it changes joint block {max(blocks)}, but this model "
            f"({family}) has {index.depth} joint blocks (0-{index.depth - 1})."
        )
    extra = sorted(attn2 - index.attn2)
    if extra:
        if not index.attn2:
            raise SD35Error(
                f"{what}: this LoRA seems made for SD3.5 Medium: it changes the MMDiT-X 'attn2' layers of joint "
                f"block(s) {extra}, which this model ({family}) does not have."
            )
        raise SD35Error(
            f"{what}: this LoRA changes 'attn2' layers of joint block(s) {extra}, but this model ({family}) has "
            f"attn2 only in blocks {sorted(index.attn2)}; it was made for another MMDiT-X configuration."
        )


# ---------------------------------------------------------------------------------------------
# Reading


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the ``__metadata__`` of a LoRA ``.safetensors`` file (clear errors for bad files)."""
    from safetensors.torch import load_file

    from sd35.loading.safetensors_io import read_header, read_metadata

    read_header(path)
    return load_file(str(path), device="cpu"), read_metadata(path)


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, fieldname in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], fieldname
    return None


def group_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({stem: {field: key}}, keys that are no adapter tensor or repeat a field of their stem).

    A stem is a key without its adapter suffix (``.lora_up.weight``, ``.alpha``, ``.hada_w1_a`` ...): all
    tensors of one adapter share it.
    """
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in keys:
        split = _split_suffix(key)
        if split is None:
            unmatched.append(key)
            continue
        stem, fieldname = split
        if fieldname in groups.setdefault(stem, {}):
            unmatched.append(key)  # a second tensor for the same role
            continue
        groups[stem][fieldname] = key
    return groups, unmatched


def route(stems) -> dict[str, tuple]:
    """stem -> its :data:`_PREFIXES` rule (prefix, component, naming, order, producer): the first that fits."""
    rules: dict[str, tuple] = {}
    for stem in stems:
        for rule in _PREFIXES:
            prefix = rule[0]
            if stem.startswith(prefix) and len(stem) > len(prefix):
                rules[stem] = rule
                break
    return rules


def stem_alpha(tensors: dict, rule: tuple, rest: str, peft: dict[str, dict]) -> float | None:
    """An adapter's alpha as the loader applies it: its ``.alpha`` tensor, else diffusers' PEFT metadata.

    ``tensors``: the adapter's tensors by field (real tensors, or anything with ``shape`` besides the
    alpha); ``peft``: :func:`peft_configs` of the file. None means "no alpha" (= rank, scale 1).
    """
    if "alpha" in tensors:
        return float(tensors["alpha"].float().item())
    prefix, producer = rule[0], rule[4]
    if "down" in tensors and producer == "diffusers" and prefix[:-1] in peft:
        return _peft_alpha(peft[prefix[:-1]], rest, tensors["down"].shape[0])
    return None


def peft_configs(metadata: dict[str, str] | None) -> dict[str, dict]:
    """diffusers' per-component LoraConfig kwargs from ``lora_adapter_metadata`` (keys ``transformer.r`` ...)."""
    raw = (metadata or {}).get(_DIFFUSERS_META_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items() if isinstance(flat, dict) else ():
        prefix, _, name = k.partition(".")
        if name:
            out.setdefault(prefix, {})[name] = v
    return out


def _pattern_value(patterns: dict, name: str):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending with it (peft get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _peft_alpha(cfg: dict, module: str, rank: int) -> float | None:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module)
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); our scale is alpha / r
    return alpha


def _adapter_from_fields(
    f: dict[str, torch.Tensor], alpha: float | None, out_in: tuple[int, int]
) -> Adapter | None:
    dora = f.get("dora_scale")
    if "up" in f or "down" in f:
        if "up" not in f or "down" not in f:
            return None
        return LoRA(f["up"], f["down"], alpha, f.get("mid"), dora)
    if any(k.startswith("hada_") for k in f):
        if not all(k in f for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return None
        return LoHa(
            f["hada_w1_a"],
            f["hada_w1_b"],
            f["hada_w2_a"],
            f["hada_w2_b"],
            f.get("hada_t1"),
            f.get("hada_t2"),
            alpha,
            dora,
        )
    if any(k.startswith("lokr_") for k in f):
        try:
            return LoKr(
                f.get("lokr_w1"),
                f.get("lokr_w1_a"),
                f.get("lokr_w1_b"),
                f.get("lokr_w2"),
                f.get("lokr_w2_a"),
                f.get("lokr_w2_b"),
                f.get("lokr_t2"),
                alpha,
                dora,
            )
        except ValueError:
            return None
    if "diff" in f or "diff_b" in f:
        return Diff(f.get("diff"), f.get("diff_b"), out_in)
    return None


def _shape_error(what, key, found, expected, comp, module, part) -> SD35Error:
    where = f"{COMPONENT_NAMES[comp]} layer '{module}'" + (f" (q/k/v block {part[0]})" if part else "")
    guess = _guess_from_width(tuple(found)) if comp == "mmditx" else ""
    return SD35Error(
        f"{what}: LoRA tensor '{key}' has shape {list(found)}, but {where} needs {list(expected)}; "
        f"the LoRA was made for a different model.{guess}"
    )


def _validate(adapter: Adapter, keys: dict[str, str], target: Target, index: ModelIndex, what: str) -> None:
    shape = index.expected_shape(target)
    rows, inputs = shape[0], math.prod(shape[1:])
    comp, module, part = target.component, target.module, target.part
    if isinstance(adapter, LoRA):
        up, down = adapter.up, adapter.down
        r = down.shape[0]
        if up.shape[1] != r or (adapter.mid is not None and tuple(adapter.mid.shape[:2]) != (r, r)):
            raise SD35Error(
                f"{what}: LoRA tensors '{keys['up']}' {list(up.shape)} and '{keys['down']}' {list(down.shape)} "
                "have different ranks; the file is corrupt."
            )
        got_rows, got_in = adapter.delta_shape()
        if got_in != inputs:
            exp = [r, *shape[1:]] if down.dim() > 2 or len(shape) == 2 else [r, inputs]
            raise _shape_error(what, keys["down"], down.shape, exp, comp, module, part)
        if got_rows != rows:
            raise _shape_error(what, keys["up"], up.shape, [rows, *up.shape[1:]], comp, module, part)
    elif adapter.delta_shape() != (rows, inputs):
        key = next(
            iter(k for f, k in keys.items() if f not in ("alpha", "dora_scale")), next(iter(keys.values()))
        )
        got = adapter.delta_shape()
        hint = ""
        if comp == "mmditx" and module.endswith("x_block.adaLN_modulation.1") and index.hidden():
            h = index.hidden()
            if got[0] == 6 * h and rows == 9 * h:
                hint = " It seems made for SD3 Medium or SD3.5 Large (6 adaLN chunks where MMDiT-X has 9)."
            elif got[0] == 9 * h and rows == 6 * h:
                hint = " It seems made for SD3.5 Medium (9 adaLN chunks, MMDiT-X)."
        err = _shape_error(what, key, got, (rows, inputs), comp, module, part)
        raise SD35Error(str(err).replace("has shape", "gives a change of shape") + hint)
    if adapter.dora_scale is not None:
        try:
            dora_axis(adapter.dora_scale, (rows, *shape[1:]))
        except ValueError:
            raise _shape_error(
                what, keys["dora_scale"], adapter.dora_scale.shape, [1, shape[1]], comp, module, part
            ) from None
    if isinstance(adapter, Diff) and adapter.diff_b is not None:
        layer = index.layers[comp][module]
        if getattr(layer, "bias", None) is None or tuple(adapter.diff_b.shape) != (rows,):
            raise _shape_error(what, keys["diff_b"], adapter.diff_b.shape, [rows], comp, module, part)


def parse_lora(
    sd: dict[str, torch.Tensor],
    models: dict[str, nn.Module | None],
    metadata: dict[str, str] | None = None,
    what: str = "LoRA",
) -> ParsedLoRA:
    """Map a LoRA state dict onto ``models`` ({"mmditx", "clip_l", "clip_g", "t5"}: module or None).

    Returns one adapter per changed layer (split q/k/v parts joined into a :class:`RowStack`),
    the keys that fit nothing, and the keys for components that are not loaded. Raises
    :class:`SD35Error` for a LoRA made for another model or with tensors of the wrong shape.
    """
    keys = list(sd)
    foreign = foreign_model(keys)
    if foreign:
        raise SD35Error(
            f"{what}: this LoRA seems made for {foreign}, not for SD3 / SD3.5; it cannot be applied."
        )
    index = ModelIndex(models)
    loaded = set(index.models)
    result = ParsedLoRA()

    groups, result.unmatched = group_keys(keys)
    rules = route(groups)
    routed = {
        stem: (rule[1], stem[len(rule[0]) :]) for stem, rule in rules.items()
    }  # stem -> (component, rest)
    _check_structure(routed, index, what)

    peft = peft_configs(metadata)
    found: dict[tuple[str, str], list[tuple[Target, Adapter]]] = {}
    formats: dict[str, None] = {}
    for stem, fkeys in groups.items():
        rule = rules.get(stem)
        if rule is None:
            result.unmatched += fkeys.values()
            continue
        _, comp, naming, order, producer = rule
        rest = routed[stem][1]
        if comp not in loaded:
            result.skipped += fkeys.values()
            continue
        target = index.resolve(comp, rest, naming, order)
        if target is None:
            result.unmatched += fkeys.values()
            continue
        tensors = {f: sd[k] for f, k in fkeys.items()}
        alpha = stem_alpha(tensors, rule, rest, peft)
        shape = index.expected_shape(target)
        adapter = _adapter_from_fields(tensors, alpha, (shape[0], math.prod(shape[1:])))
        if adapter is None:
            result.unmatched += fkeys.values()
            continue
        _validate(adapter, fkeys, target, index, what)
        found.setdefault((target.component, target.module), []).append((target, adapter))
        formats[producer] = None

    for (comp, module), items in found.items():
        layer = index.layers[comp][module]
        shape = weight_shape(layer)
        parts = []
        for target, adapter in items:
            a = SwapHalves(adapter) if target.swap else adapter
            off = 0 if target.part is None else target.part[0] * (shape[0] // target.part[1])
            parts.append((off, a))
        if len(parts) == 1 and parts[0][0] == 0 and items[0][0].part is None:
            result.adapters[(comp, module)] = parts[0][1]
        else:
            result.adapters[(comp, module)] = RowStack(parts, shape[0], math.prod(shape[1:]))
    result.formats = list(formats)
    if not result.adapters and not result.skipped:
        sample = ", ".join(f"'{k}'" for k in keys[:3])
        raise SD35Error(
            f"{what}: none of its {len(keys)} tensors fits a layer of this SD3-family model (first keys: {sample}); "
            "it was made for another model or is not a LoRA file."
        )
    return result


# ---------------------------------------------------------------------------------------------
# Writing


def diffusers_names(index: ModelIndex) -> dict[str, list[tuple[str, Target]]]:
    """Our MMDiT-X layer name -> [(diffusers module name, target)], the inverse of the diffusers table."""
    out: dict[str, list[tuple[str, Target]]] = {}
    for name, target in index.diffusers.items():
        out.setdefault(target.module, []).append((name, target))
    for v in out.values():
        v.sort(key=lambda nt: nt[1].part or (0, 1))
    return out


def save_lora(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (+ string ``metadata``) as safetensors, whole or not at all; never overwrite a file."""

    path = Path(path)
    if path.exists():
        raise SD35Error(
            f"{path}: the file already exists; choose another name (sd35 never overwrites a LoRA)."
        )
    if not path.parent.is_dir():
        raise SD35Error(f"{path.parent}: no such folder.")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return save_file_atomic(tensors, path, meta, overwrite=False)
