"""Load time, memory and step time of one MMDiT-X in the file formats users keep: fp16, fp8, GGUF Q8_0/Q5_1/Q4_0.

Writes one random MMDiT-X (full SD3.5 Medium size by default) in each format: the official single file in fp16
and in fp8 (``float8_e4m3fn`` 2-D weights, as ``*_fp8_e4m3fn.safetensors`` files are), and ComfyUI-GGUF's SD3
layout quantized by the ``gguf`` package (2-D weights whose rows fit the blocks; the rest F32). Then:

1. **Loading**, one fresh subprocess per format, in turn: seconds to a ready model (page cache warm: the files
   were just written), the peak of anonymous memory during the load (RSS minus file-backed pages, sampled every
   5 ms: what a machine must really provide) and the anonymous memory the loaded model keeps.
2. **Steps**, one subprocess holding the bf16 model (from the fp16 file) and every GGUF model at once, timing
   one CFG step (batch 2) of each in alternating rounds, so that the machine's load changes hit all alike. The
   difference to bf16 is the cost of dequantizing the weights layer by layer at every step.

    python benchmarks/gguf_formats.py                       # full size: ~12 GB of files, ~11 GB RAM, ~10 min
    python benchmarks/gguf_formats.py --depth 4 --size 256  # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF_TYPES = ("Q8_0", "Q5_1", "Q4_0")

LOAD_CHILD = r"""
import gc, json, sys, time
import torch
import sd35
from sd35.testing.memory import PeakAnonMemory, anon_mb
with PeakAnonMemory() as memory:
    t0 = time.perf_counter()
    model = sd35.load_models([sys.argv[1]], kinds=["mmditx"], dtype=torch.bfloat16)["mmditx"]
    seconds = time.perf_counter() - t0
gc.collect()
tensors = list(model.parameters()) + list(model.buffers())
print(json.dumps({
    "seconds": seconds, "peak_mb": memory.peak_mb, "kept_mb": anon_mb() - memory.base_mb,
    "weights_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
}))
"""

STEP_CHILD = r"""
import json, statistics, sys, time
import torch
import sd35
from sd35.bench.random_models import step_inputs
names, paths, size, rounds = json.loads(sys.argv[1])
models = {n: sd35.load_models([p], kinds=["mmditx"], dtype=torch.bfloat16)["mmditx"] for n, p in zip(names, paths)}
inp = step_inputs(next(iter(models.values())).config, size, torch.device("cpu"), torch.bfloat16, seed=1)
times = {n: [] for n in names}
with torch.inference_mode():
    for m in models.values():  # warm-up
        m(inp.x, inp.t, inp.y, inp.context)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            models[n](inp.x, inp.t, inp.y, inp.context)
            times[n].append(time.perf_counter() - t0)
print(json.dumps({n: statistics.median(v) for n, v in times.items()}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_files(folder: Path, hidden: int, depth: int) -> dict[str, Path]:
    """The random model in each format; the state dict is made once, in fp16, and dropped before returning."""
    import gguf
    import torch

    from sd35.loading.safetensors_io import save_file_atomic
    from sd35.models.configs import medium_mmditx_config
    from sd35.models.mmditx import MMDiTX
    from sd35.models.random_init import build_random

    full = medium_mmditx_config()
    cfg = dataclasses.replace(
        full,
        hidden_size=hidden,
        depth=depth,
        mlp_hidden=4 * hidden,
        attn2_layers=tuple(i for i in full.attn2_layers if i < depth),
    )
    model = build_random(MMDiTX, cfg, "cpu", torch.float16, seed=7)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    paths = {
        "fp16": folder / "sd3.5_medium.safetensors",
        "fp8": folder / "sd3.5_medium_fp8_e4m3fn.safetensors",
    }
    save_file_atomic({"model.diffusion_model." + k: v for k, v in sd.items()}, paths["fp16"])
    fp8 = {
        "model.diffusion_model." + k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()
    }
    save_file_atomic(fp8, paths["fp8"])
    del fp8
    Q = gguf.GGMLQuantizationType
    for type_name in GGUF_TYPES:
        qtype = Q[type_name]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        path = paths[type_name] = folder / f"sd3.5_medium-{type_name}.gguf"
        w = gguf.GGUFWriter(str(path), "sd3")
        for key, value in sd.items():
            arr = value.float().numpy()
            use = qtype if arr.ndim == 2 and arr.shape[-1] % block == 0 else Q.F32
            raw = gguf.quants.quantize(arr, use)
            w.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=use)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        del w
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--size", type=int, default=512, help="image size of the timed step (batch 2, CFG)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        t0 = time.perf_counter()
        paths = write_files(Path(tmp), args.hidden, args.depth)
        print(f"wrote {len(paths)} files in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        loads = {}
        for name, path in paths.items():
            loads[name] = _run(LOAD_CHILD, str(path)) | {"file_mb": path.stat().st_size / 2**20}
            print(name, loads[name], file=sys.stderr)
        timed = ["fp16", *GGUF_TYPES]
        steps = _run(STEP_CHILD, json.dumps([timed, [str(paths[n]) for n in timed], args.size, args.rounds]))
    print(
        f"MMDiT-X hidden {args.hidden} depth {args.depth}; loaded for bf16 compute; step: batch 2 (CFG), "
        f"{args.size} px, 154 text tokens, median of {args.rounds} alternating rounds; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}"
    )
    head = ("format", "file MB", "load s", "peak load MB", "kept MB", "weights MB", "step s", "vs bf16")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in loads.items():
        step = steps.get(name)
        rel = f"{step / steps['fp16']:.2f}x" if step else "(as bf16)"
        cells = (
            name,
            f"{r['file_mb']:.0f}",
            f"{r['seconds']:.1f}",
            f"{r['peak_mb']:.0f}",
            f"{r['kept_mb']:.0f}",
            f"{r['weights_mb']:.0f}",
            f"{step:.2f}" if step else "-",
            rel,
        )
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None}, "loads": loads, "steps": steps})
        )


if __name__ == "__main__":
    main()
