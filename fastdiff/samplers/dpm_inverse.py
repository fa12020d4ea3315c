"""DPM-Solver++ inversion: the multistep DPM-Solver++ ODE solver run upwards, x_0 -> x_T (Lu et
al. 2022, arXiv:2211.01095; diffusers' ``DPMSolverMultistepInverseScheduler``, used by DiffEdit).

DPM-Solver++'s steps are exact integrals of the diffusion ODE in lambda = log(alpha / sigma) with
the data prediction x0_theta interpolated by a polynomial through the last one, two or three
calls. Nothing in them needs lambda to rise: read from a lower noise level s to a higher one t,
h = lambda_t - lambda_s < 0 and the same update moves x up the ODE. This sampler is
:class:`~fastdiff.samplers.DPMSolverPPSampler` on an ascending grid (its float64 coefficient
rows with h < 0), so ``sample(noise=x_T, sampler="dpm++")`` on the same settings maps the result
back to the image up to both runs' discretisation error.
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.samplers._solver_common import sigma_grid_timesteps
from fastdiff.samplers.dpm_solver import DPMSolverPPSampler
from fastdiff.schedules import NoiseSchedule

__all__ = ["DPMSolverPPInverseSampler"]


class DPMSolverPPInverseSampler(DPMSolverPPSampler):
    """DPM-Solver++ inversion, step for step diffusers' ``DPMSolverMultistepInverseScheduler``.

    The timesteps ascend from t = 0 (the image counts as x at timestep 0's noise level). With
    ``noisiest`` = T - 1, or the last t with lambda_t >= ``lambda_min_clipped``::

        linspace: round(linspace(0, noisiest, N + 1))[:-1]
        leading:  k (noisiest + 1) // (N + 1) + steps_offset,  k = 0 .. N - 1
        trailing: round(arange(noisiest + 1, 0, -T / N))[::-1] - 1   (its last is noisiest)

    and the noise-to-signal ratios sigma/alpha = sqrt((1 - ab) / ab) at those timesteps, then at
    ``noisiest`` (diffusers' float32 values). Step i goes from level i to level i + 1 with
    :class:`~fastdiff.samplers.DPMSolverPPSampler`'s update (orders 1 - 3, ``"midpoint"`` /
    ``"heun"``, the model called at timestep i on x at level i): with h = lambda_{i+1} -
    lambda_i < 0 its coefficients are the forward ones (DPM-Solver++ eqs. 9 - 10 and the 3M
    form), e^{-h} > 1. The first step is first order, the second at most second order; the last
    is first order with ``euler_at_final`` or ``lower_order_final`` and N < 15 (then the one
    before it at most second order). No final sigma = 0 here: the run ends at a noise level.

    ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` step on that grid
    between the training levels at t = 0 and t = T - 1 (ascending; the model at the timestep of
    each level, rounded for Karras, truncated otherwise, as diffusers), whose last level is
    repeated: the last step has h = 0 and leaves x unchanged (so does ``trailing``, whose last
    timestep is already ``noisiest``; diffusers' heun / third-order formulas give NaN there, 0 /
    0, fastdiff the identity its first-order and midpoint forms give).

    A step is one fused ``dpm_solver_2m_step`` call with the float64 row of the forward sampler
    (``[alpha_s, sigma_s, c_x, c_x0, c_prev, c_noise, c_prev2, 0]``), its x0 term in eps form for
    an eps or v model: with x0 = (x - sigma_s eps) / alpha_s, ``c_x x + c_x0 x0 = (c_x + c_x0 /
    alpha_s) x - (c_x0 sigma_s / alpha_s) eps``, row ``[alpha_s, sigma_s, c_x + c_x0 / alpha_s,
    0, c_prev, 0, c_prev2, -c_x0 sigma_s / alpha_s]`` (the op's eps column, coef[7]). Upwards from
    a low noise level c_x = sigma_t / sigma_s and c_x0 ~ -alpha_t sigma_t / (alpha_s sigma_s) are
    both large and cancel (the first step from t = 0: x_1 = 50 x - 49 x0); combined in float64
    they leave the first-order step DDIM's ``(alpha_t / alpha_s) x + (sigma_t - alpha_t sigma_s /
    alpha_s) eps``, with no large terms. The history (x0 of the previous steps) is unchanged;
    an x0 model (``prediction_type="sample"``, thresholding) keeps the x0 form, whose eps would
    be recovered from x - alpha x0 with the same cancellation.

    Not implemented (a ``ValueError`` naming it): ``algorithm_type="sde-dpmsolver++"`` (run
    upwards its noise term sigma_t sqrt(1 - e^{-2h}) is the square root of a negative number:
    diffusers' inverse scheduler returns NaN), the deprecated ``"dpmsolver"`` types, and
    ``use_flow_sigmas`` (diffusers' inverse scheduler builds that grid descending: it samples
    rather than inverts).

    Args:
        schedule, steps, prediction_type, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (``steps_offset`` under ``leading``).
        timestep_spacing: ``"linspace"`` (default), ``"leading"`` or ``"trailing"``.
        solver_order, solver_type, lower_order_final, euler_at_final, thresholding,
            dynamic_thresholding_ratio, sample_max_value, use_karras_sigmas,
            use_exponential_sigmas, use_beta_sigmas: as
            :class:`~fastdiff.samplers.DPMSolverPPSampler` (``solver_type`` ``"logrho"``,
            ``"bh1"``, ``"bh2"`` mean ``"midpoint"``).
        lambda_min_clipped: the spaced timesteps end at the last t with lambda_t >= it
            (``noisiest``; cosine schedules). Unused with a sigma grid.
        algorithm_type: ``"dpmsolver++"`` only (see above).
    """

    name = "dpm++_inverse"
    inverts = True
    _upward = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        solver_order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        lambda_min_clipped: float = -math.inf,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        algorithm_type: str = "dpmsolver++",
    ) -> None:
        if algorithm_type != "dpmsolver++":
            why = (
                "run upwards (h < 0) its noise term sigma_t sqrt(1 - e^{-2h}) is the square "
                "root of a negative number (diffusers' DPMSolverMultistepInverseScheduler "
                "returns NaN)"
                if algorithm_type == "sde-dpmsolver++"
                else "fastdiff's DPM-Solver++ samplers solve in data prediction only"
            )
            raise ValueError(
                f"algorithm_type: the 'dpm++_inverse' sampler takes 'dpmsolver++' only, got "
                f"{algorithm_type!r}: {why}"
            )
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            solver_order=solver_order,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            # no final sigma 0: the last step is first order only as euler_at_final or
            # lower_order_final say (DPMSolverPPSampler._orders)
            final_sigmas_type="sigma_min",
            lambda_min_clipped=lambda_min_clipped,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
        )

    def coefficients(self) -> np.ndarray:
        """The forward sampler's rows (every order's table), the x0 term in eps form for an eps
        or v model (class docstring): the same update without the cancelling terms."""
        rows = super().coefficients()
        if not self.thresholding and self._op_prediction in ("epsilon", "v_prediction"):
            for tab in self._rows64.values():  # rows is _rows64[3]: converted in place
                a, s, c_x0 = tab[:, 0], tab[:, 1], tab[:, 3].copy()
                tab[:, 2] += c_x0 / a
                tab[:, 7] = -c_x0 * s / a
                tab[:, 3] = 0.0
        return rows

    def _noisiest(self) -> int:
        """diffusers' ``noisiest_timestep``: T - 1, or the last t with lambda_t >=
        ``lambda_min_clipped``."""
        return self._last_timestep() - 1

    def _make_timesteps(self) -> np.ndarray:
        if self.sigma_grid is not None:
            return self._grid_timesteps()
        T, n, top = self.schedule.num_train_timesteps, self.steps, self._noisiest()
        if self.timestep_spacing == "linspace":
            return np.linspace(0, top, n + 1).round()[:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = (top + 1) // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[:-1].copy().astype(np.int64)
            return ts + self.steps_offset
        ts = np.arange(top + 1, 0, -T / n).round()[::-1].copy().astype(np.int64) - 1
        if len(ts) != n:  # diffusers' trailing grid keeps its stride T / n from noisiest
            raise ValueError(
                f"lambda_min_clipped: {self.lambda_min_clipped} ends the schedule at t = {top}, "
                f"where timestep_spacing='trailing' has {len(ts)} timesteps for steps={n} "
                f"(diffusers would run {len(ts)} steps); use 'linspace' or 'leading'"
            )
        return ts

    def _grid_timesteps(self) -> np.ndarray:
        """Model timesteps of the ascending sigma grid; sets ``self._grid`` (float64 ``[steps +
        1]``, the grid's float32 values, its last repeated). diffusers' inverse scheduler passes
        the ascending training levels to the forward grid builders, whose ``sigma_min`` /
        ``sigma_max`` then read the top / bottom level: the grid comes out ascending."""
        karras = self.sigma_grid == "karras"  # diffusers rounds its timesteps only
        sig, ts = sigma_grid_timesteps(self.sigma_grid, self._train_sigmas32(), self.steps,
                                       rounded=karras, ascending=True)  # fmt: skip
        self._grid = np.append(sig, sig[-1]).astype(np.float32).astype(np.float64)
        return ts

    def _ratios(self) -> list[float]:
        """diffusers' ``sigmas``: sigma/alpha at each step, then at ``noisiest`` (``[steps +
        1]``, float64; a sigma grid: its own, last level repeated)."""
        ratios = super()._ratios()  # the spaced grid's repeated-timestep check included
        if self.sigma_grid is None:
            ratios[-1] = float(self._train_sigmas32()[self._noisiest()])
        return ratios
