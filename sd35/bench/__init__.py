"""``sd35 bench``: our engine and diffusers side by side, in one process, on the same random weights.

A speed claim is only worth the baseline it was measured against, so the baseline is measured here, in
the same run, on the same card, with the same weights and inputs:

- **step**: one CFG denoising step, i.e. one MMDiT-X forward at batch 2 with 77 CLIP + 256 T5 text
  tokens, ours (eager, plus the fast paths of :mod:`sd35.accel` where they exist) against diffusers'
  ``SD3Transformer2DModel``. Both are built from one random state dict, converted to diffusers' layout
  with our own key table; before anything is timed, both outputs are compared, so a broken model (or a
  broken conversion) is never timed as if it were fast.
- **whole image** (``--whole-image``): prompt to pixels (text encoding + sampling + VAE decode) with our
  ``load_pipeline(...).generate`` against diffusers' ``StableDiffusion3Pipeline``, both loaded from one
  diffusers-layout folder of random weights (MMDiT-X, VAE, CLIP-L, CLIP-G and T5-XXL at full size).

Timing: warm-up calls first (module load, autotuning and compilation stay out of the numbers), then the
median, p10 and p90 of many calls, each bracketed by CUDA events on a GPU (``time.perf_counter`` on the
CPU); peak memory is ``torch.cuda.max_memory_allocated`` after a reset, with only the model under test
resident. Inputs are random normal, never zeros (zeros can run faster than real data).

On the CPU the default is a scaled-down MMDiT-X (and the tiny test pipeline) so that CI smoke-tests the
whole path in seconds; ``--full`` forces the real sizes anywhere.

One job per module: :mod:`~sd35.bench.options` (the checked request), :mod:`~sd35.bench.random_models` (the
models, inputs and random pipeline folder under test), :mod:`~sd35.bench.timing` (how calls are timed),
:mod:`~sd35.bench.steps` and :mod:`~sd35.bench.whole_image` (the two benchmarks),
:mod:`~sd35.bench.report` (the JSON and its tables) and :mod:`~sd35.bench.run` (the entry point). The
library's core never imports this package.
"""

from sd35.bench.options import BenchOptions, make_options
from sd35.bench.report import tables_from_json
from sd35.bench.run import run

__all__ = ["BenchOptions", "make_options", "run", "tables_from_json"]
