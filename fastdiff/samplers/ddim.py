"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon, 2021, arXiv:2010.02502)."""

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
    alpha_bar_prev,
    set_x0_options,
    threshold_x0,
)
from fastdiff.schedules import NoiseSchedule

__all__ = ["DDIMSampler"]

PREV_TIMESTEP_RULES = ("diffusers", "list")


class DDIMSampler(Sampler):
    """DDIM sampler with stochasticity ``eta`` (eta=0: deterministic DDIM, eta=1: DDPM-like).

    One step, DDIM eq. 12 with sigma from eq. 16 (DDIM writes alpha_t for DDPM's alpha_bar_t;
    here ab = alpha_bar, "prev" = the next timestep of the reverse chain, see ``prev_timestep``)::

        x0     = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)                 (the "predicted x0", eq. 9)
        sigma  = eta * sqrt((1 - ab_prev)/(1 - ab_t) * (1 - ab_t/ab_prev))           (eq. 16)
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z        (eq. 12)

    A ``v_prediction`` or ``sample`` model gives (x0, eps) by eq. 4 instead (Salimans & Ho 2022:
    x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v, eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t). With
    eta = 1, sigma^2 is the posterior variance beta~ of DDPM eq. 7 for the (strided) step, the
    choice that makes the process Markovian again (DDIM section 4.1): on the same timesteps,
    with "prev" the next one listed and no x0 clipping, the step is then
    :class:`~fastdiff.samplers.DDPMSampler`'s ``fixed_small`` one.

    Departures from the paper, all as diffusers' ``DDIMScheduler``: x0 is clipped by default
    (``clip_sample``), and "prev" follows diffusers' ``prev_timestep`` rule by default.

    Every coefficient is precomputed in float64; a step is one call of the fused ``sampler_step``
    op with the row ``[sqrt(ab_t), sqrt(1-ab_t), sqrt(ab_prev), sqrt(1-ab_prev-sigma^2), 0, sigma,
    0, 0]``.

    Args:
        schedule, steps, prediction_type, timestep_spacing, steps_offset: see
            :class:`~fastdiff.samplers.base.Sampler` (default spacing ``"leading"``).
        eta: weight of the fresh noise (DDIM eq. 16).
        clip_sample: clip the predicted x0 to ``[-clip_sample_range, clip_sample_range]``
            (diffusers' default: on, range 1.0).
        thresholding: dynamic thresholding of x0 (Imagen) instead of clipping, with
            ``dynamic_thresholding_ratio`` and ``sample_max_value``; a separate reduction pass.
        use_clipped_model_output: re-derive eps from the clipped/thresholded x0 before the update.
        set_alpha_to_one: at the end of the chain use ab_prev = 1 (else ab_prev = ab[0]).
        prev_timestep: which alpha_bar the update moves to.

            * ``"diffusers"`` (default, for drop-in parity): prev_t = t - T // steps, as
              diffusers' ``DDIMScheduler`` computes it for every spacing. Under ``trailing`` or
              ``linspace`` spacing that is not always the next timestep the model is evaluated
              at when T is not a multiple of ``steps`` (e.g. trailing, 30 steps: the list is
              999, 966, 932, ... but the update from 966 lands on alpha_bar[933]; linspace, 50
              steps: the last step goes from t = 0 to "t = -20"), a known diffusers bug.
            * ``"list"``: the correct rule, prev_t = the next timestep in ``timesteps``
              (and -1 after the last). Identical to ``"diffusers"`` under ``leading`` spacing.
    """

    name = "ddim"
    default_spacing = "leading"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_clipped_model_output: bool = False,
        set_alpha_to_one: bool = True,
        prev_timestep: str = "diffusers",
    ) -> None:
        eta = float(eta)
        if not 0.0 <= eta < math.inf:
            raise ValueError(f"eta: expected a finite float >= 0, got {eta}")
        if prev_timestep not in PREV_TIMESTEP_RULES:
            raise ValueError(
                f"prev_timestep: expected one of {list(PREV_TIMESTEP_RULES)}, got {prev_timestep!r}"
            )
        set_x0_options(self, clip_sample, clip_sample_range, thresholding,
                       dynamic_thresholding_ratio, sample_max_value)  # fmt: skip
        self.eta = eta
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.prev_timestep = prev_timestep
        super().__init__(
            schedule,
            steps,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        # Thresholding path: the op gets (x := eps, model_output := thresholded x0) with a = 0,
        # s = 1 so that its "sample" branch yields eps = x unchanged (see ``step``).
        swap = self._coef64.copy()
        swap[:, 0], swap[:, 1] = 0.0, 1.0
        self._swap_cpu = torch.from_numpy(swap).to(torch.float32)
        self._swap_tables: dict[torch.device, Tensor] = {}
        self._swap_affines: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def prev_timesteps(self) -> np.ndarray:
        """prev_t for every step under the chosen ``prev_timestep`` rule (-1 or less: the end)."""
        ts = self._ts
        if self.prev_timestep == "list":
            return np.concatenate([ts[1:], [-1]])
        return ts - self.schedule.num_train_timesteps // self.steps

    def coefficients(self) -> np.ndarray:
        ab = self.schedule.alphas_cumprod
        final = 1.0 if self.set_alpha_to_one else float(ab[0])
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i, (t, pt) in enumerate(zip(self._ts, self.prev_timesteps(), strict=True)):
            ab_t = float(ab[t])
            ab_prev = alpha_bar_prev(self.schedule, int(pt), final)
            var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)  # (eq. 16 / eta)^2
            sigma = self.eta * _sqrt(var)
            if 1.0 - ab_prev - sigma * sigma < -1e-12:  # eta > 1: the eps direction is imaginary
                raise ValueError(
                    f"eta: {self.eta} makes sigma^2 > 1 - alpha_bar_prev at step {i} (t = {t}), "
                    "so DDIM eq. 12's sqrt(1 - alpha_bar_prev - sigma^2) is undefined; use "
                    "eta <= 1"
                )
            rows[i] = [
                _sqrt(ab_t),
                _sqrt(1.0 - ab_t),
                _sqrt(ab_prev),
                _sqrt(1.0 - ab_prev - sigma * sigma),
                0.0,
                sigma,
                0.0,
                0.0,
            ]
        return rows

    def _needs_noise_row(self, i: int) -> bool:
        # diffusers draws noise on every step when eta > 0 (even where sigma is 0)
        return self.eta > 0.0

    def config(self) -> dict:
        return {
            **super().config(),
            "clip": self.clip_sample,
            "clip_range": self.clip_sample_range,
            "thresholding": self.thresholding,
            "use_clipped": self.use_clipped_model_output,
            "noise": self.eta > 0.0,
        }

    def _swap_table(self, device: torch.device) -> Tensor:
        tab = self._swap_tables.get(device)
        if tab is None:
            tab = self._swap_tables[device] = self._swap_cpu.to(device)
        return tab

    def _swap_affine(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(mask, add) with coef * mask + add = coef with a = 0, s = 1 (cached per device)."""
        aff = self._swap_affines.get(device)
        if aff is None:
            mask = torch.tensor([0.0, 0.0] + [1.0] * 6, device=device)
            add = torch.tensor([0.0, 1.0] + [0.0] * 6, device=device)
            aff = self._swap_affines[device] = (mask, add)
        return aff

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
        """One DDIM step x_t -> x_prev at step index ``i`` (one fused op call).

        ``model_output`` is the raw model output (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``, combined in the op). ``noise`` is z (drawn with ``generator`` when
        needed and not given). ``coef`` overrides the table row (CUDA graphs pass a static
        buffer). ``generator_state`` (int64 ``[2]`` = (seed, offset) on x's device) draws z
        in the kernel with Philox when no ``noise`` is given; its offset is then advanced by
        ``x.numel()`` in place. Returns x_prev, or ``(x_prev, x0)`` with ``return_x0``.
        """
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)  # eta = 0: no noise
        own_coef = coef is None
        if own_coef:
            coef = self.coef_table(x.device)[i]
        ops = _ops()
        clip = self.clip_sample_range if (self.clip_sample and not self.thresholding) else None
        if not self.thresholding:
            out = ops.sampler_step(
                x,
                model_output,
                coef,
                prediction_type=self.prediction_type,
                clip_range=clip,
                recompute_eps=self.use_clipped_model_output,
                guidance_scale=guidance_scale,
                return_x0=return_x0,
                **nkw,
            )
            advance_generator_state(nkw, x)
            return out
        # Dynamic thresholding: x0 needs a per-sample quantile first (one reduction pass).
        m = _combine_cfg(model_output, guidance_scale)
        a, s = coef[0], coef[1]
        x0, eps = _x0_eps(x, m, a, s, self.prediction_type)
        x0 = threshold_x0(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.use_clipped_model_output:
            out = ops.sampler_step(
                x, x0, coef, prediction_type="sample", return_x0=return_x0, **nkw
            )
        else:
            # eps stays the model's; the "sample" branch with a=0, s=1 passes x (= eps) through.
            if own_coef:
                swap = self._swap_table(x.device)[i]
            else:
                mask, add = self._swap_affine(coef.device)
                swap = coef * mask + add
            # eps in x's dtype: the op's result takes its x operand's (a half model output on a
            # float32 sample returned a half sample)
            out = ops.sampler_step(
                eps.to(x.dtype), x0, swap, prediction_type="sample", return_x0=return_x0, **nkw
            )
        advance_generator_state(nkw, x)  # the next step draws fresh in-kernel noise
        return out


def _combine_cfg(model_output: Tensor, guidance_scale: float | None) -> Tensor:
    """Classifier-free guidance on the model output ``[2N x ...] = [uncond u, cond c]``.

    Returns u + s (c - u) ``[N x ...]`` with s = ``guidance_scale``. Ho & Salimans 2022 eq. 6
    writes the same combination as (1 + w) c - w u, so s = 1 + w: s = 1 (w = 0) is the plain
    conditional model, s = 0 (w = -1) the unconditional one (the diffusers / Imagen convention,
    where ``guidance_scale`` is s). ``None``: no guidance, the output as given.
    """
    if guidance_scale is None:
        return model_output
    u, c = model_output.chunk(2)
    return u + guidance_scale * (c - u)


def _x0_eps(x: Tensor, m: Tensor, a: Tensor, s: Tensor, prediction_type: str):
    """(x0, eps) from x = x_t and the model output m, with a = sqrt(ab_t), s = sqrt(1 - ab_t).

    x_t = a x0 + s eps (DDPM eq. 4) solved for the unknown pair; v = a eps - s x0 (Salimans &
    Ho 2022, section 4) gives x0 = a x_t - s v and eps = a v + s x_t, since a^2 + s^2 = 1.
    """
    if prediction_type == "epsilon":
        return (x - s * m) / a, m
    if prediction_type == "v_prediction":
        return a * x - s * m, a * m + s * x
    return m, (x - a * m) / s
