"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", arXiv:2303.01469,
Algorithm 1) as diffusers' ``CMStochasticIterativeScheduler`` runs it in
``ConsistencyModelPipeline`` (openai/diffusers-cd_* / -ct_* checkpoints).

A consistency model maps a noisy sample X at noise level sigma straight to the data: the
consistency function, with the boundary condition f(x, sigma_min) = x built in (paper, eq. 5 and
Appendix C; eps = sigma_min, sigma_d = ``sigma_data``)::

    f(X, sigma) = c_skip(sigma) X + c_out(sigma) F(c_in(sigma) X, t(sigma))
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)
    c_out  = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_d^2),     t(sigma) = 1000 * 0.25 log(sigma + 1e-44)

Algorithm 1: x = f(sigma_max z_0, sigma_max); then for each further noise level tau_n,
x <- f(x + sqrt(tau_n^2 - sigma_min^2) z_n, tau_n). diffusers writes one step per model call:
``denoised = clip(f(X_i, sigma_i))``, ``X_{i+1} = denoised + s_noise sqrt(sigma_{i+1}^2 -
sigma_min^2) z`` (the last step returns ``denoised``).

The noise levels are Karras et al. 2022's eq. 5 on the training discretisation of N =
``num_train_timesteps`` levels: a step at training index t (``set_timesteps``' leading grid
``arange(steps) * (N // steps)``, or explicit ``timesteps=[22, 0]`` of the LSUN checkpoints)
reads the ramp of the reversed list, sigma_i = karras(ts[steps - 1 - i] / (N - 1)).

As :class:`~fastdiff.samplers.EDMEulerSampler`, the state is kept in model-input units,
u_i = c_in(sigma_i) X_i, so the model's input is the state itself and each step is one fused
``sampler_step`` call (x0 = D from the model output with a = c_in / c_skip and s = -c_out a,
clipped to [-1, 1], then ``c_x0 x0 + c_noise z``) with the float64 row ``[a, s, k, 0, 0, k
s_noise sqrt(sigma_{i+1}^2 - sigma_min^2), 0, 0]``, k = c_in(sigma_{i+1}) (1 on the last step,
which returns diffusers' sample: the clipped denoised data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, custom_steps
from fastdiff.samplers.edm import _EDMBase, _flag, _pos

__all__ = ["ConsistencyModelSampler"]


class ConsistencyModelSampler(_EDMBase, Sampler):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): diffusers'
    ``CMStochasticIterativeScheduler`` step for step (see the module docstring).

    Args:
        schedule: must be None (a consistency model has no VP noise schedule).
        steps: number of steps (model calls; default 1, the pipeline's): the leading grid
            ``arange(steps) * (num_train_timesteps // steps)`` of training indices. May be
            left out with ``timesteps``; given with them, it must be their number.
        sigma_min, sigma_max, sigma_data, s_noise, rho, clip_denoised, num_train_timesteps
            (N, the training discretisation: 40 for the ImageNet-64 checkpoints, 151 / 201 for
            consistency training / LSUN): as diffusers' ``CMStochasticIterativeScheduler``.
        timesteps: explicit descending training indices in [0, N - 1] (e.g. ``[22, 0]``),
            as ``set_timesteps(timesteps=...)``.
    """

    name = "cm"
    #: ConsistencyModelPipeline's default: one step (one model call)
    default_steps = 1

    def __init__(
        self,
        schedule: None = None,
        steps: int | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
        num_train_timesteps: int = 40,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        custom = None
        if timesteps is not None:
            n = num_train_timesteps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"num_train_timesteps: expected an int, got {type(n).__name__}")
            hint = " (diffusers' set_timesteps takes num_inference_steps or timesteps, not both)"
            custom, steps = custom_steps(timesteps, int(n), steps, label="timesteps", hint=hint)
        if steps is None:
            steps = self.default_steps
        self._edm_setup(schedule, steps, sigma_min, sigma_max, sigma_data, "karras",
                        num_train_timesteps, "epsilon", rho, "zero")  # fmt: skip
        T = self.num_train_timesteps
        if T < 2:
            raise ValueError(
                f"num_train_timesteps: expected an int >= 2 (the ramp divides by N - 1), got {T}"
            )
        if self.steps > T:
            raise ValueError(
                f"steps: expected 1 <= steps <= num_train_timesteps = {T}, got {self.steps}"
            )
        zero = isinstance(s_noise, Real) and not isinstance(s_noise, bool) and s_noise == 0
        self.s_noise = 0.0 if zero else _pos("s_noise", s_noise)  # False: a TypeError
        self.clip_denoised = _flag("clip_denoised", clip_denoised)
        if custom is None:
            custom = np.arange(self.steps, dtype=np.int64)[::-1] * (T // self.steps)
        #: the training indices of the steps, descending (diffusers' pre-conversion timesteps)
        self.train_indices = custom.copy()
        ramp = custom[::-1].astype(np.float64) / (T - 1)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sig64 = (hi + ramp * (lo - hi)) ** self.rho
        #: float64 ``[steps + 1]``: diffusers' float32 sigmas, then sigma_min (its final level)
        self.sigmas = np.append(sig64, self.sigma_min).astype(np.float32).astype(np.float64)
        #: the model's timesteps t = 250 log(sigma + 1e-44) (of the float64 sigmas, as
        #: diffusers' ``sigma_to_t``), float32 ``[steps]``
        self.timesteps = torch.from_numpy(250.0 * np.log(sig64 + 1e-44)).to(torch.float32)
        self._ts_dev: dict[torch.device, Tensor] = {}
        self._tables: dict[torch.device, Tensor] = {}
        self._coef64 = self.coefficients()
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        # diffusers draws z on every step of a multistep run (the last one's weight is ~0)
        self._noise_steps = [i < self.steps - 1 for i in range(self.steps)]

    # float64 boundary-condition scalings (Song et al. 2023, Appendix C; eps = sigma_min)
    def c_skip(self, sigma: float) -> float:
        """sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)."""
        return self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)

    def c_out(self, sigma: float) -> float:
        """(sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)."""
        return (sigma - self.sigma_min) * self.sigma_data / math.sqrt(sigma**2 + self.sigma_data**2)

    def noise_std(self, i: int) -> float:
        """The std of step i's fresh noise in diffusers' units: s_noise sqrt(sigma_hat^2 -
        sigma_min^2), sigma_hat = sigma_{i+1} clamped to [sigma_min, sigma_max]; 0 on the last
        step (diffusers': sigma_min's float32 rounding, ~6e-7)."""
        if i == self.steps - 1:
            return 0.0
        s_hat = min(max(float(self.sigmas[i + 1]), self.sigma_min), self.sigma_max)
        return self.s_noise * math.sqrt(max(s_hat**2 - self.sigma_min**2, 0.0))

    @property
    def init_noise_scale(self) -> float:
        """x_T = init_noise_scale z in u-units: c_in(sigma_0) sigma_max (diffusers' start
        ``init_noise_sigma`` z = sigma_max z, as the model's input)."""
        return self.c_in(float(self.sigmas[0])) * self.sigma_max

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` rows of ``sampler_step`` (see the module docstring)."""
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            s = float(self.sigmas[i])
            a, k = self._op_as(s)[0], self._out_scale(i)
            rows[i] = [a, -self.c_out(s) * a, k, 0.0, 0.0, k * self.noise_std(i), 0.0, 0.0]
        return rows

    def config(self) -> dict[str, Any]:
        return {**super().config(), "clip": self.clip_denoised, "noise": any(self._noise_steps)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, timesteps={self.train_indices.tolist()}, "
            f"num_train_timesteps={self.num_train_timesteps}, sigma_data={self.sigma_data}, "
            f"clip_denoised={self.clip_denoised})"
        )

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
        """One consistency step u_i -> u_{i+1} (one fused ``sampler_step`` call; the last step
        returns diffusers' sample, the clipped denoised data). ``model_output`` is F
        (``[2N, ...] = [uncond, cond]`` with ``guidance_scale``); z is ``noise``, else in-kernel
        Philox from ``generator_state``, else a draw from ``generator`` (every step but the
        last). ``coef`` overrides the table row (CUDA graphs). Returns u_{i+1}, or ``(u_{i+1},
        denoised)`` with ``return_x0``."""
        return self._one_op_step(model_output, i, x, noise, guidance_scale, generator, coef,
                                 generator_state, return_x0, prediction_type="epsilon",
                                 clip_range=1.0 if self.clip_denoised else None)  # fmt: skip
