"""UniPC multistep sampler (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", arXiv:2302.04867), as diffusers' ``UniPCMultistepScheduler``."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable, Sequence
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._history import RunRows, read_operands
from fastdiff.samplers._solver_common import (
    FINAL_SIGMAS,
    sigma_grid_timesteps,
    threshold_config,
    thresholded_x0,
)
from fastdiff.samplers.base import (
    Sampler,
    _unipc_ops,
    check_choice,
    set_x0_options,
)
from fastdiff.samplers.dpm_solver import DPMSolverPPSampler
from fastdiff.samplers.flow_sigmas import FlowOptions, flow_timesteps, unipc_flow_sigmas
from fastdiff.samplers.sigmas import karras_sigmas, pick_sigma_grid
from fastdiff.schedules import NoiseSchedule

__all__ = ["UniPCSampler"]

SOLVER_TYPES = ("bh1", "bh2")
# diffusers' UniPCMultistepScheduler.__init__ maps these (DPM-Solver's names) to "bh2"
BH2_ALIASES = ("midpoint", "heun", "logrho")
_UNSET = object()


def _step_indices(value: object) -> list[int]:
    """``disable_corrector`` as sorted ints; a string, or an entry that is not an integer
    (diffusers compares step indices with ``in``: 1.5 or "1" would never match), is refused."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"disable_corrector: expected a list of step indices, got {type(value).__name__}"
        )
    out = set()
    for k in value:
        index = None
        if isinstance(k, Real) and not isinstance(k, bool) and float(k).is_integer():
            index = int(k)
        elif not isinstance(k, (bool, Real)) and hasattr(k, "__index__"):  # a 0-d int tensor
            with contextlib.suppress(TypeError):
                index = operator.index(k)
        if index is None:
            raise TypeError(f"disable_corrector: expected integer step indices, got {k!r} in it")
        out.add(index)
    return sorted(out)


class UniPCSampler(RunRows, DPMSolverPPSampler):
    """UniPC: the UniP-2 predictor and the UniC corrector in data prediction (``predict_x0``).

    With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t), the
    data predictions m_i = x0_theta(x_i, t_i) (x_i: the sample the model sees) and, for a
    step from s = t_i to t = t_{i+1}, h = lambda_t - lambda_s, hh = -h, h phi_1 = e^{hh} - 1 and
    B(h) = hh ("bh1") or e^{hh} - 1 ("bh2") (the paper's two choices of B(h), section 3):

    UniP-p (the paper's UniP, section 3.2, in data prediction), with
    r_k = (lambda_{s_k} - lambda_s)/h and D_k = (m_{s_k} - m_s) / r_k for the p - 1 earlier
    points::

        x_t = (sigma_t/sigma_s) x_s - alpha_t h phi_1 m_s - alpha_t B(h) sum_k a_k D_k

    For p = 2 diffusers takes a_1 = 1/2 (one earlier point, r_1 = (lambda_{i-1} - lambda_i)/h);
    for p = 3 (r_2 = (lambda_{i-2} - lambda_i)/h) a solves the leading 2 x 2 block of UniC's
    system below, [[1, 1], [r_1, r_2]] a = (b_1, b_2).

    UniC-p (the paper's UniC, section 3.1: the corrector, applied at the start of the next step
    with the fresh model output m_t at the predicted x_t; ``last`` = the x_s the predictor
    started from)::

        x_t^c = (sigma_t/sigma_s) last - alpha_t h phi_1 m_s
                - alpha_t B(h) (sum_k rho_k D_k + rho_p (m_t - m_s))

    rho solves R rho = b (UniC's order conditions: R_{jk} = r_k^{j-1},
    b_j = phi_{j+1}(hh) j! / B(h) with the phi functions of the exponential integrator,
    r_p = 1); for p = 1 diffusers takes rho = 1/2. The model is not called at x^c: the next
    predictor starts from it.

    Orders as diffusers' scheduler: the predictor's order at step i is
    min(solver_order, steps - i (``lower_order_final``), steps run so far + 1); the corrector
    at step i has the order the predictor of step i - 1 had, and is skipped at a run's first
    step and when i - 1 is in ``disable_corrector``. The last step's x is the predictor's
    (uncorrected).

    Fused form. Everything above is linear in (x_i, last, m_i, m_{i-1}, m_{i-2}, m_{i-3}) with
    scalar weights that depend only on the schedule, so step i is one
    :func:`fastdiff.ops.unipc_step` call with the float64-computed row
    ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2]``::

        m_i     = x0(x_i, model_output)                                  (a = alpha_i, s = sigma_i)
        x_c     = c_x x_i + c_last last + c_m m_i + c_m1 m_{i-1} + c_m2 m_{i-2}
                  + c_m3 m_{i-3}                                                  (UniC)
        x_{i+1} = p_xc x_c + p_m m_i + p_m1 m_{i-1} + p_m2 m_{i-2}                (UniP)

    Without a corrector c_x = 1 and c_last = c_m = c_m1 = c_m2 = 0. For UniC-1,
    c_last = sigma_i/sigma_{i-1}, c_m = -alpha_i B(h)/2, c_m1 = -alpha_i (h phi_1 - B(h)/2); for
    UniC-2 (rho_1, rho_2 from the 2 x 2 system) c_m = -alpha_i B(h) rho_2,
    c_m2 = -alpha_i B(h) rho_1 / r_1, c_m1 = -alpha_i (h phi_1 - B(h)(rho_1/r_1 + rho_2)). For
    UniP-1, p_xc = sigma_{i+1}/sigma_i, p_m = -alpha_{i+1} h phi_1, p_m1 = 0; for UniP-2,
    p_m1 = -alpha_{i+1} B(h) / (2 r_1) and p_m = -alpha_{i+1} h phi_1 - p_m1. Order 3
    (``solver_order=3``, the weights c_m3 and p_m2; zero at orders 1 and 2): UniC-3 with
    (rho_1, rho_2, rho_3) from the 3 x 3 system over r = (r_1, r_2, 1),
    r_k = (lambda_{i-1-k} - lambda_{i-1})/h, gives c_m = -alpha_i B(h) rho_3,
    c_m2 = -alpha_i B(h) rho_1 / r_1, c_m3 = -alpha_i B(h) rho_2 / r_2 and
    c_m1 = -alpha_i h phi_1 - c_m - c_m2 - c_m3; UniP-3 with (a_1, a_2) gives
    p_m1 = -alpha_{i+1} B(h) a_1 / r_1, p_m2 = -alpha_{i+1} B(h) a_2 / r_2 and
    p_m = -alpha_{i+1} h phi_1 - p_m1 - p_m2. (The final step to sigma = 0 has h = inf:
    x_n = m_{n-1}. A sigma grid's last step from sigma_min to sigma_min has h = 0: x_n = x_c,
    where diffusers' order-3 predictor divides 0 by 0.)

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"linspace"``; the
            ``linspace`` / ``leading`` grids over ``steps + 1`` points as diffusers').
        solver_order: 2 (diffusers' default: UniP-2 / UniC-2), 1 (UniP-1 / UniC-1) or 3
            (UniP-3 / UniC-3, which diffusers recommends for unconditional sampling).
        solver_type: ``"bh2"`` (B(h) = e^{-h} - 1, default) or ``"bh1"`` (B(h) = -h);
            ``"midpoint"``, ``"heun"`` and ``"logrho"`` mean ``"bh2"``, as in diffusers.
        predict_x0: True (data prediction; the noise-prediction variant is not implemented).
        lower_order_final: first-order predictor at the last step.
        disable_corrector: step indices whose predictor output is not corrected.
        final_sigmas_type: ``"zero"`` or ``"sigma_min"``, as :class:`DPMSolverPPSampler`.
        clip_sample, clip_sample_range: clip the data prediction (a fastdiff extension, off).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding
            of the data prediction (a separate torch pass before the fused op).
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid, as
            diffusers builds it (at most one).
        use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, mu, shift_terminal,
            sigmas: diffusers' flow-matching grid (Wan 2.1: ``prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=5.0``; :mod:`~fastdiff.samplers.flow_sigmas`):
            ``linspace(1, 1/T, steps + 1)[:-1]`` or the custom ``sigmas``, shifted (static
            ``flow_shift``, or with ``mu`` under ``use_dynamic_shifting``, which needs it),
            stretched to ``shift_terminal``; alpha_t = 1 - sigma, sigma_t = sigma, the model
            called at ``int(sigma T)``. With ``use_karras_sigmas`` the Karras grid of the VP
            betas' noise levels k becomes k / (k + 1), as diffusers (the shift unused).
            ``final_sigmas_type="sigma_min"`` ends at the grid's last sigma (a final h = 0 step).
    """

    name = "unipc"
    default_spacing = "linspace"
    is_multistep = True
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
        solver_type: str = "bh2",
        predict_x0: bool = True,
        lower_order_final: bool = True,
        disable_corrector: Iterable[int] = (),
        final_sigmas_type: str = "zero",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
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
        shift_terminal: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        self._flow = FlowOptions(use_flow_sigmas, flow_shift, use_dynamic_shifting,
                                 time_shift_type, mu, shift_terminal)  # fmt: skip
        if self._flow.dynamic and self._flow.mu is None:  # diffusers' set_timesteps, any grid
            raise ValueError("mu: use_dynamic_shifting=True needs mu (as diffusers), got None")
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(
                f"solver_order: expected 1, 2 (diffusers' default) or 3, got {solver_order!r}"
            )
        if solver_type in BH2_ALIASES:
            solver_type = "bh2"
        if solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"solver_type: expected one of {list(SOLVER_TYPES)}, got {solver_type!r}"
            )
        if predict_x0 is not True:
            raise ValueError(
                f"predict_x0: only True (data prediction, diffusers' default) is implemented, "
                f"got {predict_x0!r}"
            )
        disabled = _step_indices(disable_corrector)
        grid = pick_sigma_grid(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        grids = [grid] if grid else []
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        set_x0_options(self, clip_sample, clip_sample_range, thresholding,
                       dynamic_thresholding_ratio, sample_max_value)  # fmt: skip
        self.sigma_grid: str | None = grid
        prediction_type = self._check_flow([g for g in grids if g != "karras"], None,
                                           prediction_type)  # fmt: skip
        self.flow_shift = self._flow.shift  # UniPC's dynamic shift reads mu itself
        self._custom_sigmas = sigmas
        if sigmas is not None:
            if not self._flow.on:
                raise ValueError(
                    "sigmas: custom sigmas need use_flow_sigmas=True (as diffusers), got "
                    "use_flow_sigmas=False"
                )
            if self.sigma_grid is not None:
                raise ValueError("sigmas: not with use_karras_sigmas=True (diffusers reverses it)")
            if steps is None:
                steps = len(sigmas) if hasattr(sigmas, "__len__") else steps
        self.solver_order = int(solver_order)
        self.solver_type = solver_type
        self.disable_corrector = disabled
        self.lower_order_final = bool(lower_order_final)
        self.final_sigmas_type = final_sigmas_type
        self.algorithm_type, self.sde = "dpmsolver++", False  # read by inherited helpers only
        self.reset()
        Sampler.__init__(
            self,
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        self.prediction_type = "flow_prediction" if self.flow_prediction else self.prediction_type

    # ------------------------------------------------------------------ timesteps and tables
    def _flow_timesteps(self) -> np.ndarray:
        """diffusers' UniPC flow grid (or Karras grid read as flow sigmas k / (k + 1)) and its
        model timesteps ``int(sigma T)``; sets ``self._grid`` (float32 values, the final one)."""
        T = self.schedule.num_train_timesteps
        if self.sigma_grid == "karras":
            train = self._train_sigmas32()
            k = karras_sigmas(train[0].item(), train[-1].item(), self.steps)
            sig = k / (k + 1)
        else:
            sig = unipc_flow_sigmas(self.steps, T, self._flow, self._custom_sigmas)
        last = sig[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self._grid = np.append(sig, last).astype(np.float32).astype(np.float64)
        return flow_timesteps(sig, T, type(self).__name__)

    def _grid_timesteps(self) -> np.ndarray:
        """As :meth:`DPMSolverPPSampler._grid_timesteps`, but Karras timesteps are always
        rounded (diffusers' UniPC has no cosine exception)."""
        sig, ts = sigma_grid_timesteps(self.sigma_grid, self._train_sigmas32(), self.steps,
                                       rounded=self.sigma_grid == "karras")  # fmt: skip
        last = sig[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self._grid = np.append(sig, last).astype(np.float32).astype(np.float64)
        return ts

    def _ratios(self) -> list[float]:
        """As :meth:`DPMSolverPPSampler._ratios`; repeated spaced timesteps (h = 0 between two
        steps: diffusers' UniPC returns NaN) are refused with UniPC's name."""
        if self.sigma_grid is None and not self.use_flow_sigmas:
            ts = [int(t) for t in self._ts]
            if len(set(ts)) < len(ts):
                raise ValueError(
                    f"steps: {self.steps} steps with timestep_spacing={self.timestep_spacing!r} "
                    f"over {self.schedule.num_train_timesteps} training timesteps repeat "
                    f"timesteps ({ts[:3]} ... {ts[-3:]}), which UniPC cannot step between "
                    "(diffusers' UniPCMultistepScheduler returns NaN there); use fewer steps or "
                    "timestep_spacing='trailing'"
                )
        # diffusers' float32 levels at the timesteps, as DPM-Solver++ (float64 levels there with
        # the float32 sigma_min as the end made the last step inconsistent: sigma_50 ~2.7e-6
        # off, 1e-5 from diffusers where its own fp32 error is ~5e-7)
        return super()._ratios()

    def _rows(self, ratio: list[float], since: int | None) -> np.ndarray:
        """float64 ``[steps x 12]``: row i for step i when ``since`` steps of this run precede
        it (None: i of them, a run from step 0)."""
        alpha, sigma = self._alpha_sigma(ratio)
        lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in
               zip(alpha, sigma, strict=True)]  # fmt: skip
        n, bh1, order = self.steps, self.solver_type == "bh1", self.solver_order

        def hphi_bh(h: float) -> tuple[float, float, float]:
            hh = -h
            hphi1 = math.expm1(hh)  # h phi_1(hh) = e^{hh} - 1
            return hh, hphi1, (hh if bh1 else hphi1)

        def b_vec(hh: float, hphi1: float, bh: float, k: int) -> np.ndarray:
            """b_j = phi_{j+1}(hh) j! / B(h), j = 1..k (diffusers' recursion, in float64)."""
            out, hphi_k, fact = [], hphi1 / hh - 1.0, 1.0
            for j in range(1, k + 1):
                out.append(hphi_k * fact / bh)
                fact *= j + 1
                hphi_k = hphi_k / hh - 1.0 / fact
            return np.array(out)

        rows = np.zeros((n, self.coef_width), dtype=np.float64)
        for i in range(n):
            d = i if since is None else min(since, i)
            row = rows[i]
            row[0], row[1] = (1.0 if self.flow_prediction else alpha[i]), sigma[i]
            # UniC: corrects the previous step's predictor output, with that step's order
            p_c = min(order, n - i + 1 if self.lower_order_final else order, d)
            if p_c >= 1 and (i - 1) not in self.disable_corrector:
                h = lam[i] - lam[i - 1]
                if h == 0.0:
                    raise ValueError(
                        f"steps: steps {i - 1} and {i} share the noise level {ratio[i]:.6g}; "
                        "UniPC cannot step between them; use fewer steps"
                    )
                hh, hphi1, bh = hphi_bh(h)
                a_t = alpha[i]
                row[3] = sigma[i] / sigma[i - 1]
                rho_2, r2 = 0.0, 1.0
                if p_c == 1:
                    rho_c, rho_1, r1 = 0.5, 0.0, 1.0
                elif p_c == 3:  # R rho = b, R_jk = r_k^(j-1), r = (r1, r2, 1)
                    r1 = (lam[i - 2] - lam[i - 1]) / h
                    r2 = (lam[i - 3] - lam[i - 1]) / h
                    rk = np.array([r1, r2, 1.0])
                    rho = np.linalg.solve(np.stack([rk**0, rk, rk**2]), b_vec(hh, hphi1, bh, 3))
                    rho_1, rho_2, rho_c = (float(v) for v in rho)
                else:
                    r1 = (lam[i - 2] - lam[i - 1]) / h
                    hphi_k = hphi1 / hh - 1.0  # phi_2 (times 1!)
                    b1 = hphi_k / bh
                    hphi_k = hphi_k / hh - 0.5  # phi_3 (times 2!)
                    b2 = hphi_k * 2.0 / bh
                    rho_1 = (b1 - b2) / (1.0 - r1)  # R rho = b, R = [[1, 1], [r1, 1]]
                    rho_c = b1 - rho_1
                row[4] = -a_t * bh * rho_c
                row[6] = -a_t * bh * rho_1 / r1
                row[10] = -a_t * bh * rho_2 / r2
                row[5] = -a_t * hphi1 - row[4] - row[6] - row[10]
            else:
                row[2] = 1.0
            # UniP: from this (corrected) sample to the next noise level
            p_p = min(order, n - i if self.lower_order_final else order, d + 1)
            h = lam[i + 1] - lam[i]
            if h == 0.0:  # a sigma grid's last sigma_min to sigma_min again: the identity
                row[7] = 1.0
                continue
            hh, hphi1, bh = hphi_bh(h)
            a_t = alpha[i + 1]
            row[7] = sigma[i + 1] / sigma[i]
            row[8] = -a_t * hphi1
            if p_p >= 2:
                if math.isinf(h):
                    raise ValueError(
                        "lower_order_final: False with final_sigmas_type='zero' makes the last "
                        f"UniP-{p_p} step divide by the infinite log-SNR step (diffusers returns "
                        "inf / NaN there); use lower_order_final=True or "
                        "final_sigmas_type='sigma_min'"
                    )
                r1 = (lam[i - 1] - lam[i]) / h
                if p_p == 2:
                    row[9] = -a_t * bh * 0.5 / r1
                else:  # UniP-3: rho from the leading 2 x 2 block of R rho = b
                    r2 = (lam[i - 2] - lam[i]) / h
                    r_mat = np.array([[1.0, 1.0], [r1, r2]])
                    rho = np.linalg.solve(r_mat, b_vec(hh, hphi1, bh, 2))
                    row[9] = -a_t * bh * float(rho[0]) / r1
                    row[11] = -a_t * bh * float(rho[1]) / r2
                row[8] -= row[9] + row[11]
        return rows

    def coefficients(self) -> np.ndarray:
        ratio = self._ratios()
        # the rows of a run's first solver_order steps (0, 1, 2 steps of history): a run that
        # starts at i > 0 warms up as diffusers' lower_order_nums; later rows are the table's
        self._since64 = [self._rows(ratio, k) for k in range(self.solver_order)]
        self._variant_tables: dict[tuple[int, torch.device], Tensor] = {}
        return self._rows(ratio, None)

    def _needs_noise_row(self, i: int) -> bool:
        return False

    def _run_warmup(self) -> int:
        return self.solver_order  # a run's first solver_order steps take rows of their own

    def config(self) -> dict:
        return {
            "cls": type(self).__name__,
            "prediction_type": self._op_prediction,
            # order 3 reads m_{i-3} (a CUDA graph's fourth static history buffer)
            "solver_order": self.solver_order,
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            **threshold_config(self),
        }

    def reset(self) -> None:
        self._last: Tensor | None = None
        self._m1: Tensor | None = None
        self._m2: Tensor | None = None
        self._m3: Tensor | None = None
        self._prev_i = -1  # the step whose outputs the history holds
        self._start = 0  # the first step of the current run

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
        """One fused UniPC call with the caller's history and coefficient row (CUDA graphs):
        returns ``(x_c, m_i, x_{i+1})``; the sampler's own history is left alone. ``m_prev3``
        (m_{i-3}) is read by order 3's corrector only."""
        self._check_step_args(model_output, i, x, None, guidance_scale)
        ops = _unipc_ops()
        if self.thresholding:
            x0 = thresholded_x0(self, x, model_output, guidance_scale, coef[0], coef[1],
                                self._op_prediction)  # fmt: skip
            return ops.unipc_step(x, x0, coef, last, m_prev, m_prev2, m_prev3=m_prev3,
                                  prediction_type="sample")  # fmt: skip
        return ops.unipc_step(
            x,
            model_output,
            coef,
            last,
            m_prev,
            m_prev2,
            m_prev3=m_prev3,
            prediction_type=self._op_prediction,
            clip_range=self.clip_sample_range if self.clip_sample else None,
            guidance_scale=guidance_scale,
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
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One UniPC step at ``timesteps[i]``: correct x (UniC, with the model output at x),
        then predict the sample at the next noise level (UniP). One fused op call.

        The history (the previous corrected sample and data predictions) is kept on the
        sampler and used only when step ``i - 1`` was the last one it ran for this x shape and
        device; a run that starts at ``i > 0`` (img2img, diffusers' ``set_begin_index``) or a
        reused sampler starts without a corrector and with a first-order predictor, as
        diffusers.
        UniPC is deterministic: ``noise``, ``generator`` and ``generator_state`` are unused.
        Returns x_{i+1}, or ``(x_{i+1}, m_i)`` with ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        m1 = self._m1
        valid, _, row, r = self._run_call(i, x, m1)
        if not valid:
            self._m2, self._m3 = None, None
        hist = [self._last, m1, self._m2, self._m3] if valid else [None] * 4
        x_c, m, x_next = self.step_with_history(model_output, i, x, row, *read_operands(r, hist),
                                                guidance_scale=guidance_scale)  # fmt: skip
        self._m3 = self._m2 if valid else None
        self._last, self._m2, self._m1, self._prev_i = x_c, m1 if valid else None, m, i
        return (x_next, m) if return_x0 else x_next
