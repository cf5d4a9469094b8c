"""Build the embedded demo model from scratch, reproducibly (the recipe behind ``sd35/demo/weights``).

    python -m sd35.demo.build WORK_DIR [--vae VAE.safetensors] [--steps 3000] [--init FILE] [--install]

1. the VAE: ``python -m sd35.demo.train_vae`` (or ``--vae`` to reuse one);
2. text encoders: small CLIP-L / CLIP-G / T5 of the real architectures, random and frozen (seeded), with
   tokenizer files made by :func:`sd35.conditioning.tiny_tokenizers.write_tiny_tokenizers`; frozen random encoders
   still give every word its own embedding, which is all the flow model needs to learn from;
3. the MMDiT-X (hidden 128, 4 blocks, attn2 in blocks 0-1, qk-norm) initialised like DiT (adaLN-zero, 2-D
   sin-cos position grid), then trained from scratch by ``sd35 train`` (``mode = "full"``) on 4000 captioned
   scenes from :mod:`sd35.demo.shapes`, with caption dropout so classifier-free guidance works;
4. everything assembled in fp16 into one all-in-one file in the official layout, plus the tokenizer folders.
   ``--install`` copies them into the package (``sd35/demo/weights``).

The shipped weights came from these runs, in order (each continues the previous one's output; 2 CPU cores,
about 1.5 hours in all)::

    python -m sd35.demo.train_vae vae1.safetensors                                   # 900 steps
    python -m sd35.demo.train_vae vae2.safetensors --init vae1.safetensors --steps 1500 --lr 1e-3 --seed 1
    python -m sd35.demo.train_vae vae3.safetensors --init vae2.safetensors --steps 3000 --lr 1e-3 --seed 3
    python -m sd35.demo.build W1 --vae vae2.safetensors                              # 2500 steps, lr 1e-3
    python -m sd35.demo.build W2 --vae vae2.safetensors --init W1/sd35_demo.safetensors --steps 3000 --learning-rate 5e-4
    python -m sd35.demo.build W3 --vae vae2.safetensors --init W2/sd35_demo.safetensors --steps 3000 --learning-rate 3e-4
    python -m sd35.demo.build W4 --vae vae3.safetensors --init W3/sd35_demo.safetensors --steps 4000 --learning-rate 5e-4
    python -m sd35.demo.build W5 --vae vae3.safetensors --init W4/sd35_demo.safetensors --steps 4000 --learning-rate 3e-4 --install

(The flow model is fine-tuned onto the sharper ``vae3`` latents in the last two runs. ``vae3`` was continued
from ``vae2`` as stored, in fp16, inside W3's ``sd35_demo.safetensors``.)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from sd35.conditioning.tiny_tokenizers import write_tiny_tokenizers
from sd35.demo.shapes import dataset
from sd35.loading.safetensors_io import open_safetensors, save_file_atomic
from sd35.loading.writers import write_all_in_one
from sd35.models.clip import CLIPTextEncoder
from sd35.models.configs import PipelineWeights, demo_mmditx_config, tiny_configs
from sd35.models.mmditx import MMDiTX, MMDiTXConfig
from sd35.models.random_init import random_state_dict
from sd35.models.t5 import T5Encoder

PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
DEMO_FILE = "sd35_demo.safetensors"


def sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position embedding (half the channels for rows, half for columns), as DiT/SD3 initialise."""

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_axis(ys, dim // 2), one_axis(xs, dim // 2)], dim=1)
    return emb.float()[None]


def init_mmditx(cfg: MMDiTXConfig, seed: int) -> dict[str, torch.Tensor]:
    """DiT-style initialisation: Xavier linears, adaLN-zero, zero final projection, sin-cos positions."""
    torch.manual_seed(seed)
    model = MMDiTX(cfg)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
        if name.endswith("adaLN_modulation"):
            torch.nn.init.zeros_(module[1].weight)
            torch.nn.init.zeros_(module[1].bias)
    torch.nn.init.zeros_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    torch.nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_grid(cfg.pos_embed_max_size, cfg.hidden_size))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _mmditx_of(path: Path) -> dict[str, torch.Tensor]:
    prefix = "model.diffusion_model."
    return {
        k[len(prefix) :]: t.load().float() for k, t in open_safetensors(path).items() if k.startswith(prefix)
    }


def write_data(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, scene) in enumerate(dataset(n, seed)):
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(scene.caption)


def build(
    work: Path,
    vae_path: Path | None,
    steps: int,
    n_images: int = 4000,
    seed: int = 0,
    init: Path | None = None,
    learning_rate: float = 1e-3,
) -> Path:
    """``init``: continue from the MMDiT-X of an earlier build's output instead of a fresh initialisation."""
    from sd35.demo.train_vae import train_vae
    from sd35.train.config import TrainConfig
    from sd35.train.trainer import train

    work.mkdir(parents=True, exist_ok=True)
    if vae_path is None:
        vae_path = work / "vae.safetensors"
        save_file_atomic(train_vae(seed=seed), vae_path)
    vae = {k: t.load() for k, t in open_safetensors(vae_path).items()}
    c = tiny_configs()
    weights = PipelineWeights(
        configs=c,
        mmditx=init_mmditx(demo_mmditx_config(), seed) if init is None else _mmditx_of(init),
        vae=vae,
        clip_l=random_state_dict(CLIPTextEncoder(c.clip_l), seed + 2),
        clip_g=random_state_dict(CLIPTextEncoder(c.clip_g), seed + 3),
        t5=random_state_dict(T5Encoder(c.t5), seed + 4),
    )
    base = write_all_in_one(work / "base.safetensors", weights)
    write_tiny_tokenizers(work / "tokenizers", clip_vocab=c.clip_l.vocab_size, t5_vocab=c.t5.vocab_size)
    write_data(work / "data", n_images, seed)
    cfg = TrainConfig(
        model=str(base),
        tokenizers=str(work / "tokenizers"),
        data_dir=str(work / "data"),
        resolution=64,
        bucket_min_side=64,
        batch_size=16,
        mode="full",
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
        weight_decay=0.0,
        caption_dropout=0.1,
        mixed_precision="no",
        ema=True,
        ema_decay=0.995,
        seed=seed,
        output_dir=str(work / "run"),
        output_name="mmditx",
        validation_every=0,
        validation_prompts=[],
        save_every=0,
        caption_t5_tokens=77,
    )
    result = train(cfg)
    trained = {k: t.load() for k, t in open_safetensors(result.outputs[0]).items()}
    mmditx = {
        k[len("model.diffusion_model.") :]: v
        for k, v in trained.items()
        if k.startswith("model.diffusion_model.")
    }
    final = PipelineWeights(c, mmditx, vae, weights.clip_l, weights.clip_g, weights.t5)
    out = work / DEMO_FILE
    if out.exists():
        out.unlink()
    write_all_in_one(out, final, dtype=torch.float16)
    with_defaults(out)
    print(f"losses: first {sum(result.losses[:50]) / 50:.4f}, last {sum(result.losses[-50:]) / 50:.4f}")
    return out


def with_defaults(path: Path) -> None:
    """Store :data:`sd35.demo.DEMO_DEFAULTS` in the file's metadata, so every loader runs it as trained."""
    from sd35.demo import DEMO_DEFAULTS
    from sd35.presets import METADATA_KEY, to_metadata

    tensors = {k: t.load() for k, t in open_safetensors(path).items()}
    save_file_atomic(tensors, path, metadata={METADATA_KEY: to_metadata(DEMO_DEFAULTS)})


def install(work: Path) -> None:
    PACKAGE_WEIGHTS.mkdir(exist_ok=True)
    shutil.copy2(work / DEMO_FILE, PACKAGE_WEIGHTS / DEMO_FILE)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(PACKAGE_WEIGHTS / sub, ignore_errors=True)
        shutil.copytree(work / "tokenizers" / sub, PACKAGE_WEIGHTS / sub)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--vae", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument(
        "--init", type=Path, default=None, help="continue from an earlier build's sd35_demo.safetensors"
    )
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--install", action="store_true")
    args = ap.parse_args()
    out = build(
        args.work, args.vae, args.steps, args.images, init=args.init, learning_rate=args.learning_rate
    )
    print(out, f"{out.stat().st_size / 2**20:.1f} MB")
    if args.install:
        install(args.work)


if __name__ == "__main__":
    main()
