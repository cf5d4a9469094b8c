"""Our MMDiT-X step (and whole image) against diffusers on the same random weights: ``sd35 bench`` as a script.

Every option is ``sd35 bench``'s (see ``python benchmarks/step_speed.py --help``); the work is in
:mod:`sd35.bench`. Examples:

    python benchmarks/step_speed.py                                  # CPU: scaled config, seconds
    python benchmarks/step_speed.py --device cuda --compile --fp8 --cuda-graphs --json step.json
    python benchmarks/step_speed.py --device cuda --skip-steps --whole-image --json image.json

``benchmarks/gpu_run.sh`` runs the full H100 set in one go.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from sd35.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
