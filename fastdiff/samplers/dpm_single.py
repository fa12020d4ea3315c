"""Singlestep DPM-Solver (Lu et al. 2022, arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022,
arXiv:2211.01095), model call for model call as diffusers' ``DPMSolverSinglestepScheduler``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._history import RunRows, read_operands
from fastdiff.samplers._solver_common import (
    FINAL_SIGMAS,
    SOLVER_TYPES,
    check_lambda_min_clipped,
    custom_steps,
    sigma_grid_timesteps,
    threshold_config,
    thresholded_x0,
)
from fastdiff.samplers.base import (
    Sampler,
    _ops,
    _unipc_ops,
    advance_generator_state,
    check_choice,
    check_solver_order,
    check_thresholding,
    vp_of_sigma,
)
from fastdiff.samplers.flow_sigmas import (
    FlowGridMixin,
    FlowOptions,
    dpm_flow_sigmas,
    flow_timesteps,
)
from fastdiff.samplers.sigmas import (
    clipped_end,
    pick_sigma_grid,
    train_sigmas32,
)
from fastdiff.schedules import PREDICTION_TYPES, NoiseSchedule

__all__ = ["DPMSolverSinglestepSampler", "singlestep_orders"]

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


def singlestep_orders(steps: int, solver_order: int, lower_order_final: bool,
                      final_zero: bool) -> list[int]:  # fmt: skip
    """The order of each model call: groups ``1, 2, ..., solver_order`` (one singlestep update
    of that order from the group's first sample), as diffusers' ``get_order_list``; with
    ``lower_order_final`` the tail is ``1, 2`` / ``1`` groups, and a final sigma of zero makes
    the last call first order."""
    n, k = steps, solver_order
    if k == 1:
        orders = [1] * n
    elif not lower_order_final:
        orders = list(range(1, k + 1)) * (n // k)
    elif k == 2:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    elif n % 3 == 0:
        orders = [1, 2, 3] * (n // 3 - 1) + [1, 2] + [1]
    elif n % 3 == 1:
        orders = [1, 2, 3] * (n // 3) + [1]
    else:
        orders = [1, 2, 3] * (n // 3) + [1, 2]
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepSampler(FlowGridMixin, RunRows, Sampler):
    """Singlestep DPM-Solver / DPM-Solver++ (orders 1-3), step for step as diffusers'
    ``DPMSolverSinglestepScheduler``.

    Notation as :class:`~fastdiff.samplers.DPMSolverPPSampler`: alpha_t = 1 / sqrt(1 + rho^2),
    sigma_t = rho alpha_t for the noise level rho = sqrt((1 - ab) / ab), lambda_t = -log rho.
    The calls are grouped (:func:`singlestep_orders`): a group of order k starts at the sample
    x_a of its first call (the anchor) and its j-th call (j = 1..k) is an update of order j
    from x_a to the next noise level, using the model outputs m of the group's calls so far.
    Call 1 is DPM-Solver-1 (DDIM); call 2 at s0 is DPM-Solver-2 with intermediate point s0
    (Lu et al. 2022, arXiv:2206.00927, its Algorithm 1 with r1 = h_0 / h, here the diffusers
    form); call 3 is the last stage of DPM-Solver-3 (Algorithm 2). For ``"dpmsolver++"`` m is
    the data prediction x0 and the updates are DPM-Solver++(2S)'s (arXiv:2211.01095, Algorithm
    1) and its third-order analogue; for ``"dpmsolver"`` m is the noise estimate eps. (The
    algorithm numbers are the usual citations, not checked against the papers here; the
    formulas below are diffusers' and are checked against it and a float64 twin.) With h =
    lambda_t - lambda_a, h_0 = lambda_{s0} - lambda_a, h_1 = lambda_{s1} - lambda_a, r_j = h_j /
    h, D0 = m_a, and (dpmsolver++) A = alpha_t (1 - e^{-h}), B = alpha_t ((e^{-h} - 1) / h + 1),
    C = -alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2)::

        order 1:  x_t = (sigma_t / sigma_a) x_a + A m_a
        order 2:  x_t = (sigma_t / sigma_a) x_a + A D0 + B' D1,  D1 = (m_{s0} - m_a) / r0,
                  B' = A / 2 (midpoint) or B (heun)
        order 3:  x_t = (sigma_t / sigma_a) x_a + A D0 + B D1_1             (midpoint)
                  x_t = (sigma_t / sigma_a) x_a + A D0 + B D1 + C D2        (heun)
                  D1_0 = (m_{s1} - m_a) / r1, D1_1 = (m_{s0} - m_a) / r0,
                  D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)

    and for ``"dpmsolver"`` the same with x_a's factor alpha_t / alpha_a, A = -sigma_t (e^h - 1),
    B = -sigma_t ((e^h - 1) / h - 1), C = -sigma_t ((e^h - 1 - h) / h^2 - 1/2). The weights are
    computed on the host in float64 from diffusers' float32 noise levels.

    Flow models (``use_flow_sigmas``, diffusers 0.42's flow grid): rectified-flow sigmas s with
    alpha_t = 1 - s, sigma_t = s, lambda_t = log((1 - s) / s); the grid is DPM-Solver++'s
    multistep one (:func:`~fastdiff.samplers.flow_sigmas.dpm_flow_sigmas`, ``flow_shift`` or
    e^mu), ending at 0 (or at the VP sigma_min of the betas with ``final_sigmas_type=
    "sigma_min"``, as diffusers), the model called at ``int(s T)``. A velocity model
    (``prediction_type="flow_prediction"``, ``"dpmsolver++"`` only, as diffusers) gives x0 = x -
    s v: the op's "epsilon" with (a, s) = (1, s).

    Fused form. Each call is one :func:`fastdiff.ops.unipc_step`; its ``last`` operand carries
    the anchor x_a and its x_c output passes the anchor on (x_c = x at a group's first call,
    x_c = last after): with row ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3,
    p_m2]``::

        order 1:  [a, s, 1, 0, 0, 0, 0, c, w_s0, 0,         0, 0  ]   x_c = x = x_a
        order 2:  [a, s, 0, 1, 0, 0, 0, c, w_s0, w_a,       0, 0  ]   x_c = last = x_a
        order 3:  [a, s, 0, 1, 0, 0, 0, c, w_s0, w_s1,      0, w_a]

    x_next = c x_c + w_s0 m + w_. m_prev + w_. m_prev2 (c the factor of x_a, w the weights of
    the m in the expansions above; m_prev, m_prev2 the op's m of the previous two calls). The
    op's prediction type and (a, s) make m the quantity the solver integrates: dpmsolver++: the
    model's own type with (alpha_s0, sigma_s0) (m = x0); dpmsolver: epsilon as op "sample", v
    as op "v_prediction" with (sigma, -alpha), sample as op "epsilon" with (sigma, alpha) (m =
    eps). x_a passes through x_c exactly (times 1 in fp32), so the anchor is never rounded.

    ``"sde-dpmsolver++"`` (diffusers' singlestep SDE): with h from the anchor, x_a's factor is
    (sigma_t / sigma_a) e^{-h}, A = alpha_t (1 - e^{-2h}), B = alpha_t ((1 - e^{-2h}) / (-2h) + 1)
    and fresh noise sigma_t sqrt(1 - e^{-2h}) z at every call (drawn in x's dtype, as diffusers).
    Its order-3 update (diffusers' ``singlestep_dpm_solver_third_order_update``) has the same A, B
    (midpoint: on D1_1) and, with heun, C = alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2) on D2.
    Each call is one :func:`fastdiff.ops.dpm_solver_2m_step`, row ``[a, s, c_x, c_x0, c_prev,
    c_noise, c_prev2, 0(, c_prev3)]``: order 1 ``[a, s, c, A, 0, c_n, 0, 0]`` (x = x_a), 2
    ``[a, s, 0, w_s0, w_a, c_n, c, 0]`` (x0_prev = m_a, x0_prev2 = x_a), 3 ``[a, s, 0, w_s0,
    w_s1, c_n, c, 0, w_a]`` (x0_prev = m_{s1}, x0_prev2 = x_a, x0_prev3 = m_a; 9 columns at
    ``solver_order=3``). x_c passes the anchor on: x at order 1, then ``last`` (a device select
    on c_prev2 != 0, which a CUDA graph replays).

    A run that starts at call s > 0 (img2img, diffusers' ``set_begin_index``) has no m yet: as
    diffusers, its call i takes order min(order_i, i - s + 1).

    Args:
        schedule, steps, prediction_type: see :class:`~fastdiff.samplers.base.Sampler`
            (``"epsilon"``, ``"v_prediction"``, ``"sample"``). The timesteps are diffusers'
            (``linspace`` over ``steps + 1`` points, t = 0 dropped; the scheduler has no
            spacing option).
        timesteps: custom model timesteps, strictly descending (diffusers'
            ``set_timesteps(timesteps=...)``, e.g. Align Your Steps' schedules); ``steps`` is
            then their number (or None). Not with a sigma grid.
        solver_order: 1, 2 (default) or 3.
        solver_type: ``"midpoint"`` (default) or ``"heun"`` (diffusers reads ``"logrho"``,
            ``"bh1"``, ``"bh2"`` as ``"midpoint"``, and so does this sampler).
        algorithm_type: ``"dpmsolver++"`` (default; data prediction) or ``"dpmsolver"`` (noise
            prediction; needs ``final_sigmas_type="sigma_min"``, as diffusers) or
            ``"sde-dpmsolver++"`` (orders 1-3; see below).
        lower_order_final: lower-order groups at the end. As diffusers' ``set_timesteps``, it is
            switched on when ``steps % solver_order != 0`` or ``final_sigmas_type="zero"``.
        final_sigmas_type: ``"zero"`` (default) or ``"sigma_min"`` (end at the noise level of
            t = 0).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of the
            data prediction (``"dpmsolver++"`` only here), in a separate torch pass.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid (at
            most one) between the float32 training noise levels of t = 0 and T - 1; model
            timesteps rounded (Karras) or truncated, as diffusers.
        use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, mu: the flow grid
            (above; not with a VP sigma grid or custom timesteps). ``mu``
            (``set_timesteps(mu=...)``) needs ``use_dynamic_shifting`` and makes the shift e^mu;
            ``time_shift_type`` only ``"exponential"``, as diffusers asserts.
        lambda_min_clipped: the spaced timesteps stop where lambda_t falls below this (as
            diffusers: ``linspace(0, T - 1 - clipped, steps + 1)``; for cosine schedules).
            Unused with a sigma grid, the flow grid or custom timesteps.
    """

    name = "dpm++_single"
    default_spacing = "linspace"
    is_multistep = True
    coef_width = 12

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None,
        *,
        prediction_type: str = "epsilon",
        timesteps: Sequence[int] | None = None,
        solver_order: int = 2,
        solver_type: str = "midpoint",
        algorithm_type: str = "dpmsolver++",
        lower_order_final: bool = False,
        final_sigmas_type: str = "zero",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        mu: float | None = None,
        lambda_min_clipped: float = -math.inf,
    ) -> None:
        self._flow = FlowOptions(use_flow_sigmas, flow_shift, use_dynamic_shifting,
                                 time_shift_type, mu, dpm=True, name="dpm++_single")  # fmt: skip
        grid = pick_sigma_grid(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        if prediction_type == "flow_prediction" and algorithm_type == "dpmsolver":
            raise ValueError(
                "prediction_type: 'flow_prediction' needs algorithm_type='dpmsolver++' (diffusers' "
                "'dpmsolver' has no flow conversion), got algorithm_type='dpmsolver'"
            )
        prediction_type = self._check_flow([grid] if grid else [], timesteps, prediction_type)
        self.lambda_min_clipped = check_lambda_min_clipped(lambda_min_clipped)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_solver_order(solver_order)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        #: diffusers' "sde-dpmsolver++": data prediction plus fresh noise at every call
        self.sde = algorithm_type == "sde-dpmsolver++"
        self.coef_width = (9 if solver_order == 3 else 8) if self.sde else 12  # 2m / unipc rows
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError(
                "final_sigmas_type: algorithm_type='dpmsolver' needs 'sigma_min' (as diffusers), "
                "got 'zero'"
            )
        if thresholding:
            if algorithm_type == "dpmsolver":
                raise ValueError(
                    "thresholding: not implemented with algorithm_type='dpmsolver'; expected "
                    "False, got True"
                )
            check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        #: the group order (1, 2, 3); also the CUDA-graph loop's history depth
        self.solver_order = int(solver_order)
        self.solver_type = SOLVER_TYPES[solver_type]
        self.algorithm_type = algorithm_type
        self.final_sigmas_type = final_sigmas_type
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        #: "karras", "exponential", "beta" or None (steps at the spaced timesteps)
        self.sigma_grid: str | None = grid
        self._sig: np.ndarray | None = None
        self._custom: np.ndarray | None = None  # user timesteps, int64, descending
        if timesteps is not None and isinstance(schedule, NoiseSchedule):
            if self.sigma_grid is not None:
                raise ValueError(
                    f"timesteps: custom timesteps cannot be combined with "
                    f"use_{self.sigma_grid}_sigmas=True (as in diffusers)"
                )
            self._custom, steps = custom_steps(timesteps, schedule.num_train_timesteps, steps)
        uneven = isinstance(steps, Integral) and steps % self.solver_order != 0
        #: as diffusers' set_timesteps: forced on for uneven groups or a final sigma of zero
        self.lower_order_final = bool(lower_order_final or uneven or final_sigmas_type == "zero")
        self.reset()
        super().__init__(schedule, steps, prediction_type=prediction_type)
        self.prediction_type = "flow_prediction" if self.flow_prediction else self.prediction_type

    # ------------------------------------------------------------------ grid
    def _make_timesteps(self) -> np.ndarray:
        train = train_sigmas32(self.schedule)  # float32, ascending in t
        T, n = self.schedule.num_train_timesteps, self.steps
        if self.use_flow_sigmas:
            sig = dpm_flow_sigmas(n, T, self.flow_shift)
            ts = flow_timesteps(sig, T, type(self).__name__)
        elif self.sigma_grid is not None:  # diffusers rounds Karras' timesteps only
            sig, ts = sigma_grid_timesteps(self.sigma_grid, train, n,
                                           rounded=self.sigma_grid == "karras")  # fmt: skip
        elif self._custom is not None:
            ts = self._custom.copy()
            sig = train[ts]
        else:
            end = clipped_end(self.schedule, self.lambda_min_clipped) - 1
            ts = np.linspace(0, end, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            sig = train[ts]
        last = 0.0 if self.final_sigmas_type == "zero" else float(train[0])
        self._sig = np.append(sig, last).astype(np.float32).astype(np.float64)
        return ts

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: (alpha_t, sigma_t) of call i's grid sigma (diffusers' ``add_noise``)."""
        return self._alpha_sigma_at(i)

    def _alpha_sigma_at(self, i: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of call ``i``'s noise level (flow: (1 - s, s))."""
        s = float(self._sig[i])
        return (1.0 - s, s) if self.use_flow_sigmas else vp_of_sigma(s)

    def _run_warmup(self) -> int:
        return self.solver_order - 1

    def sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: the noise level rho = sigma / alpha of each call, then the
        end point; the float32 values diffusers' ``DPMSolverSinglestepScheduler`` steps with."""
        return self._sig.copy()

    def _orders(self, k: int | None) -> list[int]:
        """The order of each call as the ``k``-th call of a run (None: a run from call 0)."""
        full = singlestep_orders(self.steps, self.solver_order, self.lower_order_final,
                                 self.final_sigmas_type == "zero")  # fmt: skip
        return full if k is None else [min(o, k + 1) for o in full]

    def _weights(self, i: int, order: int) -> tuple[float, list[float]]:
        """(c, [w_a, w_s1, w_s0][-order:] as the expansions of the class docstring): x_{i+1} =
        c x_a + sum w m, for call ``i`` of ``order`` (anchor a = i - order + 1). Float64."""
        sig = self._sig
        a = i - order + 1
        pairs = [self._alpha_sigma_at(j) for j in range(len(sig))]
        alpha, sigma = [p[0] for p in pairs], [p[1] for p in pairs]
        t, pp = i + 1, self.algorithm_type != "dpmsolver"
        if sig[t] == 0.0:  # the final step to sigma = 0 (order 1 only): x_t = m_a
            return 0.0, [alpha[t]]
        # lambda = log(alpha / sigma) from a to t: -log(rho), flow log((1 - s) / s)
        flow = self.use_flow_sigmas
        lam = [
            math.log((1.0 - v) / v) if flow else -math.log(v) for v in map(float, sig[a : t + 1])
        ]
        h = lam[-1] - lam[0]
        if self.sde:  # diffusers' SDE forms: -2h in place of -h (C: its order-3 heun update)
            em2 = math.expm1(-2.0 * h)  # e^{-2h} - 1
            c, A = sigma[t] / sigma[a] * math.exp(-h), -alpha[t] * em2
            B = alpha[t] * (em2 / (2.0 * h) + 1.0) if h else 0.0
            C = alpha[t] * ((-em2 - 2.0 * h) / (4.0 * h * h) - 0.5) if h else 0.0
        elif pp:
            c = sigma[t] / sigma[a]
            em = math.expm1(-h)  # e^{-h} - 1
            A, B = -alpha[t] * em, alpha[t] * (em / h + 1.0) if h else 0.0
            C = -alpha[t] * ((em + h) / h**2 - 0.5) if h else 0.0
        else:
            c = alpha[t] / alpha[a]
            ep = math.expm1(h)
            A, B = -sigma[t] * ep, -sigma[t] * (ep / h - 1.0) if h else 0.0
            C = -sigma[t] * ((ep - h) / h**2 - 0.5) if h else 0.0
        if order == 1:
            return c, [A]
        hs = [lam[j] - lam[0] for j in range(1, order)]  # h_1 (order 3), h_0: s1, s0
        if h == 0.0 or any(v == 0.0 for v in hs) or (order == 3 and hs[0] == hs[1]):
            raise ValueError(
                f"steps: calls {a}..{t} of the {self.sigma_grid or 'spaced'} grid share a noise "
                f"level, where the order-{order} singlestep update divides by zero (diffusers: "
                "NaN); use fewer steps"
            )
        if order == 2:
            r0 = hs[0] / h
            Bp = 0.5 * A if self.solver_type == "midpoint" else B
            return c, [A - Bp / r0, Bp / r0]  # D0 = m_a, D1 = (m_s0 - m_a) / r0
        r1, r0 = hs[0] / h, hs[1] / h
        d1_0 = np.array([-1.0, 1.0, 0.0]) / r1  # (m_s1 - m_a) / r1, over (m_a, m_s1, m_s0)
        d1_1 = np.array([-1.0, 0.0, 1.0]) / r0  # (m_s0 - m_a) / r0
        w = np.array([A, 0.0, 0.0])
        if self.solver_type == "midpoint":
            w = w + B * d1_1
        else:
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            w = w + B * d1 + C * d2
        return c, [float(v) for v in w]

    def _ab(self, i: int) -> tuple[float, float]:
        """(a, s) slots of call ``i``'s row (see the class docstring)."""
        alpha, sigma = self._alpha_sigma_at(i)
        if self.flow_prediction:  # x0 = (x - s v) / 1
            return 1.0, sigma
        if self.algorithm_type != "dpmsolver":
            return alpha, sigma
        if self.prediction_type == "v_prediction":
            return sigma, -alpha
        if self.prediction_type == "sample":
            return sigma, alpha
        return 1.0, 1.0

    def _noise_coef(self, i: int, order: int) -> float:
        """SDE: sigma_t sqrt(1 - e^{-2h}), h from call ``i``'s anchor to its target (0 at 0)."""
        t, a = i + 1, i - order + 1
        if self._sig[t] == 0.0:
            return 0.0
        alpha, sigma = zip(*(self._alpha_sigma_at(j) for j in (a, t)), strict=True)
        h = math.log(alpha[1] / sigma[1]) - math.log(alpha[0] / sigma[0])
        return sigma[1] * math.sqrt(-math.expm1(-2.0 * h))

    def _row(self, i: int, order: int) -> np.ndarray:
        c, w = self._weights(i, order)
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0], row[1] = self._ab(i)
        if self.sde:  # [a, s, c_x, c_x0, c_prev, c_noise, c_prev2, 0(, c_prev3)]: class doc
            row[2:4] = [c, w[0]] if order == 1 else [0.0, w[-1]]
            if order > 1:  # x0_prev = the newest earlier m, x0_prev2 = x_a (, x0_prev3 = m_a)
                row[4], row[6] = w[-2], c
                row[8:] = w[0] if order == 3 else 0.0  # (no column below solver_order 3)
            row[5] = self._noise_coef(i, order)
            return row
        row[2], row[3] = (1.0, 0.0) if order == 1 else (0.0, 1.0)
        row[7] = c
        # newest first: m (this call), m_prev, m_prev2 -> p_m, p_m1, p_m2
        for col, wj in zip((8, 9, 11), reversed(w), strict=False):
            row[col] = wj
        return row

    def coefficients(self) -> np.ndarray:
        # a run's k-th call (k < solver_order - 1) takes order min(order, k + 1)
        return self._order_rows(self._orders, self._row)

    def _needs_noise_row(self, i: int) -> bool:
        # SDE: diffusers draws noise at every call, the last included (c_noise = 0 at sigma 0)
        return self.sde

    def _op_prediction(self) -> str:  # type: ignore[override]  # a method here
        if self.thresholding:
            return "sample"
        if self.flow_prediction:
            return "epsilon"
        if self.algorithm_type != "dpmsolver":
            return self.prediction_type
        return {"epsilon": "sample", "v_prediction": "v_prediction", "sample": "epsilon"}[
            self.prediction_type
        ]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, solver_order={self.solver_order}, "
            f"algorithm_type={self.algorithm_type!r}, solver_type={self.solver_type!r}, "
            f"prediction_type={self.prediction_type!r}, sigma_grid={self.sigma_grid!r}, "
            f"use_flow_sigmas={self.use_flow_sigmas}, flow_shift={self.flow_shift}, "
            f"final_sigmas_type={self.final_sigmas_type!r}, schedule={self.schedule!r})"
        )

    def config(self) -> dict:
        return {
            **super().config(),
            # order 3 reads a second history operand (a CUDA graph's fourth static buffer)
            "solver_order": self.solver_order,
            "algorithm_type": self.algorithm_type,
            **threshold_config(self),
        }

    # ------------------------------------------------------------------ stepping
    def reset(self) -> None:
        """Forget the run: the next call starts a new one (no anchor, no m)."""
        self._last: Tensor | None = None
        self._hist: list[Tensor | None] = [None, None]
        self._prev_i = -1
        self._start = 0

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of call ``i`` at ``x`` from the op's ``m`` (x0 itself for
        dpmsolver++, eps for dpmsolver); for trajectories, not part of the fused step. A new
        tensor (the CUDA-graph loop passes its static buffer)."""
        if self.algorithm_type != "dpmsolver":
            return m.clone()
        a, s = self._alpha_sigma_at(i)
        return ((x.float() - s * m.float()) / a).to(x.dtype)

    def step(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Call ``i`` (model output at ``x``, ``timesteps[i]``): one fused op call.

        The anchor and the m of the group are kept on the sampler and used only when call
        ``i - 1`` was the last one it ran for this x shape and device; otherwise call ``i``
        starts a new run (img2img, as diffusers after ``set_begin_index``). The ODE solvers are
        deterministic (``noise``, ``generator`` and ``generator_state`` unused); the SDE adds
        ``noise``, else a draw with ``generator`` (one, or one per sample), else in-kernel Philox
        noise from ``generator_state`` (int64 ``[2]`` = (seed, offset)), else a draw from torch's
        global generator. Returns x_{i+1}, or ``(x_{i+1}, x0)`` with ``return_x0``."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        valid, _, row, r = self._run_call(i, x, self._hist[0])
        if not valid:  # a new run: no anchor, no m
            self._last, self._hist = None, [None, None]
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        if self.sde:  # order 2: x0_prev = m_a, x0_prev2 = x_a; 3: + x0_prev3 = m_a, m_{s1} first
            last = self._last if r[6] != 0.0 else None
            m_prev = self._hist[0] if last is not None else None
            m_prev2 = self._hist[1] if len(r) > 8 and r[8] != 0.0 else None
        else:
            last, m_prev, m_prev2 = read_operands(r, [self._last, *self._hist])
        x_c, m, x_next = self.step_with_history(model_output, i, x, row, last, m_prev, m_prev2,
                                                guidance_scale=guidance_scale, **nkw)  # fmt: skip
        self._last, self._hist, self._prev_i = x_c, [m, self._hist[0]], i
        if not return_x0:
            return x_next
        return x_next, (m if self.algorithm_type != "dpmsolver" else self.x0_of(m, i, x))

    def step_with_history(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        coef: Tensor,
        last: Tensor | None,
        m_prev: Tensor | None,
        m_prev2: Tensor | None,
        m_prev3: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        noise: Tensor | None = None,
        generator_state: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One fused call with the caller's anchor (``last``), history and row (CUDA graphs):
        ``(x_c, m, x_next)``, x_c the anchor for the next call; ``m_prev3`` (and for the SDE
        below order 3, ``m_prev2``) is not read, ``noise`` / ``generator_state`` only by the
        SDE (x0_prev = m_prev, x0_prev2 = last, x0_prev3 = m_prev2); own history left alone."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        if self.thresholding:  # x0 from the row's (a, s) = (alpha, sigma), thresholded
            pt = "epsilon" if self.flow_prediction else self.prediction_type  # flow: a = 1
            model_output = thresholded_x0(self, x, model_output, guidance_scale, coef[0], coef[1],
                                          pt, in_x_dtype=True)  # fmt: skip
            guidance_scale = None
        if self.sde:
            nkw = {"noise": noise} if noise is not None else {"generator_state": generator_state}
            x_c = x
            if self.solver_order == 3 and last is not None:  # x_c: x_a after a group's 1st call
                nkw.update({} if m_prev2 is None else {"x0_prev3": m_prev2})  # m_a (coef[8])
                x_c = torch.where(coef[6] != 0, last, x)  # c_prev2 != 0: x_a's factor
            x_next, m = _ops().dpm_solver_2m_step(
                x, model_output, coef, m_prev, x0_prev2=last, prediction_type=self._op_prediction(),
                guidance_scale=guidance_scale, **nkw,
            )  # fmt: skip
            advance_generator_state(nkw, x)  # in place, so a captured graph advances it too
            return x_c, m, x_next
        return _unipc_ops().unipc_step(
            x,
            model_output,
            coef,
            last,
            m_prev,
            m_prev2,
            prediction_type=self._op_prediction(),
            guidance_scale=guidance_scale,
        )
