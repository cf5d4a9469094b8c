"""How much arithmetic one MMDiT-X step is, and how fast this device multiplies matrices: together they say
what fraction of the hardware's reachable rate a step gets (the issue's "50% of the bf16 matmul rate").

The FLOPs are counted from the shapes: every joint block's linears and the attention's two matmuls
(QK^T and PV). The embedders, the adaLN modulation (one row per sample) and the elementwise ops are left
out: together well under 1% at SD3.5 Medium's width.
"""

from __future__ import annotations

import time

import torch

from sd35.bench.timing import synchronize
from sd35.models.mmditx import MMDiTXConfig


def step_flops(cfg: MMDiTXConfig, size: int, text_tokens: int, batch: int = 2) -> float:
    """Matmul FLOPs of one forward at ``size`` pixels (square) with ``text_tokens`` text tokens."""
    image = (size // 8 // cfg.patch_size) ** 2
    d, mlp = cfg.hidden_size, cfg.mlp_hidden
    total = 0.0
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        for tokens, pre_only in ((text_tokens, last), (image, False)):
            per_token = 3 * d * d + (0 if pre_only else d * d + 2 * d * mlp)
            total += 2 * batch * tokens * per_token
        if i in cfg.attn2_layers:  # image-only attention: qkv + proj, and its two matmuls
            total += 2 * batch * image * 4 * d * d + 4 * batch * image**2 * d
        total += 4 * batch * (image + text_tokens) ** 2 * d
    return total


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one n^3 matmul in ``dtype`` on ``device`` (the median of ``reps`` after one warm-up)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[reps // 2]
