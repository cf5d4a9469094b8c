"""Sampling for SD3.5: the sigma schedule, the ODE samplers and the guided denoiser.

The pieces follow the official reference (``shared/spec/REFERENCE.md`` sections 2 and 3):

- :mod:`sd35.sampling.schedules`: the flow time shift and the reference's sigma schedule (with its
  deliberate double shift of ``sigma_min``), plus the img2img cut;
- :mod:`sd35.sampling.samplers`: ``euler`` and ``dpmpp_2m`` as plain functions of
  ``(model, x, sigmas)``, where ``model(x, sigma) -> denoised`` works in x0-space, as in k-diffusion;
- :mod:`sd35.sampling.guidance`: the MMDiT-X velocity turned into a denoiser, classifier-free guidance
  and Skip Layer Guidance.
"""

from sd35.sampling.guidance import GuidedDenoiser, SkipLayerGuidance, flow_denoiser
from sd35.sampling.samplers import SAMPLERS, get_sampler, sample_dpmpp_2m, sample_euler
from sd35.sampling.schedules import flow_sigma, img2img_sigmas, reference_sigmas

__all__ = [
    "SAMPLERS",
    "GuidedDenoiser",
    "SkipLayerGuidance",
    "flow_denoiser",
    "flow_sigma",
    "get_sampler",
    "img2img_sigmas",
    "reference_sigmas",
    "sample_dpmpp_2m",
    "sample_euler",
]
