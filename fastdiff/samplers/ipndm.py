"""iPNDM: the improved pseudo numerical method (Zhang & Chen 2022, "Fast Sampling of Diffusion
Models with Exponential Integrator", arXiv:2204.13902, Appendix: iPNDM), as diffusers'
``IPNDMScheduler`` runs it (the "iPNDM" / "plms2" of crowsonkb's v-diffusion and k-diffusion).

PNDM (Liu et al. 2022, arXiv:2202.09778) moves the sample with DDIM's transfer phi (eq. 9) fed
by a linear multistep combination of noise estimates (eq. 12: 4th-order Adams-Bashforth), and
warms the history up with pseudo Runge-Kutta steps (eq. 13). iPNDM drops the Runge-Kutta
warm-up: its first steps use the lower-order Adams-Bashforth combinations of the history it
already has, so every step is one model call::

    r = 1:  e' = e_i
    r = 2:  e' = (3 e_i - e_{i-1}) / 2
    r = 3:  e' = (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12
    r = 4:  e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24

with r = min(number of noise estimates so far, 4) (the constant-step Adams-Bashforth weights).

The model is a v-prediction model of continuous time t in [0, 1] (v-diffusion's
parameterisation x = alpha x0 + sigma eps, v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1):
its noise estimate is e = sigma x + alpha v and DDIM's transfer (Song et al. 2021,
arXiv:2010.02502, eq. 12 with eta = 0) is::

    x0' = (x_i - sigma_i e') / max(alpha_i, 1e-8),    x_{i+1} = alpha_{i+1} x0' + sigma_{i+1} e'

diffusers' grid: s_k = linspace(1, 0, N + 1) (the last entry 0), sigma_k = sin(pi s_k / 2)^2,
alpha_k = sqrt(1 - sigma_k^2) (float32), and the model sees t_k = atan2(sigma_k, alpha_k) 2/pi
(float32; t_0 = 1). The first level is pure noise (sigma_0 = 1, alpha_0 = 0): diffusers' first
x0' is then exactly 0 (x_0 - 1 * x_0, over 1e-8) and x_1 = sigma_1 x_0, whatever the model says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers._history import EpsHistory
from fastdiff.samplers.base import Sampler

__all__ = ["IPNDMSampler", "AB_WEIGHTS", "ipndm_grid"]

#: Adams-Bashforth weights of orders 1-4 (constant step), newest noise estimate first
AB_WEIGHTS = (
    (1.0,),
    (3.0 / 2.0, -1.0 / 2.0),
    (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
)


def ipndm_grid(steps: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """diffusers' ``IPNDMScheduler.set_timesteps(steps)``: ``(alpha, sigma)`` float64 ``[steps +
    1]`` (the float32 values diffusers steps with; the last level is 0 noise) and the model's
    float32 timesteps ``[steps]``, computed with torch in float32 as diffusers does."""
    s = torch.cat([torch.linspace(1, 0, steps + 1)[:-1], torch.tensor([0.0])])
    sigma = torch.sin(s * math.pi / 2) ** 2
    alpha = (1.0 - sigma**2) ** 0.5
    t = (torch.atan2(sigma, alpha) / math.pi * 2)[:-1]
    return alpha.double().numpy(), sigma.double().numpy(), t


class IPNDMSampler(EpsHistory, Sampler):
    """iPNDM (see the module docstring): diffusers' ``IPNDMScheduler`` step for step.

    Fused form. Each step is one :func:`fastdiff.ops.unipc_step` call whose m output is the noise
    estimate e_i = sigma_i x + alpha_i v (the op's ``v_prediction`` with the row's (a, s) slots
    (sigma_i, -alpha_i)), kept as the history of the next three steps; with the weights w_j of
    order r the transfer folds into one float64 row (x_next = x_c)::

        x_{i+1} = (alpha_{i+1} / alpha_i) x_i
                  + (sigma_{i+1} - alpha_{i+1} sigma_i / alpha_i) sum_j w_j e_{i-j}

    ``[a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2] = [sigma_i, -alpha_i,
    alpha_{i+1}/alpha_i, 0, k w_0, k w_1, k w_2, 1, 0, 0, k w_3, 0]``, k = sigma_{i+1} -
    alpha_{i+1} sigma_i / alpha_i. On the pure-noise first level (alpha_0 = 0, sigma_0 = 1) the
    row is diffusers' exact result x_1 = sigma_1 x_0: c_x = 0 and c_m = sigma_1 (e_0 = x_0),
    not the 1e8-sized terms of its max(alpha, 1e-8), which would cancel in fp32.

    A run that starts at step s > 0 (a step out of order, or diffusers' ``set_begin_index``)
    has no history: as diffusers' scheduler, whose history starts empty, its steps take the
    orders 1, 2, 3, 4, ... again.

    img2img (``sample(image=, strength=)``) and inpainting (``mask=``): diffusers'
    ``IPNDMScheduler`` has ``set_begin_index`` but no ``add_noise``, so no diffusers pipeline
    starts it from an image; fastdiff defines the start the way an img2img pipeline would with
    it: ``get_timesteps`` (s = N - int(N strength)), ``set_begin_index(s)`` and the image
    noised by the forward process of the model's own parameterisation, x_s = alpha_s x_0 +
    sigma_s z (the relation the step itself uses, x_{i+1} = alpha_{i+1} x0' + sigma_{i+1} e';
    :meth:`_noising`). At strength 1 (s = 0, alpha_0 = 0, sigma_0 = 1) that is x_T = z, the
    plain run. Inpainting blends the image noised to the next level the same way after each
    call (the image itself after the last), as the SD inpainting pipeline with ``add_noise``.

    Args:
        schedule: must be None (the model's noise levels are the sampler's own grid, not a VP
            beta schedule).
        steps: number of steps (model calls), >= 1.
        prediction_type: ``"v_prediction"`` only (diffusers' IPNDMScheduler reads the model
            output as v; it has no setting for another).
    """

    name = "ipndm"
    default_steps = 50
    is_multistep = True
    coef_width = 12
    #: the CUDA-graph loop keeps 4 history buffers (last, e_{i-1}, e_{i-2}, e_{i-3})
    solver_order = 4

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        prediction_type: str = "v_prediction",
    ) -> None:
        if schedule is not None:
            raise TypeError(
                "schedule: the ipndm sampler takes no VP noise schedule (expected None, got "
                f"{type(schedule).__name__}); its noise levels are diffusers' IPNDMScheduler "
                "grid"
            )
        if isinstance(steps, bool) or not isinstance(steps, Integral):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps}")
        if prediction_type != "v_prediction":
            raise ValueError(
                "prediction_type: expected 'v_prediction' (diffusers' IPNDMScheduler reads the "
                f"model output as v: e = sigma x + alpha v), got {prediction_type!r}"
            )
        self.schedule = None
        self.steps = int(steps)
        self.prediction_type = "v_prediction"
        self.timestep_spacing = None
        self.steps_offset = 0
        self.alphas, self.sigmas, ts = ipndm_grid(self.steps)
        #: the model's timesteps t = atan2(sigma, alpha) 2 / pi, float32 ``[steps]``, descending
        self.timesteps = ts
        self._ts = ts.double().numpy()
        self._ts_dev: dict[torch.device, Tensor] = {}
        self._tables: dict[torch.device, Tensor] = {}
        self.reset()
        self._coef64 = self.coefficients()
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        self._noise_steps = [False] * self.steps

    # ------------------------------------------------------------------ rows
    def _row(self, i: int, k: int) -> np.ndarray:
        """float64 row of step ``i`` as the ``k``-th step of a run (order min(k + 1, 4))."""
        a, s = float(self.alphas[i]), float(self.sigmas[i])
        a_n, s_n = float(self.alphas[i + 1]), float(self.sigmas[i + 1])
        w = AB_WEIGHTS[min(k + 1, 4) - 1]
        row = np.zeros(self.coef_width, dtype=np.float64)
        row[0], row[1], row[7] = s, -a, 1.0
        if a == 0.0 and s == 1.0 and len(w) == 1:
            # pure noise, first order: e = x, x0' = (x - x) / 1e-8 = 0, x_{i+1} = sigma_{i+1} x
            row[4] = s_n
            return row
        a_div = max(a, 1e-8)  # diffusers' guard
        k_e = s_n - a_n * s / a_div
        row[2] = a_n / a_div
        for col, wj in zip((4, 5, 6, 10), w, strict=False):
            row[col] = k_e * wj
        return row

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 12]`` rows of a run from step 0; ``_since64[k]`` holds the rows
        of a run's k-th call (k < 3) for runs that start later."""
        rows = np.stack([self._row(i, i) for i in range(self.steps)])
        # a run that starts at step s > 0: its k-th step (k < 3) at order k + 1
        return self._set_since_rows(rows, self._row)

    def _max_order(self) -> int:
        return 4

    def _sigma_at(self, i: int) -> float:
        """The noise-to-signal ratio sigma_i / alpha_i of step ``i`` (inf on pure noise)."""
        a = float(self.alphas[i])
        return float(self.sigmas[i]) / a if a > 0 else math.inf

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img / inpainting: the forward process of the model's parameterisation, x =
        alpha_i x0 + sigma_i eps (v-diffusion's; diffusers' IPNDMScheduler has no
        ``add_noise``: see the class docstring)."""
        return float(self.alphas[i]), float(self.sigmas[i])

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of step ``i`` from its own noise estimate ``m`` (trajectories):
        (x - sigma_i m) / max(alpha_i, 1e-8), diffusers' x0' with r = 1 (0 on pure noise)."""
        a, s = max(float(self.alphas[i]), 1e-8), float(self.sigmas[i])
        return ((x.float() - s * m.float()) / a).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {"cls": type(self).__name__, "prediction_type": self.prediction_type}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"

    def _op_prediction(self) -> str:
        """The op reads the v output with the row's (a, s) = (sigma_i, -alpha_i): its
        ``v_prediction`` "x0" a x - s v is the noise estimate e_i = sigma_i x + alpha_i v."""
        return "v_prediction"

    # ------------------------------------------------------------------ stepping
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
        """Step ``i`` (the v output at ``x``, ``timesteps[i]``): one fused op call, as
        :meth:`~fastdiff.samplers._history.EpsHistory.step` (history kept on the sampler; a
        step out of order starts a new run). Deterministic: ``noise``, ``generator`` and
        ``generator_state`` are unused."""
        return EpsHistory.step(self, model_output, i, x, noise, guidance_scale=guidance_scale,
                               generator=generator, generator_state=generator_state,
                               return_x0=return_x0)  # fmt: skip
