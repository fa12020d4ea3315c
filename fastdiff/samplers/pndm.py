"""PNDM / PLMS: the pseudo numerical methods of Liu et al. 2022 ("Pseudo Numerical Methods for
Diffusion Models on Manifolds", ICLR, arXiv:2202.09778), as diffusers' ``PNDMScheduler``: the
pseudo linear multistep method (PLMS) after a pseudo Runge-Kutta warm-up (F-PNDM), or, with
``skip_prk_steps=True`` (Stable Diffusion 1.x / 2.x's configs; the "PLMS" sampler of the original
latent-diffusion code), after a pseudo improved-Euler start."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._history import RunRows, read_operands
from fastdiff.samplers.base import Sampler, _unipc_ops, alpha_bar_prev
from fastdiff.schedules import NoiseSchedule

__all__ = ["PNDMSampler"]

#: PLMS weights (the pseudo linear multistep formula) and its lower-order starts (diffusers'
#: step_plms), newest output first, indexed by the number of outputs combined.
PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class PNDMSampler(RunRows, Sampler):
    """PNDM (Liu et al. 2022: the transfer part phi, the pseudo linear multistep method PLMS and
    the pseudo Runge-Kutta warm-up PRK), model call for model call as diffusers'
    ``PNDMScheduler``. Equation numbers as diffusers cites them (not checked against the paper
    here): phi is eq. (9); PRK and PLMS are eqs. (12)-(13) and Algorithm 2.

    The transfer part phi (eq. (9)) moves x_t to x_{t'} along the DDIM-like direction of a
    noise estimate e, with ab = alpha_bar::

        phi(x_t, e, t, t') = A x_t - B e,      A = sqrt(ab_t' / ab_t),
        B = (ab_t' - ab_t) / (ab_t sqrt(1 - ab_t') + sqrt(ab_t (1 - ab_t) ab_t'))

    and the gradient part (PLMS) combines the model outputs e_i of the linear multistep
    method::

        e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24

    ``skip_prk_steps=False`` (diffusers' default, F-PNDM): the first three steps are pseudo
    Runge-Kutta steps (PRK), four model calls each at [t, t' + h, t' + h, t'] (h = T // N
    // 2; T the number of training timesteps), every call from the step's start sample x_s with
    diffusers' timestep arithmetic: x_a = phi(x_s, e_a, t, t - h), x_b = phi(x_s, e_b, t, t' + h),
    x_c = phi(x_s, e_c, t, t' + h - h), then x_{t'} = phi(x_s, e_a/6 + e_b/3 + e_c/3 + e_d/6, t,
    t'); the steps' first outputs e_a are PLMS's history, and every later call is PLMS
    with 4 outputs: N steps are N + 9 model calls (N >= 4).

    ``skip_prk_steps=True`` (as diffusers, after crowsonkb's PLMS for latent diffusion): the
    lower-order Adams-Bashforth combinations (3 e_i - e_{i-1}) / 2 and
    (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12 while fewer outputs exist, after a second-order pseudo
    improved Euler step: N steps are N + 1 model calls (one for N = 1) at the timesteps
    ``[t_0, t_1, t_1, t_2, ..., t_{N-1}]``. With r = T // N (diffusers uses t - r as the next
    timestep under every spacing):

    * call 0: x' = phi(x, e_0, t_0, t_0 - r)
    * call 1 (the model at x', t_1): x_1 = phi(x, (e_0 + e_1) / 2, t_1 + r, t_1), from call 0's x
    * call k >= 2: x_{k} = phi(x_{k-1}, e', t, t - r) with the outputs e_k, e_{k-1}, ..., e_2, e_0
      (call 1's output is not kept). t - r < 0 uses ``final_alpha_cumprod``: 1 with
      ``set_alpha_to_one``, else ab_0.

    A v-prediction model's combined output v' becomes e' = sqrt(ab_t) v' + sqrt(1 - ab_t) x_t
    with the x_t phi starts from (diffusers' conversion), so phi = (A - B sqrt(1 - ab_t)) x_t
    - B sqrt(ab_t) v' with A, B the two coefficients above: still linear in x_t and the outputs.

    Fused form. Every call is one :func:`fastdiff.ops.unipc_step` call with
    ``prediction_type="sample"``, so the op's m is the (CFG-combined) raw model output, kept as
    the history, and the float64 row ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3,
    p_m2]`` (a = s = 1, unused) holds phi: with k_x = A (epsilon) or A - B sqrt(1 - ab_t) (v) and
    k_e = -B (epsilon) or -B sqrt(ab_t) (v), and the PLMS weights w_j of the order in use::

        call 0:   c_x = 1 (x_c = x, kept as ``last``), p_xc = k_x, p_m = k_e
        call 1:   c_last = k_x (last = call 0's x), c_m = c_m1 = k_e / 2, p_xc = 1
        call k:   c_x = k_x, c_m = k_e w_0, c_m1 = k_e w_1, c_m2 = k_e w_2, c_m3 = k_e w_3,
                  p_xc = 1
        RK calls a, b, c:  x_c = the step's start sample (c_x = 1, then c_last = 1),
                  p_xc = k_x, p_m = k_e
        RK call d: c_last = k_x, c_m = k_e / 6, c_m1 = c_m2 = k_e / 3, c_m3 = k_e / 6, p_xc = 1

    The op shifts each output into the history (m_{i-3} <- m_{i-2} <- m_{i-1} <- m, last <-
    x_c); :meth:`history_moves` then drops call 1's output (PLMS start) or keeps the RK steps'
    first outputs aside (F-PNDM), in the eager loop and, as device copies, in CUDA graphs. A run
    that starts at call s > 0 (img2img: diffusers' pipelines slice ``timesteps[s:]`` and the
    scheduler starts afresh) takes the rows of calls 0, 1, 2, ... at s, s + 1, s + 2, ..., as
    diffusers' counter (which also picks the RK steps' start timesteps).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"leading"``;
            ``prediction_type`` ``"epsilon"`` or ``"v_prediction"``, as diffusers).
        set_alpha_to_one: the last call moves to ab = 1 (else to ab_0, diffusers' default).
        skip_prk_steps: PLMS from an improved-Euler start (True; ``sampler="plms"``'s default)
            or after three Runge-Kutta steps (False, diffusers' default).
    """

    name = "pndm"
    default_spacing = "leading"
    is_multistep = True
    coef_width = 12
    #: the outputs PLMS reads: e_i .. e_{i-3} (the CUDA-graph loop keeps 4 history buffers)
    solver_order = 4

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = False,
        skip_prk_steps: bool = False,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                "prediction_type: expected 'epsilon' or 'v_prediction' (diffusers' "
                f"PNDMScheduler takes no other), got {prediction_type!r}"
            )
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.skip_prk_steps = bool(skip_prk_steps)
        #: calls 0 .. warmup - 1 of a run have rows of their own (PLMS start: 4; PRK: 12)
        self.warmup = 4 if self.skip_prk_steps else 12
        self._graph_stash: list[Tensor] = []
        self.reset()
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )

    # ------------------------------------------------------------------ timesteps and tables
    def _make_timesteps(self) -> np.ndarray:
        # the base class validated steps = N (diffusers' num_inference_steps); count model calls
        #: number of PNDM steps N (``steps`` is the number of model calls: N + 1, 1 for N = 1;
        #: N + 9 with the Runge-Kutta warm-up)
        self.num_inference_steps = n = self.steps
        ts = super()._make_timesteps()  # [N], descending
        if self.skip_prk_steps:
            calls = np.concatenate([ts[:2], ts[1:]]) if n > 1 else ts  # [t0, t1, t1, t2, ...]
        else:
            if n < 4:
                raise ValueError(
                    f"steps: skip_prk_steps=False needs >= 4 steps (the Runge-Kutta warm-up "
                    f"spans the first 3 and diffusers' set_timesteps fails below 4), got {n}; "
                    "use skip_prk_steps=True (sampler 'plms')"
                )
            half = self.schedule.num_train_timesteps // n // 2
            prk = np.repeat(ts[:4][::-1], 2) + np.tile([0, half], 4)  # diffusers' layout
            self._prk = np.repeat(prk[:-1], 2)[1:-1][::-1].copy()  # [12]: 3 RK steps
            calls = np.concatenate([self._prk, ts[3:]])
        self.steps = len(calls)
        return calls.astype(np.int64)

    def _transfer(self, t: int, tp: int) -> tuple[float, float]:
        """(k_x, k_e): phi(x, e, t, tp) = k_x x + k_e e' for the raw (combined) output e'."""
        ab = self.schedule.alphas_cumprod
        final = 1.0 if self.set_alpha_to_one else float(ab[0])
        ab_t, ab_p = float(ab[t]), alpha_bar_prev(self.schedule, tp, final)
        if ab_t <= 0.0:
            raise ValueError(
                f"schedule: alpha_bar is 0 at t = {t} (zero terminal SNR), where PNDM's transfer "
                "sqrt(alpha_bar_prev / alpha_bar_t) is infinite (diffusers' PNDMScheduler "
                "returns inf / NaN); use a sampler with a zero-SNR limit, e.g. 'ddim' or 'unipc'"
            )
        big_a = math.sqrt(ab_p / ab_t)
        denom = ab_t * math.sqrt(1.0 - ab_p) + math.sqrt(ab_t * (1.0 - ab_t) * ab_p)
        big_b = (ab_p - ab_t) / denom
        if self.prediction_type == "v_prediction":  # e' = sqrt(ab_t) v' + sqrt(1 - ab_t) x_t
            return big_a - big_b * math.sqrt(1.0 - ab_t), -big_b * math.sqrt(ab_t)
        return big_a, -big_b

    def _row(self, i: int, k: int) -> np.ndarray:
        """float64 row of model call ``i`` as the ``k``-th call of a run (k >= warmup: PLMS)."""
        r = self.schedule.num_train_timesteps // self.num_inference_steps
        t = int(self._ts[i])
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0] = row[1] = 1.0  # a, s: unused by prediction_type="sample"
        if not self.skip_prk_steps and k < 12:  # Runge-Kutta: every call from the step's start
            start = int(self._prk[k // 4 * 4])  # diffusers reads it by its counter
            tp = t - (0 if k % 2 else r // 2)
            k_x, k_e = self._transfer(start, tp)
            if k % 4 == 3:  # x = phi(start sample, e_a/6 + e_b/3 + e_c/3 + e_d/6)
                row[3], row[4], row[5], row[6], row[10] = k_x, k_e / 6, k_e / 3, k_e / 3, k_e / 6
                row[7] = 1.0
            else:  # x_c carries the step's start sample; x_next = phi(it, this output)
                row[2 if k % 4 == 0 else 3], row[7], row[8] = 1.0, k_x, k_e
            return row
        k_x, k_e = self._transfer(*((t + r, t) if k == 1 else (t, t - r)))
        if k == 0:
            row[2], row[7], row[8] = 1.0, k_x, k_e
            return row
        row[7] = 1.0
        if k == 1:
            row[3], row[4], row[5] = k_x, k_e / 2, k_e / 2
            return row
        w = PLMS_WEIGHTS[min(k, 4)]
        row[2] = k_x
        for col, wj in zip((4, 5, 6, 10), w, strict=False):
            row[col] = k_e * wj
        return row

    def coefficients(self) -> np.ndarray:
        rows = np.stack([self._row(i, min(i, self.warmup)) for i in range(self.steps)])
        # a run that starts at call s > 0 (img2img) takes call k's row at s + k, k < warmup
        return self._set_since_rows(rows, self._row)

    def _needs_noise_row(self, i: int) -> bool:
        return False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_inference_steps} ({self.steps} model calls),"
            f" prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}, set_alpha_to_one={self.set_alpha_to_one},"
            f" skip_prk_steps={self.skip_prk_steps}, schedule={self.schedule!r})"
        )

    def config(self) -> dict:
        return {**super().config(), "skip_prk_steps": self.skip_prk_steps}

    def _run_warmup(self) -> int:
        return self.warmup

    def reset(self) -> None:
        """Forget the run: the next call starts a new one (call 0's row)."""
        # [last, m_{i-1}, m_{i-2}, m_{i-3}] as the op reads them, and the Runge-Kutta steps'
        # first outputs (the history of the first PLMS call)
        self._hist: list[Tensor | None] = [None] * 4
        self._stash: list[Tensor | None] = [None] * 3
        self._prev_i = -1
        self._start = 0

    # ------------------------------------------------------------------ history
    def history_moves(self, k: int) -> list[tuple[str, str]]:
        """After the ``k``-th call of a run, once every output has been shifted into the history
        (m_{i-3} <- m_{i-2} <- m_{i-1} <- m, last <- x_c): the ``(destination, source)`` moves
        between ``m1``, ``m2``, ``m3`` and the stash ``s0``..``s2`` that give the next call
        diffusers' history. PLMS start: call 1's output is averaged in, then dropped. Runge-Kutta:
        each RK step's first output is kept (diffusers' ets) and after the 12th call they are the
        history of the first PLMS call."""
        if self.skip_prk_steps:
            return [("m1", "m2")] if k == 1 else []
        if k in (0, 4, 8):
            return [(f"s{k // 4}", "m1")]
        return [("m1", "s2"), ("m2", "s1"), ("m3", "s0")] if k == 11 else []

    def graph_history(self, i: int, hist: Sequence[Tensor]) -> None:
        """After call ``i`` of a CUDA-graph run (from call 0): the captured step shifted its
        output into the static history ``[last, m_{i-1}, m_{i-2}, m_{i-3}]``; the
        :meth:`history_moves` run as device copies (the stash: buffers of this sampler)."""
        moves = self.history_moves(i)
        if not moves:
            return
        st = self._graph_stash
        if not st or st[0].shape != hist[1].shape or st[0].device != hist[1].device:
            st[:] = [torch.empty_like(hist[1]) for _ in range(3)]
        bufs = {"m1": hist[1], "m2": hist[2], "m3": hist[3], "s0": st[0], "s1": st[1], "s2": st[2]}
        for dst, src in moves:
            bufs[dst].copy_(bufs[src])

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of model call ``i`` at sample ``x`` from its (combined) output
        ``m`` (for trajectories; a torch expression, not part of the fused step)."""
        ab = float(self.schedule.alphas_cumprod[int(self._ts[i])])
        a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        if self.prediction_type == "v_prediction":
            return (a * x.float() - s * m.float()).to(x.dtype)
        return ((x.float() - s * m.float()) / a).to(x.dtype)

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
        """One fused call with the caller's history and row (CUDA graphs): ``(x_c, m,
        x_next)``, m the combined raw model output; the sampler's own history is left alone."""
        self._check_step_args(model_output, i, x, None, guidance_scale)
        return _unipc_ops().unipc_step(
            x,
            model_output,
            coef,
            last,
            m_prev,
            m_prev2,
            m_prev3=m_prev3,
            prediction_type="sample",
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
        """Model call ``i`` (at ``timesteps[i]``, model output at ``x``): one fused op call.

        The history (the sample a step starts from, the outputs PLMS combines) is kept on
        the sampler and used only when call ``i - 1`` was the last one it ran for this x shape
        and device; otherwise call ``i`` starts a new run (img2img: diffusers' pipelines run
        ``timesteps[s:]`` with a fresh scheduler). PNDM is deterministic: ``noise``,
        ``generator`` and ``generator_state`` are unused. Returns the next sample, or ``(sample,
        x0)`` with ``return_x0`` (x0: this call's x0 prediction, see :meth:`x0_of`).
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        valid, k, row, r = self._run_call(i, x, self._hist[1])
        hist, stash = (self._hist, self._stash) if valid else ([None] * 4, [None] * 3)
        x_c, m, x_next = self.step_with_history(model_output, i, x, row, *read_operands(r, hist),
                                                guidance_scale=guidance_scale)  # fmt: skip
        hist = [x_c, m, hist[1], hist[2]]
        named = {"m1": 1, "m2": 2, "m3": 3}
        for dst, src in self.history_moves(k):
            val = hist[named[src]] if src in named else stash[int(src[1])]
            if dst in named:
                hist[named[dst]] = val
            else:
                stash[int(dst[1])] = val
        self._hist, self._stash, self._prev_i = hist, stash, i
        return (x_next, self.x0_of(m, i, x)) if return_x0 else x_next
