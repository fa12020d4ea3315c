"""Euler sampler of the probability-flow ODE (Karras et al., 2022, arXiv:2206.00364)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, _ops, custom_timesteps, vp_of_sigma
from fastdiff.samplers.sigmas import make_sigma_grid, pick_sigma_grid, sigma_to_t, train_sigmas32
from fastdiff.schedules import NoiseSchedule

__all__ = ["EulerSampler"]


def custom_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    """A user noise-level list as diffusers' ``EulerDiscreteScheduler.set_timesteps(sigmas=...)``
    takes it: ``steps + 1`` values, the last the final noise level (kept, not replaced by 0),
    rounded to float32 as diffusers stores them; here also finite, strictly descending, > 0
    but the last (>= 0), which diffusers does not check."""
    if isinstance(sigmas, (str, bytes)):  # iterable, but "12" is not [1.0, 2.0]
        raise TypeError(f"sigmas: expected a list of floats, got {sigmas!r}")
    try:
        sig = np.asarray([float(s) for s in sigmas], dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas: expected a list of floats, got {sigmas!r}") from None
    if len(sig) < 2:
        raise ValueError(
            f"sigmas: expected steps + 1 >= 2 noise levels (the last the final one), got "
            f"{sig.tolist()}"
        )
    sig = sig.astype(np.float32).astype(np.float64)
    if not np.isfinite(sig).all() or sig[-1] < 0 or np.any(sig[:-1] <= 0):
        raise ValueError(f"sigmas: expected finite values > 0 (the last >= 0), got {sig.tolist()}")
    if np.any(np.diff(sig) >= 0):
        raise ValueError(f"sigmas: expected strictly descending noise levels, got {sig.tolist()}")
    return sig


def grid_steps(steps: int | None, n: int, what: str) -> int | None:
    """``steps`` of a sampler given a custom grid of ``n`` steps: None -> n; another -> error."""
    if steps is None:
        return n
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps != n:
        raise ValueError(f"steps: got {steps} but {what}; pass one of them (or the same number)")
    return steps


def grid_end(name: str, v: float | None) -> float | None:
    """A ``sigma_min`` / ``sigma_max`` option: None, or a finite float > 0 (a wrong type is a
    TypeError, a wrong value a ValueError)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
        raise TypeError(f"{name}: expected None or a finite float > 0, got {type(v).__name__}")
    if v is not None and not 0.0 < float(v) < math.inf:
        raise ValueError(f"{name}: expected None or a finite float > 0, got {v!r}")
    return None if v is None else float(v)


class EulerSampler(Sampler):
    """Euler method on the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1).

    With the variance-exploding noise level sigma_t = sqrt((1 - ab_t) / ab_t) and the sample
    x_sigma = x0 + sigma eps, the ODE is dx_sigma/dsigma = (x_sigma - D(x_sigma; sigma)) / sigma
    (Karras eq. 4 with s(t) = 1, sigma(t) = t and eq. 3's score (D - x) / sigma^2), D the denoiser
    (the x0 prediction). One Euler step from sigma_i to sigma_{i+1} (Algorithm 1, lines 4-5,
    without the Heun correction)::

        d             = (x_sigma - x0) / sigma_i                         (= eps)
        x_sigma_next  = x_sigma + (sigma_{i+1} - sigma_i) d

    fastdiff keeps the VP sample x = a x0 + s eps (a = sqrt(ab), s = sqrt(1 - ab)), i.e.
    x_sigma = x / a with a = 1 / sqrt(1 + sigma^2) (diffusers' ``scale_model_input``). In VP space
    the step is therefore::

        x_next = (a_{i+1} / a_i) x + a_{i+1} (sigma_{i+1} - sigma_i) eps

    where eps is the model's eps, or derived from its v / x0 prediction exactly as the ODE
    derivative d is (v: eps = a v + s x; x0: eps = (x - a x0) / s). The row passed to the fused
    ``sampler_step`` op is ``[a_i, s_i, 0, a_{i+1} (sigma_{i+1} - sigma_i), a_{i+1} / a_i, 0, 0,
    0]``; the last step goes to sigma = 0 (a = 1), where it returns the x0 prediction.

    As diffusers' ``EulerDiscreteScheduler`` (interpolation_type "linear", final sigma zero),
    sigma_i is interpolated linearly in t between the training sigmas; under ``linspace`` spacing
    (the default) the timesteps are fractional: ``timesteps`` holds them rounded to int64, or
    with ``fractional_timesteps`` diffusers' float32 values (``fastdiff.sample`` sets it for a
    diffusers model, as its pipelines call it there; the sample it sees, x = a x_sigma, is
    diffusers'). Start from x_T = ``init_noise_scale`` z in VP space: diffusers' pipelines start
    from x_sigma = ``init_noise_sigma`` z, sigma_0 z under ``linspace`` / ``trailing`` spacing.

    With ``use_karras_sigmas`` (Karras et al. 2022 eq. 5, rho = 7), ``use_exponential_sigmas``
    or ``use_beta_sigmas`` the steps are taken on that grid of noise levels instead
    (:mod:`fastdiff.samplers.sigmas`), between the noise levels of the first and last spaced
    timesteps (or ``sigma_max`` / ``sigma_min`` when given), as diffusers'
    ``EulerDiscreteScheduler`` builds it. diffusers then calls the model at the fractional
    training timestep of each grid sigma (log-sigma interpolation); fastdiff's timesteps are
    those, rounded or not as above, while the update uses the grid's sigmas exactly.

    Custom grids, as diffusers' ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)``
    (e.g. Align Your Steps): ``timesteps`` are the model timesteps themselves (sigma_i
    interpolated there, final sigma 0; not with a sigma grid option, as in diffusers);
    ``sigmas`` are ``steps + 1`` noise levels, the model timesteps then those of the grid
    sigmas (log-sigma interpolation, rounded) and the last value the final noise level. A final
    sigma > 0 is kept as diffusers keeps it: the last step then returns diffusers' sample
    x_sigma = x0 + sigma_N eps (a = 1 on that step, not the VP a_N x_sigma).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"linspace"``).
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: step on that sigma grid (at
            most one; the beta grid uses Beta(0.6, 0.6) and needs scipy).
        sigma_min, sigma_max: the grid's end noise levels (default: those of the last and the
            first spaced timestep); only read with a grid, as in diffusers.
        timesteps: custom model timesteps, strictly descending in [0, T - 1]; ``steps`` is then
            their number (or None). ``timestep_spacing`` and ``steps_offset`` are unused.
        sigmas: custom noise levels, strictly descending, ``steps + 1`` of them (``steps``: None
            or their number - 1). As in diffusers, the sigma grid options, ``sigma_min`` /
            ``sigma_max``, ``timestep_spacing`` and ``steps_offset`` are then unused.
        fractional_timesteps: ``timesteps`` are diffusers' float32 model timesteps (fractional
            under ``linspace`` spacing and on sigma grids) instead of those rounded to int64.
    """

    name = "euler"
    default_spacing = "linspace"
    _custom: np.ndarray | None = None  # custom timesteps (also for subclasses without them)
    _user_sigmas: np.ndarray | None = None  # custom sigmas, [steps + 1] (likewise)

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        fractional_timesteps: bool = False,
    ) -> None:
        if not isinstance(fractional_timesteps, bool):
            raise TypeError(
                f"fractional_timesteps: expected a bool, got {type(fractional_timesteps).__name__}"
            )
        #: call the model at diffusers' float32 timesteps (fractional under ``linspace``
        #: spacing and on sigma grids) instead of those rounded to int64
        self.fractional_timesteps = fractional_timesteps
        #: "karras", "exponential", "beta", "custom" (``sigmas``) or None (steps at the spaced
        #: or custom timesteps)
        self.sigma_grid: str | None = pick_sigma_grid(
            use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        self._custom, self._user_sigmas = None, None
        if timesteps is not None and sigmas is not None:
            raise ValueError("timesteps, sigmas: pass one of them (as diffusers), got both")
        if timesteps is not None and isinstance(schedule, NoiseSchedule):
            if self.sigma_grid is not None:
                raise ValueError(
                    f"timesteps: custom timesteps cannot be combined with "
                    f"use_{self.sigma_grid}_sigmas=True (as in diffusers): the grid decides "
                    "the timesteps"
                )
            self._custom = custom_timesteps(timesteps, schedule.num_train_timesteps, whole=True)
            steps = grid_steps(steps, len(self._custom), f"{len(self._custom)} custom timesteps")
        if sigmas is not None:
            self._user_sigmas = custom_sigmas(sigmas)
            n = len(self._user_sigmas) - 1
            steps = grid_steps(steps, n, f"{n + 1} custom sigmas ({n} steps)")
            self.sigma_grid = "custom"  # diffusers then ignores its sigma grid options
        self.sigma_min = grid_end("sigma_min", sigma_min)
        self.sigma_max = grid_end("sigma_max", sigma_max)
        self._grid: tuple[np.ndarray, np.ndarray] | None = None
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )

    def _spaced_frac(self) -> np.ndarray:
        """diffusers' (float32) spaced timesteps: fractional under ``linspace``."""
        if self._custom is not None:
            return self._custom.astype(np.float32)
        T, n = self.schedule.num_train_timesteps, self.steps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        ts = super()._make_timesteps()
        if ts.max() >= T:
            raise ValueError(
                f"steps_offset: timesteps {ts.max()}..{ts.min()} fall outside [0, {T - 1}]"
            )
        return ts.astype(np.float32)

    def _sigma_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas, fractional model timesteps), float64 ``[steps]`` each, of the sigma grid.

        As diffusers: the grid spans the float32 training noise levels interpolated at the first
        and last spaced timesteps (unless ``sigma_max`` / ``sigma_min`` are given), its
        timesteps come from :func:`~fastdiff.samplers.sigmas.sigma_to_t`, and its sigmas are
        kept in float32 (the values diffusers' step uses)."""
        if self._grid is None and self._user_sigmas is not None:
            sig = self._user_sigmas[:-1]
            ts = sigma_to_t(sig.astype(np.float32), np.log(train_sigmas32(self.schedule)))
            self._grid = (sig, ts)
        if self._grid is None:
            train = train_sigmas32(self.schedule)  # ascending in t
            ends = np.interp(self._spaced_frac(), np.arange(len(train)), train)
            lo = self.sigma_min if self.sigma_min is not None else ends[-1].item()
            hi = self.sigma_max if self.sigma_max is not None else ends[0].item()
            if not lo < hi and self.steps > 1:
                raise ValueError(
                    f"sigma_min, sigma_max: the {self.sigma_grid} sigma grid needs sigma_min < "
                    f"sigma_max, got {lo:.6g} and {hi:.6g}"
                )
            sig = make_sigma_grid(self.sigma_grid, lo, hi, self.steps)
            ts = sigma_to_t(sig, np.log(train))
            self._grid = (sig.astype(np.float32).astype(np.float64), ts)
        return self._grid

    def _frac_timesteps(self) -> np.ndarray:
        """diffusers' (float32) timesteps: fractional under ``linspace`` or a sigma grid."""
        if self.sigma_grid is not None:
            return self._sigma_grid()[1].astype(np.float32)
        return self._spaced_frac()

    def _make_timesteps(self) -> np.ndarray:
        frac = self._frac_timesteps()
        return frac if self.fractional_timesteps else np.round(frac).astype(np.int64)

    def config(self) -> dict[str, Any]:
        # the timesteps' dtype is the CUDA graph's t buffer's
        return {**super().config(), "fractional_timesteps": self.fractional_timesteps}

    def _noising(self, i: int) -> tuple[float, float]:
        """diffusers' img2img start x0 + sigma_i eps (``add_noise``) is the VP sample
        (x0 + sigma_i eps) / sqrt(1 + sigma_i^2) here (:func:`vp_of_sigma`)."""
        return vp_of_sigma(float(self.sigmas()[i]))

    @property
    def init_noise_scale(self) -> float:
        """x_T = init_noise_scale z, as diffusers' pipelines start: from ``init_noise_sigma`` z
        in sigma units, ``init_noise_sigma`` = sigma_max under ``linspace`` / ``trailing``
        spacing (k-diffusion's VE start, the spacings sampled from t = T - 1) and
        sqrt(sigma_max^2 + 1) otherwise; in VP units (x = x_sigma / sqrt(sigma^2 + 1)) that is
        sigma_max / sqrt(sigma_max^2 + 1), about 1 - 1 / (2 sigma_max^2), and 1."""
        if self.timestep_spacing not in ("linspace", "trailing"):
            return 1.0
        s = float(np.float32(self.sigmas()[0]))  # diffusers' float32 sigma_max
        return s / math.sqrt(s * s + 1.0)

    def sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: sigma_i at each step, then the final sigma (0 unless custom
        ``sigmas`` end above it)."""
        if self.sigma_grid is not None:
            last = 0.0 if self._user_sigmas is None else self._user_sigmas[-1]
            return np.concatenate([self._sigma_grid()[0], [last]])
        ab = self.schedule.alphas_cumprod.clone()
        if self.schedule.rescale_betas_zero_snr:
            ab[-1] = 2.0**-24  # as diffusers: keep sigma finite at zero terminal SNR
        # user betas reaching 1 (a zero-SNR schedule given as betas) divided by zero here
        ab[ab == 0] = 2.0**-24
        ab = ab.numpy().astype(np.float64)
        train = np.sqrt((1.0 - ab) / ab)  # sigma at t = 0 .. T-1
        sig = np.interp(self._spaced_frac().astype(np.float64), np.arange(len(train)), train)
        return np.concatenate([sig, [0.0]])

    def coefficients(self) -> np.ndarray:
        sig = self.sigmas()
        a = [1.0 / math.sqrt(1.0 + s * s) for s in sig]  # a = sqrt(ab) = 1 / sqrt(1 + sigma^2)
        a[-1] = 1.0  # the last step returns diffusers' x_sigma (x0 + sigma_N eps; x0 at 0)
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            c_eps = a[i + 1] * (sig[i + 1] - sig[i])  # a_{i+1} (sigma_{i+1} - sigma_i)
            rows[i] = [a[i], sig[i] * a[i], 0.0, c_eps, a[i + 1] / a[i], 0.0, 0.0, 0.0]
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        return False

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
        """One Euler step x_i -> x_{i+1} (VP space) at step index ``i`` (one fused op call).

        ``model_output`` is the raw model output (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``). ``noise``, ``generator`` and ``generator_state`` are accepted for
        API symmetry and unused (the ODE step is deterministic). ``coef`` overrides the table
        row (CUDA graphs pass a static buffer). Returns x_{i+1}, or ``(x_{i+1}, x0)`` with
        ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        return _ops().sampler_step(
            x,
            model_output,
            coef,
            prediction_type=self.prediction_type,
            guidance_scale=guidance_scale,
            return_x0=return_x0,
        )
