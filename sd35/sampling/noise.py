"""Where the stochastic samplers' step noise comes from: a parameter of theirs, not a copy of each sampler.

A :data:`NoiseSampler` is ``noise(sigma, sigma_next) -> Tensor``: standard normal noise shaped like the
sampler's ``x`` (float32, on x's device) for the step from ``sigma`` to ``sigma_next``. Three sources:

- :func:`stream_noise` (ours, the default): continue the image's own generator, the one that drew its
  starting noise, one ``randn`` per call (the reference has no stochastic sampler; this is A1111's habit);
- :func:`seeded_noise`: ComfyUI's ``default_noise_sampler(x, seed)`` (``comfy/k_diffusion/sampling.py``),
  a *fresh* generator seeded with the generation's seed, one ``randn`` of ``x``'s shape per call; what
  ComfyUI's ancestral samplers, ``lcm``, ``er_sde`` etc. use;
- :func:`brownian_noise`: ComfyUI's ``BrownianTreeNoiseSampler``, the increment of a Brownian motion over
  the step, ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, from a Brownian tree over
  ``[smallest non-zero sigma, largest sigma]`` seeded with the seed. It is what ComfyUI's ``dpmpp_sde``
  and ``dpmpp_2m/3m_sde`` use. The tree is ``torchsde.BrownianTree`` (Li et al. 2020, "Scalable Gradients
  for Stochastic Differential Equations"), the package ComfyUI and k-diffusion use; its draws depend on
  torchsde's splitting of the seed, so using the same package is what makes the noise the same.

A batch: ComfyUI draws one tensor for the whole batch from one seed; with a sequence of seeds, row i
comes from ``seeds[i]`` alone (for the Brownian tree, ComfyUI's ``BatchedBrownianTree`` with a seed list).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from sd35.errors import SD35Error

NoiseSampler = Callable[[float, float], torch.Tensor]
"""``noise(sigma, sigma_next) -> standard normal noise shaped like x`` (float32, x's device)."""

Generators = torch.Generator | Sequence[torch.Generator] | None
"""A sampler's ``generator``: one generator for the whole batch, one per row of ``x``, or None (see
:func:`stream_noise`)."""


def stream_noise(x: torch.Tensor, generator: Generators) -> NoiseSampler:
    """Noise drawn on from ``generator``: ``torch.randn(x.shape, generator=generator, dtype=float32)`` on
    the generator's device, moved to ``x``'s device, one draw per call (the sigmas are ignored).

    ``generator=None`` seeds a fresh CPU generator from torch's global RNG (so ``torch.manual_seed`` still
    makes runs repeat). A sequence of generators, one per row of ``x``, draws row i from ``generator[i]``
    alone (shaped ``(1, *x.shape[1:])``), so each row gets exactly the noise a batch-of-one run with that
    generator gets; a sequence whose length is not the batch size is an :class:`~sd35.errors.SD35Error`.
    """
    if generator is None:
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
        generator = torch.Generator().manual_seed(seed)
    if isinstance(generator, torch.Generator):
        single = generator

        def draw(sigma: float, sigma_next: float) -> torch.Tensor:
            noise = torch.randn(x.shape, generator=single, dtype=torch.float32, device=single.device)
            return noise.to(x.device)

        return draw
    rows = _row_generators(generator, x.shape[0])
    row_shape = (1, *x.shape[1:])

    def draw_rows(sigma: float, sigma_next: float) -> torch.Tensor:
        noise = [torch.randn(row_shape, generator=g, dtype=torch.float32, device=g.device) for g in rows]
        return torch.cat([n.to(x.device) for n in noise])

    return draw_rows


def _row_generators(generators: Sequence[torch.Generator], batch: int) -> list[torch.Generator]:
    """``generators`` as a list of one ``torch.Generator`` per row of a batch of ``batch``, else an error."""
    if not isinstance(generators, Sequence):
        raise SD35Error(
            f"generator must be a torch.Generator, a sequence of them (one per row) or None, "
            f"got {type(generators).__name__}."
        )
    rows = list(generators)
    if len(rows) != batch:
        raise SD35Error(
            f"{len(rows)} generators were given for a batch of {batch} rows; give exactly one per row."
        )
    bad = [type(g).__name__ for g in rows if not isinstance(g, torch.Generator)]
    if bad:
        raise SD35Error(
            f"every per-row generator must be a torch.Generator, got {', '.join(sorted(set(bad)))}."
        )
    return rows


def _seed_list(x: torch.Tensor, seeds: int | Sequence[int]) -> list[int] | None:
    """None for one seed (the whole batch), else the per-row seeds (as many as rows)."""
    if isinstance(seeds, int):
        return None
    rows = [int(s) for s in seeds]
    if len(rows) != x.shape[0]:
        raise SD35Error(f"{len(rows)} seeds were given for a batch of {x.shape[0]} rows; give one per row.")
    return rows


def seeded_noise(x: torch.Tensor, seeds: int | Sequence[int]) -> NoiseSampler:
    """ComfyUI's ``default_noise_sampler``: a fresh CPU generator seeded with ``seeds``, ``randn(x.shape)``
    per call; with a sequence of seeds, row i from its own generator (see the module docstring)."""
    per_row = _seed_list(x, seeds)
    if per_row is None:
        return stream_noise(x, torch.Generator().manual_seed(seeds))
    return stream_noise(x, [torch.Generator().manual_seed(s) for s in per_row])


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seeds: int | Sequence[int]) -> NoiseSampler:
    """ComfyUI's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True)`` with ``sigma_min``
    the smallest non-zero and ``sigma_max`` the largest of ``sigmas`` (the sampler's own schedule).

    ``noise(s, s') = (W(s') - W(s)) / sqrt(|s' - s|)`` in float32, W a Brownian motion on the CPU of
    ``x``'s shape (a row's shape per seed, with a sequence of seeds) with ``W(sigma_min) = 0``. The times
    are float32, as ComfyUI passes its schedule's entries.
    """
    import torchsde  # a runtime dependency; imported here because only these samplers need it

    sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float32)
    t_min, t_max = sigmas[sigmas > 0].min(), sigmas.max()
    per_row = _seed_list(x, seeds)
    shape = x.shape if per_row is None else x.shape[1:]
    w0 = torch.zeros(shape, dtype=torch.float32)
    trees = [torchsde.BrownianTree(t_min, w0, t_max, entropy=s) for s in per_row or [seeds]]

    def draw(sigma: float, sigma_next: float) -> torch.Tensor:
        t0 = torch.as_tensor(sigma, dtype=torch.float32)
        t1 = torch.as_tensor(sigma_next, dtype=torch.float32)
        lo, hi, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        with warnings.catch_warnings():
            # torchsde compares a float32 query at the tree's end with the end it printed to 6 digits
            # ("Should have ta>=t0 but got ta=0.0089285718 and t0=0.008929"): the same time, no problem
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in trees]) * sign
        w = w[0] if per_row is None else w
        return (w / (t1 - t0).abs().sqrt()).to(x.device)

    return draw


class BatchRows:
    """Row views of one batch-shaped noise sampler, for images that sample one at a time.

    ComfyUI samples a batch at once and draws its noise for the whole batch (``randn`` of the batch's
    shape from one seed). An image sampled alone gets row ``i`` of what that batch draw would be: the
    ``k``-th call of row ``i``'s view returns row ``i`` of the ``k``-th batch draw, made on the first view
    to ask for it (every row runs the same schedule, so the calls line up).
    """

    def __init__(self, make: Callable[[], NoiseSampler]):
        self._make = make
        self._sampler: NoiseSampler | None = None
        self._draws: list[torch.Tensor] = []

    def row(self, index: int) -> NoiseSampler:
        calls = 0

        def draw(sigma: float, sigma_next: float) -> torch.Tensor:
            nonlocal calls
            if self._sampler is None:
                self._sampler = self._make()
            if calls == len(self._draws):
                self._draws.append(self._sampler(sigma, sigma_next))
            calls += 1
            return self._draws[calls - 1][index : index + 1]

        return draw


def stack_rows(samplers: Sequence[NoiseSampler]) -> NoiseSampler:
    """One noise sampler for a batch whose row i is drawn by ``samplers[i]``."""

    def draw(sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.cat([s(sigma, sigma_next) for s in samplers])

    return draw
