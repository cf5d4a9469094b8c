"""Write the ComfyUI parity fixtures (tests/fixtures/comfyui) by running ComfyUI v0.3.64's own code.

ComfyUI (Comfy-Org/ComfyUI at a125cd84, version 0.3.64, GPL-3.0) is the oracle: this script imports it from
a source tree (``--comfyui``, default ``../shared/oracles/comfyui``), runs its scheduler handlers, noise
samplers and the whole ``nodes.common_ksampler`` path (``ModelSamplingSD3`` shift, ``SkipLayerGuidanceSD3``,
``comfy.sample.prepare_noise`` and ``comfy.sample.sample``) and keeps what they return. No ComfyUI code is
copied into the project and the tests never import it: they read the files this writes.

The transformer is :class:`sd35.testing.standin.StandInVelocity` (its weights are stored in the fixture),
installed as the ``diffusion_model`` of a ComfyUI ``model_base.SD3``; the latent format's in/out scaling is
replaced by the identity so the fixtures hold the sampler's raw latents. Tiny latents (16 x 2 x 2) keep the
files small. Run with the oracle's own dependencies importable (``pip install --target DIR einops av``, then
``PYTHONPATH=$PWD:DIR``)::

    python scripts/comfy_fixtures.py --comfyui ../shared/oracles/comfyui

Outputs: ``sigmas.json`` (every scheduler's sigmas at several step counts and shifts), ``noise.safetensors``
(``default_noise_sampler`` and ``BrownianTreeNoiseSampler`` draws) and ``runs.safetensors`` (whole latents of
every sampler x scheduler x steps x CFG, first steps, SLG runs and batches of two).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sd35.testing.standin import StandInVelocity, standin_conditioning  # noqa: E402

COMFYUI_VERSION = "0.3.64"
COMFYUI_COMMIT = "a125cd84"
SEED = 42
SHAPE = (1, 16, 2, 2)
STEPS = (4, 8, 30)
CFGS = (1.0, 4.5)
SIGMA_STEPS = (1, 2, 3, 4, 5, 8, 9, 30, 31)
SHIFTS = (3.0, 1.0)
SLG_SETTINGS = {"default": ("1, 2", 3.0, 0.01, 0.15), "wide": ("1, 2", 2.5, 0.05, 0.6)}
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "comfyui"


def import_comfy(root: Path):
    """ComfyUI's modules, imported from ``root`` for the CPU (a stand-in for torchvision, which the SD3
    path never runs but the model registry imports)."""
    import transformers  # noqa: F401  (before the stand-in below: it probes for torchvision itself)

    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            stub = types.ModuleType("torchvision")
            stub.transforms = types.ModuleType("torchvision.transforms")
            stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
            stub.transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
            sys.modules["torchvision"] = stub
            sys.modules["torchvision.transforms"] = stub.transforms
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = "/tmp/comfy-base"
    import comfy.k_diffusion.sampling as kds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    import comfy.utils
    import comfyui_version
    import nodes
    from comfy_extras import nodes_model_advanced, nodes_sd3

    if comfyui_version.__version__ != COMFYUI_VERSION:
        raise SystemExit(f"expected ComfyUI {COMFYUI_VERSION}, found {comfyui_version.__version__}")
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return types.SimpleNamespace(
        comfy=comfy, kds=kds, nodes=nodes, advanced=nodes_model_advanced, sd3=nodes_sd3
    )


def build_model(c, standin: StandInVelocity, shift: float):
    """A ComfyUI SD3 ModelPatcher whose diffusion model is the stand-in, at ``shift``."""

    class StandInModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dtype = torch.float32

        def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
            replaced = transformer_options.get("patches_replace", {}).get("dit", {})
            skip = sorted(i for kind, i in replaced if kind == "double_block")
            return standin(x, timesteps, y, context, skip)

    class RawLatent(c.comfy.latent_formats.SD3):
        def process_in(self, latent):
            return latent

        def process_out(self, latent):
            return latent

    config = c.comfy.supported_models.SD3(
        {"in_channels": 16, "pos_embed_scaling_factor": None, "disable_unet_model_creation": True}
    )
    base = c.comfy.model_base.SD3(config, device=torch.device("cpu"))
    base.diffusion_model = StandInModule()
    base.latent_format = RawLatent()
    cpu = torch.device("cpu")
    patcher = c.comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    (patched,) = c.advanced.ModelSamplingSD3().patch(patcher, shift)
    return patched


def sigma_tables(c) -> dict:
    tables = {}
    for shift in SHIFTS:
        (sampling,) = c.advanced.ModelSamplingSD3().patch(
            build_model(c, StandInVelocity.seeded(0), 1.0), shift
        )
        ms = sampling.get_model_object("model_sampling")
        tables[str(shift)] = {
            name: {str(n): c.comfy.samplers.calculate_sigmas(ms, name, n).tolist() for n in SIGMA_STEPS}
            for name in c.comfy.samplers.SCHEDULER_NAMES
        }
        tables[str(shift)]["_percent_to_sigma"] = {
            str(p): float(ms.percent_to_sigma(p)) for p in (0.0, 0.01, 0.05, 0.15, 0.2, 0.6, 1.0)
        }
    return tables


def noise_draws(c) -> dict[str, torch.Tensor]:
    """``default_noise_sampler`` and ``BrownianTreeNoiseSampler`` on a (2, 16, 2, 2) latent, seed SEED."""
    x = torch.zeros(2, *SHAPE[1:])
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.1, 0.0])
    out = {}
    default = c.kds.default_noise_sampler(x, seed=SEED)
    for i in range(3):
        out[f"default/{i}"] = default(sigmas[i], sigmas[i + 1])
    positive = sigmas[sigmas > 0]
    for name, seed in (("one", SEED), ("rows", [SEED, SEED + 1])):
        tree = c.kds.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed, cpu=True)
        for i in range(4):
            out[f"brownian_{name}/{i}"] = tree(sigmas[i], sigmas[i + 1])
    out["brownian_sigmas"] = sigmas
    return out


def conditioning(batch: int = 1):
    context, pooled, neg_context, neg_pooled = standin_conditioning()
    positive = [[context.expand(batch, -1, -1), {"pooled_output": pooled.expand(batch, -1)}]]
    negative = [[neg_context.expand(batch, -1, -1), {"pooled_output": neg_pooled.expand(batch, -1)}]]
    return positive, negative


def ksample(c, model, sampler, scheduler, steps, cfg, batch=1, seed=SEED, firsts=None):
    """ComfyUI's KSampler node (``nodes.common_ksampler``) on an empty latent of ``batch`` rows."""
    positive, negative = conditioning(batch)
    latent = {"samples": torch.zeros(batch, *SHAPE[1:])}
    captured = []
    if firsts is not None:
        import latent_preview

        original = latent_preview.prepare_callback

        def prepare_callback(model, steps, x0_output_dict=None):
            def callback(step, x0, x, total_steps):
                captured.append((step, x.clone(), x0.clone()))

            return callback

        latent_preview.prepare_callback = prepare_callback
        c.nodes.latent_preview.prepare_callback = prepare_callback
    try:
        (out,) = c.nodes.common_ksampler(
            model, seed, steps, cfg, sampler, scheduler, positive, negative, latent
        )
    finally:
        if firsts is not None:
            latent_preview.prepare_callback = original
            c.nodes.latent_preview.prepare_callback = original
    if firsts is not None and len(captured) > 1:
        firsts.append(captured[1])  # ComfyUI's callback sees x before each step: [1] is x after the first
    return out["samples"].to(torch.float32).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, default=Path("../shared/oracles/comfyui"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    c = import_comfy(args.comfyui.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"comfyui_version": COMFYUI_VERSION, "comfyui_commit": COMFYUI_COMMIT, "seed": str(SEED)}

    (args.out / "sigmas.json").write_text(
        json.dumps({"comfyui_version": COMFYUI_VERSION, "shifts": sigma_tables(c)}, indent=None) + "\n"
    )
    save_file({k: v.contiguous() for k, v in noise_draws(c).items()}, args.out / "noise.safetensors", meta)

    standin = StandInVelocity.seeded(0)
    model = build_model(c, standin, 3.0)
    samplers = args.samplers.split(",") if args.samplers else list(c.comfy.samplers.SAMPLER_NAMES)
    tensors = {f"standin.{k}": v.contiguous() for k, v in standin.tensors().items()}
    for name, t in zip(
        ("context", "pooled", "neg_context", "neg_pooled"), standin_conditioning(), strict=True
    ):
        tensors[f"cond.{name}"] = t.contiguous()
    failures = {}
    t0 = time.time()
    for sampler in samplers:
        try:
            for scheduler in c.comfy.samplers.SCHEDULER_NAMES:
                for steps in STEPS:
                    for cfg in CFGS:
                        firsts = [] if steps == 8 else None
                        key = f"{sampler}/{scheduler}/{steps}/{cfg:g}"
                        tensors[f"run/{key}"] = ksample(
                            c, model, sampler, scheduler, steps, cfg, firsts=firsts
                        )
                        if firsts:
                            tensors[f"first/{key}"] = firsts[0][1].contiguous()
            for label, (layers, scale, start, end) in SLG_SETTINGS.items():
                (slg_model,) = c.sd3.SkipLayerGuidanceSD3.execute(model, layers, scale, start, end).result
                for scheduler in ("normal", "karras"):
                    tensors[f"slg_{label}/{sampler}/{scheduler}/8/4.5"] = ksample(
                        c, slg_model, sampler, scheduler, 8, 4.5
                    )
            tensors[f"batch/{sampler}/normal/8/4.5"] = ksample(c, model, sampler, "normal", 8, 4.5, batch=2)
            tensors[f"seed1/{sampler}/normal/8/4.5"] = ksample(
                c, model, sampler, "normal", 8, 4.5, seed=SEED + 1
            )
        except Exception as error:  # a sampler ComfyUI cannot run on this model: recorded, not fatal
            failures[sampler] = f"{type(error).__name__}: {error}"
            for key in [k for k in tensors if k.split("/")[1:2] == [sampler]]:
                del tensors[key]
        print(f"{sampler}: {time.time() - t0:.0f}s {failures.get(sampler, '')}", flush=True)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    meta["failures"] = json.dumps(failures)
    meta["nonfinite"] = json.dumps(bad)
    meta["shape"] = json.dumps(list(SHAPE))
    save_file(tensors, args.out / "runs.safetensors", meta)
    print(f"wrote {len(tensors)} tensors; failures: {failures}; non-finite: {bad}")


if __name__ == "__main__":
    main()
