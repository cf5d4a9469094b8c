"""Sampling for SD3.5: the sigma schedule, the ODE samplers and the guided denoiser.

The pieces follow the official reference (Stability-AI/sd3.5 ``sd3_impls.py`` and ``sd3_infer.py``):

- :mod:`sd35.sampling.schedules`: the flow time shift and the reference's sigma schedule (with its
  deliberate double shift of ``sigma_min``), ComfyUI's other schedulers (:func:`get_sigmas`), plus the
  img2img cut;
- :mod:`sd35.sampling.samplers`: ComfyUI's samplers under its names (``euler`` and ``dpmpp_2m`` as the
  reference) as plain functions of ``(model, x, sigmas)``, where ``model(x, sigma) -> denoised`` works in
  x0-space, as in k-diffusion; the stochastic ones are in :mod:`sd35.sampling.stochastic`, their shared
  helpers in :mod:`sd35.sampling.sampler_base`;
- :mod:`sd35.sampling.noise`: where the stochastic samplers' step noise comes from (our seeded stream,
  ComfyUI's seeded draws or its Brownian tree), a parameter of those samplers;
- :mod:`sd35.sampling.inpaint`: masked latent blending for inpainting;
- :mod:`sd35.sampling.guidance`: the MMDiT-X velocity turned into a denoiser, classifier-free guidance
  adaptive projected guidance (APG) and Skip Layer Guidance.
"""

from sd35.sampling.guidance import APG, GuidedDenoiser, SkipLayerGuidance, flow_denoiser
from sd35.sampling.inpaint import MaskedDenoiser
from sd35.sampling.samplers import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    SamplerName,
    get_sampler,
    sample_dpmpp_2m,
    sample_euler,
)
from sd35.sampling.schedules import (
    SCHEDULERS,
    SchedulerName,
    discrete_flow_sigmas,
    flow_sigma,
    get_sigmas,
    img2img_sigmas,
    reference_sigmas,
)

__all__ = [
    "APG",
    "MaskedDenoiser",
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "SCHEDULERS",
    "SamplerName",
    "SchedulerName",
    "GuidedDenoiser",
    "SkipLayerGuidance",
    "discrete_flow_sigmas",
    "flow_denoiser",
    "flow_sigma",
    "get_sampler",
    "get_sigmas",
    "img2img_sigmas",
    "reference_sigmas",
    "sample_dpmpp_2m",
    "sample_euler",
]
