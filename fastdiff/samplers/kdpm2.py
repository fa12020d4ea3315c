"""DPM2 and DPM2 a: the second-order sampler of Karras et al. 2022 (arXiv:2206.00364) with a
log-midpoint stage, as k-diffusion's ``sample_dpm_2`` / ``sample_dpm_2_ancestral`` and diffusers'
``KDPM2DiscreteScheduler`` / ``KDPM2AncestralDiscreteScheduler``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import advance_generator_state, vp_of_sigma
from fastdiff.samplers.euler import EulerSampler
from fastdiff.samplers.heun import _UNSET, TwoStageRun
from fastdiff.samplers.sigmas import train_sigmas32

__all__ = ["DPM2AncestralSampler", "DPM2Sampler"]


def _t_of_sigma32(sigma: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the float32 noise levels ``sigma``: log-sigma
    interpolation over the float32 training grid ``log_train`` (ascending in t), clamped to
    [0, T - 1], computed in float32 as diffusers' KDPM2 schedulers do for their midpoints (so
    the rounded model timesteps agree)."""
    log_sigma = np.log(np.maximum(sigma.astype(np.float32), np.float32(1e-10)))
    if len(log_train) < 2:
        return np.zeros_like(log_sigma)
    lo = np.searchsorted(log_train, log_sigma, side="right") - 1
    lo = np.clip(lo, 0, len(log_train) - 2)
    hi = lo + 1
    w = (log_train[lo] - log_sigma) / (log_train[lo] - log_train[hi])
    w = np.clip(w, np.float32(0.0), np.float32(1.0))
    return (np.float32(1.0) - w) * lo.astype(np.float32) + w * hi.astype(np.float32)


class DPM2Sampler(TwoStageRun, EulerSampler):
    """DPM2: k-diffusion's ``sample_dpm_2`` ("inspired by DPM-Solver-2 and Algorithm 2 from
    Karras et al. 2022", with S_churn = 0), as diffusers' ``KDPM2DiscreteScheduler``: a
    second-order step of the probability-flow ODE dx_sigma/dsigma = (x_sigma - D) / sigma
    (Karras et al. 2022, arXiv:2206.00364, eq. 4 with s(t) = 1, sigma(t) = t) that takes the
    slope at the log-midpoint, i.e. DPM-Solver-2 (Lu et al. 2022, arXiv:2206.00927, noise
    prediction, r_1 = 1/2: the midpoint in lambda = -log sigma) written in sigma space.

    With x_sigma = x0 + sigma eps and D the denoiser (the x0 prediction), one step from
    sigma_i to sigma_{i+1} goes through the log-midpoint sigma_m = exp((log sigma_i + log
    sigma_{i+1}) / 2) = sqrt(sigma_i sigma_{i+1}) and is two model calls::

        stage 1 (Euler to sigma_m):  d_1 = (x_sigma - D(x_sigma; sigma_i)) / sigma_i
                                     x_m = x_sigma + (sigma_m - sigma_i) d_1
        stage 2 (midpoint slope):    d_m = (x_m - D(x_m; sigma_m)) / sigma_m
                                     x_sigma_next = x_sigma + (sigma_{i+1} - sigma_i) d_m

    The last step goes to sigma = 0, where sigma_m = 0: stage 1 alone lands on D (no stage 2),
    so N steps are 2N - 1 model calls. As diffusers, ``len(sampler)`` and ``timesteps`` count
    the model calls: ``[t_0, t(m_0), t_1, t(m_1), ..., t(m_{N-2}), t_{N-1}]`` with t(m_i) the
    fractional training timestep of sigma_m (log-sigma interpolation; rounded to int64 unless
    ``fractional_timesteps``, see :class:`~fastdiff.samplers.euler.EulerSampler`), and
    ``step(out, i, x)`` is one of them, each one fused ``dpm_solver_2m_step``
    call ``x_next = c_x x + c_x0 m + c_prev h + c_noise z + c_eps e`` (m = the x0 prediction of
    this call, e its eps; h, the op's ``x0_prev`` operand, only in stage 2: the previous call's
    input sample).

    Stage 2 adds the slope at x_m to x_sigma, the stage-1 input, not to its own sample, so the
    sampler keeps that input as stage 2's history operand (the op's ``x0_prev`` slot; one op
    call per stage), and the slope d_m = (x_m - D) / sigma_m is the model's eps at x_m (the
    ODE's), which the op forms as its eps term. fastdiff keeps the VP sample x = a x_sigma (a =
    1 / sqrt(1 + sigma^2), see :class:`~fastdiff.samplers.euler.EulerSampler`); with a_k = 1 /
    sqrt(1 + sigma_k^2), s_k = a_k sigma_k, t the stage-2 target (sigma_{i+1} here), x_i = a_i
    x_sigma the kept stage-1 input and eps_2 stage 2's eps, stage 2 is::

        x_next = a_{i+1} [x_i / a_i + (t - sigma_i) eps_2]

    and the rows ``[a, s, c_x, c_x0, c_prev, c_noise, 0, c_eps]`` (c_prev multiplies m_1 = the
    stage-1 x0 prediction in stage 1, which has c_prev = 0, and x_i in stage 2) are::

        stage 1:  [a_i, s_i, a_m (sigma_m / sigma_i) / a_i, a_m (1 - sigma_m / sigma_i), 0, 0, 0, 0]
        stage 2:  [a_m, s_m, 0, 0, a_{i+1} / a_i, a_{i+1} sigma_up, 0, a_{i+1} (t - sigma_i)]

    Each stage's x0 prediction (and stage 2's eps) uses the noise level of its own sample
    (sigma_i, then sigma_m), as diffusers' ``scale_model_input`` and ``step``. The update is
    algebraically diffusers' (which stores x_sigma too) and differs by rounding, with no terms
    that cancel. Where sigma_i / sigma_m is large (2 steps; the last stage 2 of a beta grid;
    cosine trailing ancestral: up to ~1600) diffusers' own fp32 step computes its slope from
    nearly equal terms and is 1e-6 .. 5e-5 off float64; fastdiff's is then ~10-100x closer;
    every call is within 2x diffusers' own error in its dtype plus 2 ulps (fp32, fp16, bf16;
    tests/test_stage2_precision.py). (The x0 form c_x x + c_x0 m_2 of stage 2, without the eps
    term, cancels the sample at that scale: up to 5.4x diffusers' own fp32 error; eliminating
    x_i through stage 1, x_i / a_i = (sigma_i x / a_m - (sigma_i - sigma_m) m_1) / sigma_m,
    which needs only m_1 as history, multiplies m_1's fp32 error, ~ulp(x_sigma) at sigma_i, by
    sigma_i / sigma_m: up to ~8x.)

    The noise levels are diffusers' float32 values: the step sigmas interpolated in t between
    the float32 training sigmas (or the Karras / exponential / beta grid, as
    :class:`~fastdiff.samplers.euler.EulerSampler` builds it), the midpoints computed in float32
    as diffusers does (so the rounded midpoint timesteps agree), then used in float64 here.
    ``prediction_type="sample"`` works too (diffusers raises NotImplementedError for it).

    Args:
        schedule, prediction_type, timestep_spacing, steps_offset, use_karras_sigmas,
        use_exponential_sigmas, use_beta_sigmas, sigma_min, sigma_max: see
            :class:`~fastdiff.samplers.euler.EulerSampler` (default spacing ``"linspace"``;
            ``sigma_min`` / ``sigma_max`` are a fastdiff extension: diffusers' KDPM2 has none).
        steps: number of DPM2 steps N (diffusers' ``num_inference_steps``): 2N - 1 model calls.
    """

    name = "dpm2"
    ancestral = False

    # ------------------------------------------------------------------ grids
    def _make_timesteps(self) -> np.ndarray:
        # The base class validated steps = N (diffusers' num_inference_steps): build the N
        # step sigmas, their midpoints, then count model calls.
        #: number of DPM2 steps N (``steps`` is the number of model calls, 2N - 1)
        self.num_inference_steps = n = self.steps
        frac = self._frac_timesteps()  # float32 [N]
        train = train_sigmas32(self.schedule)
        if self.sigma_grid is not None:
            sig = self._sigma_grid()[0].astype(np.float32)
        else:
            sig = np.interp(frac, np.arange(len(train)), train).astype(np.float32)
        sig = torch.from_numpy(np.concatenate([sig, np.zeros(1, np.float32)]))  # [N + 1]
        nxt = torch.cat([sig[1:], sig.new_zeros(1)])
        if self.ancestral:  # k-diffusion's get_ancestral_step (eta = 1), in float32
            up = (nxt**2 * (sig**2 - nxt**2) / sig**2) ** 0.5
            down = (nxt**2 - up**2) ** 0.5
            mid = sig.log().lerp(down.log(), 0.5).exp()
        else:
            up, down = torch.zeros_like(sig), nxt
            mid = nxt.log().lerp(sig.log(), 0.5).exp()
        mid[n - 1 :] = 0.0  # the last step: Euler to sigma = 0
        up[n - 1 :] = 0.0
        down[n - 1 :] = 0.0
        self._sig = sig.double().numpy()  # [N + 1], ends at 0
        self._mid, self._down, self._up = (v[:n].double().numpy() for v in (mid, down, up))
        # sigma_down = sigma_{i+1}^2 / sigma_i below float32's resolution of sigma_{i+1}^2
        # (e.g. 2 linspace steps on the linear schedule) rounds to 0 there: diffusers' midpoint
        # is then log(0)-based (NaN). Use the float64 split on such steps.
        head = slice(0, n - 1)
        bad = np.flatnonzero(~(self._down[head] > 0.0) | ~(self._mid[head] > 0.0))  # NaN too
        for j in bad:
            s, s1 = self._sig[j], self._sig[j + 1]
            self._down[j] = s1 * s1 / s
            self._up[j] = math.sqrt(max(s1 * s1 - self._down[j] ** 2, 0.0))
            self._mid[j] = math.sqrt(s * self._down[j])
            mid[j] = float(self._mid[j])
        if self.sigma_grid == "karras":  # diffusers' KDPM2 rounds these (not other grids')
            frac = np.round(frac.astype(np.float64)).astype(np.float32)
        calls = np.empty(2 * n - 1, dtype=np.float32)  # diffusers' model timesteps
        calls[0::2], calls[1::2] = frac, _t_of_sigma32(mid[: n - 1].numpy(), np.log(train))
        if not self.fractional_timesteps:
            calls = np.round(calls.astype(np.float64)).astype(np.int64)
        self.steps = 2 * n - 1
        return calls

    def sigmas(self) -> np.ndarray:
        """float64 ``[N + 1]``: sigma_i of each step, then the final sigma = 0."""
        return self._sig.copy()

    def _noising(self, i: int) -> tuple[float, float]:
        """VP (x0 + sigma eps) / sqrt(1 + sigma^2) at the noise level of call i's sample."""
        return vp_of_sigma(float(self.call_sigmas()[i]))

    def call_sigmas(self) -> np.ndarray:
        """float64 ``[steps + 1]``: the noise level of the sample each model call gets,
        ``[sigma_0, sigma_m0, sigma_1, sigma_m1, ..., sigma_{N-1}]``, then the final 0."""
        out = np.zeros(self.steps + 1, dtype=np.float64)
        out[0:-1:2] = self._sig[:-1]
        out[1:-1:2] = self._mid[:-1]
        return out

    def coefficients(self) -> np.ndarray:
        sig, mid, down, up = self._sig, self._mid, self._down, self._up
        a = [1.0 / math.sqrt(1.0 + s * s) for s in sig]  # a = sqrt(ab) = 1 / sqrt(1 + sigma^2)
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for j in range(self.num_inference_steps):
            s, m, t = sig[j], mid[j], down[j]
            am = 1.0 / math.sqrt(1.0 + m * m)
            rows[2 * j, :4] = [a[j], s * a[j], am * (m / s) / a[j], am * (1.0 - m / s)]
            if 2 * j + 1 < self.steps:  # stage 2, at sigma_m > 0; c_prev reads x_j
                an = a[j + 1]  # the sample after stage 2 is at sigma_{j+1} (with the noise)
                # x_{j+1} = a_{j+1} (x_sigma + (t - sigma_j) d_m), d_m = eps (the eps term)
                rows[2 * j + 1] = [am, m * am, 0, 0, an / a[j], an * up[j], 0, an * (t - s)]
        return rows

    # ------------------------------------------------------------------ stepping
    def _needs_noise_row(self, i: int) -> bool:
        # diffusers' ancestral scheduler draws noise on every stage 2 (and only there)
        return self.ancestral and i % 2 == 1

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
        """Model call ``i`` of the run (one fused op call): stage 1 (even ``i``, x_i -> x_m)
        or stage 2 (odd ``i``, x_m -> x_{i+1}), both in VP space.

        ``model_output`` is the raw model output at ``timesteps[i]`` (``[2N, ...] = [uncond,
        cond]`` with ``guidance_scale``). Stage 2 needs the input sample ``x`` of call ``i - 1``
        (not its x0 prediction), which the sampler keeps when it ran that call (and which must
        not be modified in place before stage 2); pass it as ``x0_prev`` to manage it yourself
        (CUDA graphs pass a buffer and ``coef`` from a static buffer; a stage-1 row has c_prev =
        0). Noise (the ancestral sampler's stage 2 only): ``noise`` is z, else it
        is drawn with ``generator`` (a generator or one per sample), else in the kernel with
        Philox from ``generator_state`` (int64 ``[2]`` = (seed, offset) on x's device), whose
        offset is then advanced by ``x.numel()`` in place, on every call of the ancestral
        sampler (so a CUDA graph, which draws on every replay, uses the same stream). The
        deterministic sampler ignores them. Returns the new sample, or ``(sample, x0)`` with
        ``return_x0``.
        """
        x_next, x0 = self._two_stage_step(
            model_output,
            i,
            x,
            noise,
            guidance_scale,
            generator,
            coef,
            x0_prev,
            generator_state,
            ("the second (midpoint) stage", "a stage-1"),
        )
        if self.ancestral and generator_state is not None and noise is None:
            advance_generator_state({"generator_state": generator_state}, x)
        return (x_next, x0) if return_x0 else x_next


class DPM2AncestralSampler(DPM2Sampler):
    """DPM2 a: DPM2's midpoint step down to sigma_down, then fresh noise up to sigma_{i+1}
    (k-diffusion's ``sample_dpm_2_ancestral``), as diffusers'
    ``KDPM2AncestralDiscreteScheduler``. With k-diffusion's ancestral split (eta = 1, see
    :func:`~fastdiff.samplers.euler_ancestral.ancestral_step`)::

        sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)

    the midpoint is sigma_m = exp((log sigma_i + log sigma_down) / 2) and the two stages are::

        stage 1:  x_m          = x_sigma + (sigma_m - sigma_i) d_1
        stage 2:  x_sigma_next = x_sigma + (sigma_down - sigma_i) d_m + sigma_up z,  z ~ N(0, I)

    i.e. :class:`DPM2Sampler`'s rows with the stage-2 target t = sigma_down and the noise
    coefficient c_noise = a_{i+1} sigma_up (the sample then has noise level sigma_{i+1}). The
    last step (sigma_down = 0) is stage 1 alone, to sigma = 0, without noise. As diffusers, z is
    drawn on every stage 2 (N - 1 draws): from ``noise``, else ``generator`` (torch.randn),
    else the in-kernel Philox generator (``generator_state``). The Karras / exponential / beta
    grids are diffusers' (``use_karras_sigmas``: "DPM2 a Karras").

    Args: as :class:`DPM2Sampler`.
    """

    name = "dpm2_a"
    ancestral = True

    def config(self) -> dict:
        return {**super().config(), "noise": True}
