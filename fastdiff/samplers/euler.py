"""Euler sampler of the probability-flow ODE (Karras et al., 2022, arXiv:2206.00364)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, _ops
from fastdiff.schedules import NoiseSchedule

__all__ = ["EulerSampler"]


class EulerSampler(Sampler):
    """Euler method on the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1).

    With the variance-exploding noise level sigma_t = sqrt((1 - ab_t) / ab_t) and the sample
    x_sigma = x0 + sigma eps, the ODE is dx_sigma/dsigma = (x_sigma - D(x_sigma; sigma)) / sigma
    (Karras eq. 3 with s(t) = 1, sigma(t) = t), D the denoiser (the x0 prediction). One Euler
    step from sigma_i to sigma_{i+1} (Algorithm 1, lines 4-5, without the Heun correction)::

        d             = (x_sigma - x0) / sigma_i                         (= eps)
        x_sigma_next  = x_sigma + (sigma_{i+1} - sigma_i) d

    fastdiff keeps the VP sample x = a x0 + s eps (a = sqrt(ab), s = sqrt(1 - ab)), i.e.
    x_sigma = x / a with a = 1 / sqrt(1 + sigma^2) (diffusers' ``scale_model_input``). In VP space
    the step is therefore::

        x_next = (a_{i+1} / a_i) x + a_{i+1} (sigma_{i+1} - sigma_i) eps

    where eps is the model's eps, or derived from its v / x0 prediction exactly as the ODE
    derivative d is (v: eps = a v + s x; x0: eps = (x - a x0) / s). The row passed to the fused
    ``sampler_step`` op is ``[a_i, s_i, 0, a_{i+1} (sigma_{i+1} - sigma_i), a_{i+1} / a_i, 0, 0,
    0]``; the last step goes to sigma = 0 (a = 1), where it returns the x0 prediction.

    As diffusers' ``EulerDiscreteScheduler`` (interpolation_type "linear", final sigma zero),
    sigma_i is interpolated linearly in t between the training sigmas; under ``linspace`` spacing
    (the default) the timesteps are fractional and the model gets them rounded to int64 (the
    sample it sees, x = a x_sigma, is the same as diffusers'). Start from x_T ~ N(0, I) in VP
    space (diffusers' x_sigma = init_noise_sigma-scaled noise is x_T / a_0 for the same draw).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"linspace"``).
    """

    name = "euler"
    default_spacing = "linspace"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
    ) -> None:
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )

    def _frac_timesteps(self) -> np.ndarray:
        """diffusers' (float32) timesteps: fractional under ``linspace``, else integer-valued."""
        T, n = self.schedule.num_train_timesteps, self.steps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return super()._make_timesteps().astype(np.float32)

    def _make_timesteps(self) -> np.ndarray:
        return np.round(self._frac_timesteps()).astype(np.int64)

    def sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: sigma_i at each step, then the final sigma = 0."""
        ab = self.schedule.alphas_cumprod.clone()
        if self.schedule.rescale_betas_zero_snr:
            ab[-1] = 2.0**-24  # as diffusers: keep sigma finite at zero terminal SNR
        # user betas reaching 1 (a zero-SNR schedule given as betas) divided by zero here
        ab[ab == 0] = 2.0**-24
        ab = ab.numpy().astype(np.float64)
        train = np.sqrt((1.0 - ab) / ab)  # sigma at t = 0 .. T-1
        sig = np.interp(self._frac_timesteps().astype(np.float64), np.arange(len(train)), train)
        return np.concatenate([sig, [0.0]])

    def coefficients(self) -> np.ndarray:
        sig = self.sigmas()
        a = [1.0 / math.sqrt(1.0 + s * s) for s in sig]  # a = sqrt(ab) = 1 / sqrt(1 + sigma^2)
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            c_eps = a[i + 1] * (sig[i + 1] - sig[i])  # a_{i+1} (sigma_{i+1} - sigma_i)
            rows[i] = [a[i], sig[i] * a[i], 0.0, c_eps, a[i + 1] / a[i], 0.0, 0.0, 0.0]
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        return False

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
        """One Euler step x_i -> x_{i+1} (VP space) at step index ``i`` (one fused op call).

        ``model_output`` is the raw model output (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``). ``noise``, ``generator`` and ``generator_state`` are accepted for
        API symmetry and unused (the ODE step is deterministic). ``coef`` overrides the table
        row (CUDA graphs pass a static buffer). Returns x_{i+1}, or ``(x_{i+1}, x0)`` with
        ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        return _ops().sampler_step(
            x,
            model_output,
            coef,
            prediction_type=self.prediction_type,
            guidance_scale=guidance_scale,
            return_x0=return_x0,
        )
