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

``--only edits`` writes just the image and latent node fixtures (``edits.json``: ``KSampler.set_steps``'s
sigmas at denoise < 1; ``edits.safetensors``: ``common_ksampler`` over a made latent with denoise < 1, a noise
mask (``KSamplerX0Inpaint``) and KSamplerAdvanced's windows, and what LoadImage, LoadImageMask,
VAEEncodeForInpaint, InpaintModelConditioning, LatentUpscaleBy, ImageScale and ImageScaleBy return; the
images LoadImage reads are written beside them as ``load_*.png``).
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


# ------------------------------------------------------------------------- image and latent node fixtures

EDIT_SHAPE = (1, 16, 4, 4)
EDIT_DENOISE = (0.3, 0.6, 0.75, 1.0)
EDIT_SAMPLERS = ("euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde")


def denoise_sigmas(c, model) -> dict:
    """``KSampler.set_steps``'s sigmas for denoise below 1, as ``scheduler/sampler/steps/denoise``."""
    out = {}
    for scheduler in ("normal", "simple", "sgm_uniform", "karras", "beta"):
        for sampler in ("euler", "uni_pc"):
            for steps in (4, 10):
                for denoise in EDIT_DENOISE:
                    ks = c.comfy.samplers.KSampler(
                        model, steps, "cpu", sampler=sampler, scheduler=scheduler, denoise=denoise
                    )
                    out[f"{scheduler}/{sampler}/{steps}/{denoise:g}"] = ks.sigmas.tolist()
    return out


def edit_runs(c, model) -> dict[str, torch.Tensor]:
    """``common_ksampler`` over a made latent: denoise 0.6 and 1 with and without a soft pixel-size noise
    mask; KSamplerAdvanced in two stages (leftover noise, then no added noise) and one cut window."""
    g = torch.Generator().manual_seed(SEED + 7)
    latent = torch.randn(EDIT_SHAPE, generator=g) * 0.8
    ramp = torch.clamp((torch.arange(32, dtype=torch.float32) - 10) / 12, 0, 1)
    mask = ramp[None, None, :].expand(1, 32, 32).contiguous()
    positive, negative = conditioning()
    out = {"edit.latent": latent, "edit.mask": mask}
    for sampler in EDIT_SAMPLERS:
        for denoise in (0.6, 1.0):
            for masked in (False, True):
                given = {"samples": latent.clone()} | ({"noise_mask": mask.clone()} if masked else {})
                (made,) = c.nodes.common_ksampler(
                    model, SEED, 6, 4.5, sampler, "normal", positive, negative, given, denoise=denoise
                )
                out[f"denoise/{sampler}/{denoise:g}/{'mask' if masked else 'plain'}"] = made["samples"]
    for sampler in ("euler", "euler_ancestral"):

        def run(latent, sampler=sampler, **kw):
            return c.nodes.common_ksampler(
                model, SEED, 8, 4.5, sampler, "normal", positive, negative, latent, **kw
            )[0]

        one = run({"samples": latent.clone()}, start_step=0, last_step=3, force_full_denoise=False)
        two = run(dict(one), disable_noise=True, start_step=3, last_step=10000, force_full_denoise=True)
        cut = run({"samples": latent.clone()}, start_step=2, last_step=5, force_full_denoise=True)
        out[f"advanced/{sampler}/stage1"] = one["samples"]
        out[f"advanced/{sampler}/stage2"] = two["samples"]
        out[f"advanced/{sampler}/window"] = cut["samples"]
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def write_load_images(folder: Path) -> None:
    """The images LoadImage reads in the fixtures: RGBA, RGB (no alpha) and a palette with transparency."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "load_rgba.png")
    Image.fromarray(rgba[..., :3], "RGB").save(folder / "load_rgb.png")
    palette = Image.fromarray(rgba[..., 0] // 64, "L").convert("P")
    palette.save(folder / "load_palette.png", transparency=1)


def node_outputs(c, folder: Path) -> dict[str, torch.Tensor]:
    """What ComfyUI's image and latent nodes return on seeded inputs (a VAE stand-in whose ``encode``
    records the pixels it is given, cropped by ComfyUI's own ``vae_encode_crop_pixels``)."""
    import folder_paths

    g = torch.Generator().manual_seed(SEED + 8)
    image = torch.rand((1, 36, 44, 3), generator=g)
    mask = torch.rand((1, 18, 22), generator=g)
    latent = torch.randn((1, 16, 5, 6), generator=g)
    seen: list[torch.Tensor] = []

    class RecordingVAE:
        downscale_ratio = 8
        crop_input = True

        def spacial_compression_encode(self):
            return 8

        def encode(self, pixels):
            seen.append(c.comfy.sd.VAE.vae_encode_crop_pixels(self, pixels).clone())
            return torch.zeros(1)

    vae = RecordingVAE()
    out = {"nodes.image": image, "nodes.mask": mask, "nodes.latent": latent}
    for grow in (0, 5, 6):
        seen.clear()
        (made,) = c.nodes.VAEEncodeForInpaint().encode(vae, image, mask, grow)
        out[f"inpaint/{grow}/pixels"], out[f"inpaint/{grow}/noise_mask"] = seen[0], made["noise_mask"]
    seen.clear()
    positive, negative = conditioning()
    *_, made = c.nodes.InpaintModelConditioning().encode(positive, negative, image, vae, mask, True)
    out["model_conditioning/pixels"], out["model_conditioning/noise_mask"] = seen[1], made["noise_mask"]
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "bislerp"):
        (made,) = c.nodes.LatentUpscaleBy().upscale({"samples": latent}, method, 1.5)
        out[f"latent_upscale/{method}"] = made["samples"]
    for method, width, height, crop in (
        ("lanczos", 24, 24, "center"),
        ("bicubic", 50, 0, "disabled"),
        ("area", 20, 16, "center"),
        ("nearest-exact", 0, 30, "disabled"),
    ):
        (made,) = c.nodes.ImageScale().upscale(image, method, width, height, crop)
        out[f"image_scale/{method}/{width}/{height}/{crop}"] = made
    (out["image_scale_by/bilinear/1.5"],) = c.nodes.ImageScaleBy().upscale(image, "bilinear", 1.5)
    write_load_images(folder)
    folder_paths.set_input_directory(str(folder))
    for name in ("rgba", "rgb", "palette"):
        out[f"load_image/{name}/image"], out[f"load_image/{name}/mask"] = c.nodes.LoadImage().load_image(
            f"load_{name}.png"
        )
    for channel in ("alpha", "red", "green", "blue"):
        (out[f"load_mask/rgba/{channel}"],) = c.nodes.LoadImageMask().load_image("load_rgba.png", channel)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def write_edits(c, out: Path, meta: dict[str, str]) -> None:
    standin = StandInVelocity.seeded(0)
    model = build_model(c, standin, 3.0)
    sigmas = {"comfyui_version": COMFYUI_VERSION, "denoise_sigmas": denoise_sigmas(c, model)}
    (out / "edits.json").write_text(json.dumps(sigmas) + "\n")
    tensors = edit_runs(c, model) | node_outputs(c, out)
    tensors |= {f"standin.{k}": v.contiguous() for k, v in standin.tensors().items()}
    for name, t in zip(
        ("context", "pooled", "neg_context", "neg_pooled"), standin_conditioning(), strict=True
    ):
        tensors[f"cond.{name}"] = t.contiguous()
    save_file(tensors, out / "edits.safetensors", meta | {"shape": json.dumps(list(EDIT_SHAPE))})
    print(f"wrote {len(tensors)} edit tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, default=Path("../shared/oracles/comfyui"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--samplers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--only", choices=("edits",), default=None, help="write only these fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    c = import_comfy(args.comfyui.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"comfyui_version": COMFYUI_VERSION, "comfyui_commit": COMFYUI_COMMIT, "seed": str(SEED)}
    if args.only == "edits":
        write_edits(c, args.out, meta)
        return

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
