"""DEIS: the diffusion exponential integrator sampler of Zhang & Chen 2023 ("Fast Sampling of
Diffusion Models with Exponential Integrator", ICLR, arXiv:2204.13902), multistep in the noise
estimate, as diffusers' ``DEISMultistepScheduler`` (``algorithm_type="deis"``,
``solver_type="logrho"``, orders 1 to 3)."""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import polynomial as P
from torch import Tensor

from fastdiff.samplers._history import EpsHistory
from fastdiff.samplers._solver_common import (
    sigma_grid_timesteps,
    spaced_over_steps_plus_one,
    threshold_config,
    thresholded_x0,
)
from fastdiff.samplers.base import (
    Sampler,
    _unipc_ops,
    check_choice,
    check_solver_order,
    check_thresholding,
)
from fastdiff.samplers.flow_sigmas import (
    FlowGridMixin,
    FlowOptions,
    dpm_flow_sigmas,
    flow_timesteps,
)
from fastdiff.samplers.sigmas import pick_sigma_grid, train_sigmas32
from fastdiff.schedules import PREDICTION_TYPES, NoiseSchedule

__all__ = ["DEISSampler", "deis_weights"]

# diffusers' DEISMultistepScheduler registers these as "deis" / "logrho" (its only method)
ALGORITHM_TYPES = {"deis": "deis", "dpmsolver": "deis", "dpmsolver++": "deis"}
SOLVER_TYPES = {"logrho": "logrho", "midpoint": "logrho", "heun": "logrho", "bh1": "logrho",
                "bh2": "logrho"}  # fmt: skip


def deis_weights(rho: np.ndarray, i: int, order: int) -> np.ndarray:
    """The ``order`` DEIS weights of step ``i`` (float64, newest noise estimate first)::

        w_j = int_{rho_i}^{rho_{i+1}} l_j(log rho) d rho,
        l_j(u) = prod_{k != j, k < order} (u - log rho_{i-k}) / (log rho_{i-j} - log rho_{i-k})

    the Lagrange basis in log rho through the last ``order`` steps' noise levels. With u =
    log rho_i + v, rho = rho_i e^v and an antiderivative of l(v) e^v is e^v Q(v), Q = l - l' +
    l'' (l has degree < 3), so, exactly and without cancelling rho_i e^v Q(v) - rho_i Q(0)::

        w_j = rho_i ((e^v - 1) Q_j(v) + Q_j(v) - Q_j(0)),   v = log(rho_{i+1} / rho_i)

    ValueError when two of the nodes coincide (the basis divides by zero)."""
    base = math.log(float(rho[i]))
    nodes = [math.log(float(rho[i - k])) - base for k in range(order)]
    if len(set(nodes)) < order:
        raise ValueError(
            f"steps: steps {i - order + 1}..{i} share a noise level ({float(rho[i]):.6g}), where "
            f"DEIS's order-{order} step divides by zero (diffusers: NaN); use fewer steps"
        )
    v = math.log(float(rho[i + 1]) / float(rho[i]))
    out = np.zeros(order, dtype=np.float64)
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        den = math.prod(nodes[j] - u for u in others)
        q = d = P.polyfromroots(others) / den  # l_j (power basis, constant first)
        sign = -1.0
        for _ in range(order - 1):  # Q = l - l' + l'' (l has degree order - 1)
            d = P.polyder(d)
            q, sign = P.polyadd(q, sign * d), -sign
        dq = q.copy()
        dq[0] = 0.0  # Q(v) - Q(0), without the constant's rounding
        out[j] = float(rho[i]) * (math.expm1(v) * P.polyval(v, q) + P.polyval(v, dq))
    return out


class DEISSampler(FlowGridMixin, EpsHistory, Sampler):
    """DEIS (Zhang & Chen 2023), model call for model call as diffusers'
    ``DEISMultistepScheduler``: the "logrho" multistep exponential integrator.

    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) and rho = sigma_t / alpha_t (the noise
    level sigma of the other samplers), the probability-flow ODE of a VP model in its noise
    estimate eps is, after the exponential integrator's change of variable y = x / alpha,
    d(x / alpha) / d rho = eps(x, rho): the linear part is integrated exactly, and only eps
    is approximated. (This is the paper's rho-parametrised exponential integrator, its
    "rhoAB-DEIS"; the equation numbers are not checked against the paper here.) DEIS fits the
    polynomial in u = log rho through the noise estimates of the last r steps (diffusers'
    ``solver_type="logrho"``) and integrates it over [rho_i, rho_{i+1}]::

        x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_{j < r} w_j eps_{i-j}),
        w_j = int_{rho_i}^{rho_{i+1}} l_j(log rho) d rho      (:func:`deis_weights`)

    l_j the Lagrange basis through log rho_i, log rho_{i-1}, ...; r = 1 is DDIM
    (w_0 = rho_{i+1} - rho_i). The weights are computed on the host in float64, in closed form
    (diffusers evaluates the same antiderivatives in float32). The model output is first
    turned into the data prediction x0 (optionally thresholded) and then into eps = (x - alpha
    x0) / sigma, as diffusers' ``convert_model_output``: for an epsilon model that is its
    output.

    The order is r = min(solver_order, steps run so far + 1) (diffusers' ``lower_order_nums``;
    a run that starts at step s > 0, e.g. img2img after ``set_begin_index``, starts again at
    first order), and with ``lower_order_final`` and fewer than 15 steps the last step is first
    order and the one before at most second. As diffusers' scheduler, the spaced grids end at
    the noise level of t = 0 (not at 0) and the Karras / exponential / beta / flow grids at their
    own last sigma (the last step is then the identity).

    Flow models (``use_flow_sigmas``, diffusers 0.42's flow grid of ``DEISMultistepScheduler``):
    the noise levels are rectified-flow sigmas s (x_s = (1 - s) x0 + s eps), alpha_t = 1 - s,
    sigma_t = s, so rho = s / (1 - s) and the step above is unchanged. The grid is DPM-Solver++'s
    (:func:`~fastdiff.samplers.flow_sigmas.dpm_flow_sigmas`: ``linspace(1, 1/T)`` shifted by
    ``flow_shift``, or by e^mu with ``use_dynamic_shifting`` and ``mu``), the model is called at
    ``int(s T)``, and the last step repeats the last sigma (identity). A velocity model
    (``prediction_type="flow_prediction"``: x0 = x - s v) has eps = x + (1 - s) v: the op's
    "v_prediction" with (a', s') = (1, -(1 - s)); v_prediction on the flow grid has eps =
    ((1 - alpha^2) / sigma) x + alpha v, (a', s') = ((1 - alpha^2) / sigma, -alpha).

    Fused form. Each step is one :func:`fastdiff.ops.unipc_step` call whose m output IS the
    noise estimate eps_i (kept as the history m_{i-1}, m_{i-2}): the op's prediction type and
    (a, s) slots are chosen so that m = p x + q mo is eps for the model's output mo::

        epsilon:       op "sample",        m = mo                       (a, s unused: 1, 1)
        v_prediction:  op "v_prediction",  m = a' x - s' v, a' = sigma_i, s' = -alpha_i
        sample:        op "epsilon",       m = (x - s' x0) / a', a' = sigma_i, s' = alpha_i

    and the float64 row ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2]``
    is ``[a', s', alpha_{i+1}/alpha_i, 0, alpha_{i+1} w_0, alpha_{i+1} w_1, alpha_{i+1} w_2, 1,
    0, 0, 0, 0]`` (x_next = x_c). With ``thresholding`` x0 is computed and thresholded in a
    separate torch pass (from the row's (a', s') = (sigma_i, alpha_i)) and passed as a "sample"
    prediction.

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"linspace"``; as
            diffusers, ``linspace`` / ``leading`` space ``steps + 1`` points and drop t = 0).
        solver_order: 1, 2 (default) or 3.
        lower_order_final: lower orders on the last two steps when ``steps < 15``.
        algorithm_type, solver_type: ``"deis"`` and ``"logrho"`` (diffusers' only method; it
            reads ``"dpmsolver"`` / ``"dpmsolver++"`` and ``"midpoint"`` / ``"heun"`` /
            ``"bh1"`` / ``"bh2"`` as them, and so does this sampler).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of
            the data prediction (Imagen), as diffusers.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid (at
            most one; spacing and offset are then unused), between the float32 training noise
            levels of t = 0 and T - 1; model timesteps rounded (Karras) or truncated, as
            diffusers.
        use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, mu: the flow grid
            (above; spacing and offset unused; not with a VP sigma grid, which diffusers would
            read as flow sigmas). ``mu`` (``set_timesteps(mu=...)``) needs
            ``use_dynamic_shifting`` and makes the shift e^mu; ``time_shift_type`` only
            ``"exponential"``, as diffusers asserts.
    """

    name = "deis"
    default_spacing = "linspace"
    is_multistep = True
    _n_hist = 2  # eps_{i-1}, eps_{i-2}
    coef_width = 12

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        solver_order: int = 2,
        lower_order_final: bool = True,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
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
    ) -> None:
        self._flow = FlowOptions(use_flow_sigmas, flow_shift, use_dynamic_shifting,
                                 time_shift_type, mu, dpm=True, name="deis")  # fmt: skip
        grid = pick_sigma_grid(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        prediction_type = self._check_flow([grid] if grid else [], None, prediction_type)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_solver_order(solver_order)
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        if thresholding:
            check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        #: the multistep order (1, 2, 3); also the CUDA-graph loop's history depth
        self.solver_order = int(solver_order)
        self.lower_order_final = bool(lower_order_final)
        self.algorithm_type = ALGORITHM_TYPES[algorithm_type]
        self.solver_type = SOLVER_TYPES[solver_type]
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        #: "karras", "exponential", "beta" or None (steps at the spaced timesteps)
        self.sigma_grid: str | None = grid
        self._sig: np.ndarray | None = None
        self.reset()
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        self.prediction_type = "flow_prediction" if self.flow_prediction else self.prediction_type

    # ------------------------------------------------------------------ grid
    def _make_timesteps(self) -> np.ndarray:
        train = train_sigmas32(self.schedule)  # float32, ascending in t
        T, n = self.schedule.num_train_timesteps, self.steps
        if self.use_flow_sigmas:  # flow sigmas s, the last repeated (as diffusers)
            sig = dpm_flow_sigmas(n, T, self.flow_shift)
            self._sig = np.append(sig, sig[-1]).astype(np.float32).astype(np.float64)
            return flow_timesteps(sig, T, type(self).__name__)
        if self.sigma_grid is not None:  # diffusers rounds Karras' timesteps only
            sig, ts = sigma_grid_timesteps(self.sigma_grid, train, n,
                                           rounded=self.sigma_grid == "karras")  # fmt: skip
            self._sig = np.append(sig, sig[-1]).astype(np.float32).astype(np.float64)
            return ts
        ts = spaced_over_steps_plus_one(T, n, self.timestep_spacing, self.steps_offset, T)
        if ts.max() >= T:
            raise ValueError(
                f"steps_offset: timesteps {ts.max()}..{ts.min()} fall outside [0, {T - 1}]"
            )
        self._sig = np.append(train[ts], train[0]).astype(np.float64)
        return ts

    def sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: the noise level rho = sigma / alpha of each step (flow: the
        flow sigma s), then the end point; the float32 values diffusers'
        ``DEISMultistepScheduler`` steps with."""
        return self._sig.copy()

    def _alpha_sigma_at(self, i: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of step ``i``'s noise level (flow: (1 - s, s))."""
        s = float(self._sig[i])
        if self.use_flow_sigmas:
            return 1.0 - s, s
        a = 1.0 / math.sqrt(1.0 + s * s)
        return a, s * a

    def _rho(self) -> np.ndarray:
        """rho = sigma_t / alpha_t of every level (float64): the grid itself, or s / (1 - s)."""
        return self._sig / (1.0 - self._sig) if self.use_flow_sigmas else self._sig

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: diffusers' ``add_noise`` at step i's level, alpha_t x0 + sigma_t eps."""
        return self._alpha_sigma_at(i)

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of step ``i`` at ``x`` from its noise estimate ``m`` (for
        trajectories; a torch expression, not part of the fused step)."""
        a, s = self._alpha_sigma_at(i)
        return ((x.float() - s * m.float()) / a).to(x.dtype)

    def _orders(self, k: int | None) -> list[int]:
        """The order of each step as the ``k``-th step of a run (None: a run from step 0)."""
        n = self.steps
        few = self.lower_order_final and n < 15
        out = []
        for i in range(n):
            order = min(self.solver_order, (i if k is None else k) + 1)
            if few and i == n - 1:
                order = 1
            elif few and i == n - 2:
                order = min(order, 2)
            out.append(order)
        return out

    def _ab(self, i: int) -> tuple[float, float]:
        """(a, s) slots of step ``i``'s row (see the class docstring)."""
        alpha, sigma = self._alpha_sigma_at(i)
        if self.thresholding or self.prediction_type == "sample":
            return sigma, alpha
        if self.flow_prediction:  # eps = x + (1 - s) v
            return 1.0, -alpha
        if self.prediction_type == "v_prediction":  # eps = ((1 - alpha^2) / sigma) x + alpha v
            return (sigma if not self.use_flow_sigmas else (1.0 - alpha * alpha) / sigma), -alpha
        return 1.0, 1.0

    def _row(self, i: int, order: int) -> np.ndarray:
        a_i, a_n = self._alpha_sigma_at(i)[0], self._alpha_sigma_at(i + 1)[0]
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0], row[1] = self._ab(i)
        row[2], row[7] = a_n / a_i, 1.0
        for col, wj in zip((4, 5, 6), deis_weights(self._rho(), i, order), strict=False):
            row[col] = a_n * wj
        return row

    def coefficients(self) -> np.ndarray:
        # a run that starts at step s > 0 takes, as its k-th step (k < solver_order - 1), the
        # row of order min(k + 1, ...) at s + k
        return self._order_rows(self._orders, self._row)

    def _max_order(self) -> int:
        return self.solver_order

    def _sigma_at(self, i: int) -> float:
        return float(self._sig[i])

    def _needs_noise_row(self, i: int) -> bool:
        return False

    def _op_prediction(self) -> str:  # type: ignore[override]  # a method here
        if self.thresholding:
            return "epsilon"
        return {"epsilon": "sample", "v_prediction": "v_prediction", "sample": "epsilon",
                "flow_prediction": "v_prediction"}[self.prediction_type]  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, solver_order={self.solver_order}, "
            f"prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}, sigma_grid={self.sigma_grid!r}, "
            f"use_flow_sigmas={self.use_flow_sigmas}, flow_shift={self.flow_shift}, "
            f"lower_order_final={self.lower_order_final}, schedule={self.schedule!r})"
        )

    def config(self) -> dict:
        return {
            **super().config(),
            # order 3 reads a second history operand (a CUDA graph's fourth static buffer)
            "solver_order": self.solver_order,
            **threshold_config(self),
        }

    # ------------------------------------------------------------------ stepping
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One fused call with the caller's history and row (CUDA graphs): ``(x_c, eps_i,
        x_next)``; ``last`` and ``m_prev3`` are not read (their weights are 0). The sampler's
        own history is left alone."""
        self._check_step_args(model_output, i, x, None, guidance_scale)
        if self.thresholding:  # x0 from the row's (a, s) = (sigma_i, alpha_i), thresholded
            # flow: x0 = (x - s v) / 1, s = the row's sigma_t
            a, s, pt = (1.0, coef[0], "epsilon") if self.flow_prediction else (
                coef[1], coef[0], self.prediction_type)  # fmt: skip
            model_output = thresholded_x0(self, x, model_output, guidance_scale, a, s, pt,
                                          in_x_dtype=True)  # fmt: skip
            guidance_scale = None
        return _unipc_ops().unipc_step(
            x,
            model_output,
            coef,
            None,
            m_prev,
            m_prev2,
            prediction_type=self._op_prediction(),
            guidance_scale=guidance_scale,
        )
