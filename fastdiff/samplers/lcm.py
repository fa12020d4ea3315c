"""Few-step samplers of distilled models: latent consistency models (LCM; Luo et al. 2023,
arXiv:2310.04378, also LCM-LoRA) and trajectory consistency distillation (TCD; Zheng et al. 2024,
arXiv:2402.19159), as diffusers' ``LCMScheduler`` and ``TCDScheduler``.

Both steps are linear in x_t, the model's x0 / eps predictions and a fresh noise draw z, so each
model call is one fused :func:`fastdiff.ops.sampler_step` call with a float64 row
``[a, s, c_x0, c_eps, c_x, c_noise, 0, 0]``: the op forms x0 and eps from the model output with
``a = sqrt(ab_t)``, ``s = sqrt(1 - ab_t)`` and writes ``c_x0 x0 + c_eps eps + c_x x + c_noise z``.
"""

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
    check_thresholding,
    custom_steps,
    threshold_x0,
)
from fastdiff.samplers.ddim import _combine_cfg, _x0_eps
from fastdiff.schedules import NoiseSchedule

__all__ = ["LCMSampler", "TCDSampler", "consistency_timesteps"]

#: sigma_data of the consistency-model boundary conditions (Song et al. 2023; diffusers' value)
SIGMA_DATA = 0.5
ORIGIN_GRIDS = ("distillation", "all")


def consistency_timesteps(
    num_train_timesteps: int,
    steps: int,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    origin_grid: str = "distillation",
) -> np.ndarray:
    """The model timesteps of diffusers' ``LCMScheduler`` / ``TCDScheduler.set_timesteps``.

    The distillation grid (LCM paper, section 4.2: the skipping step k = T // n with n =
    ``original_inference_steps``) is ``t = k j - 1`` for ``j = 1 .. int(n strength)``; the
    ``steps`` timesteps are the entries at the indices ``floor(linspace(0, L, steps,
    endpoint=False))`` of it, descending (L its length). ``origin_grid="all"`` (TCD's
    ``set_timesteps`` given an explicit ``original_inference_steps``) takes them from every
    training timestep ``0 .. int(T strength) - 1`` instead (n then only bounds ``steps``).
    """
    T, n = num_train_timesteps, original_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"original_inference_steps: expected an int >= 1, got {n!r}")
    if n > T:
        raise ValueError(
            f"original_inference_steps: expected <= num_train_timesteps = {T}, got {n}"
        )
    strength = _check_strength(strength)
    if origin_grid not in ORIGIN_GRIDS:
        raise ValueError(f"origin_grid: expected one of {list(ORIGIN_GRIDS)}, got {origin_grid!r}")
    if origin_grid == "distillation":
        origin = np.arange(1, int(n * strength) + 1, dtype=np.int64) * (T // n) - 1
    else:
        origin = np.arange(0, int(T * strength), dtype=np.int64)
    if len(origin) // steps < 1:
        raise ValueError(
            f"steps: the {len(origin)} timesteps of the {origin_grid} grid "
            f"(original_inference_steps x strength = {n} x {strength}) are fewer than "
            f"steps = {steps}; use fewer steps or a larger strength"
        )
    if steps > n:
        raise ValueError(
            f"steps: expected <= original_inference_steps = {n} (the timesteps are a subset of "
            f"its grid), got {steps}"
        )
    origin = origin[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].copy()


def _float_option(name: str, v: object) -> float:
    """A real-number option (not a bool) as a float; TypeError naming it otherwise (float()
    raised 'could not convert string to float' without the option's name)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    return float(v)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)):
        raise TypeError(f"strength: expected a float in (0, 1], got {type(strength).__name__}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength: expected a float in (0, 1], got {strength}")
    return float(strength)


class _DistilledSampler(Sampler):
    """Timesteps of the LCM / TCD schedulers (``set_timesteps``) and their shared options."""

    origin_grid = "distillation"
    #: img2img strength is ``set_timesteps``' (LatentConsistencyModelImg2ImgPipeline's)
    strength_option = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None,
        *,
        prediction_type: str,
        original_inference_steps: int,
        strength: float,
        timesteps: Sequence[int] | None,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule: expected a fastdiff.NoiseSchedule, got {type(schedule).__name__}"
            )
        self.original_inference_steps = original_inference_steps
        self.strength = _check_strength(strength)
        self._custom = None
        if timesteps is not None:
            if self.strength != 1.0:
                raise ValueError(
                    "strength: custom timesteps with strength < 1 are not supported (diffusers "
                    "then keeps the full list's length and adds noise on its final step); pass "
                    f"the shortened list instead, got strength={strength}"
                )
            T = schedule.num_train_timesteps
            self._custom, steps = custom_steps(timesteps, T, steps, hint="")
        if steps is None:
            raise TypeError("steps: expected the number of steps (or custom timesteps=)")
        super().__init__(schedule, steps, prediction_type=prediction_type)
        if prediction_type == "epsilon":
            zero = [int(t) for t in self._ts if float(self.schedule.alphas_cumprod[t]) <= 0.0]
            if zero:
                raise ValueError(
                    f"prediction_type: 'epsilon' at t = {zero[0]}, where alpha_bar = 0 (a "
                    "zero-terminal-SNR schedule), divides by sqrt(alpha_bar) = 0 to get x0 "
                    "(diffusers returns inf / NaN); use a v_prediction model"
                )

    def _make_timesteps(self) -> np.ndarray:
        if self._custom is not None:
            return self._custom.copy()
        return consistency_timesteps(
            self.schedule.num_train_timesteps,
            self.steps,
            self.original_inference_steps,
            self.strength,
            self.origin_grid,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, prediction_type={self.prediction_type!r},"
            f" timesteps={self._ts.tolist()}, schedule={self.schedule!r})"
        )

    def _needs_noise_row(self, i: int) -> bool:
        # diffusers draws z on every step but the last (also where its weight is 0)
        return self._noisy and i != self.steps - 1

    _noisy = True


class LCMSampler(_DistilledSampler):
    """Multistep latent-consistency sampling (Luo et al. 2023, Algorithm 1 / eq. (9)), step for
    step as diffusers' ``LCMScheduler``.

    The consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (Song et al. 2023,
    "Consistency Models", eq. (7)-(8), with sigma_data = 0.5 and diffusers' discrete
    parameterisation ``tau = timestep_scaling * t``)::

        c_skip = sigma_data^2 / (tau^2 + sigma_data^2),    c_out = tau / sqrt(tau^2 + sigma_data^2)

    x0 is the model's data prediction (epsilon: (x - sqrt(1 - ab_t) eps) / sqrt(ab_t); v:
    sqrt(ab_t) x - sqrt(1 - ab_t) v; sample: the output), clipped to ``clip_sample_range`` or
    dynamically thresholded if asked. With ab = alpha_bar and ab_prev that of the next timestep::

        denoised = c_out x0 + c_skip x_t
        x_prev   = sqrt(ab_prev) denoised + sqrt(1 - ab_prev) z        (z ~ N(0, I), fresh)

    and the last step returns ``denoised`` (no noise; a 1-step run is one denoising). Fused row:
    ``[sqrt(ab_t), sqrt(1 - ab_t), sqrt(ab_prev) c_out, 0, sqrt(ab_prev) c_skip,
    sqrt(1 - ab_prev), 0, 0]``, the last step ``[.., c_out, 0, c_skip, 0, 0, 0]``.

    Timesteps: :func:`consistency_timesteps` (the distillation grid of ``original_inference_steps``
    and ``strength``; img2img pipelines of LCM pass ``strength`` here), or ``timesteps``.
    diffusers' ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` do nothing in this
    scheduler and are not options.

    Args:
        schedule: the model's training schedule; steps: number of steps (may be left out with
            ``timesteps``).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        original_inference_steps: n of the distillation grid (diffusers' default 50).
        strength: img2img strength in (0, 1]: the grid's first ``int(n strength)`` entries.
        timesteps: custom descending timesteps (diffusers' ``set_timesteps(timesteps=...)``).
        timestep_scaling: tau = timestep_scaling * t in c_skip / c_out (default 10).
        clip_sample, clip_sample_range: clip x0 to ``[-r, r]`` (default off).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0
            (Imagen) instead of clipping; a separate reduction pass before the op.
    """

    name = "lcm"
    #: diffusers' LatentConsistencyModelPipeline default (a distilled model needs 2-8 steps)
    default_steps = 4

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None = None,
        *,
        prediction_type: str = "epsilon",
        original_inference_steps: int = 50,
        strength: float = 1.0,
        timesteps: Sequence[int] | None = None,
        timestep_scaling: float = 10.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ) -> None:
        scaling = _float_option("timestep_scaling", timestep_scaling)
        if not 0.0 <= scaling < math.inf:
            raise ValueError(f"timestep_scaling: expected a finite float >= 0, got {scaling}")
        clip_range = _float_option("clip_sample_range", clip_sample_range)
        if clip_sample and not clip_range > 0:
            raise ValueError(f"clip_sample_range: expected > 0, got {clip_sample_range}")
        ratio = _float_option("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
        max_value = _float_option("sample_max_value", sample_max_value)
        if thresholding:
            check_thresholding(ratio, max_value)
        self.timestep_scaling = scaling
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = clip_range
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = ratio
        self.sample_max_value = max_value
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            original_inference_steps=original_inference_steps,
            strength=strength,
            timesteps=timesteps,
        )

    def boundary_scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at timestep t (Song et al. 2023, eq. (7)-(8); diffusers'
        ``get_scalings_for_boundary_condition_discrete``)."""
        tau = t * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (tau**2 + SIGMA_DATA**2)
        c_out = tau / math.sqrt(tau**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def coefficients(self) -> np.ndarray:
        ab = self.schedule.alphas_cumprod
        ts = self._ts
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i, t in enumerate(ts):
            ab_t = float(ab[t])
            c_skip, c_out = self.boundary_scalings(int(t))
            if i == self.steps - 1:  # the last step returns the denoised sample itself
                rows[i] = [_sqrt(ab_t), _sqrt(1.0 - ab_t), c_out, 0.0, c_skip, 0.0, 0.0, 0.0]
                continue
            ab_p = float(ab[ts[i + 1]])
            k = _sqrt(ab_p)
            rows[i] = [_sqrt(ab_t), _sqrt(1.0 - ab_t), k * c_out, 0.0, k * c_skip,
                       _sqrt(1.0 - ab_p), 0.0, 0.0]  # fmt: skip
        return rows

    def config(self) -> dict:
        return {
            **super().config(),
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            "thresholding": self.thresholding,
            "noise": any(self._noise_steps),
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
        """One LCM step at step index ``i`` (one fused op call; with thresholding a reduction
        pass first).

        ``noise`` is z (drawn with ``generator`` on every step but the last when not given, or
        in the kernel with Philox from ``generator_state``, whose offset then advances by
        ``x.numel()``). ``coef`` overrides the table row (CUDA graphs). Returns x_prev (the
        denoised sample at the last step), or ``(x_prev, x0)`` with ``return_x0`` (x0: the
        model's clipped data prediction, before the boundary condition).
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        ops = _ops()
        if self.thresholding:  # x0 needs a per-sample quantile first: the op then takes it
            m = _combine_cfg(model_output, guidance_scale)
            x0, _ = _x0_eps(x, m, coef[0], coef[1], self.prediction_type)
            x0 = threshold_x0(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
            out = ops.sampler_step(
                x, x0, coef, prediction_type="sample", return_x0=return_x0, **nkw
            )  # c_eps = 0: the op's eps from this x0 is not used
        else:
            clip = self.clip_sample_range if self.clip_sample else None
            out = ops.sampler_step(
                x,
                model_output,
                coef,
                prediction_type=self.prediction_type,
                clip_range=clip,
                guidance_scale=guidance_scale,
                return_x0=return_x0,
                **nkw,
            )
        advance_generator_state(nkw, x)
        return out


class TCDSampler(_DistilledSampler):
    """Strategic stochastic sampling of trajectory consistency distillation (Zheng et al. 2024,
    section 4.3 / Algorithm 4), step for step as diffusers' ``TCDScheduler``.

    From x_t, with the next timestep t' (0 after the last step) and gamma = ``eta``, the model's
    predictions x0 and eps go back along the trajectory to the earlier noise level
    s = floor((1 - gamma) t') (DDIM, eta = 0), then fresh noise moves it forward to t'::

        x_s    = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps
        x_prev = sqrt(ab_t' / ab_s) x_s + sqrt(1 - ab_t' / ab_s) z          (z ~ N(0, I))

    gamma = 0 is deterministic (s = t': a DDIM step), gamma = 1 denoises to s = 0 and re-noises
    every step (multistep consistency sampling). The last step, and every step with gamma = 0,
    returns x_s (the last one at s = 0: sqrt(ab_0) x0 + sqrt(1 - ab_0) eps, as diffusers).
    Fused row: ``[sqrt(ab_t), sqrt(1 - ab_t), sqrt(ab_t'), sqrt(ab_t' / ab_s) sqrt(1 - ab_s), 0,
    sqrt(1 - ab_t' / ab_s), 0, 0]``, without noise ``[.., sqrt(ab_s), sqrt(1 - ab_s), 0, 0, 0,
    0]``; s is computed in float32 as diffusers does ((1 - 0.3) * 90: 63, float64 62).

    diffusers' TCDScheduler ignores its ``clip_sample``, ``thresholding``,
    ``timestep_scaling``, ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``; they
    are not options here. Its ``eta`` is an argument of ``step`` (default 0.3, this sampler's);
    diffusers' Stable Diffusion pipelines pass their own ``eta`` (default 0.0) unless given.

    Args:
        schedule, steps, prediction_type, original_inference_steps, strength, timesteps: as
            :class:`LCMSampler`.
        eta: gamma in [0, 1].
        origin_grid: ``"distillation"`` (default) or ``"all"``: the grid diffusers'
            ``set_timesteps`` uses when called with an explicit ``original_inference_steps``
            (every training timestep; see :func:`consistency_timesteps`).
    """

    name = "tcd"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None = None,
        *,
        eta: float = 0.3,
        prediction_type: str = "epsilon",
        original_inference_steps: int = 50,
        strength: float = 1.0,
        timesteps: Sequence[int] | None = None,
        origin_grid: str = "distillation",
    ) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)):
            raise TypeError(f"eta: expected a float in [0, 1], got {type(eta).__name__}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta: expected gamma in [0, 1], got {eta}")
        if origin_grid not in ORIGIN_GRIDS:
            raise ValueError(
                f"origin_grid: expected one of {list(ORIGIN_GRIDS)}, got {origin_grid!r}"
            )
        self.eta = float(eta)
        self.origin_grid = origin_grid
        self._noisy = self.eta > 0.0
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            original_inference_steps=original_inference_steps,
            strength=strength,
            timesteps=timesteps,
        )

    def s_timesteps(self) -> np.ndarray:
        """s = floor((1 - gamma) t') per step, in float32 arithmetic as diffusers (t' = the next
        timestep, 0 after the last)."""
        prev = torch.from_numpy(np.concatenate([self._ts[1:], [0]]).astype(np.int64))
        return torch.floor((1 - self.eta) * prev).to(torch.long).numpy()

    def coefficients(self) -> np.ndarray:
        ab = self.schedule.alphas_cumprod
        ts = self._ts
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i, (t, s) in enumerate(zip(ts, self.s_timesteps(), strict=True)):
            ab_t, ab_s = float(ab[t]), float(ab[s])
            head = [_sqrt(ab_t), _sqrt(1.0 - ab_t)]
            if not self._noisy or i == self.steps - 1:  # x_s itself
                rows[i] = [*head, _sqrt(ab_s), _sqrt(1.0 - ab_s), 0.0, 0.0, 0.0, 0.0]
                continue
            r = float(ab[ts[i + 1]]) / ab_s  # ab_t' / ab_s <= 1 (s <= t')
            k = _sqrt(r)
            rows[i] = [*head, k * _sqrt(ab_s), k * _sqrt(1.0 - ab_s), 0.0, _sqrt(1.0 - r),
                       0.0, 0.0]  # fmt: skip
        return rows

    def config(self) -> dict:
        return {**super().config(), "noise": any(self._noise_steps)}

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
        """One TCD step at step index ``i`` (one fused op call); arguments as
        :meth:`LCMSampler.step`. Returns x_prev, or ``(x_prev, x0)`` with ``return_x0``."""
        return self._one_op_step(model_output, i, x, noise, guidance_scale, generator, coef,
                                 generator_state, return_x0)  # fmt: skip
