"""DDPM ancestral sampling (Ho, Jain & Abbeel, 2020, arXiv:2006.11239) with the improved-DDPM
learned variance (Nichol & Dhariwal, 2021, arXiv:2102.09672)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import (
    Sampler,
    _ops,
    _sqrt,
    advance_generator_state,
    custom_steps,
    set_x0_options,
    threshold_x0,
)
from fastdiff.samplers.ddim import _combine_cfg, _x0_eps
from fastdiff.schedules import NoiseSchedule

__all__ = ["DDPMSampler"]

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


class DDPMSampler(Sampler):
    """Ancestral sampler: x_prev ~ N(mu~_t(x_t, x0_pred), sigma_t^2 I) (DDPM Algorithm 2).

    The mean is that of the Gaussian posterior q(x_prev | x_t, x_0) (DDPM eq. 6-7) at the model's
    predicted x_0; the variance sigma_t^2 is chosen by ``variance_type``. With ab = alpha_bar,
    "prev" the next timestep in ``timesteps`` (ab_prev = 1 after the last) and the step's
    effective alpha'_t = ab_t / ab_prev, beta'_t = 1 - alpha'_t (improved DDPM section 4, for
    strided sampling; with all T steps these are DDPM's alpha_t and beta_t), eq. 7 reads::

        mu~_t  = sqrt(ab_prev) beta'_t / (1 - ab_t) x0
                 + sqrt(alpha'_t) (1 - ab_prev) / (1 - ab_t) x_t
        x_prev = mu~_t + sigma_t z,   z ~ N(0, I)

    with z = 0 at t = 0 (the paper's t = 1: Algorithm 2, line 3).

    For an eps model, x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) (eq. 4 inverted) turns mu~_t
    into eq. 11, 1/sqrt(alpha'_t) (x_t - beta'_t / sqrt(1 - ab_t) eps); x0 is clipped first
    (``clip_sample``, diffusers' default; Algorithm 2 has no clip), which eq. 11 cannot express.

    Variance (``variance_type``; DDPM section 3.2 gives the two fixed choices):

    * ``"fixed_small"``: sigma_t^2 = beta~_t = (1 - ab_prev)/(1 - ab_t) beta'_t, the posterior's
      variance (eq. 7), clamped at 1e-20 as diffusers does;
    * ``"fixed_large"``: sigma_t^2 = beta'_t;
    * ``"learned_range"``: improved DDPM eq. 15, Sigma = exp(v log beta'_t + (1 - v) log beta~_t).
      The model outputs 2C channels ``[prediction, r]``, and v = (r + 1)/2 maps its nominal
      [-1, 1] to [0, 1] as the paper's released code and diffusers do (not clamped: the paper
      puts no constraint on v).

    Each step is one fused ``sampler_step`` call with the precomputed row
    ``[sqrt(ab_t), sqrt(1-ab_t), c_x0, 0, c_x, c_noise, log beta'_t, log beta~_t]``: c_x0 and c_x
    are eq. 7's weights of x0 and x_t, c_noise is sigma_t (1 with ``learned_range``, whose
    sigma_t the op computes from the two log variances).

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"leading"``).
        variance_type: see above.
        clip_sample, clip_sample_range: clip x0 to ``[-clip_sample_range, clip_sample_range]``
            (default on, range 1).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0
            (Imagen) instead of clipping.
        timesteps: custom timesteps, strictly descending in [0, T - 1] (diffusers'
            ``set_timesteps(timesteps=...)``); "prev" is then the next one in the list (ab_prev
            = 1 after the last, which still adds noise if it is > 0, as diffusers);
            ``steps`` is their number (or None); ``timestep_spacing`` and ``steps_offset`` are
            unused.
    """

    name = "ddpm"
    default_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None = None,
        *,
        variance_type: str = "fixed_small",
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type: expected one of {list(VARIANCE_TYPES)}, got {variance_type!r}"
            )
        set_x0_options(self, clip_sample, clip_sample_range, thresholding,
                       dynamic_thresholding_ratio, sample_max_value)  # fmt: skip
        self.variance_type = variance_type
        self.learned_variance = variance_type == "learned_range"
        self._custom = None  # user timesteps (set_timesteps(timesteps=...)), int64, descending
        if timesteps is not None and isinstance(schedule, NoiseSchedule):
            self._custom, steps = custom_steps(timesteps, schedule.num_train_timesteps, steps)
        if steps is None and isinstance(schedule, NoiseSchedule):
            steps = schedule.num_train_timesteps
        super().__init__(
            schedule,
            steps,  # type: ignore[arg-type]
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )

    def _make_timesteps(self) -> np.ndarray:
        if self._custom is not None:
            return self._custom.copy()
        return super()._make_timesteps()

    def coefficients(self) -> np.ndarray:
        ab = self.schedule.alphas_cumprod
        ts = self._ts
        prev = np.concatenate([ts[1:], [-1]])
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i, (t, pt) in enumerate(zip(ts, prev, strict=True)):
            ab_t = float(ab[t])
            ab_prev = float(ab[pt]) if pt >= 0 else 1.0
            alpha_t = ab_t / ab_prev  # alpha'_t of the (strided) step
            beta_t = 1.0 - alpha_t  # beta'_t
            # eq. 7: mu~_t = c_x0 x0 + c_x x_t, beta~_t = the posterior variance
            c_x0 = math.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
            c_x = math.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t)
            beta_tilde = max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
            log_beta = math.log(max(beta_t, 1e-20))  # improved DDPM eq. 15's two end points
            log_beta_tilde = math.log(beta_tilde)
            if t == 0:
                c_noise = 0.0
            elif self.variance_type == "fixed_small":
                c_noise = math.sqrt(beta_tilde)
            elif self.variance_type == "fixed_large":
                c_noise = _sqrt(beta_t)
            else:
                c_noise = 1.0  # learned_range: the op computes sigma_t from the log variances
            rows[i] = [_sqrt(ab_t), _sqrt(1.0 - ab_t), c_x0, 0.0, c_x, c_noise, log_beta,
                       log_beta_tilde]  # fmt: skip
        return rows

    def config(self) -> dict:
        return {
            **super().config(),
            "variance_type": self.variance_type,
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            "thresholding": self.thresholding,
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
        """One ancestral step at step index ``i`` (one fused op call).

        ``noise`` is z, drawn with ``generator`` when the step adds noise and none is given, or
        in the kernel (Philox) from ``generator_state`` (int64 ``[2]`` = (seed, offset) on x's
        device; the offset is advanced by ``x.numel()`` in place).
        Returns x_prev, or ``(x_prev, x0)`` with ``return_x0``.
        """
        lv = self.learned_variance
        self._check_step_args(model_output, i, x, noise, guidance_scale, lv)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)  # none at t = 0
        if coef is None:
            coef = self.coef_table(x.device)[i]
        ops = _ops()
        if not self.thresholding:
            clip = self.clip_sample_range if self.clip_sample else None
            out = ops.sampler_step(
                x,
                model_output,
                coef,
                prediction_type=self.prediction_type,
                clip_range=clip,
                guidance_scale=guidance_scale,
                learned_variance=lv,
                return_x0=return_x0,
                **nkw,
            )
            advance_generator_state(nkw, x)
            return out
        # Dynamic thresholding: one reduction pass for the per-sample quantile, then the update
        # with the thresholded x0 as a "sample" prediction (eps is not used by DDPM: c_eps = 0).
        c = x.shape[1]
        if lv:
            if guidance_scale is not None:
                n = x.shape[0]
                var = model_output[n:, c:]
                m = _combine_cfg(model_output[:, :c], guidance_scale)
            else:
                m, var = model_output[:, :c], model_output[:, c:]
        else:
            m = _combine_cfg(model_output, guidance_scale)
        x0, _ = _x0_eps(x, m, coef[0], coef[1], self.prediction_type)
        x0 = threshold_x0(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if lv:
            x0 = torch.cat([x0, var.to(x0.dtype)], dim=1)
        out = ops.sampler_step(
            x,
            x0,
            coef,
            prediction_type="sample",
            learned_variance=lv,
            return_x0=return_x0,
            **nkw,
        )
        advance_generator_state(nkw, x)
        return out
