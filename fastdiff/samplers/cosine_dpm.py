"""Stochastic DPM-Solver++ on Stable Audio's EDM-preconditioned noise levels: diffusers'
``CosineDPMSolverMultistepScheduler`` (Stable Audio Open, Evans et al. 2024, arXiv:2407.14358),
step for step.

The model is EDM-preconditioned (Karras et al. 2022, arXiv:2206.00364, Table 1; section 18 of
docs/math.md) with Stable Audio's choices: sigma_data = 1, v-prediction (c_out = -sigma
sigma_d / sqrt(sigma^2 + sigma_d^2)) and the timestep

    c_noise(sigma) = atan(sigma) 2 / pi

(the "cosine" of the name: with sigma = tan(pi t / 2), t in [0, 1) is the time of a cosine
schedule alpha = cos(pi t / 2), sigma_vp = sin(pi t / 2); Nichol & Dhariwal 2021,
arXiv:2102.09672). The noise levels are evenly spaced in log sigma from ``sigma_max`` = 500
down to ``sigma_min`` = 0.3 (``sigma_schedule="exponential"``; or Karras' rho grid), then 0.

The solver is always the SDE variant of DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095; the
``sde-dpmsolver++`` of diffusers' ``DPMSolverMultistepScheduler``) in x = x0 + sigma eps
(alpha = 1, lambda = -log sigma, h = lambda_t - lambda_s), orders 1 and 2::

    x_t = (sigma_t / sigma_s) e^{-h} x_s + (1 - e^{-2h}) D_0
          [+ (1/2) (1 - e^{-2h}) (D_0 - D_1) / r_0]       (midpoint; heun: ((1 - e^{-2h}) /
          + sigma_t sqrt(1 - e^{-2h}) z                     (-2h) + 1) (D_0 - D_1) / r_0)

with r_0 = h_0 / h. This is :class:`~fastdiff.samplers.EDMDPMSolverSampler` with
``algorithm_type="sde-dpmsolver++"`` (the same update, order rules and u-unit fused step), only
the model's timestep and the defaults differ.

The noise z: diffusers draws it from a Brownian tree (torchsde's ``BrownianTreeNoiseSampler``
over sigma, seeded from the generator): z_i = (W(sigma_{i+1}) - W(sigma_i)) / sqrt(|sigma_{i+1}
- sigma_i|), which for the disjoint intervals of one run are independent N(0, I) draws. fastdiff
draws the same distribution as fresh N(0, I) per step (``noise=``, ``generator=`` or in-kernel
Philox): the same generator does not give diffusers' values (fastdiff does not depend on
torchsde); given the same z per step, the runs agree step for step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.samplers.edm import EDMDPMSolverSampler

__all__ = ["CosineDPMSolverSampler"]


class CosineDPMSolverSampler(EDMDPMSolverSampler):
    """SDE-DPM-Solver++ (orders 1-2) on Stable Audio's EDM noise levels: diffusers'
    ``CosineDPMSolverMultistepScheduler`` (see the module docstring).

    The state is kept in model-input units u = c_in(sigma) X as in
    :class:`~fastdiff.samplers.EDMDPMSolverSampler` (X is diffusers' sample; x_T is
    ``init_noise_scale`` z, diffusers' sqrt(sigma_max^2 + 1) z as the model's input); each step
    is one fused ``dpm_solver_2m_step`` with the noise term. The model gets ``timesteps[i]`` =
    atan(sigma_i) 2 / pi (float32, as diffusers' ``precondition_noise``).

    Args:
        schedule: must be None (no VP noise schedule).
        steps: number of steps (model calls).
        sigma_min, sigma_max, sigma_data, sigma_schedule ("exponential" / "karras"),
            num_train_timesteps (unused, as in diffusers' step), solver_order (1 or 2),
            prediction_type ("v_prediction" / "epsilon"), rho, solver_type ("midpoint" /
            "heun"; "logrho", "bh1", "bh2" mean "midpoint", as in diffusers),
            lower_order_final, euler_at_final, final_sigmas_type ("zero" / "sigma_min"): as
            diffusers' ``CosineDPMSolverMultistepScheduler`` (defaults: Stable Audio Open's).
    """

    name = "cosine_dpm++"

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        sigma_min: float = 0.3,
        sigma_max: float = 500.0,
        sigma_data: float = 1.0,
        sigma_schedule: str = "exponential",
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "v_prediction",
        rho: float = 7.0,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        if isinstance(solver_order, bool) or solver_order not in (1, 2):
            raise ValueError(
                "solver_order: expected 1 or 2 (diffusers' CosineDPMSolverMultistepScheduler "
                f"has no third-order step), got {solver_order!r}"
            )
        if schedule is not None:
            raise TypeError(
                "schedule: the cosine_dpm++ sampler takes no VP noise schedule (expected None, "
                f"got {type(schedule).__name__}); pass its settings (sigma_min, ...) as options"
            )
        super().__init__(
            None,
            steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            sigma_schedule=sigma_schedule,
            num_train_timesteps=num_train_timesteps,
            prediction_type=prediction_type,
            rho=rho,
            solver_order=solver_order,
            algorithm_type="sde-dpmsolver++",
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            final_sigmas_type=final_sigmas_type,
        )
        # the model's timestep: diffusers' precondition_noise, atan(sigma) / pi * 2 (float32)
        sig32 = torch.from_numpy(self.sigmas[:-1].astype(np.float32))
        self.timesteps = sig32.atan() / math.pi * 2

    def c_noise(self, sigma: float) -> float:
        """The model's timestep of noise level ``sigma``: atan(sigma) 2 / pi (float64)."""
        return math.atan(sigma) * 2.0 / math.pi

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, sigma_schedule={self.sigma_schedule!r}, "
            f"prediction_type={self.model_prediction_type!r}, solver_order={self.solver_order}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
        )
