"""The per-step cost of one ControlNet over none, ours against diffusers in the same run, on the same weights.

A scaled MMDiT-X (``sd35.models.configs.scaled_mmditx_config``: hidden 256, depth 4, attn2 in blocks 0-1,
qk-norm) and a 2-block ControlNet (dual attention in its block 0, sincos positions) built by diffusers
(``SD3ControlNetModel``, every tensor random) and loaded by ours from the folder diffusers writes. One CFG
step (batch 2) is: the ControlNet's forward, then the transformer's with the residuals added; "none" is the
transformer alone. Both sides are checked to agree before anything is timed, then timed in alternating blocks
(``sd35.bench.timing.time_paired``), which cancels the drift of a shared CPU.

    python benchmarks/controlnet_step.py                       # CPU, 128 and 256 px
    python benchmarks/controlnet_step.py --sizes 256 --layers 4 --rounds 15
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch


def _time_size(ours, theirs, net, ref_net, size: int, rounds: int, block: int) -> tuple[dict, float]:
    """Alternating-block timings of the four calls at ``size`` px, after checking ours and diffusers agree."""
    from sd35.bench.random_models import call_diffusers, compare, step_inputs
    from sd35.bench.timing import time_paired

    inp = step_inputs(ours.config, size, torch.device("cpu"), torch.float32, seed=3)
    hint = torch.randn(
        1, ours.config.in_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(4)
    )
    zeros = torch.zeros_like(inp.y)

    def ours_none():
        return ours(*inp.args)

    def ours_cn():
        return ours(*inp.args, control=[net(*inp.args, hint)])

    def theirs_none():
        return call_diffusers(theirs, inp)

    def theirs_cn():
        blocks = ref_net(hidden_states=inp.x, controlnet_cond=hint.expand(2, -1, -1, -1), timestep=inp.t,
                         encoder_hidden_states=inp.context, pooled_projections=zeros, return_dict=False)[0]  # fmt: skip
        return theirs(hidden_states=inp.x, encoder_hidden_states=inp.context, pooled_projections=inp.y,
                      timestep=inp.t, block_controlnet_hidden_states=blocks, return_dict=False)[0]  # fmt: skip

    with torch.inference_mode():
        agree = compare(ours_cn(), theirs_cn())
        changed = compare(ours_cn(), ours_none())
        assert agree["rel_l2_diff"] < 1e-5, agree
        assert changed["rel_l2_diff"] > 1e-3, changed  # the ControlNet acts
        calls = {
            "ours none": ours_none,
            "ours cn": ours_cn,
            "theirs none": theirs_none,
            "theirs cn": theirs_cn,
        }
        return time_paired(calls, rounds, block), agree["rel_l2_diff"]


def main(argv: list[str] | None = None) -> int:
    from diffusers import SD3ControlNetModel

    from sd35.bench.random_models import diffusers_transformer
    from sd35.control.files import load_controlnet
    from sd35.loading.writers import diffusers_transformer_config
    from sd35.models.configs import scaled_mmditx_config
    from sd35.models.mmditx import MMDiTX
    from sd35.models.random_init import randomize_

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides in pixels")
    p.add_argument("--layers", type=int, default=2, help="ControlNet blocks")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = scaled_mmditx_config()
    ours = randomize_(MMDiTX(cfg), seed=0).eval().requires_grad_(False)
    theirs = diffusers_transformer(ours)
    transformer = {k: v for k, v in diffusers_transformer_config(cfg).items() if not k.startswith("_")}
    ref_net = SD3ControlNetModel(**{**transformer, "num_layers": args.layers, "dual_attention_layers": (0,)})
    ref_net = randomize_(ref_net, seed=1).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        ref_net.save_pretrained(tmp)
        net = load_controlnet(tmp, cfg).requires_grad_(False)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; scaled MMDiT-X hidden {cfg.hidden_size} "
          f"depth {cfg.depth}, ControlNet {args.layers} blocks; fp32, batch 2 (one CFG step)")  # fmt: skip
    print("| size | impl | no ControlNet | one ControlNet | cost of the ControlNet |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        times, agree = _time_size(ours, theirs, net, ref_net, size, args.rounds, args.block)
        for impl in ("ours", "theirs"):
            none, cn = times[f"{impl} none"]["median_ms"], times[f"{impl} cn"]["median_ms"]
            name = "sd35" if impl == "ours" else "diffusers"
            print(
                f"| {size} px | {name} | {none:.1f} ms | {cn:.1f} ms | +{cn - none:.1f} ms (+{100 * (cn / none - 1):.0f}%) |"
            )
        print(f"<!-- {size} px: outputs with the ControlNet agree to rel L2 {agree:.1e} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
