"""What a request leaves unset means for each model: one table, chosen once when a model is loaded.

The official reference keeps one settings dict per release (Stability-AI/sd3.5 ``sd3_infer.py``
``CONFIGS``, keyed by the file's name, so a renamed file silently loses them). We choose by what the
weights are (the release :mod:`sd35.models.family` names from their shapes, and for Large Turbo from the
file's metadata or name: :func:`defaults_for`), and a weight file may carry its own defaults in its
safetensors metadata under :data:`METADATA_KEY` (the built-in demo model does), which win.

Every front end (the CLI, ``pipe.generate``, each HTTP route) resolves a request against the loaded
model's table in one place, :meth:`sd35.request.GenerateRequest.resolved`, so "the default" never
depends on which door a request came in by.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from typing import get_args

from sd35.errors import CheckpointError
from sd35.models.family import Variant, release_from_shape
from sd35.models.mmditx import MMDiTXConfig
from sd35.sampling.guidance import SkipLayerGuidance
from sd35.sampling.samplers import SamplerName
from sd35.sampling.schedules import SchedulerName

METADATA_KEY = "sd35.defaults"
"""Safetensors metadata key of a JSON object with :class:`ModelDefaults` fields (``slg`` as an object)."""


@dataclass(frozen=True)
class ModelDefaults:
    """The settings a model runs with when a request does not say; all complete."""

    name: str  # the preset's name (the reference's CONFIGS key where there is one)
    width: int
    height: int
    steps: int
    cfg: float
    sampler: SamplerName
    scheduler: SchedulerName
    shift: float
    slg: SkipLayerGuidance  # what a bare "use SLG" means for this model
    trained_size: int  # the largest image side the model was trained at; beyond it quality falls apart

    def __post_init__(self) -> None:
        if not self.slg.complete:
            raise ValueError(f"the {self.name} preset's SLG settings must be complete")


SD35_MEDIUM = ModelDefaults(
    name="sd3.5_medium",
    width=1024,
    height=1024,
    steps=50,
    cfg=5.0,
    sampler="dpmpp_2m",
    scheduler="normal",
    shift=3.0,
    slg=SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.20),
    trained_size=1440,  # the model card: progressive training up to 1440 px
)
"""``sd3_infer.py`` CONFIGS["sd3.5_medium"] (SLG opt-in with ``--skip_layer_cfg``; its cfg 4.0 is never used)."""

SD3_MEDIUM = replace(SD35_MEDIUM, name="sd3_medium", shift=1.0, trained_size=1024)
"""CONFIGS["sd3_medium"]: shift 1.0, else the reference's fallbacks."""

SD35_LARGE = replace(SD35_MEDIUM, name="sd3.5_large", steps=40, cfg=4.5, trained_size=1024)
"""CONFIGS["sd3.5_large"]: 40 steps, CFG 4.5."""

SD35_LARGE_TURBO = replace(SD35_LARGE, name="sd3.5_large_turbo", steps=4, cfg=1.0, sampler="euler")
"""CONFIGS["sd3.5_large_turbo"]: 4 steps, CFG 1.0 (one model call per step: the distilled model needs no
guidance), Euler."""

PRESETS: dict[Variant, ModelDefaults] = {
    "medium": SD35_MEDIUM,
    "large": SD35_LARGE,
    "large-turbo": SD35_LARGE_TURBO,
    "sd3-medium": SD3_MEDIUM,
}
"""Each release's defaults, by :data:`sd35.models.family.Variant`."""


def defaults_for(
    config: MMDiTXConfig, metadata: dict[str, str] | None = None, variant: Variant | None = None
) -> ModelDefaults:
    """The defaults of a loaded MMDiT-X: its file's own (``metadata[METADATA_KEY]``), else its release's
    (``variant``, as :func:`sd35.models.family.identify` names it; by default the one its shapes name).

    A transformer of no known release (a custom or test-sized model) gets SD3.5 Medium's settings with the
    size capped by its position grid, so a bare request still fits the model.
    """
    if metadata and METADATA_KEY in metadata:
        return from_metadata(metadata[METADATA_KEY])
    variant = variant or release_from_shape(config)
    preset = PRESETS[variant] if variant else replace(SD35_MEDIUM, name="custom")
    if variant and config.max_image_size >= preset.trained_size:
        return preset
    # no release, or a grid smaller than the release's (a toy model named by its file): the size its grid allows
    side = min(preset.width, config.max_image_size)
    return replace(preset, width=side, height=side, trained_size=config.max_image_size)


NAMING_KEY = "schedule_names"
"""Marks metadata written since scheduler names mean ComfyUI's (``"comfyui"``). Before, ``"simple"`` named the
reference's schedule, which is ComfyUI's ``normal``: :func:`from_metadata` reads an unmarked ``"simple"``
(the built-in demo model's file has one) as ``"normal"``, so an older file keeps its image."""


def to_metadata(defaults: ModelDefaults) -> str:
    """The JSON text stored under :data:`METADATA_KEY` (see :func:`from_metadata`)."""
    return json.dumps({**dataclasses.asdict(defaults), NAMING_KEY: "comfyui"}, sort_keys=True)


def from_metadata(text: str) -> ModelDefaults:
    """A :class:`ModelDefaults` from its JSON form; a clear :class:`CheckpointError` for anything malformed."""
    try:
        raw = json.loads(text)
        if raw.pop(NAMING_KEY, None) != "comfyui" and raw.get("scheduler") == "simple":
            raw["scheduler"] = "normal"
        raw["slg"] = SkipLayerGuidance(**raw["slg"])
        defaults = ModelDefaults(**raw)
    except Exception as e:
        raise CheckpointError(f"the weight file's '{METADATA_KEY}' metadata is malformed ({e}).") from None
    if defaults.sampler not in get_args(SamplerName) or defaults.scheduler not in get_args(SchedulerName):
        raise CheckpointError(
            f"the weight file's '{METADATA_KEY}' metadata names an unknown sampler or scheduler "
            f"({defaults.sampler!r}, {defaults.scheduler!r})."
        )
    return defaults
