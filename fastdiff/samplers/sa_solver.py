"""SA-Solver: stochastic Adams predictor-corrector (Xue et al. 2023, "SA-Solver: Stochastic Adams
Solver for Fast Sampling of Diffusion Models", arXiv:2309.05019), as diffusers'
``SASolverScheduler`` runs it.

With lambda = log(alpha / sigma) and tau >= 0 the amount of noise, the variance-controlled SDE
in data prediction (paper, eq. 6) has the exact solution from lambda_s to lambda_t (eq. 9)::

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s
          + (1 + tau^2) sigma_t int_{lambda_s}^{lambda_t} e^{-tau^2 lambda_t} e^{(1 + tau^2) lambda}
            x0(lambda) dlambda + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,      h = lambda_t - lambda_s

tau = 0 is the probability-flow ODE (DPM-Solver++), tau = 1 the reverse SDE. SA-Solver replaces
x0(lambda) by the Lagrange polynomial through the last model outputs (stochastic Adams methods):

* SA-Predictor (eq. 13, Adams-Bashforth): nodes lambda_i, lambda_{i-1}, ... (``predictor_order``
  of them) and the new noise z_i, from x_i to x_{i+1};
* SA-Corrector (eq. 14, Adams-Moulton): at step i, once m_i = x0(x_i) is known, x_i is redone
  from x_{i-1} with nodes lambda_i, lambda_{i-1}, ... (``corrector_order``) and the same noise
  z_{i-1} the predictor used.

Since the corrector starts from the same x_{i-1} with the same z_{i-1}, the same factor and the
same noise coefficient as the predictor of step i - 1, it differs from the predicted x_i only in
the weights: x_i^c = x_i + sum_j c_j m_{i-j} - sum_j p'_j m_{i-1-j} (p' the weights the last
predictor used). Corrector and predictor are then one linear map of (x_i, m_i, m_{i-1}, ...,
m_{i-K}, z_i), one fused ``dpm_solver_2m_step`` call per model call, with K = max(predictor
order, corrector order - 1) history operands (the last predictor's p' reaches m_{i-p}; the
corrector m_{i-c+1}): x0_prev, x0_prev2 and, for K = 3 / 4, x0_prev3 / x0_prev4.

The weights w_j = (1 + tau^2) alpha_t int e^{(1 + tau^2)(lambda - lambda_t)} l_j(lambda) dlambda
(l_j the Lagrange basis) are integrated on the host in float64 by Gauss-Legendre quadrature
(exact to rounding: an exponential times a polynomial); diffusers' closed forms in lambda^k and
its order-2 modifications ("as UniPC", used only for few-step sampling) are reproduced.
``algorithm_type="noise_prediction"``: the same with eps, x_t = (alpha_t / alpha_s) x_s - (1 +
tau^2) sigma_t int e^{lambda_t - lambda} l_j eps dlambda + tau sigma_t sqrt(e^{2h} - 1) z, as
diffusers writes it.

tau of a step is ``tau_func(t)`` of its model timestep t (diffusers' default: 1 for 200 <= t <=
800, else 0); the corrector of step i uses the tau of step i - 1 (its predictor's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, check_choice
from fastdiff.samplers.dpm_solver import _UNSET, DPMSolverPPSampler
from fastdiff.schedules import NoiseSchedule

__all__ = ["SASolverSampler", "sa_weights"]

ALGORITHMS = ("data_prediction", "noise_prediction")
_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)


def default_tau(t: float) -> float:
    """diffusers' ``SASolverScheduler`` default: tau = 1 for 200 <= t <= 800, else 0."""
    return 1.0 if 200 <= t <= 800 else 0.0


def sa_weights(lam: Sequence[float], lam_s: float, lam_t: float, tau: float, alpha_t: float,
               sigma_t: float, data: bool) -> np.ndarray:  # fmt: skip
    """Stochastic Adams weights (float64) of the nodes ``lam`` (newest first) over [lam_s,
    lam_t]: data, w_j = (1 + tau^2) alpha_t int e^{(1 + tau^2)(l - lam_t)} L_j(l) dl; noise,
    w_j = -(1 + tau^2) sigma_t int e^{lam_t - l} L_j(l) dl (L_j the Lagrange basis)."""
    nodes = np.asarray(lam, dtype=np.float64)
    half = 0.5 * (lam_t - lam_s)
    x = lam_s + half * (_GL_X + 1.0)
    c = 1.0 + tau * tau
    if data:
        kernel = c * alpha_t * np.exp(c * (x - lam_t))
    else:
        kernel = -c * sigma_t * np.exp(lam_t - x)
    out = np.empty(len(nodes))
    for j, nj in enumerate(nodes):
        basis = np.prod([(x - nk) / (nj - nk) for k, nk in enumerate(nodes) if k != j], axis=0)
        out[j] = half * float(np.sum(_GL_W * kernel * basis))
    return out


def _tau_value(tau: Any, t: int) -> float:
    """``tau_func``'s value at timestep ``t`` as a float: a real number (a bool, a numpy scalar
    or a one-element real tensor too), finite (NaN or inf made every sample NaN)."""
    if isinstance(tau, Tensor) and tau.numel() == 1 and not tau.is_complex():
        tau = tau.item()
    if not isinstance(tau, Real):
        got = (
            f"a tensor of shape {tuple(tau.shape)}"
            if isinstance(tau, Tensor)
            else type(tau).__name__
        )
        raise TypeError(f"tau_func: expected a real number tau, got {got} at t = {t}")
    if not math.isfinite(float(tau)):
        raise ValueError(f"tau_func: expected a finite tau, got {float(tau)} at t = {t}")
    return float(tau)


class SASolverSampler(DPMSolverPPSampler):
    """SA-Solver (see the module docstring): diffusers' ``SASolverScheduler`` step for step.

    Each model call is one fused ``dpm_solver_2m_step``: row ``[a, s, c_x, w0, w1, c_noise,
    w2, 0, w3, w4]`` with x_{i+1} = c_x x_i + w0 m_i + w1 m_{i-1} + w2 m_{i-2} + w3 m_{i-3} + w4
    m_{i-4} + c_noise z_i (corrector of step i, then predictor, folded; 8 columns while
    ``history_depth`` <= 2); the op's "x0" m is the data prediction (or, with
    ``noise_prediction``, the noise estimate: the row's (a, s) slots are chosen so). As
    diffusers, noise is drawn on every step (z_i, its std 0 where tau = 0), so the same
    ``generator`` gives diffusers' samples. The step reads ``history_depth`` = max(predictor
    order, corrector order - 1) earlier model outputs (the op's x0_prev .. x0_prev4).

    Args:
        schedule, steps, prediction_type ("epsilon", "v_prediction", "sample"),
            timestep_spacing (default "linspace"), steps_offset, lambda_min_clipped,
            thresholding, dynamic_thresholding_ratio, sample_max_value (data prediction only),
            use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: as
            :class:`~fastdiff.samplers.DPMSolverPPSampler` and diffusers' ``SASolverScheduler``
            (the run ends at the noise level of t = 0, not at 0).
        predictor_order: 1, 2 (default), 3 or 4 (diffusers recommends 3 for unconditional
            sampling).
        corrector_order: 1, 2 (default), 3 or 4.
        tau_func: tau of a step from its model timestep t (default: 1 on 200 <= t <= 800, else
            0); evaluated once per step when the sampler is built, with t a 0-d int64 tensor
            as diffusers' step passes it; its value must be a finite real number.
        algorithm_type: ``"data_prediction"`` (default) or ``"noise_prediction"``.
        lower_order_final: lower orders on the last steps (diffusers' default True).
    """

    name = "sa_solver"
    #: ``sample(mask=...)`` refuses it with this reason
    no_inpaint = (
        "SASolverSampler does not inpaint: diffusers' SA-Corrector redoes each step from the "
        "sample before the pipeline's blend (its last_sample), fastdiff's fused corrector from "
        "the blended one, which differ where the mask is soft (use another sampler)"
    )
    #: DPMSolverPPSampler's order slot (its rows are not used): 3 gives the CUDA-graph loop its
    #: x0_prev2 buffer; ``history_depth`` 3 / 4 adds x0_prev3 / x0_prev4
    solver_order = 3

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        predictor_order: int = 2,
        corrector_order: int = 2,
        tau_func: Callable[[float], float] | None = None,
        algorithm_type: str = "data_prediction",
        lower_order_final: bool = True,
        lambda_min_clipped: float = -math.inf,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ) -> None:
        for name, v in (("predictor_order", predictor_order),
                        ("corrector_order", corrector_order)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, Integral) or not 1 <= v <= 4:
                raise ValueError(f"{name}: expected an int in 1..4 (as diffusers), got {v!r}")
        check_choice("algorithm_type", algorithm_type, ALGORITHMS)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                "prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got "
                f"{prediction_type!r}"
            )
        if thresholding and algorithm_type == "noise_prediction":
            raise ValueError(
                "thresholding: only with algorithm_type='data_prediction' (diffusers' "
                "noise_prediction thresholding indexes its tables with a missing timestep)"
            )
        if tau_func is not None and not callable(tau_func):
            raise TypeError(
                f"tau_func: expected a callable t -> tau, got {type(tau_func).__name__}"
            )
        self.predictor_order = int(predictor_order)
        self.corrector_order = int(corrector_order)
        #: earlier model outputs a step reads (the CUDA-graph loop's history buffers): diffusers'
        #: max(predictor_order, corrector_order - 1), the cap of its lower_order_nums
        self.history_depth = max(self.predictor_order, self.corrector_order - 1)
        self.coef_width = 10 if self.history_depth > 2 else 8  # x0_prev3 / x0_prev4's columns
        self.tau_func = default_tau if tau_func is None else tau_func
        self.sa_algorithm = algorithm_type
        self.data = algorithm_type == "data_prediction"
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            solver_order=3,
            lower_order_final=lower_order_final,
            final_sigmas_type="sigma_min",
            lambda_min_clipped=lambda_min_clipped,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            algorithm_type="sde-dpmsolver++",  # noise on every step (the rows are SA-Solver's)
        )

    # ------------------------------------------------------------------ rows
    def _grid_timesteps(self) -> np.ndarray:
        """A sigma grid's timesteps; as diffusers' ``SASolverScheduler`` the run ends at the
        grid's own last sigma (repeated: a last step of zero length), not at t = 0's."""
        ts = super()._grid_timesteps()
        self._grid[-1] = self._grid[-2]
        return ts

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: diffusers' ``SASolverScheduler.add_noise`` is DDPM's, sqrt(ab_t) x0 +
        sqrt(1 - ab_t) eps at step i's integer timestep t (:meth:`Sampler._noising`), also on a
        Karras / exponential / beta grid, where that is not the grid's sigma_i (DPM-Solver's
        ``add_noise``, which this class would inherit, uses sigma_i)."""
        return Sampler._noising(self, i)

    def _draw_noise(
        self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
    ) -> Tensor:
        """z in x's dtype: diffusers' SASolverScheduler draws ``randn_tensor`` in the model
        output's dtype (under fp16 / bf16 other values than a rounded float32 draw), not in
        float32 as DPM-Solver++'s SDE step, whose draw this class would inherit."""
        return Sampler._draw_noise(self, x, generator)

    def taus(self) -> list[float]:
        """tau of each step: ``tau_func`` of its model timestep, passed as diffusers' step
        passes it (an element of its int64 ``timesteps``: a 0-d tensor, so a tau_func written
        for diffusers' scheduler, e.g. with torch ops on t, works here)."""
        return [_tau_value(self.tau_func(torch.tensor(int(t))), int(t)) for t in self._ts]

    def _orders_at(self, i: int, k: int) -> tuple[int, int]:
        """(predictor order, order of the corrector run at step i) for step i as the k-th step
        of a run (k = 0: no corrector), as diffusers' ``this_*_order`` (lower_order_final and
        the warm-up ``lower_order_nums``)."""
        n = self.steps

        def p_of(j: int, kk: int) -> int:
            p = min(self.predictor_order, n - j) if self.lower_order_final else self.predictor_order
            return min(p, kk + 1)

        if k == 0:
            return p_of(i, 0), 0
        j = i - 1  # the corrector order was set by the previous step
        c = min(self.corrector_order, n - j + 1) if self.lower_order_final else self.corrector_order
        return p_of(i, k), min(c, k + 1)

    def _row(self, i: int, k: int, grid) -> np.ndarray:
        alpha, sigma, lam, taus = grid
        p_ord, c_ord = self._orders_at(i, k)
        c_x, w, noise = self._predictor(i, p_ord, grid)
        w = np.concatenate([w, np.zeros(5 - len(w))])  # weights of m_i .. m_{i-4}
        if c_ord:
            # x_i^c = x_i + sum_j c_j m_{i-j} - sum_j p'_j m_{i-1-j}: then the predictor on it
            pp_ord = self._orders_at(i - 1, k - 1)[0]
            _, w_prev, _ = self._predictor(i - 1, pp_ord, grid)
            corr = self._corrector(i, c_ord, grid)
            delta = np.zeros(5)
            delta[: len(corr)] += corr
            delta[1 : 1 + len(w_prev)] -= w_prev
            w = w + c_x * delta
        if self.data:
            a, s = alpha[i], sigma[i]
        else:  # the op's m is eps: epsilon -> "sample" (m = output); v: (sigma, -alpha); x0
            a, s = {"epsilon": (1.0, 1.0), "v_prediction": (sigma[i], -alpha[i]),
                    "sample": (sigma[i], alpha[i])}[self.prediction_type]  # fmt: skip
        row = [a, s, c_x, w[0], w[1], noise, w[2], 0.0, w[3], w[4]]
        return np.array(row[: 8 if self.history_depth <= 2 else 10])

    def _predictor(self, i: int, order: int, grid) -> tuple[float, np.ndarray, float]:
        """(factor of x_i, weights of m_i, m_{i-1}, ..., noise std) of step i's SA-Predictor."""
        alpha, sigma, lam, taus = grid
        tau, h = taus[i], lam[i + 1] - lam[i]
        nodes = [lam[i - j] for j in range(order)]
        w = sa_weights(nodes, lam[i], lam[i + 1], tau, alpha[i + 1], sigma[i + 1], self.data)
        if self.data:
            if order == 2:  # diffusers' modification for few-step sampling (as UniPC)
                c = 1.0 + tau * tau
                d = c * alpha[i + 1] * (h * h / 2 - (h * c - 1 + math.exp(-c * h)) / (c * c))
                d /= lam[i] - lam[i - 1]
                w[0] += d
                w[1] -= d
            c_x = math.exp(-tau * tau * h) * sigma[i + 1] / sigma[i]
            noise = sigma[i + 1] * math.sqrt(max(1.0 - math.exp(-2.0 * tau * tau * h), 0.0))
        else:
            c_x = alpha[i + 1] / alpha[i]
            noise = tau * sigma[i + 1] * math.sqrt(max(math.exp(2.0 * h) - 1.0, 0.0))
        return c_x, w, noise

    def _corrector(self, i: int, order: int, grid) -> np.ndarray:
        """Weights of m_i, m_{i-1}, ... of the SA-Corrector run at step i (over [lambda_{i-1},
        lambda_i], tau of step i - 1)."""
        alpha, sigma, lam, taus = grid
        tau, h = taus[i - 1], lam[i] - lam[i - 1]
        nodes = [lam[i - j] for j in range(order)]
        w = sa_weights(nodes, lam[i - 1], lam[i], tau, alpha[i], sigma[i], self.data)
        if self.data and order == 2:
            c = 1.0 + tau * tau
            d = c * alpha[i] * (h / 2 - (h * c - 1 + math.exp(-c * h)) / (c * c * h))
            w[0] += d
            w[1] -= d
        return w

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` (``[steps x 10]`` for a ``history_depth`` of 3 / 4) rows of
        a run from step 0; ``_rows64[u + 1]`` holds the rows of a step that is the u-th of its
        run (u < history_depth), for runs that start later."""
        ratio = self._ratios()
        alpha = [1.0 / math.sqrt(1.0 + r * r) for r in ratio]
        sigma = [r * a for r, a in zip(ratio, alpha, strict=True)]
        lam = [math.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
        grid = (alpha, sigma, lam, self.taus())
        n, depth = self.steps, self.history_depth
        rows = {u + 1: np.stack([self._row(i, min(u, i), grid) for i in range(n)])
                for u in range(max(depth, 2) + 1)}  # fmt: skip
        self._rows64 = rows
        self._need = [min(i, depth) for i in range(n)]
        #: (predictor order, corrector order) of each step in a run from step 0
        self.step_orders = tuple(self._orders_at(i, min(i, depth)) for i in range(n))
        self._fallback_tables: dict[tuple[int, torch.device], Tensor] = {}
        return rows[max(depth, 2) + 1]

    @property
    def _op_prediction(self) -> str:
        if self.data:
            return self.prediction_type
        return {"epsilon": "sample", "v_prediction": "v_prediction",
                "sample": "epsilon"}[self.prediction_type]  # fmt: skip

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of step ``i`` from the op's m (trajectories; a new tensor, as the
        CUDA-graph loop's m is a static buffer): m, or with ``noise_prediction`` (x - sigma_i
        eps) / alpha_i."""
        if self.data:
            return m.clone()
        r = float(self._ratios()[i])
        a = 1.0 / math.sqrt(1.0 + r * r)
        return ((x.float() - a * r * m.float()) / a).to(x.dtype)

    def _kept(self) -> int:
        return self.history_depth

    def config(self) -> dict[str, Any]:
        # history_depth: the CUDA-graph loop's history buffers (a captured step's operands)
        return {**super().config(), "sa_algorithm": self.sa_algorithm,
                "history_depth": self.history_depth}  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, predictor_order={self.predictor_order}, "
            f"corrector_order={self.corrector_order}, algorithm_type={self.sa_algorithm!r}, "
            f"prediction_type={self.prediction_type!r}, schedule={self.schedule!r})"
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
        x0_prev: Tensor | None | object = _UNSET,
        x0_prev2: Tensor | None | object = _UNSET,
        x0_prev3: Tensor | None | object = _UNSET,
        x0_prev4: Tensor | None | object = _UNSET,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Step ``i``: the corrector of x_i (from step i > 0 of a run) and the predictor to
        x_{i+1}, one fused call. The history m_{i-1}, ..., m_{i-K} (K = ``history_depth``) is
        kept on the sampler and used as far as steps i - 1, i - 2, ... were the last ones it ran
        (for this x shape): a run that starts later warms up as diffusers' ``lower_order_nums``.
        Pass ``x0_prev`` .. ``x0_prev4`` (m_{i-1} .. m_{i-4}; ``None``: not available) to manage
        it yourself (CUDA graphs: buffers, and ``coef`` from a static buffer whose row decides
        what is read). z_i is ``noise``, else drawn from ``generator``, else in-kernel Philox
        from ``generator_state`` (its offset advanced in place), else torch's global generator.
        x must be the previous step's output. ``return_x0``: also the x0 prediction (with
        ``noise_prediction`` and a caller-managed history: the op's m, the noise estimate)."""
        given = (x0_prev, x0_prev2, x0_prev3, x0_prev4)
        x_next, m, external = self._multistep(model_output, i, x, given, noise, guidance_scale,
                                              generator, coef, generator_state)  # fmt: skip
        if not return_x0:
            return x_next
        if not self.data and not external:
            return x_next, self.x0_of(m, i, x)
        return x_next, m
