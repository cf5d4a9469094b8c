#!/usr/bin/env bash
# The whole GPU check in one prepared run (about 9 minutes of device time on one H100), from the repo root:
#
#   bash benchmarks/gpu_run.sh            # results under $OUT (or /tmp/sd35-gpu-out when OUT is unset)
#
# 1. the GPU tests (pytest -k "cuda or gpu"), if there are any;
# 2. one CFG step at 512/1024/1440, bf16: diffusers eager, ours eager, fp8, CUDA graphs, fp8 + CUDA graphs;
# 3. one whole 1024x1024 image, 28 steps, full-size random MMDiT-X, VAE, CLIP-L/G and T5-XXL: ours (each memory
#    mode load_pipeline offers) and diffusers' StableDiffusion3Pipeline;
# 4. our compiled variants (compile, compile + CUDA graphs) at COMPILE_SIZES, with whatever time is left
#    (diffusers compile is left out: it took 93 s at one size in our anchor run).
#
# Each stage is its own process under its own time limit, and each JSON is rewritten after every
# measurement, so a stage that hangs or crashes costs only its own numbers. The tables are printed again
# at the end from the JSON files, since the device tool returns only the end of the output.
#
# diffusers is not on the device image: carry its wheels (the tool's carry: [".whl"]), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#
# Knobs (environment): BUDGET_S (default 510: seconds for all stages together), COMPILE_SIZES (512,1024),
# MEMORY_MODES (high,balanced,low), ITERS (20), WARMUP (5).

set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sd35-gpu-out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-510}
COMPILE_SIZES=${COMPILE_SIZES:-512,1024}
MEMORY_MODES=${MEMORY_MODES:-high,balanced,low}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-5}
START=$(date +%s)
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# seconds a stage may take: its own cap, but never past the budget (minus 10 s to print the summary)
limit() {
  local left=$((BUDGET_S - ($(date +%s) - START) - 10))
  if [ "$left" -gt "$1" ]; then echo "$1"; elif [ "$left" -gt 20 ]; then echo "$left"; else echo 0; fi
}

stage() {  # stage NAME CAP COMMAND...
  local name=$1 cap=$2
  shift 2
  local t
  t=$(limit "$cap")
  if [ "$t" -le 0 ]; then
    echo "== $name: skipped, the time budget is spent" | tee -a "$OUT/run.log"
    return
  fi
  echo "== $name (limit ${t}s, $(($(date +%s) - START))s into the run)" | tee -a "$OUT/run.log"
  timeout --signal=INT --kill-after=15 "$t" "$@" >>"$OUT/run.log" 2>&1
  local rc=$?
  echo "== $name: exit code $rc" | tee -a "$OUT/run.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee -a "$OUT/run.log"

# 1. GPU tests. Exit code 5 = none selected; modules that cannot even be imported here (a missing test-only
#    package) must not stop the ones that can.
stage "gpu tests" 90 "$PY" -m pytest tests -x -k "cuda or gpu" --continue-on-collection-errors -p no:cacheprovider

# 2. step: everything but compilation
stage "step" 150 "$PY" -m sd35.cli bench --device cuda --full --sizes 512,1024,1440 --iters "$ITERS" --warmup "$WARMUP" \
  --ours eager,fp8,cuda_graphs,fp8+cuda_graphs --json "$OUT/step.json"

# 3. whole image
stage "whole image" 240 "$PY" -m sd35.cli bench --device cuda --full --skip-steps --whole-image --steps 28 \
  --memory "$MEMORY_MODES" --json "$OUT/image.json"

# 4. compilation, with what is left (diffusers eager again at these sizes for the speed-up column: seconds)
stage "compile" 240 "$PY" -m sd35.cli bench --device cuda --full --sizes "$COMPILE_SIZES" --iters "$ITERS" \
  --warmup "$WARMUP" --ours compile,compile+cuda_graphs --json "$OUT/compile.json"

echo
echo "== summary ($(($(date +%s) - START))s); full log: run.log; numbers: step.json, image.json, compile.json"
grep -E "passed|failed|error|no tests ran" "$OUT/run.log" | grep -v "^bench:" | tail -3
for f in step image compile; do
  [ -f "$OUT/$f.json" ] && "$PY" -c "import sys; from sd35.bench import tables_from_json; print(tables_from_json(sys.argv[1]))" \
    "$OUT/$f.json" && echo
done
