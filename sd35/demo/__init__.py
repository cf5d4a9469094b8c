"""The embedded demo model: a small MMDiT-X trained on captioned synthetic shape scenes.

It lets ``sd35 generate`` work on a fresh machine, offline, with an image that visibly follows its prompt,
and it proves that training and inference fit together (``benchmarks/adherence.py``).
"""

from dataclasses import dataclass
from pathlib import Path

from sd35.errors import SD35Error

WEIGHTS = Path(__file__).parent / "weights"
MODEL_FILE = WEIGHTS / "sd35_demo.safetensors"


@dataclass(frozen=True)
class DemoDefaults:
    """Settings the demo model was trained and measured at (benchmarks/adherence.py)."""

    width: int = 64
    height: int = 64
    steps: int = 20
    cfg: float = 4.0
    sampler: str = "euler"
    shift: float = 1.0


DEMO_DEFAULTS = DemoDefaults()


def demo_files() -> tuple[Path, Path]:
    """(model file, tokenizer folder) of the embedded demo model."""
    if not MODEL_FILE.is_file():
        raise SD35Error(
            f"the built-in demo model is not installed ({MODEL_FILE} is missing); build it with "
            "`python -m sd35.demo.build WORK_DIR --install`, or pass --model with real SD3.5 weights."
        )
    return MODEL_FILE, WEIGHTS


def load_demo_pipeline(device: str | None = "cpu"):
    """The demo model as an :class:`sd35.pipeline.SD3Pipeline` (CPU by default: it is tiny)."""
    from sd35.pipeline import load_pipeline

    model, tokenizers = demo_files()
    return load_pipeline(model, tokenizers=tokenizers, device=device)
