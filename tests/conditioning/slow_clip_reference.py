"""Run as a script: transformers 4.x's slow (pure Python) ``CLIPTokenizer`` on words read from stdin.

The official SD3 reference tokenizes CLIP text with that class, which transformers 5 no longer has. The
tests run this file in a subprocess whose ``PYTHONPATH`` puts a transformers 4.46 installation first
(``make test`` installs it under ``.venv/ref/transformers4``; see :func:`slow_clip_ids`), without ftfy,
as in the reference's requirements. Input: JSON ``{"folder": ..., "words": [...]}``; output: JSON, one
id list per word, BOS and EOS stripped (the reference's ``tokenizer(word)["input_ids"][1:-1]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REF_DIR = Path(sys.prefix) / "ref" / "transformers4"
INSTALL = (
    f"{sys.executable} -m pip install --no-deps --target {REF_DIR} "
    "transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5"
)


def slow_clip_ids(folder: Path, words: list[str]) -> list[list[int]]:
    """Each word's ids from the slow CLIPTokenizer of ``folder`` (vocab.json + merges.txt)."""
    assert (REF_DIR / "transformers").is_dir(), (
        f"the slow CLIPTokenizer reference is not installed ({REF_DIR}); make test installs it, or: {INSTALL}"
    )
    env = {**os.environ, "PYTHONPATH": str(REF_DIR), "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    done = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps({"folder": str(folder), "words": words}),
        capture_output=True,
        text=True,
        env=env,
        check=False,
        encoding="utf-8",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _main() -> None:
    import transformers
    from transformers import CLIPTokenizer

    assert transformers.__version__.startswith("4."), transformers.__version__
    request = json.loads(sys.stdin.read())
    folder = Path(request["folder"])
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert tok.fix_text is None, "ftfy is installed: the reference runs without it"
    out = [tok(w)["input_ids"][1:-1] for w in request["words"]]
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _main()
