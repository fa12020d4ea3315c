"""DPM-Solver++ (2M) multistep sampler (Lu et al., 2022, arXiv:2211.01095)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, _ops, check_thresholding, threshold_x0
from fastdiff.samplers.ddim import _combine_cfg, _x0_eps
from fastdiff.schedules import NoiseSchedule

__all__ = ["DPMSolverPPSampler"]

_UNSET = object()
FINAL_SIGMAS = ("zero", "sigma_min")


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++(2M): second-order multistep solver of the diffusion ODE in data prediction.

    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i, the data predictions
    m_i = x0_theta(x_{t_i}, t_i), one step from s = t_{i-1} to t = t_i is (Algorithm 2)::

        first order (DPM-Solver++1 = DDIM):  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m_s
        2M:  D = (1 + 1/(2 r)) m_s - 1/(2 r) m_{s-1}
             x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D

    (diffusers' "midpoint" form). The first step is first order; so is the last one when the
    final sigma is zero, or when ``lower_order_final`` and fewer than 15 steps. All of this is
    folded into the precomputed row ``[alpha_s, sigma_s, c_x, c_x0, c_prev, 0, 0, 0]`` so that a
    step is one fused ``dpm_solver_2m_step`` call: ``x_t = c_x x_s + c_x0 m_s + c_prev m_{s-1}``.

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler`. Default spacing ``"linspace"``; as in
            diffusers' ``DPMSolverMultistepScheduler`` the ``linspace``/``leading`` grids are
            built over ``steps + 1`` points with the last (t = 0) dropped.
        lower_order_final: first-order last step when ``steps < 15`` (stabilises few-step runs).
        final_sigmas_type: ``"zero"`` (end at sigma = 0, i.e. return the x0 prediction) or
            ``"sigma_min"`` (end at the noise level of t = 0).
        clip_sample, clip_sample_range: clip the data prediction (off by default, as diffusers).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the
            data prediction (Imagen; DPM-Solver++ section 3.3).
    """

    name = "dpm++"
    default_spacing = "linspace"
    is_multistep = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        lower_order_final: bool = True,
        final_sigmas_type: str = "zero",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ) -> None:
        if final_sigmas_type not in FINAL_SIGMAS:
            raise ValueError(
                f"final_sigmas_type: expected one of {list(FINAL_SIGMAS)}, "
                f"got {final_sigmas_type!r}"
            )
        if clip_sample and not float(clip_sample_range) > 0:
            raise ValueError(f"clip_sample_range: expected > 0, got {clip_sample_range}")
        if thresholding:
            check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        self.lower_order_final = bool(lower_order_final)
        self.final_sigmas_type = final_sigmas_type
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        self._x0_prev: Tensor | None = None
        self._prev_i = -1  # the step whose x0 is in _x0_prev
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        self._uses_prev = [bool(self._coef64[i, 4] != 0.0) for i in range(self.steps)]

    def _make_timesteps(self) -> np.ndarray:
        T, n = self.schedule.num_train_timesteps, self.steps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = T // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + self.steps_offset
        return np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1

    def _alphas_cumprod(self) -> torch.Tensor:
        ab = self.schedule.alphas_cumprod.clone()
        if self.schedule.rescale_betas_zero_snr:
            ab[-1] = 2.0**-24  # as diffusers: keep lambda finite at zero terminal SNR
        # user betas reaching 1 (a zero-SNR schedule given as betas) divided by zero here
        ab[ab == 0] = 2.0**-24
        return ab

    def coefficients(self) -> np.ndarray:
        ts = [int(t) for t in self._ts]
        if len(set(ts)) < len(ts):  # e^{-h} = 1 between equal steps: h = 0 divides
            raise ValueError(
                f"steps: {self.steps} steps with timestep_spacing={self.timestep_spacing!r} over "
                f"{self.schedule.num_train_timesteps} training timesteps repeat timesteps "
                f"({ts[:3]} ... {ts[-3:]}), which DPM-Solver++ cannot step between; use fewer "
                "steps or timestep_spacing='trailing'"
            )
        ab = self._alphas_cumprod()
        # DPM-Solver's sigma (noise-to-signal ratio) sigma/alpha = sqrt((1 - ab)/ab) per step,
        # then the end point.
        ratio = [math.sqrt((1.0 - float(ab[t])) / float(ab[t])) for t in self._ts]
        ratio.append(0.0 if self.final_sigmas_type == "zero" else math.sqrt((1 - ab[0]) / ab[0]))
        alpha = [1.0 / math.sqrt(r * r + 1.0) for r in ratio]  # alpha_t
        sigma = [r * a for r, a in zip(ratio, alpha, strict=True)]  # sigma_t
        lam = [-math.log(r) if r > 0 else math.inf for r in ratio]  # lambda_t = log(alpha/sigma)
        n = self.steps
        final_first = self.final_sigmas_type == "zero" or (self.lower_order_final and n < 15)
        rows = np.zeros((n, 8), dtype=np.float64)
        first_rows = np.zeros((n, 8), dtype=np.float64)  # every step first order (no history)
        for i in range(n):
            a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            exp_neg_h = ratio[i + 1] / ratio[i]  # e^{-h}, exact also for the final sigma = 0
            phi = a_t * (1.0 - exp_neg_h)  # -alpha_t (e^{-h} - 1)
            first = i == 0 or (i == n - 1 and final_first)
            if first:
                c_x0, c_prev = phi, 0.0
            else:
                h = lam[i + 1] - lam[i]
                r = (lam[i] - lam[i - 1]) / h
                c_x0, c_prev = phi * (1.0 + 0.5 / r), -phi * 0.5 / r
            rows[i] = [a_s, s_s, s_t / s_s, c_x0, c_prev, 0.0, 0.0, 0.0]
            first_rows[i] = [a_s, s_s, s_t / s_s, phi, 0.0, 0.0, 0.0, 0.0]
        self._first64 = first_rows
        self._first_tables: dict[torch.device, Tensor] = {}
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        return False

    def config(self) -> dict:
        return {
            **super().config(),
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            "thresholding": self.thresholding,
        }

    def reset(self) -> None:
        self._x0_prev = None
        self._prev_i = -1

    def _first_order_table(self, device: torch.device) -> Tensor:
        """``coef_table`` with every step first order (c_prev = 0): for a step whose previous
        step did not run on this sampler (a run starting at i > 0, e.g. img2img)."""
        tab = self._first_tables.get(device)
        if tab is None:
            tab = self._first_tables[device] = torch.from_numpy(self._first64).float().to(device)
        return tab

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
        x0_prev: Tensor | None | object = _UNSET,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One DPM-Solver++ step from ``timesteps[i]`` to the next noise level (one fused call).

        The history m_{s-1} is kept on the sampler and used only when step ``i - 1`` was the last
        one it ran (for this x shape): a run that starts at ``i > 0`` (img2img, diffusers'
        ``set_begin_index``) or a reused sampler takes a first-order step first; pass ``x0_prev``
        to manage it yourself (CUDA graphs pass a buffer and ``coef`` from a static buffer).
        ``noise`` and ``generator`` are accepted for API symmetry and unused (the 2M solver is
        deterministic). Returns x_t, or ``(x_t, m_s)`` with ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        external = x0_prev is not _UNSET
        first = False
        if not external:
            prev = self._x0_prev
            # the history is m_{i-1} only if step i - 1 just ran on this sampler for this x
            # shape; otherwise (a run starting at i > 0, as diffusers' set_begin_index, or a
            # reused sampler) this step is first order, as diffusers' lower_order_nums makes it
            valid = prev is not None and self._prev_i == i - 1 and prev.shape == x.shape
            first = self._uses_prev[i] and not valid
            x0_prev = prev if self._uses_prev[i] and valid else None
        if coef is None:
            table = self._first_order_table(x.device) if first else self.coef_table(x.device)
            coef = table[i]
        ops = _ops()
        if self.thresholding:
            m = _combine_cfg(model_output, guidance_scale)
            x0, _ = _x0_eps(x, m, coef[0], coef[1], self.prediction_type)
            x0 = threshold_x0(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            x_next, x0 = ops.dpm_solver_2m_step(x, x0, coef, x0_prev, prediction_type="sample")
        else:
            x_next, x0 = ops.dpm_solver_2m_step(
                x,
                model_output,
                coef,
                x0_prev,  # type: ignore[arg-type]
                prediction_type=self.prediction_type,
                clip_range=self.clip_sample_range if self.clip_sample else None,
                guidance_scale=guidance_scale,
            )
        if not external:
            self._x0_prev, self._prev_i = x0, i
        return (x_next, x0) if return_x0 else x_next
