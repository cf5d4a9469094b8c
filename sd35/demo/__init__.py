"""The embedded demo model: a small MMDiT-X trained on captioned synthetic shape scenes.

It lets ``sd35 generate`` work on a fresh machine, offline, with an image that visibly follows its prompt,
and it proves that training and inference fit together (``benchmarks/adherence.py``). Its settings
(:data:`DEMO_DEFAULTS`) travel inside its weight file (:data:`sd35.presets.METADATA_KEY`), so every way
of loading it, ``load_demo_pipeline()``, ``sd35 generate`` or ``load_pipeline(MODEL_FILE, ...)``, runs it
as it was trained.
"""

from pathlib import Path

from sd35.errors import MissingComponentError
from sd35.presets import ModelDefaults
from sd35.sampling.guidance import SkipLayerGuidance

WEIGHTS = Path(__file__).parent / "weights"
MODEL_FILE = WEIGHTS / "sd35_demo.safetensors"

DEMO_DEFAULTS = ModelDefaults(
    name="sd35_demo",
    width=64,
    height=64,
    steps=20,
    cfg=4.0,
    sampler="euler",
    scheduler="normal",
    shift=1.0,
    slg=SkipLayerGuidance(layers=(2,), scale=2.0, start=0.01, end=0.3),
    trained_size=64,
)
"""The settings the demo model was trained and measured at (``benchmarks/adherence.py``)."""


def demo_files() -> tuple[Path, Path]:
    """(model file, tokenizer folder) of the embedded demo model."""
    if not MODEL_FILE.is_file():
        raise MissingComponentError(
            f"the built-in demo model is not installed ({MODEL_FILE} is missing); build it with "
            "`python -m sd35.demo.build WORK_DIR --install`, or give real SD3.5 weights as the model.",
            param="model",
        )
    return MODEL_FILE, WEIGHTS


def load_demo_pipeline(device: str | None = "cpu", dtype: str | None = None):
    """The demo model as an :class:`sd35.pipeline.SD3Pipeline` (CPU by default: it is tiny; ``dtype`` as
    :func:`sd35.load_pipeline`'s)."""
    from sd35.loading.assemble import load_pipeline

    model, tokenizers = demo_files()
    return load_pipeline(model, tokenizers=tokenizers, device=device, dtype=dtype)
