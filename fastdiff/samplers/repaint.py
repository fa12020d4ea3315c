"""RePaint (Lugmayr et al. 2022, arXiv:2201.09865): the time list with resampling jumps and the
per-step coefficients of its reverse step and its forward ("undo") jump.

RePaint inpaints with an ordinary unconditional DDPM. Algorithm 1 of the paper, per step t
(ab = alpha_bar; ``keep`` is 1 on the known pixels, the paper's m)::

    x_known   ~ N(sqrt(ab_prev) x_0, (1 - ab_prev) I)                       (eq. 8a; DDPM eq. 4)
    x_unknown = one reverse step of x_t                                       (eq. 8b)
    x_prev    = keep * x_known + (1 - keep) * x_unknown                       (eq. 8c)

and every ``jump_length`` steps the sample is pushed back up the chain (``jump_n_sample - 1``
times per jump) with the forward transition (Alg. 1 line 10; DDPM eq. 2)::

    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z

so that the model sees the blended sample again and harmonises the generated region with the
known one (Sec. 4.2, "resampling"). As diffusers' ``RePaintScheduler`` does, the reverse step is
DDIM's (Song et al. 2021, arXiv:2010.02502, eq. 12 with sigma of eq. 16; eta = 1 is the DDPM
posterior of DDPM eqs. 6-7), the known part reuses the step's noise z, and a jump over a
spaced step of ``T // steps`` training steps applies the forward transition once per training
step, each with its own z. diffusers' mask is the opposite of fastdiff's: see
:func:`fastdiff.repaint`.

This module is host-side math only (numpy / float64): the time list, and for every level the
``sampler_step`` row of the unknown part, the (sqrt(ab_prev), sqrt(1 - ab_prev)) of the known
part and the forward rows of a jump. The loop is :func:`fastdiff.repaint`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import _sqrt
from fastdiff.schedules import PREDICTION_TYPES, NoiseSchedule

__all__ = ["RePaintSampler", "repaint_timesteps"]


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (numpy ints too, not bool); TypeError / ValueError naming it."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int >= 1, got {type(value).__name__}") from None
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def repaint_timesteps(
    steps: int, jump_length: int, jump_n_sample: int, num_train_timesteps: int = 1000
) -> np.ndarray:
    """RePaint's time list (the paper's Sec. 4.2 / App. B schedule, as diffusers'
    ``RePaintScheduler.set_timesteps``): int64 model timesteps, non-monotone.

    Walking down from ``steps - 1`` to 0 in units of ``T // steps``, after each level j that is
    a multiple of ``jump_length`` below ``steps - jump_length`` the walk goes back up
    ``jump_length`` levels, ``jump_n_sample - 1`` times for each such j. An entry below the
    previous one is a reverse step at that timestep, an entry above it a forward jump.
    """
    steps = _positive_int("steps", steps)
    jump_length = _positive_int("jump_length", jump_length)
    jump_n_sample = _positive_int("jump_n_sample", jump_n_sample)
    T = _positive_int("num_train_timesteps", num_train_timesteps)
    if steps > T:
        raise ValueError(f"steps: expected 1 <= steps <= num_train_timesteps = {T}, got {steps}")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    levels: list[int] = []
    t = steps
    while t >= 1:
        t -= 1
        levels.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                levels.append(t)
    return np.asarray(levels, dtype=np.int64) * (T // steps)


class RePaintSampler:
    """RePaint's schedule and host coefficients (float64, then fp32 device tables).

    Args:
        schedule: the model's training :class:`~fastdiff.NoiseSchedule`.
        steps: reverse levels (1 .. T); the spacing is ``T // steps`` training steps.
        jump_length: levels per resampling jump (the paper's j; default 10).
        jump_n_sample: resampling passes per jump point (the paper's r; 1: no jumps).
        eta: DDIM's noise weight in the reverse step of the unknown part (0: deterministic
            DDIM, 1: DDPM's posterior variance); at most 1.
        clip_sample: clip the predicted x0 to [-1, 1] (diffusers' default, on).
        prediction_type: ``"epsilon"`` (diffusers' RePaint), ``"v_prediction"`` or ``"sample"``.

    Attributes:
        timesteps: int64 ``[len]`` the time list (:func:`repaint_timesteps`).
        step_rows: float64 ``[steps x 8]``: row k is the ``sampler_step`` row of the reverse
            step at level k (timestep ``k * skip``).
        known_rows: float64 ``[steps x 2]``: (sqrt(ab_prev), sqrt(1 - ab_prev)) of level k.
        undo_rows: float64 ``[steps x skip x 8]``: the forward rows of a jump from level k
            (``c_x = sqrt(1 - beta)``, ``c_noise = sqrt(beta)``, as ``prediction_type="sample"``
            rows with a = 0, s = 1: ``x' = c_x x + c_noise z``).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        eta: float = 0.0,
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule: expected a fastdiff.NoiseSchedule, got {type(schedule).__name__}"
            )
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
            raise TypeError(f"eta: expected a float in [0, 1], got {eta!r}")
        eta = float(eta)
        if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta: expected a finite float in [0, 1], got {eta}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: expected one of {list(PREDICTION_TYPES)}, "
                f"got {prediction_type!r}"
            )
        T = schedule.num_train_timesteps
        self.timesteps = torch.from_numpy(repaint_timesteps(steps, jump_length, jump_n_sample, T))
        self.schedule = schedule
        self.steps = int(steps)
        self.jump_length = int(jump_length)
        self.jump_n_sample = int(jump_n_sample)
        self.eta = eta
        self.clip_sample = bool(clip_sample)
        self.prediction_type = prediction_type
        self.skip = T // self.steps
        self.step_rows, self.known_rows = self._step_rows()
        self.undo_rows = self._undo_rows()

    def __repr__(self) -> str:
        return (
            f"RePaintSampler(steps={self.steps}, jump_length={self.jump_length}, "
            f"jump_n_sample={self.jump_n_sample}, eta={self.eta}, calls={self.model_calls})"
        )

    @property
    def model_calls(self) -> int:
        """Reverse steps in the time list (one model call each)."""
        ts = self.timesteps.tolist()
        return sum(1 for last, t in zip([ts[0] + 1, *ts[:-1]], ts, strict=True) if t < last)

    def plan(self) -> list[tuple[bool, int]]:
        """The run, entry by entry: ``(True, k)`` a reverse step at level k, ``(False, k)`` a
        forward jump from level k (diffusers' ``undo_step(x, t_last)``, k = t_last // skip)."""
        ts = self.timesteps.tolist()
        out = []
        last = ts[0] + 1
        for t in ts:
            out.append((True, t // self.skip) if t < last else (False, last // self.skip))
            last = t
        return out

    def _step_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """DDIM eq. 12 (sigma: eq. 16 times eta) from level k to k - 1 (ab_prev = 1 below 0,
        diffusers' ``final_alpha_cumprod``), and the known part's noising to ab_prev."""
        ab = self.schedule.alphas_cumprod
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        known = np.zeros((self.steps, 2), dtype=np.float64)
        for k in range(self.steps):
            t, pt = k * self.skip, (k - 1) * self.skip
            ab_t = float(ab[t])
            ab_p = float(ab[pt]) if pt >= 0 else 1.0
            var = (1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p)  # DDIM eq. 16 / eta^2
            sigma = self.eta * _sqrt(var)
            rows[k] = [
                _sqrt(ab_t),
                _sqrt(1.0 - ab_t),
                _sqrt(ab_p),
                _sqrt(1.0 - ab_p - sigma * sigma),
                0.0,
                sigma,
                0.0,
                0.0,
            ]
            known[k] = [_sqrt(ab_p), _sqrt(1.0 - ab_p)]  # RePaint eq. 8a (a std, not a var)
        return rows, known

    def _undo_rows(self) -> np.ndarray:
        """Forward rows of a jump from level k: training steps k*skip .. k*skip + skip - 1,
        as diffusers' ``undo_step`` (betas past T - 1 never occur: jumps start below the
        top level)."""
        betas = self.schedule.betas
        T = self.schedule.num_train_timesteps
        rows = np.zeros((self.steps, self.skip, 8), dtype=np.float64)
        rows[:, :, 1] = 1.0  # s = 1: the op's "sample" branch, eps = x, unused (c_eps = 0)
        for k in range(self.steps):
            for i in range(self.skip):
                t = k * self.skip + i
                if t < T:
                    b = float(betas[t])
                    rows[k, i, 4], rows[k, i, 5] = _sqrt(1.0 - b), _sqrt(b)
        return rows

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(step, known, undo) tables as fp32 on ``device``: one host -> device copy each."""
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).to(device)
            for a in (self.step_rows, self.known_rows, self.undo_rows)
        )
