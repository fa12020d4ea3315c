"""Heun sampler of the probability-flow ODE (Karras et al., 2022, arXiv:2206.00364, Alg. 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import _ops, vp_of_sigma
from fastdiff.samplers.euler import EulerSampler
from fastdiff.schedules import NoiseSchedule

__all__ = ["HeunSampler", "TwoStageRun", "stage2_history"]

_UNSET = object()


class TwoStageRun:
    """Run bookkeeping of the two-stage samplers (Heun, DPM2, flow Heun): each step is two model
    calls, and stage 2 (the odd call) reads stage 1's input sample, which the sampler keeps
    between the calls (:func:`stage2_history` checks it; flow Heun keeps the velocity too);
    Heun's and DPM2's ``__repr__`` counts both, and their call is :meth:`_two_stage_step`."""

    is_multistep = True
    scheduler_order = 2  # img2img starts at a first stage (Heun: the Euler stage), call 2 t_start
    #: stage 2's history operand is the stage-1 input sample, not its x0 prediction (the
    #: CUDA-graph loop fills its x0_prev buffer with the step's input; flow Heun's graphed step
    #: goes through step_with_history instead)
    history_is_input = True
    _x0_prev: Tensor | None = None  # the input sample of model call _prev_i (history)
    _prev_i = -1
    _prev_version: int | None = None  # its in-place version counter then

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_inference_steps} ({self.steps} model calls),"
            f" prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}, schedule={self.schedule!r})"
        )

    def reset(self) -> None:
        self._x0_prev = None
        self._prev_i = -1
        self._prev_version = None

    def is_second_stage(self, i: int) -> bool:
        """Whether model call ``i`` is stage 2 (Heun's correction, DPM2's midpoint stage): the
        odd calls."""
        return i % 2 == 1

    def _keep(self, x: Tensor, i: int) -> None:
        """Keep call ``i``'s input sample ``x`` (and its version) for stage 2, which reads it."""
        self._x0_prev, self._prev_i, self._prev_version = x, i, _version(x)

    def _two_stage_step(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None,
        guidance_scale: float | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        coef: Tensor | None,
        x0_prev: Tensor | None | object,
        generator_state: Tensor | None,
        stages: tuple[str, str],
        clip_range: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Model call ``i`` as one fused ``dpm_solver_2m_step`` (Heun's and DPM2's ``step``):
        the history operand from :func:`stage2_history` (``stages``: stage 2's and stage 1's
        names in its errors), the row from the table unless ``coef`` is given, the step's
        noise where its row has any (DPM2 a's stage 2); keeps ``x`` for stage 2 unless the
        caller manages the history. Returns ``(x_next, x0)``."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        x0_prev, external = stage2_history(self, i, x, x0_prev, coef, *stages)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        x_next, x0 = _ops().dpm_solver_2m_step(
            x,
            model_output,
            coef,
            x0_prev,  # type: ignore[arg-type]
            prediction_type=self.prediction_type,
            clip_range=clip_range,
            guidance_scale=guidance_scale,
            **nkw,
        )
        if not external:  # stage 2 of this call reads its input
            self._keep(x, i)
        return x_next, x0


class HeunSampler(TwoStageRun, EulerSampler):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, the
    deterministic sampler; Algorithm 2 with S_churn = 0), as diffusers' ``HeunDiscreteScheduler``.

    With x_sigma = x0 + sigma eps and D the denoiser (the x0 prediction), one step from sigma_i
    to sigma_{i+1} (h = sigma_{i+1} - sigma_i) is two model calls (Algorithm 1, lines 4-8)::

        stage 1 (Euler):   d_1 = (x_sigma - D(x_sigma; sigma_i)) / sigma_i
                           x'  = x_sigma + h d_1
        stage 2 (Heun):    d_2 = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}
                           x_sigma_next = x_sigma + h (d_1 + d_2) / 2

    and the last step, to sigma = 0, is Euler only (line 6's condition sigma_{i+1} != 0): N steps
    are 2N - 1 model calls. As diffusers, ``len(sampler)`` and ``timesteps`` count the model
    calls: ``[t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}]``, and ``step(out, i, x)`` is one
    of them, each one fused ``dpm_solver_2m_step`` call ``x_next = c_x x + c_x0 m + c_prev h +
    c_eps e`` (m = the x0 prediction of this call, e its eps; h, the op's ``x0_prev`` operand,
    only in stage 2: the previous call's input sample).

    Stage 1 gives h d_1 = x' - x_sigma, and d_2 = (x' - D) / sigma_{i+1} is the model's eps at
    x' (the ODE's slope), so stage 2 is x_sigma_next = (x_sigma + x') / 2 + (h / 2) eps_2: it
    needs x', its eps and the stage-1 input x_sigma, which the sampler keeps as the history
    operand (the op's ``x0_prev`` slot, as diffusers stores x_sigma). fastdiff keeps the VP
    sample x = a x_sigma (a = 1 / sqrt(1 + sigma^2), see
    :class:`~fastdiff.samplers.euler.EulerSampler`), so with x_i = a_i x_sigma the kept input,
    x = a_{i+1} x' stage 2's sample, s_i = a_i sigma_i and r = sigma_{i+1} / sigma_i, the rows
    ``[a, s, c_x, c_x0, c_prev, 0, 0, c_eps]`` (c_prev multiplies x_i; c_eps the op's eps term)
    are::

        stage 1:  [a_i, s_i, a_{i+1} r / a_i, a_{i+1} (1 - r), 0, 0, 0, 0]
        stage 2:  [a_{i+1}, s_{i+1}, 1/2, 0, a_{i+1} / (2 a_i), 0, 0, a_{i+1} h / 2]

    Stage 2's sample is x' (at sigma_{i+1}, where the model is called), so its x0 prediction
    and eps use a_{i+1}, s_{i+1}, as diffusers' (which uses sigma_next there). Stage 2 is
    algebraically diffusers' update from its stored x_sigma and d_1 and differs only by
    rounding, with no terms that cancel: where diffusers' own fp32 step loses digits (its d_2
    from x' - D, e.g. 2 steps, k = h / (2 sigma_{i+1}) = -243 on scaled_linear), fastdiff's is
    ~100x closer to float64; every call is within 2x diffusers' own error in its dtype plus 2
    ulps (fp32, fp16, bf16; tests/test_stage2_precision.py; the ulps: each side rounds the
    state in its own space). (The x0 form x' (1/2 + k) - a_{i+1} k m + ...,
    without the eps term, was ~2.3x diffusers' own fp32 error there, up to 4.7x; the form x' +
    k (m_1 - m_2), which needs the stage-1 x0 m_1 instead of x_i, multiplies m_1's fp32 error,
    ~ulp(x_sigma) at sigma_i, by k: up to 6.8x.)
    ``clip_sample`` clips m in both stages (diffusers' derivative uses the clipped x0; the op's
    eps is then that of the clipped x0).

    Timesteps and sigmas are Euler's (default ``linspace`` spacing: fractional timesteps, rounded
    to int64 unless ``fractional_timesteps``; x_T = ``init_noise_scale`` z; Karras / exponential
    / beta grids as diffusers builds them; custom ``timesteps`` as diffusers'
    ``set_timesteps(timesteps=...)``: the N step timesteps, laid out as above, final sigma 0).

    Args:
        schedule, prediction_type, timestep_spacing, steps_offset, use_karras_sigmas,
        use_exponential_sigmas, use_beta_sigmas, sigma_min, sigma_max, fractional_timesteps: see
            :class:`~fastdiff.samplers.euler.EulerSampler` (default spacing ``"linspace"``;
            ``sigma_min`` / ``sigma_max`` are a fastdiff extension: diffusers' Heun has none).
        steps: number of Heun steps N (diffusers' ``num_inference_steps``): 2N - 1 model calls.
        clip_sample, clip_sample_range: clip the x0 prediction to ``[-r, r]`` (off by default,
            as diffusers).
        timesteps: custom timesteps of the N steps, strictly descending (``steps``: None or N);
            not with a sigma grid option, as in diffusers.
    """

    name = "heun"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timesteps: Sequence[int] | None = None,
        fractional_timesteps: bool = False,
    ) -> None:
        if clip_sample and not 0.0 < float(clip_sample_range) < math.inf:
            raise ValueError(
                f"clip_sample_range: expected a finite float > 0, got {clip_sample_range!r}"
            )
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            timesteps=timesteps,
            fractional_timesteps=fractional_timesteps,
        )

    def _make_timesteps(self) -> np.ndarray:
        # The base class validated steps = N (diffusers' num_inference_steps) and Euler's grid
        # code reads it: take the N timesteps and N + 1 sigmas, then count model calls.
        #: number of Heun steps N (``steps`` is the number of model calls, 2N - 1)
        self.num_inference_steps = n = self.steps
        ts = super()._make_timesteps()  # [N]
        self._sig = super().sigmas()  # [N + 1], float64, ends at 0
        self.steps = 2 * n - 1
        return np.concatenate([ts[:1], np.repeat(ts[1:], 2)])  # [t0, t1, t1, ..., tN-1, tN-1]

    def _noising(self, i: int) -> tuple[float, float]:
        """VP (x0 + sigma eps) / sqrt(1 + sigma^2) at call i's sigma (calls 2k - 1 and 2k are at
        sigma_k, as diffusers' interleaved sigmas)."""
        return vp_of_sigma(float(self._sig[(i + 1) // 2]))

    def sigmas(self) -> np.ndarray:
        """float64 ``[N + 1]``: sigma_i of each Heun step, then the final sigma = 0."""
        return self._sig.copy()

    def coefficients(self) -> np.ndarray:
        sig = self._sig
        a = [1.0 / math.sqrt(1.0 + s * s) for s in sig]  # a = sqrt(ab) = 1 / sqrt(1 + sigma^2)
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for j in range(self.num_inference_steps):
            r = sig[j + 1] / sig[j]  # sigma_{j+1} / sigma_j (0 at the last step: x' = m)
            rows[2 * j, :5] = [a[j], sig[j] * a[j], a[j + 1] * r / a[j], a[j + 1] * (1.0 - r), 0.0]
            if 2 * j + 1 < self.steps:  # the correction at sigma_{j+1} > 0; c_prev: x_j
                an, h = a[j + 1], sig[j + 1] - sig[j]
                # x_{j+1} = a' ((x_sigma + x') / 2 + (h / 2) d_2), d_2 = eps (the op's eps term)
                c_prev, c_eps = an / (2.0 * a[j]), an * h / 2.0
                rows[2 * j + 1] = [an, sig[j + 1] * an, 0.5, 0.0, c_prev, 0.0, 0.0, c_eps]
        return rows

    def config(self) -> dict:
        return {**super().config(), "clip": self.clip_sample, "clip_range": self.clip_sample_range}

    #: Heun's name for stage 2 (the odd calls)
    is_correction = TwoStageRun.is_second_stage

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
        """Model call ``i`` of the Heun run (one fused op call): the Euler stage (even ``i``,
        x_i -> x') or the correction (odd ``i``, x' -> x_{i+1}), both in VP space.

        ``model_output`` is the raw model output at ``timesteps[i]`` (``[2N, ...] = [uncond,
        cond]`` with ``guidance_scale``). The correction needs the input sample ``x`` of call
        ``i - 1`` (not its x0 prediction), which the sampler keeps when it ran that call (and
        which must not be modified in place before the correction); pass it as ``x0_prev`` to
        manage it yourself (CUDA graphs pass a buffer and ``coef`` from a static buffer; a
        stage-1 row has c_prev = 0). ``noise``, ``generator`` and ``generator_state`` are
        accepted for API symmetry and unused (the ODE step is deterministic). Returns the new
        sample, or ``(sample, x0)`` with ``return_x0``.
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
            ("the Heun correction", "an Euler-stage"),
            clip_range=self.clip_sample_range if self.clip_sample else None,
        )
        return (x_next, x0) if return_x0 else x_next


def stage2_history(
    smp: HeunSampler | Any,
    i: int,
    x: Tensor,
    x0_prev: Tensor | None | object,
    coef: Tensor | None,
    stage2: str,
    stage1: str,
    history: str = "input sample",
) -> tuple[Tensor | None, bool]:
    """The history operand of model call ``i`` of a two-stage sampler (Heun, DPM2: the odd calls
    are stage 2 and read what call ``i - 1`` left, its input sample): ``(x0_prev, external)``.

    ``x0_prev`` passed (``external``) is used as given; else stage 2 takes the tensor the sampler
    kept (``smp._x0_prev`` of call ``smp._prev_i``), which must be call ``i - 1``'s for this x
    and, where the sampler recorded its version (``smp._prev_version``, a kept input), not
    modified in place since.
    ``stage2`` / ``stage1`` name the stages in the errors ("the Heun correction", "an
    Euler-stage"), ``history`` what call ``i - 1`` leaves for it ("input sample")."""
    external = x0_prev is not _UNSET
    if coef is not None and not external:
        # the row, not i, then decides the stage: a stage-2 row without the history would
        # silently drop its c_prev term
        raise ValueError(
            f"coef: a {type(smp).__name__} step with an explicit coefficient row needs x0_prev "
            f"too (the previous call's {history}; any finite tensor for {stage1} row)"
        )
    second = i % 2 == 1
    if external and x0_prev is None and coef is None and second:
        raise ValueError(
            f"x0_prev: model call {i} is {stage2} of call {i - 1} and needs that call's "
            f"{history}, got None"
        )
    if external:
        return x0_prev, True  # type: ignore[return-value]
    if not second:
        return None, False
    prev = smp._x0_prev
    if prev is None or smp._prev_i != i - 1 or prev.shape != x.shape or prev.device != x.device:
        raise ValueError(
            f"i: model call {i} is {stage2} of call {i - 1}, whose {history} this sampler "
            f"did not keep (for this x); run call {i - 1} first (start a run at an even call, as "
            "diffusers' timesteps[2 k:]) or pass x0_prev"
        )
    version = getattr(smp, "_prev_version", None)
    if version is not None and _version(prev) != version:
        raise ValueError(
            f"x: the {history} of call {i - 1}, which {stage2} reads, was modified in place "
            "after that call (pass a new tensor to each call, or pass x0_prev)"
        )
    return prev, False


def _version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (None for an inference-mode tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None
