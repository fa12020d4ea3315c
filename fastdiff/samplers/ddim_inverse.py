"""DDIM inversion: the deterministic DDIM ODE run upwards, x_0 -> x_T (Song, Meng & Ermon 2021,
arXiv:2010.02502, Sec. 4.3; diffusers' ``DDIMInverseScheduler``).

Real-image editing (prompt-to-prompt, null-text inversion, DiffEdit, pix2pix-zero) first maps an
image to the noise x_T that DDIM (``eta=0``) would turn back into it. DDIM eq. 13 is the Euler
step of an ODE in (x / sqrt(ab), sqrt(1 - ab) / sqrt(ab)); read in the other direction, from the
noise level of one timestep up to the next, it is the same update with the roles of the two
levels swapped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import (
    Sampler,
    _ops,
    _sqrt,
    alpha_bar_prev,
    check_clip_range,
    spaced_timesteps,
)
from fastdiff.schedules import NoiseSchedule

__all__ = ["DDIMInverseSampler"]

PREV_TIMESTEP_RULES = ("diffusers", "list")
INVERSE_SPACINGS = ("leading", "trailing")


class DDIMInverseSampler(Sampler):
    """Deterministic DDIM inversion, step for step diffusers' ``DDIMInverseScheduler``.

    The timesteps ascend (``leading``: 0, T//N, 2 T//N, ... + ``steps_offset``; ``trailing``:
    ..., T - 1). Step i calls the model at the *upper* timestep t_i on the sample x at the lower
    noise level s_i (diffusers' ``prev_timestep``), and moves x up to t_i (ab = alpha_bar)::

        x0   = (x - sqrt(1 - ab_s) eps) / sqrt(ab_s)          (the predicted x0, optionally clipped)
        x_t  = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps             (DDIM eq. 12, eta = 0, s -> t)

    with s_i = t_i - T // N (``prev_timestep="diffusers"``) or the previous listed timestep
    (``"list"``), and ab_s = 1 (``set_alpha_to_one``, the clean image) or ab[0] below timestep
    0. Taking eps(x_s, t) for eps(x_s, s) is the approximation every DDIM inversion makes; its
    error falls with the step size.

    Every coefficient is computed in float64 when the sampler is built; a step is one call of
    the fused ``sampler_step`` op with the row ``[sqrt(ab_s), sqrt(1-ab_s), sqrt(ab_t),
    sqrt(1-ab_t), 0, 0, 0, 0]`` (DDIM's row with the two levels swapped).

    Args:
        schedule, steps, prediction_type, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler`.
        timestep_spacing: ``"leading"`` (default) or ``"trailing"`` (diffusers'
            ``DDIMInverseScheduler`` has no ``"linspace"``: a ``ValueError``).
        clip_sample: clip the predicted x0 to ``[-clip_sample_range, clip_sample_range]``
            (diffusers' default: on; pipelines built on Stable Diffusion's config turn it off).
        set_alpha_to_one: the first step starts from ab = 1 (the image itself) where s_0 < 0;
            else from ab[0].
        prev_timestep: ``"diffusers"`` (default, for parity) or ``"list"``: which lower level a
            step starts from (they differ only under ``trailing`` spacing when T is not a
            multiple of ``steps``; see :class:`~fastdiff.samplers.DDIMSampler`).
    """

    name = "ddim_inverse"
    inverts = True
    default_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        prev_timestep: str = "diffusers",
    ) -> None:
        if timestep_spacing is not None and timestep_spacing not in INVERSE_SPACINGS:
            raise ValueError(
                f"timestep_spacing: expected one of {list(INVERSE_SPACINGS)} (diffusers' "
                f"DDIMInverseScheduler has no other), got {timestep_spacing!r}"
            )
        if not isinstance(prev_timestep, str) or prev_timestep not in PREV_TIMESTEP_RULES:
            raise ValueError(
                f"prev_timestep: expected one of {list(PREV_TIMESTEP_RULES)}, got {prev_timestep!r}"
            )
        check_clip_range(clip_sample, clip_sample_range)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.prev_timestep = prev_timestep
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )

    def _make_timesteps(self) -> np.ndarray:
        # diffusers' DDIMInverseScheduler.set_timesteps: DDIMScheduler's list, ascending
        T = self.schedule.num_train_timesteps
        down = spaced_timesteps(T, self.steps, self.timestep_spacing, self.steps_offset)
        return down[::-1].copy()

    def source_timesteps(self) -> np.ndarray:
        """s_i, the timestep whose noise level step i starts from (< 0: below timestep 0)."""
        ts = self._ts
        if self.prev_timestep == "list":
            return np.concatenate([[-1], ts[:-1]])
        T = self.schedule.num_train_timesteps
        return np.minimum(ts - T // self.steps, T - 1)

    def coefficients(self) -> np.ndarray:
        ab = self.schedule.alphas_cumprod
        start = 1.0 if self.set_alpha_to_one else float(ab[0])
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i, (t, s) in enumerate(zip(self._ts, self.source_timesteps(), strict=True)):
            ab_s = alpha_bar_prev(self.schedule, int(s), start)
            ab_t = float(ab[t])
            if self.prediction_type == "sample" and not 1.0 - ab_s > 0.0:
                raise ValueError(
                    f"prediction_type: 'sample' cannot start step {i} (t = {t}) from alpha_bar "
                    "= 1 (set_alpha_to_one=True): eps = (x - sqrt(ab) x0) / sqrt(1 - ab) is 0/0 "
                    "there (diffusers' DDIMInverseScheduler returns inf / NaN); use "
                    "set_alpha_to_one=False"
                )
            rows[i] = [_sqrt(ab_s), _sqrt(1.0 - ab_s), _sqrt(ab_t), _sqrt(1.0 - ab_t), 0, 0, 0, 0]
        return rows

    def config(self) -> dict:
        return {
            **super().config(),
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
        }

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
        """One inversion step x_{s_i} -> x_{t_i} at step index ``i`` (one fused op call).

        ``model_output`` is the model's output at ``self.timesteps[i]`` (``[2N, ...] =
        [uncond, cond]`` with ``guidance_scale``, combined in the op). The step is
        deterministic: ``noise``, ``generator`` and ``generator_state`` are accepted for the
        common sampler interface and unused. ``coef`` overrides the table row (CUDA graphs pass
        a static buffer). Returns the new sample, or ``(sample, x0)`` with ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        return _ops().sampler_step(
            x,
            model_output,
            coef,
            prediction_type=self.prediction_type,
            clip_range=self.clip_sample_range if self.clip_sample else None,
            guidance_scale=guidance_scale,
            return_x0=return_x0,
        )
