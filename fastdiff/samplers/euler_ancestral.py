"""Ancestral Euler sampler, "Euler a" (Karras et al., 2022, arXiv:2206.00364; k-diffusion)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.euler import EulerSampler

__all__ = ["EulerAncestralSampler", "ancestral_step"]


def ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one ancestral step from ``sigma`` to ``sigma_next``.

    k-diffusion's ``get_ancestral_step`` (eta = 1): the DDPM posterior q(x_{sigma_next} | x_sigma,
    x0) in VE form has standard deviation::

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)            (= sigma_next^2 / sigma)

    so a deterministic Euler step down to sigma_down plus fresh noise of std sigma_up lands at
    total noise level sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2).
    """
    if sigma_next == 0.0:
        return 0.0, 0.0
    up = math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral ("Euler a"): an Euler step of the probability-flow ODE (Karras et al.
    2022, Alg. 1) down to sigma_down, then fresh noise up to sigma_{i+1} (the ancestral DDPM
    posterior; k-diffusion's ``sample_euler_ancestral``, :func:`ancestral_step`). In sigma space::

        d             = (x_sigma - x0) / sigma_i                          (= eps)
        x_sigma_next  = x_sigma + (sigma_down - sigma_i) d + sigma_up z,   z ~ N(0, I)

    fastdiff keeps the VP sample x = a x_sigma (a = 1 / sqrt(1 + sigma^2), see
    :class:`~fastdiff.samplers.euler.EulerSampler`), where the step is linear in x, eps and z::

        x_next = (a_{i+1} / a_i) x + a_{i+1} (sigma_down - sigma_i) eps + a_{i+1} sigma_up z

    so it is one fused ``sampler_step`` call with the row ``[a_i, s_i, 0, a_{i+1} (sigma_down -
    sigma_i), a_{i+1} / a_i, a_{i+1} sigma_up, 0, 0]`` (eps from an eps / v / x0 prediction as in
    Euler). The last step goes to sigma = 0 (sigma_up = 0) and returns the x0 prediction. As
    diffusers' ``EulerAncestralDiscreteScheduler``, noise is drawn at every step, the last one
    included (so a ``generator`` advances the same way): from ``noise``, else ``generator``
    (torch.randn), else the in-kernel Philox generator (``generator_state``).

    Timesteps and sigmas are Euler's (diffusers' default ``linspace`` spacing gives fractional
    timesteps, rounded to int64 unless ``fractional_timesteps``). The Karras / exponential /
    beta sigma grids (``use_karras_sigmas``: "Euler a Karras", as k-diffusion's sampler on its
    ``get_sigmas_karras``) are a fastdiff extension here: diffusers' ancestral scheduler has no
    such setting; the grid is built as for :class:`~fastdiff.samplers.euler.EulerSampler`.
    ``prediction_type="sample"`` works too (diffusers raises NotImplementedError for it).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset, use_karras_sigmas,
        use_exponential_sigmas, use_beta_sigmas, sigma_min, sigma_max: see
            :class:`~fastdiff.samplers.euler.EulerSampler` (default spacing ``"linspace"``).
    """

    name = "euler_a"

    def coefficients(self) -> np.ndarray:
        sig = self.sigmas()
        a = [1.0 / math.sqrt(1.0 + s * s) for s in sig]  # a = sqrt(ab) = 1 / sqrt(1 + sigma^2)
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            down, up = ancestral_step(sig[i], sig[i + 1])
            c_eps = a[i + 1] * (down - sig[i])  # a_{i+1} (sigma_down - sigma_i)
            rows[i] = [a[i], sig[i] * a[i], 0.0, c_eps, a[i + 1] / a[i], a[i + 1] * up, 0.0, 0.0]
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        # diffusers draws noise on every step, also the last (sigma_up = 0 there)
        return True

    def config(self) -> dict:
        return {**super().config(), "noise": True}

    def step(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        coef: Tensor | None = None,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One Euler-ancestral step x_i -> x_{i+1} (VP space) at step index ``i`` (one fused op).

        ``model_output`` is the raw model output (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``, combined in the op). ``noise`` is z (drawn with ``generator``, a
        generator or one per sample, when not given). ``generator_state`` (int64 ``[2]`` =
        (seed, offset) on x's device) draws z in the kernel with Philox when no ``noise`` is
        given; its offset is then advanced by ``x.numel()`` in place. ``coef`` overrides the
        table row (CUDA graphs pass a static buffer). Returns x_{i+1}, or ``(x_{i+1}, x0)``
        with ``return_x0``.
        """
        return self._one_op_step(model_output, i, x, noise, guidance_scale, generator, coef,
                                 generator_state, return_x0)  # fmt: skip
