"""DPM-Solver++ (first order, 2M, 3M) multistep sampler and its SDE variant (Lu et al., 2022,
arXiv:2211.01095)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._solver_common import (
    FINAL_SIGMAS,
    SOLVER_TYPES,
    check_lambda_min_clipped,
    custom_steps,
    spaced_over_steps_plus_one,
    threshold_config,
    thresholded_x0,
)
from fastdiff.samplers.base import (
    Sampler,
    _ops,
    advance_generator_state,
    cached,
    check_choice,
    check_solver_order,
    randn_like_with,
    set_x0_options,
    vp_of_sigma,
)
from fastdiff.samplers.flow_sigmas import FlowGridMixin, FlowOptions
from fastdiff.samplers.sigmas import (
    clipped_end,
    karras_sigmas,
    make_sigma_grid,
    pick_sigma_grid,
    sigma_to_t,
    train_sigmas32,
)
from fastdiff.schedules import NoiseSchedule

__all__ = ["DPMSolverPPSampler"]

_UNSET = object()
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
#: the op's history operands m_{i-1} .. m_{i-4} (SA-Solver reads all four)
_PREV_NAMES = ("x0_prev", "x0_prev2", "x0_prev3", "x0_prev4")


class DPMSolverPPSampler(FlowGridMixin, Sampler):
    """DPM-Solver++: multistep solver of the diffusion ODE in data prediction (orders 1, 2, 3).

    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t),
    h = lambda_t - lambda_{s0} and r_k = h_k / h (h_0 = lambda_{s0} - lambda_{s1}, h_1 =
    lambda_{s1} - lambda_{s2}), the data predictions m_k = x0_theta(x_{s_k}, s_k) of the current
    (s0) and the two previous steps, one step from s0 to t is (2M: DPM-Solver++, Algorithm 2;
    3M: the third-order multistep update of the authors' implementation, with DPM-Solver's
    (arXiv:2206.00927) third-order terms, as diffusers writes it)::

        1 (DPM-Solver++1 = DDIM):  x_t = (sigma_t/sigma_s0) x_s0 + A D0
        2M:  x_t = (sigma_t/sigma_s0) x_s0 + A D0 + B D1,                D1 = (m0 - m1) / r0
        3M:  x_t = (sigma_t/sigma_s0) x_s0 + A D0 + B D1 + C D2,
             D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1,  D2 = (D1_0 - D1_1) / (r0 + r1),
             D1 = D1_0 + r0 D2

    with D0 = m0, A = -alpha_t (e^{-h} - 1), C = -alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) and
    B = A / 2 for ``solver_type="midpoint"`` (2M only), B = alpha_t ((e^{-h} - 1) / h + 1) for
    ``"heun"`` and for 3M, as diffusers' ``DPMSolverMultistepScheduler`` writes them. The first
    step is first order and the second at most second order (no older m yet); the last step is
    first order when the final sigma is zero, with ``euler_at_final``, or when
    ``lower_order_final`` and fewer than 15 steps, and then the one before it is at most
    second order. All of this is folded into the float64 row
    ``[alpha_s, sigma_s, c_x, c_x0, c_prev, c_noise, c_prev2, 0]`` so that a step is one fused
    ``dpm_solver_2m_step`` call: ``x_t = c_x x_s + c_x0 m0 + c_prev m1 + c_prev2 m2
    (+ c_noise z)``.

    ``algorithm_type="sde-dpmsolver++"`` is "DPM++ 2M SDE" / "DPM++ 3M SDE": SDE-DPM-Solver++
    (Lu et al. 2022, appendix), with fresh noise z ~ N(0, I) at every step (the last included,
    where its coefficient is 0, so a ``generator`` advances as in diffusers)::

        x_t = (sigma_t/sigma_s0) e^{-h} x_s0 + A D0 + B D1 (+ C D2) + sigma_t sqrt(1 - e^{-2h}) z

    with A = alpha_t (1 - e^{-2h}), B = A / 2 (midpoint) or alpha_t ((1 - e^{-2h}) / (-2h) + 1)
    (heun, 3M), C = alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2).

    z comes from ``noise``, else ``generator`` (torch.randn), else in-kernel Philox
    (``generator_state``, advanced by ``x.numel()`` per step).

    With ``use_karras_sigmas`` ("DPM++ 2M Karras"), ``use_exponential_sigmas`` or
    ``use_beta_sigmas`` the steps are taken on that grid of noise levels sigma/alpha between the
    schedule's smallest and largest (:func:`karras_sigmas`, ...) instead of at the spaced
    timesteps; ``use_lu_lambdas`` takes them evenly spaced in lambda (DPM-Solver's uniform
    logSNR steps, arXiv:2206.00927: the exponential grid, with rounded model timesteps). The
    model is called at the timestep whose training noise level matches (:func:`sigma_to_t`;
    rounded for Karras and Lu, truncated otherwise, as diffusers), so timesteps may repeat (near
    t = 0; near T - 1 on cosine and zero-SNR schedules); the solver uses the grid's sigmas, which
    do not. Steps are indexed, not looked up by timestep: diffusers' scheduler, given a repeated
    first timestep without ``set_begin_index(0)``, starts at a later step (and runs out of
    sigmas at the end).
    With ``final_sigmas_type="sigma_min"`` the grid already ends at sigma_min, so the last
    step is the identity (h = 0), as in diffusers' first and midpoint steps (its heun and 3M
    formulas give NaN there: 0/0).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler`. Default spacing ``"linspace"``; as in
            diffusers' ``DPMSolverMultistepScheduler`` the ``linspace``/``leading`` grids are
            built over ``steps + 1`` points with the last (t = 0) dropped.
        timesteps: custom model timesteps, strictly descending (diffusers'
            ``set_timesteps(timesteps=...)``, e.g. Align Your Steps' schedules); ``steps`` is
            then their number (or None). Not with a sigma grid; ``timestep_spacing``,
            ``steps_offset`` and ``lambda_min_clipped`` are then unused.
        solver_order: 1, 2 (default; "DPM++ 2M") or 3 ("DPM++ 3M", diffusers' recommendation
            for unconditional sampling).
        solver_type: ``"midpoint"`` (default) or ``"heun"``: the 2M step's B (above); as in
            diffusers, ``"logrho"``, ``"bh1"`` and ``"bh2"`` mean ``"midpoint"``.
        lower_order_final: first-order last step (and at most second-order last but one) when
            ``steps < 15`` (stabilises few-step runs).
        euler_at_final: first-order last step whatever the step count (for a final sigma_min).
        final_sigmas_type: ``"zero"`` (end at sigma = 0, i.e. return the x0 prediction) or
            ``"sigma_min"`` (end at the noise level of t = 0).
        lambda_min_clipped: the spaced timesteps stop where lambda_t falls below this (as
            diffusers: the largest is the last t with lambda_t >= it; for cosine schedules, whose
            lambda_t plunges near T). Unused with a sigma grid.
        clip_sample, clip_sample_range: clip the data prediction (off by default, as diffusers).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the
            data prediction (Imagen; DPM-Solver++ section 3.3).
        algorithm_type: ``"dpmsolver++"`` (the ODE solver) or ``"sde-dpmsolver++"`` (its SDE
            variant, "DPM++ 2M SDE" / "DPM++ 3M SDE"); diffusers' ``DPMSolverMultistepScheduler``
            option.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid
            (at most one; ``timestep_spacing`` and ``steps_offset`` are then unused). The beta
            grid uses Beta(0.6, 0.6) and needs scipy. As diffusers' scheduler, the grid spans
            the float32 training noise levels at t = 0 and t = T - 1.
        use_lu_lambdas: step on noise levels evenly spaced in lambda over the same span. As in
            diffusers, ``use_karras_sigmas`` wins over it and it over the exponential / beta
            grids.
        use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, mu: diffusers'
            flow-matching grid (SANA; :mod:`~fastdiff.samplers.flow_sigmas`): alpha_t = 1 -
            sigma, sigma_t = sigma; ``mu`` (``set_timesteps(mu=...)``) makes the shift e^mu.
    """

    name = "dpm++"
    default_spacing = "linspace"
    is_multistep = True
    lambda_min_clipped = -math.inf  # no clipping (also for subclasses without the option)
    _custom: np.ndarray | None = None  # no custom timesteps (also for such subclasses)
    #: the noise levels rise along the grid (an inversion, x_0 -> x_T): h < 0 and e^{-h} > 1
    #: are the steps themselves, not float32 rounding at a grid's end to be clamped away
    _upward = False

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        timesteps: Sequence[int] | None = None,
        solver_order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        algorithm_type: str = "dpmsolver++",
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        mu: float | None = None,
    ) -> None:
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        self._flow = FlowOptions(use_flow_sigmas, flow_shift, use_dynamic_shifting,
                                 time_shift_type, mu, dpm=True)  # fmt: skip
        check_solver_order(solver_order)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        self.lambda_min_clipped = check_lambda_min_clipped(lambda_min_clipped)
        #: "dpmsolver++" (ODE) or "sde-dpmsolver++" (SDE variant: fresh noise every step)
        self.algorithm_type = algorithm_type
        self.sde = algorithm_type == "sde-dpmsolver++"
        #: the multistep order (1, 2, 3) and the 2M step's "midpoint" / "heun" form
        self.solver_order = int(solver_order)
        self.solver_type = SOLVER_TYPES[solver_type]
        self.euler_at_final = bool(euler_at_final)
        grid = pick_sigma_grid(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        grids = [grid] if grid else []
        if use_lu_lambdas and not use_karras_sigmas:  # diffusers' precedence
            grids = ["lu"]
        self._custom = None  # user timesteps (set_timesteps(timesteps=...)), int64, descending
        if timesteps is not None and isinstance(schedule, NoiseSchedule):
            if grids:
                raise ValueError(
                    f"timesteps: custom timesteps cannot be combined with "
                    f"use_{grids[0]}_{'lambdas' if grids[0] == 'lu' else 'sigmas'}=True (as in "
                    "diffusers): the grid decides the timesteps"
                )
            self._custom, steps = custom_steps(timesteps, schedule.num_train_timesteps, steps)
        self.use_lu_lambdas = bool(use_lu_lambdas)
        prediction_type = self._check_flow(grids, timesteps, prediction_type)
        #: "karras", "lu", "exponential", "beta" or None (steps at the spaced timesteps)
        self.sigma_grid: str | None = grids[0] if grids else None
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        set_x0_options(self, clip_sample, clip_sample_range, thresholding,
                       dynamic_thresholding_ratio, sample_max_value)  # fmt: skip
        self.lower_order_final = bool(lower_order_final)
        self.final_sigmas_type = final_sigmas_type
        # (m, step index) of the last solver_order - 1 steps run, newest first
        self._hist: list[tuple[Tensor, int]] = []
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        self.prediction_type = "flow_prediction" if self.flow_prediction else self.prediction_type

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
        elif self.sigma_grid == "lu":
            # evenly spaced in lambda = -log(sigma/alpha), between diffusers' float32 logs
            log_lo, log_hi = np.log(train[0]).item(), np.log(train[-1]).item()
            sig = np.exp(log_hi + np.linspace(0.0, 1.0, n) * (log_lo - log_hi))
        else:  # exponential, beta
            sig = make_sigma_grid(self.sigma_grid, lo, hi, n)
        ts = sigma_to_t(sig, np.log(train))
        if self.sigma_grid in ("karras", "lu") and self.schedule.beta_schedule != "cosine":
            ts = ts.round()  # diffusers rounds only here; elsewhere int64 truncates
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self._grid = np.append(sig, last).astype(np.float32).astype(np.float64)
        return ts.astype(np.int64)

    def _make_timesteps(self) -> np.ndarray:
        if self._custom is not None:
            return self._custom.copy()
        if self.use_flow_sigmas:
            return self._flow_timesteps()
        if self.sigma_grid is not None:
            return self._grid_timesteps()
        T, n = self.schedule.num_train_timesteps, self.steps
        last = self._last_timestep()  # T unless lambda_min_clipped cuts the schedule short
        ts = spaced_over_steps_plus_one(T, n, self.timestep_spacing, self.steps_offset, last)
        if len(ts) != n:  # trailing: diffusers keeps its stride T / n from the clipped end
            raise ValueError(
                f"lambda_min_clipped: {self.lambda_min_clipped} ends the schedule at t = "
                f"{last - 1}, where timestep_spacing='trailing' has {len(ts)} timesteps for "
                f"steps={n} (diffusers would run {len(ts)} steps); use 'linspace' or 'leading'"
            )
        return ts

    def _last_timestep(self) -> int:
        """One past the largest timestep the spaced grids use: diffusers' ``last_timestep``,
        T minus the number of training timesteps whose lambda_t < ``lambda_min_clipped``
        (diffusers' float32 lambda_t and searchsorted: see :func:`sigmas.clipped_end`)."""
        return clipped_end(self.schedule, self.lambda_min_clipped)

    def _ratios(self) -> list[float]:
        """diffusers' ``sigmas``: sigma/alpha (flow: sigma) at each step, then at the end point
        (``[steps + 1]``, float64)."""
        if self.sigma_grid is not None or self.use_flow_sigmas:
            return self._grid.tolist()  # repeated timesteps are fine here: the sigmas differ
        ts = [int(t) for t in self._ts]
        if len(set(ts)) < len(ts):  # e^{-h} = 1 between equal steps: h = 0 divides
            last = self._last_timestep()
            cut = (
                f" (lambda_min_clipped={self.lambda_min_clipped} ends the schedule at t = "
                f"{last - 1}; a lower value keeps more of it)"
                if last < self.schedule.num_train_timesteps
                else ""
            )
            raise ValueError(
                f"steps: {self.steps} steps with timestep_spacing={self.timestep_spacing!r} over "
                f"{self.schedule.num_train_timesteps} training timesteps repeat timesteps "
                f"({ts[:3]} ... {ts[-3:]}){cut}, which DPM-Solver++ cannot step between; use "
                "fewer steps or timestep_spacing='trailing'"
            )
        # DPM-Solver's sigma (noise-to-signal ratio) sigma/alpha = sqrt((1 - ab)/ab) per step,
        # then the end point: diffusers' float32 levels (its float32 alpha_bar; 1 - ab_0 ~ 1e-4
        # keeps ~3 digits there), as it steps between them. float64 levels at the steps with
        # the float32 sigma_min as the end made the last step inconsistent (as UniPC's was).
        train = self._train_sigmas32()
        ratio = [float(train[t]) for t in self._ts]
        return [*ratio, 0.0 if self.final_sigmas_type == "zero" else float(train[0])]

    def _orders(self) -> list[int]:
        """The order of each step in a run from step 0, as diffusers' ``step`` picks it from
        ``lower_order_nums``, ``lower_order_final`` and ``lower_order_second``."""
        n = self.steps
        few = self.lower_order_final and n < 15
        final_first = self.final_sigmas_type == "zero" or self.euler_at_final or few
        orders = []
        for i in range(n):
            order = min(self.solver_order, i + 1)  # a step uses the m of up to order - 1 others
            if i == n - 1 and final_first:
                order = 1
            elif i == n - 2 and few:
                order = min(order, 2)
            orders.append(order)
        return orders

    def _weights(self, order: int, h: float, h0: float, h1: float) -> tuple[float, ...]:
        """(w0, w1, w2) with A D0 + B D1 (+ C D2) = w0 m0 + w1 m1 + w2 m2 for one step of
        ``order`` with step sizes h (this one), h0, h1 (the previous two) in lambda; the
        coefficients A, B, C are those of the class docstring. Float64."""
        em1 = math.expm1(-h)  # e^{-h} - 1
        if self.sde:
            e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            A = e2
            B = e2 / (-2.0 * h) + 1.0
            C = (e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5
        else:
            A = -em1
            B = em1 / h + 1.0
            C = -((em1 + h) / h**2 - 0.5)
        if order == 1:
            return (A, 0.0, 0.0)
        r0 = h0 / h
        if order == 2:
            if self.solver_type == "midpoint":
                B = 0.5 * A
            return (A + B / r0, -B / r0, 0.0)
        r1 = h1 / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # (m0 - m1) / r0
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1  # (m1 - m2) / r1
        d2 = (d1_0 - d1_1) / (r0 + r1)
        d1 = d1_0 + r0 * d2
        w = np.array([A, 0.0, 0.0]) + B * d1 + C * d2
        return tuple(float(v) for v in w)

    def coefficients(self) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(self._ratios())
        ratio = [s / a if s > 0 else 0.0 for a, s in zip(alpha, sigma, strict=True)]
        lam = [-math.log(r) if r > 0 else math.inf for r in ratio]  # lambda_t = log(alpha/sigma)
        n = self.steps
        orders = self._orders()
        # rows[k][i]: step i at order min(k, orders[i]): k = 1 / 2 for a step with fewer
        # previous m than its order needs (a run starting at i > 0, as diffusers' lower_order_nums)
        rows = {k: np.zeros((n, 8), dtype=np.float64) for k in (1, 2, 3)}
        need = []  # how many previous m step i's full-history row uses (0, 1, 2)
        for i in range(n):
            a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            # e^{-h}, exact also for the final sigma = 0. At most 1: a grid's last sigma may sit a
            # float32 ulp below sigma_min (cosine + use_lu_lambdas), h < 0 by rounding; h = 0
            # there (as diffusers' float32 lambdas), not a step up (SDE: sqrt of < 0)
            exp_neg_h = min(ratio[i + 1] / ratio[i], math.inf if self._upward else 1.0)
            c_x, c_noise = s_t / s_s, 0.0
            if self.sde:  # SDE-DPM-Solver++: e^{-h} x_s, alpha_t (1 - e^{-2h}), noise term
                one_m_e2h = 1.0 - exp_neg_h * exp_neg_h  # 1 - e^{-2h}
                c_x *= exp_neg_h
                phi = a_t * one_m_e2h
                c_noise = s_t * math.sqrt(one_m_e2h)
            else:
                phi = a_t * (1.0 - exp_neg_h)  # -alpha_t (e^{-h} - 1)
            h = max(lam[i + 1] - lam[i], -math.inf if self._upward else 0.0)
            hs = [lam[i - k] - lam[i - k - 1] if i - k > 0 else 0.0 for k in range(2)]  # h0, h1
            order = orders[i] if h != 0.0 else 1
            # h = 0 (a sigma grid's last sigma_min, then final_sigmas_type="sigma_min" again):
            # phi = 0, x_t = x_s, as diffusers' first-order and midpoint updates
            for k, hk in enumerate(hs[: order - 1]):
                if hk == 0.0:  # r = 0: diffusers' D1 = (m_s - m_{s-1}) / r is inf / NaN
                    raise ValueError(
                        f"steps: steps {i - k - 1} and {i - k} of the {self.sigma_grid} sigma "
                        f"grid share the noise level {ratio[i - k]:.6g}, after which "
                        f"DPM-Solver++'s order-{order} step divides by zero; use fewer steps"
                    )
            need.append(order - 1)
            for k in (1, 2, 3):
                o = min(k, order)
                if o == 1:
                    w = (phi, 0.0, 0.0)  # the first-order row as before (A from e^{-h})
                else:
                    w = tuple(a_t * v for v in self._weights(o, h, *hs))
                a_x0 = 1.0 if self.flow_prediction else a_s  # flow: x0 = x - sigma v
                rows[k][i] = [a_x0, s_s, c_x, w[0], w[1], c_noise, w[2], 0.0]
        self._rows64 = rows
        self._need = need
        #: the order of each step in a run from step 0 (1, 2 or 3)
        self.step_orders = tuple(k + 1 for k in need)
        self._fallback_tables: dict[tuple[int, torch.device], Tensor] = {}
        return rows[3]

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
            "flow_prediction": self.flow_prediction,
            # order 3 reads a second history operand (a CUDA graph's second static buffer)
            "solver_order": self.solver_order,
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            **threshold_config(self),
        }

    def reset(self) -> None:
        self._hist = []

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: (alpha_t, sigma_t) of step i's grid sigma (diffusers' ``add_noise`` via
        ``_sigma_to_alpha_sigma_t``, also on Karras / exponential / beta grids; flow: (1 - s,
        s))."""
        if self.use_flow_sigmas:
            s = float(self._ratios()[i])
            return 1.0 - s, s
        return vp_of_sigma(float(self._ratios()[i]))

    def run_row(self, i: int, start: int, device: torch.device | str) -> Tensor:
        """Call ``i``'s row in a run from ``start``: lower order while fewer than the order
        needs of the run's steps have run (diffusers' ``lower_order_nums``), as ``step``."""
        use = min(self._need[i], i - start)
        if use < self._need[i]:
            return self._lower_order_table(use + 1, torch.device(device))[i]
        return self.coef_table(device)[i]

    def _lower_order_table(self, order: int, device: torch.device) -> Tensor:
        """``coef_table`` with every step at most of ``order`` (1: c_prev = c_prev2 = 0; 2:
        c_prev2 = 0): for a step with fewer previous steps run on this sampler than its order
        needs (a run starting at i > 0, e.g. img2img)."""
        return cached(self._fallback_tables, (order, device),
                      lambda: torch.from_numpy(self._rows64[order]).float().to(device))  # fmt: skip

    def _history(self, i: int, x: Tensor) -> list[Tensor]:
        """The m of steps i - 1, i - 2, ... that just ran on this sampler for this x shape
        (newest first, as many as are consecutive)."""
        out = []
        for k, (m, j) in enumerate(self._hist):
            if j != i - 1 - k or m.shape != x.shape:
                break
            out.append(m)
        return out

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
        x0_prev2: Tensor | None | object = _UNSET,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One DPM-Solver++ step from ``timesteps[i]`` to the next noise level (one fused call).

        The history m_{i-1}, m_{i-2} is kept on the sampler and used only when steps ``i - 1``
        (and ``i - 2``) were the last ones it ran (for this x shape): a run that starts at
        ``i > 0`` (img2img, diffusers' ``set_begin_index``) or a reused sampler takes a
        first-order step first, then a second-order one, as diffusers' ``lower_order_nums``.
        Pass ``x0_prev`` (m_{i-1}) and ``x0_prev2`` (m_{i-2}, order 3) to manage it yourself
        (``None``: not available, a lower-order step; CUDA graphs pass buffers and ``coef`` from
        a static buffer, whose row then decides which operands are read).
        With ``algorithm_type="sde-dpmsolver++"`` the step adds ``c_noise z``: z is ``noise``,
        else drawn with ``generator`` (one generator, or one per sample), else drawn in the
        kernel with Philox from ``generator_state`` (int64 ``[2]`` = (seed, offset) on x's
        device; its offset is then advanced by ``x.numel()`` in place), else drawn from torch's
        global generator. The ODE solver ignores ``noise``, ``generator`` and
        ``generator_state``. Returns x_t, or ``(x_t, m_s)`` with ``return_x0``.
        """
        given = (x0_prev, x0_prev2)
        x_next, x0, _ = self._multistep(model_output, i, x, given, noise, guidance_scale,
                                        generator, coef, generator_state)  # fmt: skip
        return (x_next, x0) if return_x0 else x_next

    def _kept(self) -> int:
        """How many earlier m the sampler keeps (the most a step reads)."""
        return self.solver_order - 1

    def _multistep(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        given: tuple[Tensor | None | object, ...],
        noise: Tensor | None,
        guidance_scale: float | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        coef: Tensor | None,
        generator_state: Tensor | None,
    ) -> tuple[Tensor, Tensor, bool]:
        """:meth:`step`'s fused ``dpm_solver_2m_step`` call (SA-Solver's too): the history m_{i-1},
        m_{i-2}, ... is ``given`` (the caller's ``x0_prev``, ``x0_prev2``, ...; all ``_UNSET``:
        the sampler's own, see :meth:`_history`); without ``coef`` the row is the table's, of a
        lower order while fewer m are at hand than it reads (diffusers' ``lower_order_nums``).
        Returns (x_next, m, whether the caller gave the history)."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        external = any(v is not _UNSET for v in given)
        if external:
            hist = [None if v is _UNSET else v for v in given]
            for k in range(1, len(hist)):
                if hist[k] is not None and hist[k - 1] is None:
                    raise ValueError(
                        f"{_PREV_NAMES[k]}: m_{{i-{k + 1}}} was given without {_PREV_NAMES[k - 1]}"
                        f" (m_{{i-{k}}}); pass the newer ones too, or none for a first-order step"
                    )
            hist = [m for m in hist if m is not None]
        else:
            hist = self._history(i, x)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        if coef is None:
            use = min(self._need[i], len(hist))  # previous m this step reads
            if use < self._need[i]:  # diffusers' lower_order_nums: a lower-order step
                coef = self._lower_order_table(use + 1, x.device)[i]
            else:
                coef = self.coef_table(x.device)[i]
            hist = hist[:use]
        pred, clip = self._op_prediction, self.clip_sample_range if self.clip_sample else None
        if self.thresholding:  # the thresholded x0 from the row's (a, s), as a "sample"
            model_output = thresholded_x0(self, x, model_output, guidance_scale, coef[0],
                                          coef[1], pred)  # fmt: skip
            guidance_scale, pred, clip = None, "sample", None
        x_next, m = _ops().dpm_solver_2m_step(
            x, model_output, coef, hist[0] if hist else None, prediction_type=pred,
            clip_range=clip, guidance_scale=guidance_scale,
            **dict(zip(_PREV_NAMES[1:], hist[1:], strict=False)), **nkw,
        )  # fmt: skip
        advance_generator_state(nkw, x)
        if not external:
            self._hist = [(m, i), *self._hist][: self._kept()]
        return x_next, m, external
