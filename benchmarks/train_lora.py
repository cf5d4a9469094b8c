"""LoRA training step: ours (sd35.lora.add_lora + sd35.train.loss.flow_loss) vs the diffusers recipe.

The diffusers side follows `examples/dreambooth/train_dreambooth_lora_sd3.py`: SD3Transformer2DModel with a
PEFT LoRA on ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
"attn.to_out.0", "attn.to_q", "attn.to_v"] (gaussian init), logit-normal timesteps, x_s = (1-s) x0 + s noise,
target noise - x0, MSE, AdamW. Ours puts the LoRA on the same layers (the fused qkv and the output
projections of both streams; one shared down-projection per fused qkv, as kohya does). Both models get the
same random weights (diffusers through its own single-file converter), the same batches and the same rank.

    python benchmarks/train_lora.py                       # CPU: a scaled-down MMDiT-X, 256 px
    python benchmarks/train_lora.py --full --size 1024    # CUDA: the SD3.5 Medium config, bf16 autocast

Prints a table and writes JSON (--json). Step times are medians over --steps after --warmup steps (CUDA events
on a GPU), peak memory is torch.cuda.max_memory_allocated on a GPU and peak anonymous RSS growth on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from sd35.loading.writers import diffusers_transformer_config
from sd35.lora import add_lora
from sd35.models.configs import medium_mmditx_config
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_state_dict
from sd35.train.loss import flow_loss

RECIPE_TARGETS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]  # fmt: skip
OUR_TARGETS = ("attn.qkv", "attn.proj")


def config(full: bool) -> MMDiTXConfig:
    if full:
        return medium_mmditx_config()
    return MMDiTXConfig(
        hidden_size=256,
        depth=6,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        pos_embed_max_size=64,
        pooled_dim=256,
        context_dim=512,
        mlp_hidden=1024,
        qk_norm=True,
        attn2_layers=(0, 1, 2),
    )


def anon_mb() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssAnon"].split()[0]) / 1024


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = anon_mb()
        self.stop = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, anon_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()

    @property
    def mb(self) -> float:
        return self.peak - self.base


def batches(cfg: MMDiTXConfig, n: int, batch: int, size: int, tokens: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = size // 8
    out = []
    for _ in range(n):
        out.append(
            {
                "latents": torch.randn(batch, 16, lat, lat, generator=g).to(device),
                "noise": torch.randn(batch, 16, lat, lat, generator=g).to(device),
                "sigmas": torch.sigmoid(torch.randn(batch, generator=g)).to(device),
                "pooled": torch.randn(batch, cfg.pooled_dim, generator=g).to(device),
                "context": torch.randn(batch, tokens, cfg.context_dim, generator=g).to(device),
            }
        )
    return out


def time_steps(step, data, warmup: int, device) -> list[float]:
    times = []
    for i, b in enumerate(data):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(b)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step(b)
            ms = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            times.append(ms)
    return times


def run_ours(cfg, sd, data, args, device, autocast_dtype):
    model = MMDiTX.from_state_dict(sd, dtype=torch.float32, device=device)
    model.gradient_checkpointing = args.checkpointing
    params = add_lora(model, args.rank, alpha=args.rank, targets=OUR_TARGETS, name="bench")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = flow_loss(model, b["latents"], b["pooled"], b["context"], b["noise"], b["sigmas"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def run_diffusers(cfg, sd, data, args, device, autocast_dtype):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from peft import LoraConfig

    config = {k: v for k, v in diffusers_transformer_config(cfg).items() if not k.startswith("_")}
    model = SD3Transformer2DModel(**config)
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)))
    model.to(device).requires_grad_(False)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=RECIPE_TARGETS
        )
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        s = b["sigmas"].view(-1, 1, 1, 1)
        noisy = (1.0 - s) * b["latents"] + s * b["noise"]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = model(
                hidden_states=noisy,
                timestep=b["sigmas"] * 1000,
                encoder_hidden_states=b["context"],
                pooled_projections=b["pooled"],
                return_dict=False,
            )[0]
        target = b["noise"] - b["latents"]
        loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full SD3.5 Medium config (needs a GPU)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024 with --full, else 256)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=154, help="text tokens (77 CLIP + 77 T5)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    size = args.size or (1024 if args.full else 256)
    cfg = config(args.full)
    sd = random_state_dict(MMDiTX(cfg), seed=0)
    data = batches(cfg, args.steps + args.warmup, args.batch, size, args.tokens, device)
    rows = []
    for name, build in (("sd35", run_ours), ("diffusers+peft", run_diffusers)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            step, n_params = build(cfg, sd, data, args, device, autocast_dtype)
            times = time_steps(step, data, args.warmup, device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.mb
        rows.append(
            {"impl": name, "median_ms": statistics.median(times), "peak_mb": peak, "lora_params": n_params}
        )
        del step
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"LoRA training step, {where}, {'SD3.5 Medium' if args.full else 'scaled-down MMDiT-X'} "
        f"(hidden {cfg.hidden_size}, depth {cfg.depth}), {size}px, batch {args.batch}, rank {args.rank}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'impl':16} {'median step (ms)':>17} {'peak memory (MB)':>17} {'LoRA params':>12}")
    for r in rows:
        print(f"{r['impl']:16} {r['median_ms']:17.1f} {r['peak_mb']:17.0f} {r['lora_params']:12d}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": where, "size": size, "config": cfg.__dict__, "results": rows},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
