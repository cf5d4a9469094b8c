"""Every sampler and scheduler name means what it means in ComfyUI: checked against ComfyUI v0.3.64's output.

The fixtures in ``tests/fixtures/comfyui`` were written by ``scripts/comfy_fixtures.py``, which ran ComfyUI's
own scheduler handlers, noise samplers and KSampler path (``ModelSamplingSD3`` shift 3, CFG, the
``SkipLayerGuidanceSD3`` node, ``prepare_noise`` and ``comfy.sample.sample``) on tiny latents (16 x 2 x 2)
with the stand-in transformer :class:`sd35.testing.standin.StandInVelocity` (its weights are in the file).
Here our schedules, noise samplers, guidance and samplers run the same settings and must give ComfyUI's
latents to 1e-5 relative (the norm of the difference over the norm of ComfyUI's), in float32.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd35.sampling.guidance import GuidedDenoiser, SkipLayerGuidance, percent_to_sigma
from sd35.sampling.noise import BatchRows, brownian_noise, seeded_noise, stack_rows
from sd35.sampling.samplers import SAMPLERS, run_sampler
from sd35.sampling.schedules import SCHEDULERS, get_sigmas
from sd35.sampling.stochastic import comfy_noise_sampler
from sd35.testing.standin import StandInVelocity

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui"
RTOL = 1e-5
SHIFT = 3.0

LOOSER = {
    # ComfyUI integrates lms's coefficients with scipy over float32 sigmas (NumPy 2 keeps the Lagrange
    # products in float32); on linear_quadratic's closely spaced sigmas that rounding reaches ~1e-4
    "lms": 2e-4,
    # ComfyUI runs UniPC through float32 VP conversions (SigmaConvert), whose cancellation at small sigmas
    # costs up to ~5e-4 where a schedule's last sigma is tiny (karras, exponential); the structure (its 0.001 end and the division by 0.999 after it) is matched exactly
    "uni_pc": 6e-4,
    "uni_pc_bh2": 6e-4,
    # ComfyUI sums deis's coefficients in float32 over 10,000 points (we sum the same points in float64)
    "deis": 5e-5,
}
"""Per-sampler tolerances where ComfyUI's float32 arithmetic, not a formula, sets the agreement."""

CALLBACK_SEES_INPUT = frozenset({"ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2"})
"""ComfyUI's callback for these reports the sampler's input x, not the state after the step, so its
"first step" fixture is the starting latent; their whole latents are compared as for the rest."""


@cache
def _runs() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = FIXTURES / "runs.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


def _tensor(key: str) -> torch.Tensor:
    return _runs()[0][key]


def _seed() -> int:
    return int(_runs()[1]["seed"])


def _standin() -> StandInVelocity:
    runs = _runs()[0]
    return StandInVelocity(**{k[len("standin.") :]: v for k, v in runs.items() if k.startswith("standin.")})


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> float:
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))


def _sample(sampler, scheduler, steps, cfg, *, slg=None, batch=1, batch_noise="per_image", first=False):
    """Our run of ComfyUI's KSampler settings: its initial noise (``prepare_noise``: one generator seeded
    with the seed for the whole batch) or per-image seeds, and ComfyUI's step noise."""
    seed = _seed()
    runs = _runs()[0]
    cond = (runs["cond.context"], runs["cond.pooled"])
    uncond = (runs["cond.neg_context"], runs["cond.neg_pooled"])
    sigmas = get_sigmas(scheduler, steps, SHIFT, sampler=sampler)
    denoiser = GuidedDenoiser(_standin(), cond, uncond, cfg, slg, sigmas, shift=SHIFT)
    shape = (1, 16, 2, 2)
    if batch_noise == "batch":
        noise = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(seed))
        x = noise * sigmas[0]
        rows = BatchRows(lambda: comfy_noise_sampler(sampler, x, sigmas, seed))
        noise_sampler = stack_rows([rows.row(i) for i in range(batch)])
    else:
        seeds = [seed + i for i in range(batch)]
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        x = noise * sigmas[0]
        noise_sampler = comfy_noise_sampler(sampler, x, sigmas, seeds if batch > 1 else seed)
    steps_seen = []

    def callback(i, total, x_new, denoised):
        steps_seen.append(x_new.clone())

    out = run_sampler(
        sampler, denoiser, x, sigmas, shift=SHIFT, noise_sampler=noise_sampler, callback=callback
    )
    return (out, steps_seen[0]) if first else out


# ------------------------------------------------------------------------------------------- schedules


@cache
def _sigma_tables() -> dict:
    return json.loads((FIXTURES / "sigmas.json").read_text())


def test_fixtures_name_the_comfyui_version():
    assert _sigma_tables()["comfyui_version"] == "0.3.64"
    assert _runs()[1]["comfyui_version"] == "0.3.64"
    assert json.loads(_runs()[1]["failures"]) == {}


def test_we_have_every_comfyui_scheduler():
    assert set(_sigma_tables()["shifts"]["3.0"]) - {"_percent_to_sigma"} == set(SCHEDULERS)


@pytest.mark.parametrize("shift", ["3.0", "1.0"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedules_equal_comfyui(scheduler, shift):
    table = _sigma_tables()["shifts"][shift][scheduler]
    for steps, theirs in table.items():
        theirs = torch.tensor(theirs, dtype=torch.float32)
        if torch.isnan(theirs).any():
            # ComfyUI's kl_optimal divides 0 by 0 for one step; ours gives [sigma_max, 0]
            assert (scheduler, steps) == ("kl_optimal", "1")
            continue
        ours = get_sigmas(scheduler, int(steps), float(shift))
        assert ours.shape == theirs.shape, (scheduler, steps)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=f"{scheduler} {steps}")


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"])
def test_discard_penultimate_sigma(sampler):
    table = _sigma_tables()["shifts"]["3.0"]["karras"]
    ours = get_sigmas("karras", 8, SHIFT, sampler=sampler)
    theirs = torch.tensor(table["9"])
    torch.testing.assert_close(ours, torch.cat([theirs[:-2], theirs[-1:]]), rtol=1e-6, atol=1e-7)
    assert len(get_sigmas("karras", 8, SHIFT, sampler="euler")) == 9


def test_slg_sigma_window_edges_equal_comfyui():
    for percent, theirs in _sigma_tables()["shifts"]["3.0"]["_percent_to_sigma"].items():
        assert percent_to_sigma(float(percent), SHIFT) == pytest.approx(theirs, rel=1e-12)


# --------------------------------------------------------------------------------------------- noise


def test_seeded_and_brownian_noise_equal_comfyui():
    fx = load_file(FIXTURES / "noise.safetensors")
    seed = int(_runs()[1]["seed"])
    x = torch.zeros(2, 16, 2, 2)
    sigmas = fx["brownian_sigmas"]
    default = seeded_noise(x, seed)
    for i in range(3):
        assert torch.equal(default(float(sigmas[i]), float(sigmas[i + 1])), fx[f"default/{i}"])
    for name, seeds in (("one", seed), ("rows", [seed, seed + 1])):
        tree = brownian_noise(x, sigmas, seeds)
        for i in range(4):
            got = tree(float(sigmas[i]), float(sigmas[i + 1]))
            torch.testing.assert_close(got, fx[f"brownian_{name}/{i}"], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_equals_comfyui_for_every_scheduler_steps_and_cfg(sampler):
    """Every scheduler at 4, 8 and 30 steps, CFG 1 and 4.5; the first step too at 8 steps."""
    bad = {}
    rtol = LOOSER.get(sampler, RTOL)
    for scheduler in SCHEDULERS:
        for steps in (4, 8, 30):
            for cfg in (1.0, 4.5):
                key = f"{sampler}/{scheduler}/{steps}/{cfg:g}"
                if steps == 8 and sampler not in CALLBACK_SEES_INPUT:
                    ours, first = _sample(sampler, scheduler, steps, cfg, first=True)
                    err = _close(first, _tensor(f"first/{key}"))
                    if not err <= rtol:
                        bad[f"first/{key}"] = err
                else:
                    ours = _sample(sampler, scheduler, steps, cfg)
                err = _close(ours, _tensor(f"run/{key}"))
                if not err <= rtol:
                    bad[key] = err
    assert not bad, {k: f"{v:.2e}" for k, v in bad.items()}


SLG = {
    "default": SkipLayerGuidance(layers=(1, 2), scale=3.0, start=0.01, end=0.15, window="sigma"),
    "wide": SkipLayerGuidance(layers=(1, 2), scale=2.5, start=0.05, end=0.6, window="sigma"),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_slg_sigma_window_equals_comfyui_node(sampler):
    bad = {}
    for label, slg in SLG.items():
        for scheduler in ("normal", "karras"):
            key = f"slg_{label}/{sampler}/{scheduler}/8/4.5"
            err = _close(_sample(sampler, scheduler, 8, 4.5, slg=slg), _tensor(key))
            if not err <= LOOSER.get(sampler, RTOL):
                bad[key] = err
    assert not bad, {k: f"{v:.2e}" for k, v in bad.items()}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_batches_of_two_in_both_noise_modes(sampler):
    """ComfyUI's batch (one seed for the whole batch) and per-image seeds (image i = ComfyUI's batch of
    one at seed + i)."""
    rtol = LOOSER.get(sampler, RTOL)
    batch = _sample(sampler, "normal", 8, 4.5, batch=2, batch_noise="batch")
    assert _close(batch, _tensor(f"batch/{sampler}/normal/8/4.5")) <= rtol
    per_image = _sample(sampler, "normal", 8, 4.5, batch=2)
    theirs = torch.cat([_tensor(f"run/{sampler}/normal/8/4.5"), _tensor(f"seed1/{sampler}/normal/8/4.5")])
    assert _close(per_image, theirs) <= rtol


def test_slg_step_window_differs_from_sigma_window():
    """The reference's window (fractions of the steps) is another rule: on karras's 8 steps it picks other
    calls than ComfyUI's sigma window, and gives another latent."""
    steps_slg = SkipLayerGuidance(layers=(1, 2), scale=2.5, start=0.05, end=0.6)
    ours = _sample("euler", "karras", 8, 4.5, slg=steps_slg)
    assert _close(ours, _tensor("slg_wide/euler/karras/8/4.5")) > 1e-3
    sigma_slg = SkipLayerGuidance(layers=(1, 2), scale=2.5, start=0.05, end=0.6, window="sigma")
    assert (
        _close(_sample("euler", "karras", 8, 4.5, slg=sigma_slg), _tensor("slg_wide/euler/karras/8/4.5"))
        <= RTOL
    )
