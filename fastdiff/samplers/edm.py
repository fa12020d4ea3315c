"""Samplers of models in the EDM formulation (Karras et al. 2022, arXiv:2206.00364): diffusers'
``EDMEulerScheduler`` ("edm_euler"; CosXL, SDXL-EDM) and ``EDMDPMSolverMultistepScheduler``
("edm_dpm++"; Playground v2.5), step for step.

EDM preconditioning (Karras et al. 2022, Table 1), sigma_d = ``sigma_data``: the model F sees
``c_in(sigma) X`` at the timestep ``c_noise(sigma) = log(sigma) / 4`` and the denoiser is::

    c_in  = 1 / sqrt(sigma^2 + sigma_d^2)        c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)
    c_out = +-sigma sigma_d / sqrt(sigma^2 + sigma_d^2)  (+ epsilon, - v_prediction, diffusers)
    D(X; sigma) = c_skip X + c_out F(c_in X; c_noise)

where X = x0 + sigma eps is diffusers' sample. fastdiff keeps the state in model-input units,
``u_i = c_in(sigma_i) X_i``, so the model input is the state itself (no extra pass) and D is
linear in (u, F): ``D = (u - s F) / a`` with ``a = c_in / c_skip`` and ``s = -c_out c_in /
c_skip`` (the fused ops' epsilon form). Every update of X is linear in X and the denoised
predictions, so in u-units it is one fused op call whose float64 row carries the factor
``c_in(sigma_{i+1}) / c_in(sigma_i)``; the last step returns diffusers' X itself (factor 1 in
place of c_in), the data when the final sigma is 0.

diffusers starts from ``X_T = sqrt(sigma_max^2 + 1) z`` (its ``init_noise_sigma``); in u-units
that is ``init_noise_scale z`` with ``init_noise_scale = c_in(sigma_0) sqrt(sigma_max^2 + 1)``
(1.00006 for Playground's sigma_max = 80, sigma_d = 0.5), which ``fastdiff.sample`` applies to
x_T ~ N(0, I) (or the ``noise`` given), so the same draw gives diffusers' samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._solver_common import FINAL_SIGMAS, SOLVER_TYPES
from fastdiff.samplers.base import Sampler, check_choice, check_solver_order, set_x0_options
from fastdiff.samplers.dpm_solver import ALGORITHM_TYPES, DPMSolverPPSampler

__all__ = ["EDMDPMSolverSampler", "EDMEulerSampler", "edm_sigmas"]

SIGMA_SCHEDULES = ("karras", "exponential")
EDM_PREDICTIONS = ("epsilon", "v_prediction")


def edm_sigmas(
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    schedule: str,
    ramp_dtype: torch.dtype,
    ramp: Tensor | None = None,
) -> np.ndarray:
    """The ``steps`` float32 noise levels (as float64) of diffusers' EDM ``set_timesteps``:
    Karras et al. 2022 eq. 5, ``(sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))
    ^rho`` on the ramp r = linspace(0, 1, steps) in ``ramp_dtype`` (float64 in
    ``EDMEulerScheduler``, float32 in ``EDMDPMSolverMultistepScheduler``), or ``"exponential"``:
    evenly spaced in log sigma (float32), descending. Computed with torch in those dtypes so the
    float32 values are diffusers' own. ``ramp``: the positions r of a custom Karras grid
    (``EDMEulerScheduler.set_timesteps(sigmas=ramp)``), converted to ``ramp_dtype``."""
    if schedule == "karras":
        if ramp is None:
            ramp = torch.linspace(0, 1, steps, dtype=ramp_dtype)
        else:
            ramp = ramp.to(ramp_dtype)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
    else:
        sig = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps).exp().flip(0)
    return sig.to(torch.float32).double().numpy()


def _pos(name: str, v: Any) -> float:
    """``v`` as a finite float > 0: TypeError for a non-number (a str, None, a bool), ValueError
    for a value <= 0, NaN or inf."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name}: expected a finite float > 0, got {type(v).__name__}")
    if not 0.0 < float(v) < math.inf:
        raise ValueError(f"{name}: expected a finite float > 0, got {v!r}")
    return float(v)


def _ramp(sigmas: Any, steps: int, schedule: str) -> Tensor | None:
    """``EDMEulerSampler(sigmas=)``: a 1-D sequence / array / tensor of ``steps`` finite
    real ramp positions, as a CPU tensor (a tensor's own float dtype kept, so its values are
    the ones diffusers converts); None stays None."""
    if sigmas is None:
        return None
    if schedule != "karras":
        raise ValueError(
            f"sigmas: a custom ramp needs sigma_schedule='karras', got {schedule!r} (diffusers' "
            "EDMEulerScheduler reads only len(sigmas) of an exponential grid, ignoring its "
            "values; pass steps instead)"
        )
    if isinstance(sigmas, (str, bytes, Real)) or not hasattr(sigmas, "__len__"):
        raise TypeError(
            "sigmas: expected a 1-D sequence of ramp positions in [0, 1] (diffusers' "
            f"EDMEulerScheduler.set_timesteps(sigmas=)), got {type(sigmas).__name__}"
        )
    if isinstance(sigmas, Tensor):
        if sigmas.dtype == torch.bool or sigmas.is_complex():
            raise TypeError(f"sigmas: expected real ramp positions, got dtype {sigmas.dtype}")
        ramp = sigmas.detach().cpu()
        ramp = ramp if ramp.is_floating_point() else ramp.double()
    else:
        vals = list(sigmas)
        bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, Real)]
        if bad:
            raise TypeError(
                f"sigmas: expected real ramp positions, got {type(bad[0]).__name__} {bad[0]!r}"
            )
        ramp = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    if ramp.ndim != 1 or len(ramp) == 0:
        raise ValueError(f"sigmas: expected a non-empty 1-D ramp, got shape {tuple(ramp.shape)}")
    if len(ramp) != steps:
        raise ValueError(
            f"sigmas: expected one ramp position per step, steps = {steps}, got {len(ramp)} "
            f"(diffusers runs len(sigmas) steps: pass steps={len(ramp)})"
        )
    r = ramp.double()
    if not torch.isfinite(r).all():
        raise ValueError(f"sigmas: expected finite ramp positions, got {r.tolist()}")
    if ((r < 0) | (r > 1)).any() or (len(r) > 1 and not (r[1:] > r[:-1]).all()):
        raise ValueError(
            "sigmas: expected ramp positions r in [0, 1], strictly increasing (diffusers' "
            "EDMEulerScheduler.set_timesteps(sigmas=) feeds them to the Karras formula: "
            "sigma = (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, r = 0 "
            f"at sigma_max, 1 at sigma_min; they are not noise levels), got {r.tolist()}"
        )
    return ramp


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


class _EDMBase:
    """The settings, grid and preconditioning shared by the two EDM samplers."""

    default_steps = 50
    #: the model output's kind ("epsilon" / "v_prediction"); the ops always see "epsilon"
    model_prediction_type = "epsilon"

    def _edm_setup(self, schedule, steps, sigma_min, sigma_max, sigma_data, sigma_schedule,
                   num_train_timesteps, prediction_type, rho, final_sigmas_type):  # fmt: skip
        if schedule is not None:
            raise TypeError(
                "schedule: an EDM sampler takes no VP noise schedule (expected None, got "
                f"{type(schedule).__name__}); pass its settings (sigma_min, ...) as options"
            )
        for name, v in (("steps", steps), ("num_train_timesteps", num_train_timesteps)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v}")
        self.sigma_min = _pos("sigma_min", sigma_min)
        self.sigma_max = _pos("sigma_max", sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min, sigma_max: expected sigma_min < sigma_max, got {sigma_min} and "
                f"{sigma_max}"
            )
        self.sigma_data = _pos("sigma_data", sigma_data)
        self.rho = _pos("rho", rho)
        check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
        if prediction_type not in EDM_PREDICTIONS:
            raise ValueError(
                f"prediction_type: expected one of {list(EDM_PREDICTIONS)} (diffusers' EDM "
                f"preconditioning has no other), got {prediction_type!r}"
            )
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        self.sigma_schedule = sigma_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.model_prediction_type = prediction_type
        self.final_sigmas_type = final_sigmas_type
        self.schedule = None
        self.steps = int(steps)
        self.num_inference_steps = self.steps
        #: the op's view of the model output: D = (u - s F) / a (see the module docstring)
        self.prediction_type = "epsilon"

    def _set_grid(self, sig: np.ndarray, last: float) -> None:
        #: float64 ``[steps + 1]``: diffusers' float32 sigmas, then the final one
        self.sigmas = np.append(sig, last).astype(np.float32).astype(np.float64)
        #: the model's timesteps c_noise = log(sigma) / 4, float32 ``[steps]`` (diffusers')
        self.timesteps = 0.25 * torch.log(torch.from_numpy(sig.astype(np.float32)))
        self._ts_dev: dict[torch.device, Tensor] = {}
        self._tables: dict[torch.device, Tensor] = {}

    # float64 preconditioning (Karras et al. 2022, Table 1)
    def c_in(self, sigma: float) -> float:
        """1 / sqrt(sigma^2 + sigma_data^2)."""
        return 1.0 / math.sqrt(sigma * sigma + self.sigma_data**2)

    def c_skip(self, sigma: float) -> float:
        """sigma_data^2 / (sigma^2 + sigma_data^2)."""
        return self.sigma_data**2 / (sigma * sigma + self.sigma_data**2)

    def c_out(self, sigma: float) -> float:
        """sigma sigma_data / sqrt(sigma^2 + sigma_data^2), negated for v_prediction."""
        c = sigma * self.sigma_data / math.sqrt(sigma * sigma + self.sigma_data**2)
        return -c if self.model_prediction_type == "v_prediction" else c

    def _op_as(self, sigma: float) -> tuple[float, float]:
        """(a, s) with the denoiser D = (u - s F) / a of the state u = c_in X."""
        a = self.c_in(sigma) / self.c_skip(sigma)
        return a, -self.c_out(sigma) * a

    def _out_scale(self, i: int) -> float:
        """The u-unit factor of step i's result: c_in(sigma_{i+1}), 1 on the last step."""
        return 1.0 if i == self.steps - 1 else self.c_in(float(self.sigmas[i + 1]))

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: diffusers' X = x0 + sigma_i eps (``add_noise``) as the state u = c_in X."""
        sigma = float(self.sigmas[i])
        return self.c_in(sigma), self.c_in(sigma) * sigma

    @property
    def init_noise_scale(self) -> float:
        """x_T = init_noise_scale z in u-units: c_in(sigma_0) sqrt(sigma_max^2 + 1) (diffusers'
        ``init_noise_sigma`` z, times c_in of the first noise level)."""
        return self.c_in(float(self.sigmas[0])) * math.sqrt(self.sigma_max**2 + 1.0)

    def to_diffusers(self, u: Tensor, i: int) -> Tensor:
        """diffusers' sample X_i from the state u before step ``i`` (``i = steps``: after the
        last step, where they coincide)."""
        return u if i >= self.steps else u / self.c_in(float(self.sigmas[i]))


class EDMEulerSampler(_EDMBase, Sampler):
    """Euler steps of the EDM probability-flow ODE (Karras et al. 2022, Algorithm 1 without the
    second-order correction): diffusers' ``EDMEulerScheduler``.

    With D the preconditioned denoiser (module docstring) and r = sigma_{i+1} / sigma_i::

        X_{i+1} = X_i + (sigma_{i+1} - sigma_i) (X_i - D) / sigma_i = r X_i + (1 - r) D

    In u-units (u_i = c_in(sigma_i) X_i, D = c_skip X + c_out F) one ``sampler_step`` call with
    row ``[a, s, 0, k (1 - r) c_out, k (r + (1 - r) c_skip) / c_in, c_noise, 0, 0]``, k =
    c_in(sigma_{i+1}) (1 on the last step, which returns X: D itself when the final sigma is 0)
    and c_noise = 0 unless the step churns (below).

    Args:
        schedule: must be None (no VP noise schedule).
        steps: number of Euler steps (model calls).
        sigma_min, sigma_max, sigma_data, sigma_schedule ("karras" / "exponential"),
            num_train_timesteps (unused, as in diffusers' step), prediction_type ("epsilon" /
            "v_prediction"), rho, final_sigmas_type ("zero" / "sigma_min": the grid's last
            sigma): as diffusers' ``EDMEulerScheduler``.
        s_churn, s_tmin, s_tmax, s_noise: the churn of diffusers' ``step`` (Karras et al.
            2022, Algorithm 2, lines 5-6; default 0: deterministic). With gamma_i =
            min(s_churn / steps, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax (else 0), the
            step first moves X to sigma_hat = (1 + gamma_i) sigma_i, X_hat = X + s_noise
            sqrt(sigma_hat^2 - sigma_i^2) z, then takes the Euler step from sigma_hat with D at
            sigma_hat. As diffusers, the model output is the one at (c_in(sigma_i) X,
            c_noise(sigma_i)), taken before the churn; still one op call, z its noise operand
            (``noise=`` / ``generator=`` / in-kernel Philox). ``return_x0``'s D then leaves out
            the churn noise term (diffusers' includes it).
        sigmas: a custom grid as diffusers' ``EDMEulerScheduler.set_timesteps(sigmas=...)``
            takes it: **ramp positions r, not noise levels**, one per step (``len(sigmas) ==
            steps``), in [0, 1] and strictly increasing, each mapped by the Karras formula
            ``sigma = (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
            in float64 (r = 0: sigma_max, r = 1: sigma_min; the default grid is r =
            linspace(0, 1, steps)); the final sigma follows ``final_sigmas_type``. Karras
            only: diffusers' exponential grid uses just ``len(sigmas)``, so a ramp there is
            refused. (diffusers itself takes any values, also out of [0, 1] or descending,
            giving NaN or upward "steps": refused here.)
    """

    name = "edm_euler"

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        sigmas: Sequence[float] | Tensor | None = None,
    ) -> None:
        self._edm_setup(schedule, steps, sigma_min, sigma_max, sigma_data, sigma_schedule,
                        num_train_timesteps, prediction_type, rho, final_sigmas_type)  # fmt: skip
        ramp = _ramp(sigmas, self.steps, self.sigma_schedule)
        for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax),
                        ("s_noise", s_noise)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, Real):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if math.isnan(v):
                raise ValueError(f"{name}: expected a float, got {v!r}")
        if s_churn < 0.0 or math.isinf(s_churn):
            raise ValueError(f"s_churn: expected a finite float >= 0, got {s_churn!r}")
        self.s_churn, self.s_tmin, self.s_tmax = float(s_churn), float(s_tmin), float(s_tmax)
        self.s_noise = float(s_noise)
        #: the custom Karras ramp (``sigmas=``) as given, None on the default linspace ramp
        self.ramp = ramp
        sig = edm_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho,
                         self.sigma_schedule, torch.float64, ramp)  # fmt: skip
        self._set_grid(sig, float(sig[-1]) if final_sigmas_type == "sigma_min" else 0.0)
        self._coef64 = self.coefficients()
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        self._noise_steps = [bool(self._coef64[i, 5] != 0.0) for i in range(self.steps)]

    def _gamma(self, sigma: float) -> float:
        """diffusers' churn factor of a step at ``sigma``: its window test compares the float32
        sigma tensor with the bounds, i.e. with the bounds rounded to float32."""
        with np.errstate(over="ignore"):  # a bound beyond float32's range is +-inf there
            lo, hi = (float(np.float32(v)) for v in (self.s_tmin, self.s_tmax))
        if not lo <= sigma <= hi:
            return 0.0
        return min(self.s_churn / self.steps, 2**0.5 - 1)

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` rows of ``sampler_step`` (see the class docstring; with
        churn, c_skip / c_out at sigma_hat and the noise column)."""
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            gamma = self._gamma(s)
            s_hat = s * (gamma + 1.0)
            r, k, c = s_next / s_hat, self._out_scale(i), self.c_in(s)
            a = c / self.c_skip(s_hat)  # D = c_skip(s_hat) X + c_out(s_hat) F = (u - s F) / a
            keep = k * (r + (1.0 - r) * self.c_skip(s_hat))  # the factor of X_hat
            c_noise = keep * self.s_noise * math.sqrt(s_hat**2 - s**2) if gamma > 0 else 0.0
            c_eps = k * (1.0 - r) * self.c_out(s_hat)
            rows[i] = [a, -self.c_out(s_hat) * a, 0.0, c_eps, keep / c, c_noise, 0.0, 0.0]
        return rows

    def config(self) -> dict[str, Any]:
        return {**super().config(), "churn": any(self._noise_steps)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, sigma_schedule={self.sigma_schedule!r}, "
            f"prediction_type={self.model_prediction_type!r}, sigma_data={self.sigma_data})"
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
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One Euler step u_i -> u_{i+1} (one fused ``sampler_step`` call; the last step returns
        diffusers' X). ``model_output`` is F (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``); a churn step's z is ``noise``, else in-kernel Philox from
        ``generator_state``, else a draw from ``generator`` (unused on ODE steps). ``coef``
        overrides the table row (CUDA graphs). Returns u_{i+1}, or ``(u_{i+1}, D)`` with
        ``return_x0`` (D the denoised sample)."""
        return self._one_op_step(model_output, i, x, noise, guidance_scale, generator, coef,
                                 generator_state, return_x0)  # fmt: skip


class EDMDPMSolverSampler(_EDMBase, DPMSolverPPSampler):
    """DPM-Solver++ (orders 1-3, ODE; orders 1-2, SDE) on the EDM noise levels: diffusers'
    ``EDMDPMSolverMultistepScheduler``.

    diffusers runs :class:`~fastdiff.samplers.DPMSolverPPSampler`'s multistep updates with
    alpha_t = 1 and sigma_t = sigma (the sample X = x0 + sigma eps, lambda = -log sigma) on the
    denoised predictions D of the EDM preconditioning; the step orders follow the same
    ``lower_order_final`` / ``euler_at_final`` / final-sigma rules. In u-units each step is one
    fused ``dpm_solver_2m_step`` with row ``[a, s, k c_x / c_in(sigma_s), k w0, k w1, k c_noise,
    k w2, 0]``, (c_x, w, c_noise) the X-unit coefficients of DPM-Solver++ and k =
    c_in(sigma_t) (1 on the last step); its history is D, in data units. A step of zero length
    (a ``final_sigmas_type="sigma_min"`` last step when the grid already ends there) is first
    order, the identity (diffusers' heun / third-order formulas give NaN there: 0/0).

    Args:
        schedule: must be None (no VP noise schedule).
        steps: number of steps (model calls).
        sigma_min, sigma_max, sigma_data, sigma_schedule, num_train_timesteps (unused),
            prediction_type ("epsilon" / "v_prediction"), rho, solver_order (1, 2, 3),
            thresholding, dynamic_thresholding_ratio, sample_max_value, algorithm_type
            ("dpmsolver++" / "sde-dpmsolver++", the latter with solver_order 1 or 2),
            solver_type ("midpoint" / "heun"), lower_order_final, euler_at_final,
            final_sigmas_type ("zero" / "sigma_min": then the final sigma is ``sigma_min``
            itself): as diffusers' ``EDMDPMSolverMultistepScheduler``.
    """

    name = "edm_dpm++"

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        self._edm_setup(schedule, steps, sigma_min, sigma_max, sigma_data, sigma_schedule,
                        num_train_timesteps, prediction_type, rho, final_sigmas_type)  # fmt: skip
        if algorithm_type == "deis":  # diffusers registers it as dpmsolver++
            algorithm_type = "dpmsolver++"
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_solver_order(solver_order)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        if algorithm_type == "sde-dpmsolver++" and solver_order == 3:
            raise ValueError(
                "solver_order: 3 with algorithm_type='sde-dpmsolver++' is not defined by "
                "diffusers' EDMDPMSolverMultistepScheduler (its third-order update is ODE only); "
                "use solver_order 1 or 2"
            )
        # no clipping (diffusers' EDM scheduler has none); thresholding must be a bool here
        set_x0_options(self, False, 1.0, _flag("thresholding", thresholding),
                       dynamic_thresholding_ratio, sample_max_value)  # fmt: skip
        self.algorithm_type = algorithm_type
        self.sde = algorithm_type == "sde-dpmsolver++"
        self.solver_order = int(solver_order)
        self.solver_type = SOLVER_TYPES[solver_type]
        self.lower_order_final = _flag("lower_order_final", lower_order_final)
        self.euler_at_final = _flag("euler_at_final", euler_at_final)
        self.sigma_grid = self.sigma_schedule
        self._hist: list[tuple[Tensor, int]] = []
        sig = edm_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho,
                         self.sigma_schedule, torch.float32)  # fmt: skip
        self._set_grid(sig, self.sigma_min if final_sigmas_type == "sigma_min" else 0.0)
        self._coef64 = self.coefficients()
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        self._noise_steps = [self.sde] * self.steps

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` rows of ``dpm_solver_2m_step`` at full history (see the
        class docstring); the lower-order rows of a run with less history are kept too."""
        sig = [float(v) for v in self.sigmas]
        lam = [-math.log(v) if v > 0 else math.inf for v in sig]  # lambda = -log sigma
        n = self.steps
        orders = self._orders()
        rows = {k: np.zeros((n, 8), dtype=np.float64) for k in (1, 2, 3)}
        need = []
        for i in range(n):
            s_s, s_t = sig[i], sig[i + 1]
            k_t, c_s = self._out_scale(i), self.c_in(s_s)
            a, s_op = self._op_as(s_s)
            # e^{-h} = sigma_t / sigma_s; at most 1 (a final sigma_min a float32 ulp above the
            # grid's last: h = 0 there, not a step up)
            exp_neg_h = min(s_t / s_s, 1.0)
            c_x, c_noise = s_t / s_s, 0.0
            if self.sde:
                one_m_e2h = 1.0 - exp_neg_h * exp_neg_h
                c_x *= exp_neg_h
                phi = one_m_e2h
                c_noise = s_t * math.sqrt(one_m_e2h)
            else:
                phi = 1.0 - exp_neg_h
            h = max(lam[i + 1] - lam[i], 0.0)
            hs = [lam[i - j] - lam[i - j - 1] if i - j > 0 else 0.0 for j in range(2)]
            order = orders[i] if h != 0.0 else 1
            need.append(order - 1)
            for kk in (1, 2, 3):
                o = min(kk, order)
                w = (phi, 0.0, 0.0) if o == 1 else self._weights(o, h, *hs)
                rows[kk][i] = [a, s_op, k_t * c_x / c_s, k_t * w[0], k_t * w[1],
                               k_t * c_noise, k_t * w[2], 0.0]  # fmt: skip
        self._rows64 = rows
        self._need = need
        #: the order of each step in a run from step 0 (1, 2 or 3)
        self.step_orders = tuple(j + 1 for j in need)
        self._fallback_tables: dict[tuple[int, torch.device], Tensor] = {}
        return rows[3]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, sigma_schedule={self.sigma_schedule!r}, "
            f"prediction_type={self.model_prediction_type!r}, solver_order={self.solver_order}, "
            f"algorithm_type={self.algorithm_type!r})"
        )
