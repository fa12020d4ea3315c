"""LMS: linear multistep on the probability-flow ODE in sigma space (k-diffusion's
``sample_lms``; Karras et al. 2022, arXiv:2206.00364, eq. 4 ODE), as diffusers'
``LMSDiscreteScheduler``: "LMS" / "LMS Karras" of the web UIs."""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
from numpy.polynomial import polynomial as P

from fastdiff.samplers._history import EpsHistory
from fastdiff.samplers.euler import EulerSampler, grid_end
from fastdiff.samplers.sigmas import pick_sigma_grid, train_sigmas32
from fastdiff.schedules import NoiseSchedule

__all__ = ["LMSSampler", "lms_weights"]


def exp_beta_ends(
    sigma_min: float | None, sigma_max: float | None, exponential: bool, beta: bool
) -> tuple[float | None, float | None]:
    """``sigma_min`` / ``sigma_max`` checked (:func:`~fastdiff.samplers.euler.grid_end`) and kept
    for the exponential / beta grid only: diffusers' ``LMSDiscreteScheduler`` and
    ``DPMSolverSDEScheduler`` read them from their config there (e.g. the leftovers of an
    ``EulerDiscreteScheduler`` config they were made from), their default and Karras grids
    ignore them."""
    ends = grid_end("sigma_min", sigma_min), grid_end("sigma_max", sigma_max)
    return ends if exponential or beta else (None, None)


def lms_weights(sig: np.ndarray, i: int, order: int) -> np.ndarray:
    """The ``order`` linear multistep weights of step ``i`` (float64, newest derivative first):
    w_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial
    l_j(tau) = prod_{k != j, k < order} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}),
    integrated exactly (a polynomial of degree order - 1)."""
    nodes = np.array([float(sig[i - k]) for k in range(order)], dtype=np.float64)
    out = np.zeros(order, dtype=np.float64)
    for j in range(order):
        others = np.delete(nodes, j)
        basis = P.polyfromroots(others) / np.prod(nodes[j] - others)  # l_j, power basis
        q = P.polyint(basis)
        out[j] = P.polyval(float(sig[i + 1]), q) - P.polyval(float(sig[i]), q)
    return out


class LMSSampler(EpsHistory, EulerSampler):
    """Linear multistep (LMS) on the probability-flow ODE in sigma space, step for step as
    diffusers' ``LMSDiscreteScheduler`` (k-diffusion's ``sample_lms``).

    With sigma = sqrt((1 - ab) / ab) and x_sigma = x0 + sigma eps, the ODE is dx_sigma/dsigma
    = d(x_sigma; sigma) = (x_sigma - D(x_sigma; sigma)) / sigma (Karras et al. 2022, eq. 4 with
    eq. 3's score), D the x0 prediction: the derivative is the model's noise estimate eps. LMS
    keeps the derivatives d_i, d_{i-1}, ... of the last ``order`` steps and integrates the
    polynomial through them (an Adams-Bashforth method on the non-uniform sigma grid)::

        x_sigma_{i+1} = x_sigma_i + sum_{j < r} w_j d_{i-j},
        w_j = int_{sigma_i}^{sigma_{i+1}} prod_{k != j, k < r} (tau - sigma_{i-k})
              / (sigma_{i-j} - sigma_{i-k}) dtau

    with r = min(i + 1, order) (diffusers' step(order=4) default); the weights are computed on
    the host in float64, exactly (:func:`lms_weights`; diffusers integrates the same polynomial
    numerically). fastdiff keeps the VP sample x = a x_sigma (a = 1 / sqrt(1 + sigma^2)), so::

        x_{i+1} = (a_{i+1} / a_i) x_i + a_{i+1} sum_j w_j d_{i-j}

    Fused form. Each step is one :func:`fastdiff.ops.unipc_step` call whose m output IS the
    derivative d_i = eps (kept as the history m_{i-1}, m_{i-2}, m_{i-3}): the op's prediction
    type and (a, s) slots are chosen so that m = p x + q mo is eps for the model's output mo
    (s_i = a_i sigma_i = sqrt(1 - ab))::

        epsilon:       op "sample",        m = mo                       (a, s unused: 1, 1)
        v_prediction:  op "v_prediction",  m = a' x - s' v, a' = s_i, s' = -a_i  (eps = s x + a v)
        sample:        op "epsilon",       m = (x - s' x0) / a', a' = s_i, s' = a_i

    and the float64 row ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2]`` is
    ``[a', s', a_{i+1}/a_i, 0, a_{i+1} w_0, a_{i+1} w_1, a_{i+1} w_2, 1, 0, 0, a_{i+1} w_3, 0]``
    (x_next = x_c). No row divides by sigma_{i+1}: the last step (sigma = 0, a = 1) is an
    ordinary row; sigma_i > 0 on every step.

    A run that starts at step s > 0 (img2img: diffusers' pipelines set ``begin_index`` and the
    scheduler starts with no derivatives) takes, as diffusers, the weights of order min(i + 1,
    order) but only the first min(i - s + 1, order) of them (the derivatives it has).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"linspace"``;
            ``prediction_type`` "epsilon", "v_prediction" or "sample", as diffusers).
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid
            (at most one), as :class:`~fastdiff.samplers.EulerSampler`.
        sigma_min, sigma_max: the exponential / beta grid's end noise levels, as
            :class:`~fastdiff.samplers.EulerSampler`'s. As in diffusers'
            ``LMSDiscreteScheduler`` (whose exponential / beta grids read them from its config,
            e.g. the leftovers of an ``EulerDiscreteScheduler`` config it was made from), the
            default and Karras grids ignore them (checked, then unused).
        order: the multistep order, 1 to 4 (diffusers' ``step(order=4)`` default).
        fractional_timesteps: diffusers' float32 model timesteps instead of those rounded, as
            :class:`~fastdiff.samplers.EulerSampler`.
    """

    name = "lms"
    default_spacing = "linspace"
    is_multistep = True
    coef_width = 12
    #: the CUDA-graph loop keeps 4 history buffers (last, d_{i-1}, d_{i-2}, d_{i-3})
    solver_order = 4

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        order: int = 4,
        fractional_timesteps: bool = False,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                "prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got "
                f"{prediction_type!r}"
            )
        if isinstance(order, bool) or not isinstance(order, Integral) or not 1 <= order <= 4:
            raise ValueError(f"order: expected an int in 1..4, got {order!r}")
        self.order = int(order)
        ends = exp_beta_ends(sigma_min, sigma_max, use_exponential_sigmas, use_beta_sigmas)
        pick_sigma_grid(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)  # one grid
        self._sig_cache: np.ndarray | None = None
        self.reset()
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            sigma_min=ends[0],
            sigma_max=ends[1],
            fractional_timesteps=fractional_timesteps,
        )

    # ------------------------------------------------------------------ rows
    def sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: sigma_i at each step, then 0; the float32 values diffusers'
        ``LMSDiscreteScheduler`` builds (from its float32 alpha_bar) and its step reads."""
        if self.sigma_grid is not None:
            sig = self._sigma_grid()[0]
        else:
            train = train_sigmas32(self.schedule)
            sig = np.interp(self._spaced_frac(), np.arange(len(train)), train)
        return np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)

    def _sig32(self) -> np.ndarray:
        """:meth:`sigmas`, computed once per sampler."""
        if getattr(self, "_sig_cache", None) is None:
            self._sig_cache = self.sigmas()
        return self._sig_cache

    def _weights(self, i: int) -> np.ndarray:
        """:func:`lms_weights` of step ``i`` (order min(i + 1, order)), computed once."""
        cache = self.__dict__.setdefault("_w_cache", {})
        if i not in cache:
            cache[i] = lms_weights(self._sig32(), i, min(i + 1, self.order))
        return cache[i]

    def _row(self, i: int, k: int) -> np.ndarray:
        """float64 row of step ``i`` as the ``k``-th step of a run."""
        sig = self._sig32()
        a_i, a_n = (1.0 / math.sqrt(1.0 + float(v) ** 2) for v in (sig[i], sig[i + 1]))
        s_i = a_i * float(sig[i])
        w = self._weights(i)[: min(k + 1, self.order)]
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0], row[1] = {
            "epsilon": (1.0, 1.0),
            "v_prediction": (s_i, -a_i),
            "sample": (s_i, a_i),
        }[self.prediction_type]
        row[2], row[7] = a_n / a_i, 1.0
        for col, wj in zip((4, 5, 6, 10), w, strict=False):
            row[col] = a_n * wj
        return row

    def coefficients(self) -> np.ndarray:
        rows = np.stack([self._row(i, i) for i in range(self.steps)])
        # a run that starts at step s > 0 has only the derivatives since s (class docstring)
        return self._set_since_rows(rows, self._row)

    def _max_order(self) -> int:
        return self.order

    def _sigma_at(self, i: int) -> float:
        return float(self._sig32()[i])

    def _op_prediction(self) -> str:
        return {"epsilon": "sample", "v_prediction": "v_prediction", "sample": "epsilon"}[
            self.prediction_type
        ]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, order={self.order}, prediction_type="
            f"{self.prediction_type!r}, timestep_spacing={self.timestep_spacing!r}, "
            f"sigma_grid={self.sigma_grid!r}, schedule={self.schedule!r})"
        )

    def config(self) -> dict:
        return {**super().config(), "order": self.order, "sigma_grid": self.sigma_grid}
