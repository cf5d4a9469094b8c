"""Peak host memory while loading an MMDiT-X checkpoint: our streaming loader vs the usual load_file + load_state_dict.

Writes a random MMDiT-X of the given width/depth as an fp32 official-layout file, then in fresh
subprocesses loads it into bf16 (1) with ``sd35.load_models`` and (2) the common way: read the whole
file with ``safetensors.torch.load_file``, build the model, ``load_state_dict``, cast. Peak anonymous
memory (RSS minus file-backed pages, sampled every 5 ms) is what a machine must really provide;
memory-mapped file pages are reclaimable and not counted.

    python benchmarks/load_memory.py --hidden 1024 --depth 8      # ~0.5 GB file, a few seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from sd35.testing.memory import PeakAnonMemory
mode, path = sys.argv[1], sys.argv[2]
with PeakAnonMemory() as memory:
    t0 = time.perf_counter()
    if mode == "sd35":
        import sd35
        model = sd35.load_models([path], kinds=["mmditx"], dtype=torch.bfloat16)["mmditx"]
    else:
        from safetensors.torch import load_file
        from sd35.models.mmditx import MMDiTX, MMDiTXConfig, strip_prefix
        sd = strip_prefix(load_file(path))
        model = MMDiTX(MMDiTXConfig.from_state_dict(sd))
        model.load_state_dict(sd)
        del sd
        model = model.to(torch.bfloat16)
    seconds = time.perf_counter() - t0
params = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"mode": mode, "peak_mb": memory.peak_mb, "model_mb": params / 2**20, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    from sd35.loading.safetensors_io import save_file_atomic
    from sd35.models.mmditx import MMDiTX, MMDiTXConfig

    cfg = MMDiTXConfig(
        hidden_size=args.hidden,
        depth=args.depth,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=96,
        pooled_dim=2048,
        context_dim=4096,
        mlp_hidden=4 * args.hidden,
        qk_norm=True,
        attn2_layers=tuple(range(args.depth // 2)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmditx_fp32.safetensors"
        model = MMDiTX(cfg)
        sd = {"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file_atomic(sd, path)
        del model, sd
        file_mb = path.stat().st_size / 2**20
        rows = []
        for mode in ("sd35", "load_file+load_state_dict"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"file: {file_mb:.0f} MB fp32; loaded as bf16; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'loader':28} {'peak extra RAM (MB)':>20} {'bf16 model (MB)':>16} {'seconds':>8}")
    for r in rows:
        print(f"{r['mode']:28} {r['peak_mb']:20.0f} {r['model_mb']:16.0f} {r['seconds']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"file_mb": file_mb, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
