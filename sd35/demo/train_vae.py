"""Train the demo's small 16-channel VAE on the synthetic scenes (reconstruction loss + a light KL term).

    python -m sd35.demo.train_vae OUT.safetensors [--steps 900] [--seed 0]

The result is in the official ``first_stage_model``-less VAE layout, so it loads through the same code as the
SD3 VAE. After training, the latent mean's channels are affinely renormalised (encoder output and decoder input
adjusted together, so reconstructions are unchanged) to the statistics the SD3 latent format expects
(``(z - 0.0609) * 1.5305`` has mean 0, std 1), so the flow model sees unit-scale latents like SD3.5's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sd35.demo.shapes import dataset
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.configs import demo_vae_config
from sd35.models.vae import LATENT_SCALE, LATENT_SHIFT, VAE


def images_tensor(n: int, seed: int) -> torch.Tensor:
    data = dataset(n, seed)
    arr = np.stack([np.asarray(im, dtype=np.float32) for im, _ in data]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def encode_stats(vae: VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 64]) for i in range(0, len(images), 64)])
    return means.mean((0, 2, 3)), means.std((0, 2, 3))


@torch.no_grad()
def renormalise(vae: VAE, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the encoder's mean latent channel c equal to (z_c - mean_c) * a_c + b with the SD3 target scale.

    a_c = (1 / LATENT_SCALE) / std_c, b = LATENT_SHIFT. The decoder's first conv is rewritten to undo it.
    """
    a = (1.0 / LATENT_SCALE) / std
    b = LATENT_SHIFT - mean * a
    conv_out = vae.encoder.conv_out  # 2 * z channels: mean, then logvar
    z = a.numel()
    conv_out.weight[:z] *= a.view(-1, 1, 1, 1)
    conv_out.bias[:z] = conv_out.bias[:z] * a + b
    conv_out.bias[z:] += 2 * torch.log(a)  # the variance scales by a^2
    conv_in = vae.decoder.conv_in  # z' = a z + b  ->  W z = (W / a) z' - (W / a) b
    w = conv_in.weight / a.view(1, -1, 1, 1)
    conv_in.bias -= (w * b.view(1, -1, 1, 1)).sum((1, 2, 3))
    conv_in.weight.copy_(w)


def train_vae(
    steps: int = 900,
    seed: int = 0,
    batch: int = 16,
    log_every: int = 100,
    init: Path | None = None,
    lr: float = 2e-3,
) -> dict[str, torch.Tensor]:
    """Train from scratch, or continue from ``init`` (a VAE file this script wrote)."""
    torch.manual_seed(seed)
    if init is not None:
        from sd35.loading.safetensors_io import open_safetensors

        vae = VAE.from_state_dict(open_safetensors(init))
        for p in vae.parameters():
            p.requires_grad_(True)
        vae.train()
    else:
        vae = VAE(demo_vae_config())
    train = images_tensor(4096, seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x = train[torch.randint(0, len(train), (batch,), generator=g)]
        moments = vae.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        recon = vae.decoder(z)
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}  recon {rec.item():.4f}  kl {kl.item():.3f}  {time.time() - t0:.0f}s",
                flush=True,
            )
    vae.eval()
    mean, std = encode_stats(vae, train[:1024])
    renormalise(vae, mean, std)
    return {k: v.detach().contiguous() for k, v in vae.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue training this VAE file")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    save_file_atomic(train_vae(args.steps, args.seed, init=args.init, lr=args.lr), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
