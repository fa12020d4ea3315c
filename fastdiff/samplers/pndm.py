"""PLMS: the pseudo linear multistep sampler of PNDM (Liu et al. 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds", ICLR, arXiv:2202.09778), as diffusers' ``PNDMScheduler`` with
``skip_prk_steps=True`` (Stable Diffusion 1.x / 2.x's default scheduler; the "PLMS" sampler of
the original latent-diffusion code)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, alpha_bar_prev
from fastdiff.schedules import NoiseSchedule

__all__ = ["PNDMSampler"]

#: PLMS weights of eq. (12) and its lower-order starts (diffusers' step_plms), newest output
#: first, indexed by the number of outputs combined.
PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_WARMUP = 4  # calls 0..3 of a run have rows of their own; from the 5th call on eq. (12) holds


def _unipc_ops():
    from fastdiff.ops import unipc_step as mod

    return mod


class PNDMSampler(Sampler):
    """PLMS (Liu et al. 2022, eq. (11) and (12)), model call for model call as diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``.

    The transfer part phi (eq. (11)) moves x_t to x_{t'} along the DDIM-like direction of a
    noise estimate e, with ab = alpha_bar::

        phi(x_t, e, t, t') = A x_t - B e,      A = sqrt(ab_t' / ab_t),
        B = (ab_t' - ab_t) / (ab_t sqrt(1 - ab_t') + sqrt(ab_t (1 - ab_t) ab_t'))

    and the gradient part (eq. (12)) combines the model outputs e_i of the linear multistep
    method::

        e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24

    with the lower-order Adams-Bashforth combinations (3 e_i - e_{i-1}) / 2 and
    (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12 while fewer outputs exist. As diffusers (after
    crowsonkb's PLMS for latent diffusion), the run starts with a second-order pseudo improved
    Euler step instead of the paper's Runge-Kutta warm-up: N steps are N + 1 model calls (one for
    N = 1) at the timesteps ``[t_0, t_1, t_1, t_2, ..., t_{N-1}]``. With r = T // N (T the number
    of training timesteps; diffusers uses t - r as the next timestep under every spacing):

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

    so x_next = x_c (the op's predictor part adds p_xc x_c and nothing else after call 0). A run
    that starts at call s > 0 (img2img: diffusers' pipelines slice ``timesteps[s:]`` and the
    scheduler starts afresh) takes the rows of calls 0, 1, 2, 3 at s, s + 1, s + 2, s + 3, as
    diffusers' counter.

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"leading"``;
            ``prediction_type`` ``"epsilon"`` or ``"v_prediction"``, as diffusers).
        set_alpha_to_one: the last call moves to ab = 1 (else to ab_0, diffusers' default).
    """

    name = "pndm"
    default_spacing = "leading"
    is_multistep = True
    coef_width = 12
    #: the outputs eq. (12) reads: e_i .. e_{i-3} (the CUDA-graph loop keeps 4 history buffers)
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
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                "prediction_type: expected 'epsilon' or 'v_prediction' (diffusers' "
                f"PNDMScheduler takes no other), got {prediction_type!r}"
            )
        self.set_alpha_to_one = bool(set_alpha_to_one)
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
        #: number of PLMS steps N (``steps`` is the number of model calls, N + 1; 1 for N = 1)
        self.num_inference_steps = n = self.steps
        ts = super()._make_timesteps()  # [N], descending
        self.steps = n + 1 if n > 1 else 1
        return np.concatenate([ts[:2], ts[1:]]) if n > 1 else ts  # [t0, t1, t1, t2, ...]

    def _row(self, i: int, k: int) -> np.ndarray:
        """float64 row of model call ``i`` as the ``k``-th call of a run (k >= 4: eq. (12))."""
        ab = self.schedule.alphas_cumprod
        r = self.schedule.num_train_timesteps // self.num_inference_steps
        final = 1.0 if self.set_alpha_to_one else float(ab[0])
        t = int(self._ts[i])
        t, tp = (t + r, t) if k == 1 else (t, t - r)
        ab_t, ab_p = float(ab[t]), alpha_bar_prev(self.schedule, tp, final)
        big_a = math.sqrt(ab_p / ab_t)
        denom = ab_t * math.sqrt(1.0 - ab_p) + math.sqrt(ab_t * (1.0 - ab_t) * ab_p)
        big_b = (ab_p - ab_t) / denom
        k_x, k_e = big_a, -big_b
        if self.prediction_type == "v_prediction":  # e' = sqrt(ab_t) v' + sqrt(1 - ab_t) x_t
            k_x, k_e = big_a - big_b * math.sqrt(1.0 - ab_t), -big_b * math.sqrt(ab_t)
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0] = row[1] = 1.0  # a, s: unused by prediction_type="sample"
        if k == 0:
            row[2], row[7], row[8] = 1.0, k_x, k_e
            return row
        row[7] = 1.0
        if k == 1:
            row[3], row[4], row[5] = k_x, k_e / 2, k_e / 2
            return row
        w = PLMS_WEIGHTS[min(k, _WARMUP)]
        row[2] = k_x
        for col, wj in zip((4, 5, 6, 10), w, strict=False):
            row[col] = k_e * wj
        return row

    def coefficients(self) -> np.ndarray:
        rows = np.stack([self._row(i, min(i, _WARMUP)) for i in range(self.steps)])
        # a run that starts at call s > 0 (img2img) takes call k's row at s + k, k < 4
        self._since64 = [
            np.stack([self._row(i, k) if i >= k else rows[i] for i in range(self.steps)])
            for k in range(_WARMUP)
        ]
        self._variant_tables: dict[tuple[int, torch.device], Tensor] = {}
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        return False

    def _variant(self, k: int, device: torch.device) -> Tensor:
        """The fp32 table of rows for the ``k``-th call of a run (k < 4), cached per device."""
        tab = self._variant_tables.get((k, device))
        if tab is None:
            tab = torch.from_numpy(self._since64[k]).float().to(device)
            self._variant_tables[(k, device)] = tab
        return tab

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_inference_steps} ({self.steps} model calls),"
            f" prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}, set_alpha_to_one={self.set_alpha_to_one},"
            f" schedule={self.schedule!r})"
        )

    def reset(self) -> None:
        """Forget the run: the next call starts a new one (call 0's row)."""
        self._ets: list[Tensor] = []  # the outputs eq. (12) combines (call 1's is not kept)
        self._last: Tensor | None = None  # the sample of the run's first call
        self._prev_i = -1
        self._start = 0

    # ------------------------------------------------------------------ stepping
    def graph_history(self, i: int, hist: Sequence[Tensor]) -> None:
        """After call ``i`` of a CUDA-graph run: the captured step shifted every output into the
        static history ``[last, m_{i-1}, m_{i-2}, m_{i-3}]``, but eq. (12) skips call 1's
        output (diffusers keeps e_0, e_2, e_3, ...): put e_0 back as m_{i-1} (a device copy)."""
        if i == 1:
            hist[1].copy_(hist[2])

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of model call ``i`` at sample ``x`` from its (combined) output
        ``m`` (for trajectories; a torch expression, not part of the fused step)."""
        ab = float(self.schedule.alphas_cumprod[int(self._ts[i])])
        a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        if self.prediction_type == "v_prediction":
            return (a * x.float() - s * m.float()).to(x.dtype)
        return ((x.float() - s * m.float()) / a).to(x.dtype)

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

        The history (call 0's sample, the outputs eq. (12) combines) is kept on the sampler and
        used only when call ``i - 1`` was the last one it ran for this x shape and device;
        otherwise call ``i`` starts a new run (img2img: diffusers' pipelines run
        ``timesteps[s:]`` with a fresh scheduler). PLMS is deterministic: ``noise``,
        ``generator`` and ``generator_state`` are unused. Returns the next sample, or ``(sample,
        x0)`` with ``return_x0`` (x0: this call's x0 prediction, see :meth:`x0_of`).
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        ets = self._ets
        valid = (bool(ets) and self._prev_i == i - 1 and ets[-1].shape == x.shape
                 and ets[-1].device == x.device)  # fmt: skip
        if not valid:
            self._start, ets, self._last = i, [], None
        k = i - self._start
        table = self.coef_table(x.device) if k >= _WARMUP else self._variant(k, x.device)
        hist = ets[::-1] + [None] * 3  # newest first: e_{i-1}, e_{i-2}, e_{i-3}
        last = self._last if k == 1 else None
        m1, m2, m3 = (hist[0], None, None) if k == 1 else hist[:3]
        x_c, m, x_next = self.step_with_history(model_output, i, x, table[i], last, m1, m2, m3,
                                                guidance_scale=guidance_scale)  # fmt: skip
        if k == 0:
            self._last = x_c  # x_c = x: call 1 steps from here again
        if k != 1:  # diffusers' ets: call 1's output is averaged in, then dropped
            ets = [*ets[-2:], m]
        self._ets, self._prev_i = ets, i
        return (x_next, self.x0_of(m, i, x)) if return_x0 else x_next
