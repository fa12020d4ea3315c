"""DPM++ SDE ("DPM++ SDE Karras" with ``use_karras_sigmas``): k-diffusion's ``sample_dpmpp_sde``
as diffusers' ``DPMSolverSDEScheduler``, model call for model call.

The solver is DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095, Algorithm 1: second-order
singlestep, data prediction) with its intermediate point at r = 1/2 in lambda = -log sigma,
each of its two stages made an ancestral SDE step (Karras et al. 2022, arXiv:2206.00364,
section 4, the noise split of k-diffusion's ``get_ancestral_step``). With x_sigma = x0 +
sigma eps (VE units), D the denoiser (the model's x0 prediction), sigma_i -> sigma_{i+1}, the
log-midpoint sigma_m = exp((log sigma_i + log sigma_{i+1}) / 2) = sqrt(sigma_i sigma_{i+1}) and
the split of a step from sigma to sigma' with ``eta`` (1 in diffusers)::

    sigma_up   = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))
    sigma_down = sqrt(sigma'^2 - sigma_up^2)

one step is two model calls (k-diffusion's fac = 1 / (2 r) = 1: stage 2 uses D_2 alone)::

    stage 1:  x_m    = (d_1 / sigma_i) x_i + (1 - d_1 / sigma_i) D(x_i; sigma_i) + s_noise u_1 z_1
    stage 2:  x_next = (d_2 / sigma_i) x_i + (1 - d_2 / sigma_i) D(x_m; sigma_m) + s_noise u_2 z_2

(d_1, u_1) the split from sigma_i to sigma_m, (d_2, u_2) from sigma_i to sigma_{i+1}; (d / sigma)
x + (1 - d / sigma) D is the DPM-Solver++ first-order update e^{-h} x + (1 - e^{-h}) D with h =
log(sigma_i / d) (eq. 9 of arXiv:2211.01095 with alpha = 1). Both stages start from x_i. The
last step goes to sigma = 0: one Euler call landing on D (no stage 2, no noise), so N steps are
2N - 1 model calls. As diffusers, ``len(sampler)`` and ``timesteps`` count the model calls:
``[t_0, t(m_0), t_1, t(m_1), ..., t(m_{N-2}), t_{N-1}]`` (t(m) the fractional training
timestep of sigma_m, log-sigma interpolation; rounded to int64 unless ``fractional_timesteps``).

The noise. diffusers (and k-diffusion) draw z from one Brownian motion W over sigma (torchsde's
Brownian tree): z = (W(sigma') - W(sigma)) / sqrt(sigma - sigma') for the interval of the stage,
[sigma_m, sigma_i] for stage 1 and [sigma_{i+1}, sigma_i] for stage 2. The intervals overlap,
so z_1 and z_2 are correlated: with d1 = sigma_i - sigma_m, d2 = sigma_m - sigma_{i+1}, W's
increments over [sigma_m, sigma_i] and [sigma_{i+1}, sigma_m] are independent sqrt(d1) z_1 and
sqrt(d2) w, and the second stage's increment is their sum::

    z_2 = rho z_1 + sqrt(1 - rho^2) w,   rho = sqrt(d1 / (d1 + d2)),   z_1, w ~ N(0, I) independent

(and increments of different steps are independent: disjoint intervals). fastdiff draws z_1 and
w fresh (``noise=``, ``generator=`` or in-kernel Philox, as the other ancestral samplers; the
noise given to a stage-2 call is w), so its runs have the law of diffusers' exactly but not its
values for a seed (fastdiff does not depend on torchsde); given the same per-stage increments
(z_1 and z_2 = rho z_1 + sqrt(1 - rho^2) w), the runs agree step for step (tested).
:meth:`DPMSolverSDESampler.noise_split` gives (rho, sqrt(1 - rho^2)) per step.

Fused form. fastdiff keeps the VP sample x = a x_sigma (a = 1 / sqrt(1 + sigma^2), see
:class:`~fastdiff.samplers.euler.EulerSampler`). Each call is one
:func:`fastdiff.ops.dpm_solver_2m_step`, ``x_next = c_x x + c_x0 m + c_prev h1 + c_prev2 h2 +
c_noise z`` (m = the call's x0 prediction). Stage 1's row (h1, h2 unused)::

    [a_i, s_i, A, B, 0, C, 0, 0],  A = a_m (d_1 / sigma_i) / a_i, B = a_m (1 - d_1 / sigma_i),
                                   C = a_m s_noise u_1

so x_m = A x_i + B m_1 + C z_1 (VP). Stage 2 needs x_i and, for the correlated noise, z_1: it
is recovered from stage 2's own sample, z_1 = (x_m - A x_i - B m_1) / C, with h1 = x_i (the
stage-1 input) and h2 = m_1 (its x0 prediction) as history operands. With P = a_{i+1} (d_2 /
sigma_i) / a_i, Q = a_{i+1} (1 - d_2 / sigma_i), R = a_{i+1} s_noise u_2 and k = R rho / C::

    stage 2:  [a_m, s_m, k, Q, P - k A, R sqrt(1 - rho^2), -k B, 0]

which is P x_i + Q m_2 + R (rho z_1 + sqrt(1 - rho^2) w) exactly. k is O(1) whatever eta and
s_noise (u_2 / u_1 <= sqrt(2)), so the recovery costs about one rounding of x_m, not a
cancellation. Without noise (eta or s_noise 0) k = 0 and stage 2 reads x_i only. The last step's
row is [a, s, 0, 1, 0, 0, 0, 0] (x = m at sigma = 0).

Noise levels, as diffusers: the N step sigmas interpolated at diffusers' float64 spaced
timesteps between the float32 training sigmas (or its Karras / exponential / beta grid), then
float32; the midpoints and the ancestral splits from those float32 values (the midpoint as
diffusers computes it, in float32), coefficients in float64 on the host. The midpoint timesteps
are diffusers' (float64 log-midpoints of the float64 sigmas); ``fractional_timesteps`` gives
their float32 values (diffusers passes float64 timesteps; a diffusers model casts them to
float32). ``prediction_type="sample"`` works too (diffusers raises NotImplementedError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import _ops, advance_generator_state, vp_of_sigma
from fastdiff.samplers.euler import EulerSampler
from fastdiff.samplers.heun import _version
from fastdiff.samplers.lms import exp_beta_ends
from fastdiff.samplers.sigmas import make_sigma_grid, sigma_to_t, train_sigmas32
from fastdiff.schedules import NoiseSchedule

__all__ = ["DPMSolverSDESampler", "sde_split"]


def sde_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from ``sigma`` to ``sigma_next`` with
    k-diffusion's ``eta`` (``get_ancestral_step``): sigma_up = min(sigma_next, eta sqrt(
    sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)), sigma_down = sqrt(sigma_next^2 -
    sigma_up^2); eta = 1 is the DDPM posterior's noise, eta = 0 the ODE step."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    up = eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    up = min(sigma_next, up)
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def _finite_nonneg(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name}: expected a finite float >= 0, got {type(v).__name__}")
    if not 0.0 <= float(v) < math.inf:
        raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
    return float(v)


class DPMSolverSDESampler(EulerSampler):
    """DPM++ SDE: k-diffusion's ``sample_dpmpp_sde`` (r = 1/2), step for step as diffusers'
    ``DPMSolverSDEScheduler`` (see the module docstring for the math, the noise law and the
    fused rows).

    Args:
        schedule, prediction_type (``"epsilon"``, ``"v_prediction"``, ``"sample"``),
            timestep_spacing (default ``"linspace"``), steps_offset, use_karras_sigmas,
            use_exponential_sigmas, use_beta_sigmas, fractional_timesteps: as diffusers'
            ``DPMSolverSDEScheduler`` / :class:`~fastdiff.samplers.euler.EulerSampler` (the
            grids span the noise levels of the first and last spaced timesteps).
        sigma_min, sigma_max: the exponential / beta grid's end noise levels. As in diffusers'
            ``DPMSolverSDEScheduler``, whose exponential / beta grids read them from its config
            (the leftovers of e.g. an ``EulerDiscreteScheduler`` config it was made from with
            ``from_config``) while its default and Karras grids ignore them: checked, then
            used by those two grids only.
        steps: number of DPM++ SDE steps N (diffusers' ``num_inference_steps``): 2N - 1 model
            calls.
        s_noise: scale of the added noise (diffusers' ``step(s_noise=...)``, k-diffusion's
            ``s_noise``; default 1).
        eta: k-diffusion's ancestral ``eta`` (default 1, the only value diffusers has; 0 is the
            deterministic DPM-Solver++(2S) in sigma space).
        noise_sampler_seed: diffusers' seed of its Brownian tree; accepted and unused (fastdiff
            draws its noise from ``generator=`` / ``noise=`` / Philox, see the module docstring).
    """

    name = "dpm++_sde"
    is_multistep = True
    scheduler_order = 2  # img2img starts at a first stage, call 2 t_start
    graph_hist_buffers = 2  # the CUDA-graph loop keeps last and m_prev only (m_prev2 unread)

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
        s_noise: float = 1.0,
        eta: float = 1.0,
        noise_sampler_seed: int | None = None,
        fractional_timesteps: bool = False,
    ) -> None:
        self.s_noise = _finite_nonneg("s_noise", s_noise)
        self.eta = _finite_nonneg("eta", eta)
        if noise_sampler_seed is not None and (
            isinstance(noise_sampler_seed, bool) or not isinstance(noise_sampler_seed, int)
        ):
            raise TypeError(
                f"noise_sampler_seed: expected None or an int, got "
                f"{type(noise_sampler_seed).__name__}"
            )
        #: diffusers' Brownian-tree seed: unused (module docstring)
        self.noise_sampler_seed = noise_sampler_seed
        ends = exp_beta_ends(sigma_min, sigma_max, use_exponential_sigmas, use_beta_sigmas)
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

    # ------------------------------------------------------------------ grids
    def _spaced64(self) -> np.ndarray:
        """diffusers' float64 spaced timesteps of ``DPMSolverSDEScheduler.set_timesteps``."""
        T, n = self.schedule.num_train_timesteps, self.num_inference_steps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=float)[::-1].copy()
        if self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(float)
            return ts + self.steps_offset
        return np.arange(T, 0, -T / n).round().copy().astype(float) - 1.0

    def _make_timesteps(self) -> np.ndarray:
        #: number of DPM++ SDE steps N (``steps`` is the number of model calls, 2N - 1)
        self.num_inference_steps = n = self.steps
        train = train_sigmas32(self.schedule)  # float32, ascending in t
        log_train = np.log(train)
        ts = self._spaced64()
        if ts.max() > len(train) - 1:
            raise ValueError(
                f"steps_offset: timesteps {ts.max():g}..{ts.min():g} fall outside "
                f"[0, {len(train) - 1}]"
            )
        sig = np.interp(ts, np.arange(len(train)), train)  # float64
        if self.sigma_grid is not None:
            lo = self.sigma_min if self.sigma_min is not None else sig[-1].item()
            hi = self.sigma_max if self.sigma_max is not None else sig[0].item()
            if not lo < hi and n > 1:
                raise ValueError(
                    f"sigma_min, sigma_max: the {self.sigma_grid} sigma grid needs sigma_min < "
                    f"sigma_max, got {lo:.6g} and {hi:.6g}"
                )
            sig = make_sigma_grid(self.sigma_grid, lo, hi, n)
            ts = sigma_to_t(sig, log_train)
        # the midpoint timesteps: diffusers' float64 log-midpoints of the float64 sigmas
        lam = -np.log(sig)
        mid_ts = sigma_to_t(np.exp(-(lam[:-1] + np.diff(lam) * 0.5)), log_train)
        sig32 = torch.from_numpy(sig.astype(np.float32))
        # the midpoint sigma as diffusers' step computes it (float32 torch)
        t = sig32.log().neg()
        mid32 = (t[:-1] + (t[1:] - t[:-1]) * 0.5).neg().exp()
        self._sig = np.concatenate([sig32.double().numpy(), [0.0]])  # [N + 1]
        self._mid = np.concatenate([mid32.double().numpy(), [0.0]])  # [N], 0 at the last
        calls = np.empty(2 * n - 1, dtype=np.float64)
        calls[0::2], calls[1::2] = ts, mid_ts
        self.steps = 2 * n - 1
        calls32 = calls.astype(np.float32)
        return calls32 if self.fractional_timesteps else np.round(calls).astype(np.int64)

    def sigmas(self) -> np.ndarray:
        """float64 ``[N + 1]``: sigma_i of each step (diffusers' float32 values), then 0."""
        return self._sig.copy()

    def call_sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: the noise level of the sample each model call gets,
        ``[sigma_0, sigma_m0, sigma_1, sigma_m1, ..., sigma_{N-1}]``, then the final 0."""
        out = np.zeros(self.steps + 1, dtype=np.float64)
        out[0:-1:2] = self._sig[:-1]
        out[1:-1:2] = self._mid[:-1]
        return out

    def _noising(self, i: int) -> tuple[float, float]:
        """VP (x0 + sigma eps) / sqrt(1 + sigma^2) at the noise level of call i's sample."""
        return vp_of_sigma(float(self.call_sigmas()[i]))

    def noise_split(self) -> np.ndarray:
        """float64 ``[N - 1 x 2]``: (rho, sqrt(1 - rho^2)) of each two-stage step: stage 2's
        Brownian increment is z_2 = rho z_1 + sqrt(1 - rho^2) w (module docstring)."""
        out = np.zeros((self.num_inference_steps - 1, 2), dtype=np.float64)
        for j in range(self.num_inference_steps - 1):
            s, m, sn = self._sig[j], self._mid[j], self._sig[j + 1]
            d1, d2 = s - m, m - sn
            out[j] = math.sqrt(d1 / (d1 + d2)), math.sqrt(d2 / (d1 + d2))
        return out

    def coefficients(self) -> np.ndarray:
        sig, mid, eta, sn_ = self._sig, self._mid, self.eta, self.s_noise
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        split = self.noise_split()
        for j in range(self.num_inference_steps):
            s, m, nxt = sig[j], mid[j], sig[j + 1]
            a_s = vp_of_sigma(s)[0]
            if nxt == 0.0:  # the last step: Euler to sigma = 0 lands on D
                rows[2 * j, :4] = [a_s, s * a_s, 0.0, 1.0]
                continue
            a_m, a_n = vp_of_sigma(m)[0], vp_of_sigma(nxt)[0]
            d1, u1 = sde_split(s, m, eta)
            d2, u2 = sde_split(s, nxt, eta)
            A, B, C = a_m * (d1 / s) / a_s, a_m * (1.0 - d1 / s), a_m * sn_ * u1
            rows[2 * j, :6] = [a_s, s * a_s, A, B, 0.0, C]
            P, Q, R = a_n * (d2 / s) / a_s, a_n * (1.0 - d2 / s), a_n * sn_ * u2
            rho, rest = split[j]
            k = R * rho / C if C != 0.0 and R != 0.0 else 0.0
            noise = R * rest if k else R  # without z_1 (C = 0: d1 = 0, rho = 0) all of z_2 is w
            rows[2 * j + 1] = [a_m, m * a_m, k, Q, P - k * A, noise, -k * B, 0.0]
        return rows

    def blend_takeback(self, i: int) -> float:
        """Inpainting (:mod:`fastdiff._inpaint`): stage 2's weight k on its sample x_m, which
        it reads only to recover z_1; the blend's change of x_m is taken back k times from its
        result, so z_1 is stage 1's draw as in diffusers (exact for binary masks anyway)."""
        return float(self._coef64[i, 2]) if i % 2 == 1 else 0.0

    def _needs_noise_row(self, i: int) -> bool:
        # every call but the last (to sigma = 0) draws, as diffusers (none: eta or s_noise 0)
        return bool(self._coef64[i, 5] != 0.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_inference_steps} ({self.steps} model calls),"
            f" prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}, sigma_grid={self.sigma_grid!r}, s_noise={self.s_noise},"
            f" eta={self.eta}, schedule={self.schedule!r})"
        )

    def config(self) -> dict:
        # a noiseless run (eta or s_noise 0) has no noise operand in a captured graph
        return {**super().config(), "noise": self.eta * self.s_noise > 0.0}

    # ------------------------------------------------------------------ stepping
    def reset(self) -> None:
        """Forget the kept stage-1 input and x0 prediction."""
        self._x_in: Tensor | None = None
        self._m1: Tensor | None = None
        self._prev_i = -1
        self._prev_version: int | None = None

    def is_second_stage(self, i: int) -> bool:
        """Whether model call ``i`` is a midpoint stage (stage 2): the odd calls."""
        return i % 2 == 1

    def _history(self, i: int, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Stage 2's operands (x_i, m_1) kept from call ``i - 1``; (None, None) at stage 1."""
        if i % 2 == 0:
            return None, None
        prev = self._x_in
        kept = prev is not None and self._prev_i == i - 1
        if not kept or prev.shape != x.shape or prev.device != x.device:
            raise ValueError(
                f"i: model call {i} is the second (midpoint) stage of call {i - 1}, whose input "
                f"sample and x0 prediction this sampler did not keep (for this x); run call "
                f"{i - 1} first (start a run at an even call, as diffusers' timesteps[2 k:])"
            )
        if self._prev_version is not None and _version(prev) != self._prev_version:
            raise ValueError(
                f"x: the input sample of call {i - 1}, which the second stage reads, was "
                "modified in place after that call (pass a new tensor to each call)"
            )
        return prev, (self._m1 if self._coef64[i, 6] != 0.0 else None)

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
        """Model call ``i`` (one fused op call): stage 1 (even ``i``, x_i -> x_m) or stage 2
        (odd ``i``, x_m -> x_{i+1}), in VP space.

        ``model_output`` is the raw model output at ``timesteps[i]`` (``[2N, ...] = [uncond,
        cond]`` with ``guidance_scale``). Stage 2 reads the input sample and the x0 prediction
        of call ``i - 1``, which the sampler keeps (the input must not be modified in place
        in between). Noise: ``noise`` (stage 1: z_1; stage 2: the fresh part w of its Brownian
        increment, module docstring), else drawn with ``generator`` (a generator or one per
        sample), else in the kernel with Philox from ``generator_state`` (int64 ``[2]`` =
        (seed, offset) on x's device, its offset then advanced by ``x.numel()`` in place), else
        from torch's global generator. The last call (to sigma = 0) adds none. Returns the new
        sample, or ``(sample, x0)`` with ``return_x0``."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        x_in, m1 = self._history(i, x)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        _, m, x_next = self.step_with_history(model_output, i, x, self.coef_table(x.device)[i],
                                              x_in, m1, guidance_scale=guidance_scale,
                                              **nkw)  # fmt: skip
        self._x_in, self._m1, self._prev_i, self._prev_version = x, m, i, _version(x)
        return (x_next, m) if return_x0 else x_next

    def step_with_history(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        coef: Tensor,
        last: Tensor | None,
        m_prev: Tensor | None,
        m_prev2: Tensor | None = None,
        m_prev3: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        noise: Tensor | None = None,
        generator_state: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One fused call with the caller's history and row (the CUDA-graph loop's form):
        ``last`` is the previous call's input sample (x_i), ``m_prev`` its x0 prediction (m_1);
        a stage-1 row does not read them (zero coefficients). Returns ``(x, m, x_next)``: x is
        the next call's ``last``, m its ``m_prev``. ``m_prev2`` / ``m_prev3`` are not read.
        The sampler's own history is left alone."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        nkw = {"noise": noise} if noise is not None else {"generator_state": generator_state}
        if last is None:
            m_prev = None  # the op takes x0_prev2 only with x0_prev (a stage-1 row reads none)
        x_next, m = _ops().dpm_solver_2m_step(
            x, model_output, coef, last, x0_prev2=m_prev, prediction_type=self.prediction_type,
            guidance_scale=guidance_scale, **nkw,
        )  # fmt: skip
        advance_generator_state(nkw, x)  # in place, so a captured graph advances it too
        return x, m, x_next
