"""LoRA, LyCORIS (LoHa, LoKr, full diff) and DoRA for SD3 / SD3.5: loading every common layout, training, saving.

Inference::

    report = load_lora({"mmditx": m, "clip_l": l, "clip_g": g, "t5": t5}, "style.safetensors", strength=0.8)
    unload_lora(models, report.name)  # the weights come back bit for bit

Training::

    params = add_lora(mmditx, rank=16, alpha=16)           # trainable runtime adapters, output unchanged at start
    ...                                                      # optimise params
    save_lora("out.safetensors", export_lora(mmditx), export_metadata(mmditx))

See :mod:`sd35.lora.adapters` for the adapter formulas (DoRA included), :mod:`sd35.lora.patching` for
the two ways of applying them (and trainable adapters), :mod:`sd35.lora.formats` for the key layouts,
:mod:`sd35.lora.export` for the saved layouts, :mod:`sd35.lora.summary` for what a file is (``sd35 inspect``).
"""

from sd35.lora.adapters import Adapter, Diff, LoHa, LoKr, LoRA, RowStack, SwapHalves, dora_weight
from sd35.lora.export import export_lora, export_metadata
from sd35.lora.formats import ParsedLoRA, parse_lora, read_lora, save_lora
from sd35.lora.loader import LoadReport, load_lora, loaded_loras, set_lora_strength, unload_lora
from sd35.lora.patching import DEFAULT_TARGETS, Patch, add_lora, merge_lora, set_strength
from sd35.lora.summary import LoraSummary, summarize_lora

__all__ = [
    "DEFAULT_TARGETS",
    "Adapter",
    "Diff",
    "LoHa",
    "LoKr",
    "LoRA",
    "LoadReport",
    "LoraSummary",
    "ParsedLoRA",
    "Patch",
    "RowStack",
    "SwapHalves",
    "add_lora",
    "dora_weight",
    "export_lora",
    "export_metadata",
    "load_lora",
    "loaded_loras",
    "merge_lora",
    "parse_lora",
    "read_lora",
    "save_lora",
    "set_lora_strength",
    "set_strength",
    "summarize_lora",
    "unload_lora",
]
