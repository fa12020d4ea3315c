"""DPM-Solver++ (2M) multistep sampler and its SDE variant (Lu et al., 2022, arXiv:2211.01095)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import (
    Sampler,
    _ops,
    advance_generator_state,
    check_thresholding,
    randn_like_with,
    threshold_x0,
)
from fastdiff.samplers.ddim import _combine_cfg, _x0_eps
from fastdiff.samplers.sigmas import (
    SIGMA_GRIDS,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    train_sigmas32,
)
from fastdiff.schedules import NoiseSchedule

__all__ = ["DPMSolverPPSampler"]

_UNSET = object()
FINAL_SIGMAS = ("zero", "sigma_min")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")


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
    folded into the precomputed row ``[alpha_s, sigma_s, c_x, c_x0, c_prev, c_noise, 0, 0]`` so
    that a step is one fused ``dpm_solver_2m_step`` call:
    ``x_t = c_x x_s + c_x0 m_s + c_prev m_{s-1} (+ c_noise z)``.

    ``algorithm_type="sde-dpmsolver++"`` is "DPM++ 2M SDE": SDE-DPM-Solver++(2M) (Lu et al. 2022,
    appendix; the first-order step is their SDE-DPM-Solver++1), with fresh noise z ~ N(0, I) at
    every step (the last included, where its coefficient is 0, so a ``generator`` advances as in
    diffusers)::

        first order:  x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) m_s
                            + sigma_t sqrt(1 - e^{-2h}) z
        2M:           x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D
                            + sigma_t sqrt(1 - e^{-2h}) z,   D as above

    z comes from ``noise``, else ``generator`` (torch.randn), else in-kernel Philox
    (``generator_state``, advanced by ``x.numel()`` per step).

    With ``use_karras_sigmas`` ("DPM++ 2M Karras"), ``use_exponential_sigmas`` or
    ``use_beta_sigmas`` the steps are taken on that grid of noise levels sigma/alpha between the
    schedule's smallest and largest (:func:`karras_sigmas`, ...) instead of at the spaced
    timesteps. The model is called at the timestep whose training noise level matches
    (:func:`sigma_to_t`; rounded for Karras, truncated otherwise, as diffusers), so timesteps may
    repeat (near t = 0; near T - 1 on cosine and zero-SNR schedules); the solver uses the grid's
    sigmas, which do not. Steps are indexed, not looked up by timestep: diffusers' scheduler,
    given a repeated first timestep without ``set_begin_index(0)``, starts at a later step (and
    runs out of sigmas at the end).
    With ``final_sigmas_type="sigma_min"`` the grid already ends at sigma_min, so the last
    step is the identity (h = 0), as in diffusers.

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
        algorithm_type: ``"dpmsolver++"`` (the ODE solver) or ``"sde-dpmsolver++"`` (its SDE
            variant, "DPM++ 2M SDE"); diffusers' ``DPMSolverMultistepScheduler`` option.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid
            (at most one; ``timestep_spacing`` and ``steps_offset`` are then unused). The beta
            grid uses Beta(0.6, 0.6) and needs scipy. As diffusers' scheduler, the grid spans
            the float32 training noise levels at t = 0 and t = T - 1.
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
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        algorithm_type: str = "dpmsolver++",
    ) -> None:
        if algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(
                f"algorithm_type: expected one of {list(ALGORITHM_TYPES)}, got {algorithm_type!r}"
            )
        #: "dpmsolver++" (ODE) or "sde-dpmsolver++" (SDE variant: fresh noise every step)
        self.algorithm_type = algorithm_type
        self.sde = algorithm_type == "sde-dpmsolver++"
        grids = [g for g, on in zip(SIGMA_GRIDS, (use_karras_sigmas, use_exponential_sigmas,
                                                  use_beta_sigmas), strict=True) if on]  # fmt: skip
        if len(grids) > 1:
            raise ValueError(
                "use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: at most one may be "
                f"True, got {', '.join(f'use_{g}_sigmas=True' for g in grids)}"
            )
        #: "karras", "exponential", "beta" or None (steps at the spaced timesteps)
        self.sigma_grid: str | None = grids[0] if grids else None
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

    def _train_sigmas32(self) -> np.ndarray:
        """diffusers' float32 training noise levels (see :func:`sigmas.train_sigmas32`)."""
        return train_sigmas32(self.schedule)

    def _grid_timesteps(self) -> np.ndarray:
        """Model timesteps of the sigma grid; sets ``self._grid`` (float64 ``[steps + 1]``: the
        grid's float32 values, as diffusers keeps them, then the final sigma)."""
        train = self._train_sigmas32()  # ascending in t
        lo, hi = train[0].item(), train[-1].item()
        n = self.steps
        if self.sigma_grid == "karras":
            sig = karras_sigmas(lo, hi, n)
        elif self.sigma_grid == "exponential":
            sig = exponential_sigmas(lo, hi, n)
        else:
            sig = beta_sigmas(lo, hi, n)
        ts = sigma_to_t(sig, np.log(train))
        if self.sigma_grid == "karras" and self.schedule.beta_schedule != "cosine":
            ts = ts.round()  # diffusers rounds only here; elsewhere int64 truncates
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self._grid = np.append(sig, last).astype(np.float32).astype(np.float64)
        return ts.astype(np.int64)

    def _make_timesteps(self) -> np.ndarray:
        if self.sigma_grid is not None:
            return self._grid_timesteps()
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

    def _ratios(self) -> list[float]:
        """sigma/alpha at each step, then at the end point (``[steps + 1]``, float64)."""
        if self.sigma_grid is not None:
            return self._grid.tolist()  # repeated timesteps are fine here: the sigmas differ
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
        return ratio

    def coefficients(self) -> np.ndarray:
        ratio = self._ratios()
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
            c_x, c_noise = s_t / s_s, 0.0
            if self.sde:  # SDE-DPM-Solver++: e^{-h} x_s, alpha_t (1 - e^{-2h}), noise term
                one_m_e2h = 1.0 - exp_neg_h * exp_neg_h  # 1 - e^{-2h}
                c_x *= exp_neg_h
                phi = a_t * one_m_e2h
                c_noise = s_t * math.sqrt(one_m_e2h)
            else:
                phi = a_t * (1.0 - exp_neg_h)  # -alpha_t (e^{-h} - 1)
            first = i == 0 or (i == n - 1 and final_first)
            h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1] if i > 0 else 0.0
            if first or h == 0.0:
                # h = 0 (a sigma grid's last sigma_min, then final_sigmas_type="sigma_min"
                # again): phi = 0, x_t = x_s, as diffusers' update (there r = inf, D1 = 0)
                c_x0, c_prev = phi, 0.0
            elif h_prev == 0.0:  # r = 0: diffusers' D1 = (m_s - m_{s-1}) / r is inf / NaN
                raise ValueError(
                    f"steps: steps {i - 1} and {i} of the {self.sigma_grid} sigma grid share the "
                    f"noise level {ratio[i]:.6g}, after which DPM-Solver++'s second-order step "
                    "divides by zero; use fewer steps"
                )
            else:
                r = h_prev / h
                c_x0, c_prev = phi * (1.0 + 0.5 / r), -phi * 0.5 / r
            rows[i] = [a_s, s_s, c_x, c_x0, c_prev, c_noise, 0.0, 0.0]
            first_rows[i] = [a_s, s_s, c_x, phi, 0.0, c_noise, 0.0, 0.0]
        self._first64 = first_rows
        self._first_tables: dict[torch.device, Tensor] = {}
        return rows

    def _draw_noise(
        self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
    ) -> Tensor:
        # as diffusers' SDE step: z is drawn in float32 whatever x's dtype (torch's fp16/bf16
        # randn gives other values and advances a generator differently). The torch backend adds
        # it in fp32; the fused backends read z in x's dtype (one rounding of z under fp16 x)
        return randn_like_with(torch.empty_like(x, dtype=torch.float32), generator)

    def _needs_noise_row(self, i: int) -> bool:
        # the SDE variant: diffusers draws noise on every step, the last included (c_noise = 0
        # there when the final sigma is 0), so a generator advances the same way
        return self.sde

    def config(self) -> dict:
        return {
            **super().config(),
            "algorithm_type": self.algorithm_type,
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            "thresholding": self.thresholding,
            # Python floats a captured CUDA graph bakes into its threshold kernels
            "threshold_ratio": self.dynamic_thresholding_ratio if self.thresholding else None,
            "sample_max_value": self.sample_max_value if self.thresholding else None,
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
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One DPM-Solver++ step from ``timesteps[i]`` to the next noise level (one fused call).

        The history m_{s-1} is kept on the sampler and used only when step ``i - 1`` was the last
        one it ran (for this x shape): a run that starts at ``i > 0`` (img2img, diffusers'
        ``set_begin_index``) or a reused sampler takes a first-order step first; pass ``x0_prev``
        to manage it yourself (``None``: no history, a first-order step; CUDA graphs pass a
        buffer and ``coef`` from a static buffer).
        With ``algorithm_type="sde-dpmsolver++"`` the step adds ``c_noise z``: z is ``noise``,
        else drawn with ``generator`` (one generator, or one per sample), else drawn in the
        kernel with Philox from ``generator_state`` (int64 ``[2]`` = (seed, offset) on x's
        device; its offset is then advanced by ``x.numel()`` in place), else drawn from torch's
        global generator. The ODE solver ignores ``noise``, ``generator`` and
        ``generator_state``. Returns x_t, or ``(x_t, m_s)`` with ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
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
        elif x0_prev is None:  # "no history": first order, not the 2M row without c_prev
            first = self._uses_prev[i]
        if coef is None:
            table = self._first_order_table(x.device) if first else self.coef_table(x.device)
            coef = table[i]
        ops = _ops()
        if self.thresholding:
            m = _combine_cfg(model_output, guidance_scale)
            x0, _ = _x0_eps(x, m, coef[0], coef[1], self.prediction_type)
            x0 = threshold_x0(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            x_next, x0 = ops.dpm_solver_2m_step(
                x,
                x0,
                coef,
                x0_prev,
                prediction_type="sample",
                **nkw,  # type: ignore[arg-type]
            )
        else:
            x_next, x0 = ops.dpm_solver_2m_step(
                x,
                model_output,
                coef,
                x0_prev,  # type: ignore[arg-type]
                prediction_type=self.prediction_type,
                clip_range=self.clip_sample_range if self.clip_sample else None,
                guidance_scale=guidance_scale,
                **nkw,
            )
        advance_generator_state(nkw, x)
        if not external:
            self._x0_prev, self._prev_i = x0, i
        return (x_next, x0) if return_x0 else x_next
