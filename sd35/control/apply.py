"""ControlNets during sampling: the residuals of every active unit for one model call.

The guided denoiser (:class:`sd35.sampling.guidance.GuidedDenoiser`) asks :meth:`Controls.residuals` on each
model call with the call's batch (cond and uncond rows alike, as diffusers'
``StableDiffusion3ControlNetPipeline`` and ComfyUI run the ControlNet on the whole CFG batch) and the step
the call belongs to; the MMDiT-X adds them (:func:`sd35.models.mmditx.control_residual`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sd35.control.unit import ControlUnit
from sd35.models.controlnet import ControlNet


@dataclass(frozen=True)
class ActiveControl:
    """One unit ready to run: its ControlNet and its control latent at the generation's size."""

    net: ControlNet
    unit: ControlUnit
    hint: torch.Tensor  # (1, control_channels, h, w) on the compute device


@dataclass(frozen=True)
class Controls:
    """The units of one sampling pass; ``shift`` is the model's (for ComfyUI-style percent windows)."""

    units: Sequence[ActiveControl]
    shift: float = 3.0

    def residuals(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor, step: int, steps: int
    ) -> list[list[torch.Tensor]]:
        """Per unit in its window with a non-zero strength, its block residuals times the strength.

        A unit outside its window contributes nothing, as diffusers' scale of 0 does (adding exact zeros).
        """
        out = []
        sigma = float(t.reshape(-1)[0]) / 1000.0
        for active in self.units:
            unit = active.unit
            if unit.strength == 0 or not unit.active(step, steps, sigma, self.shift):
                continue
            out.append([r * unit.strength for r in active.net(x, t, y, context, active.hint)])
        return out
