"""Euler and Heun samplers of rectified-flow / flow-matching models (SD3, Flux, AuraFlow, ...).

diffusers' ``FlowMatchEulerDiscreteScheduler`` step for step: its sigma grid (the SD3 timestep
shift, resolution-dependent shifting with ``mu``, ``shift_terminal``, Karras / exponential / beta
grids, custom sigmas), its deterministic and stochastic steps, and img2img ``strength``; and
``FlowMatchHeunDiscreteScheduler`` model call for model call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import Sampler, _ops, randn_like_with
from fastdiff.samplers.flow_sigmas import (
    TIME_SHIFT_TYPES,
    _flag,
    check_custom_sigmas,
    check_shift_terminal,
    shift_flow_sigmas,
    stretch_to_terminal,
)
from fastdiff.samplers.heun import _UNSET, TwoStageRun, stage2_history
from fastdiff.samplers.sigmas import make_sigma_grid, pick_sigma_grid

__all__ = ["FlowMatchEulerSampler", "FlowMatchHeunSampler", "calculate_shift"]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift ``mu`` of Flux / SD3 pipelines: linear in the image's
    sequence length (number of latent patches), ``base_shift`` at ``base_seq_len`` and
    ``max_shift`` at ``max_seq_len``; ``shift = e^mu`` (Esser et al. 2024, arXiv:2403.03206,
    resolution-dependent timestep shifting)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _real(name: str, v: Any, lo: float = -math.inf, lo_open: bool = True) -> float:
    """``v`` as a finite float (above ``lo``): TypeError for a non-number (a str, None, a bool:
    as every option validator of fastdiff, True is not a number here), ValueError for NaN / inf
    or a value at or below ``lo``."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name}: expected a finite float, got {type(v).__name__}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name}: expected a finite float, got {v!r}")
    if float(v) < lo or (lo_open and float(v) == lo):
        raise ValueError(f"{name}: expected a float {'>' if lo_open else '>='} {lo}, got {v!r}")
    return float(v)


class FlowMatchEulerSampler(Sampler):
    """Euler steps of the rectified-flow ODE (Liu et al. 2022, arXiv:2209.03003; Lipman et al.
    2023, arXiv:2210.02747).

    The forward process interpolates data and noise linearly, ``x_sigma = (1 - sigma) x0 +
    sigma eps`` with sigma in [0, 1]; the model predicts the velocity ``v = eps - x0`` =
    dx_sigma / dsigma, and one Euler step from sigma_i to sigma_{i+1} is::

        x_next = x + (sigma_{i+1} - sigma_i) v

    It is one call of the fused ``sampler_step`` op with the velocity in the role of the
    op's epsilon (a = 1, s = sigma: the op's x0 = x - sigma v, the data prediction) and the row
    ``[1, sigma_i, 0, sigma_{i+1} - sigma_i, 1, 0, 0, 0]``: the op then evaluates diffusers'
    expression ``x + dt v`` itself, so the fp32 rounding is the scheduler's (the linear
    combination ``(sigma_{i+1} / sigma_i) x + (1 - sigma_{i+1} / sigma_i) x0`` of
    ``dpm_solver_2m_step`` is the same step but rounds x0 too). The last step (sigma_{i+1} = 0)
    returns x0. With ``stochastic_sampling`` the step is x0 re-noised to the next level,
    ``(1 - sigma_{i+1}) x0 + sigma_{i+1} z`` (row ``[1, sigma_i, 1 - sigma_{i+1}, 0, 0,
    sigma_{i+1}, 0, 0]``).

    The grid is diffusers' ``set_timesteps``: sigmas spaced linearly from 1 to the shifted
    1 / T in the model's timestep units, then shifted (Esser et al. 2024, arXiv:2403.03206),
    ``sigma' = shift sigma / (1 + (shift - 1) sigma)``; with ``use_dynamic_shifting`` instead
    ``e^mu / (e^mu + 1/sigma - 1)`` (``time_shift_type="linear"``: ``mu / (mu + 1/sigma - 1)``),
    ``mu`` given or from ``image_seq_len`` by :func:`calculate_shift`. The model is called at
    the float32 timestep ``sigma T``; the sample starts at x_T ~ N(0, I) unscaled.

    Args:
        schedule: must be None (a flow model has no VP noise schedule; the argument keeps
            ``make_sampler(name, schedule, steps)`` uniform).
        steps: number of Euler steps (model calls) of the full grid.
        num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift,
            base_image_seq_len, max_image_seq_len, shift_terminal, time_shift_type,
            use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, stochastic_sampling:
            as diffusers' ``FlowMatchEulerDiscreteScheduler``.
        invert_sigmas: only False (Mochi's inverted grid is not implemented).
        mu: the dynamic shift (``set_timesteps(mu=...)``); needed with ``use_dynamic_shifting``
            unless ``image_seq_len`` is given; ignored without it, as in diffusers (Flux's
            pipeline passes it to schnell's static-shift scheduler too).
        image_seq_len: the latent sequence length from which pipelines compute ``mu``.
        sigmas: custom sigmas (``set_timesteps(sigmas=...)``, e.g. Flux's
            ``linspace(1, 1 / steps, steps)``), shifted like the default grid.
        strength: img2img strength in (0, 1]: as diffusers' img2img pipelines, the run skips
            the first ``steps - int(steps strength)`` steps; start from
            :meth:`scale_noise` of the image latents.
    """

    name = "flow_euler"
    #: img2img strength shortens the grid (SD3 / Flux img2img pipelines' get_timesteps)
    strength_option = True
    default_strength = 0.6  # StableDiffusion3Img2ImgPipeline's / FluxImg2ImgPipeline's

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        mu: float | None = None,
        image_seq_len: int | None = None,
        sigmas: Sequence[float] | None = None,
        strength: float = 1.0,
    ) -> None:
        if schedule is not None:
            raise TypeError(
                "schedule: a flow-matching sampler takes no VP noise schedule (expected None, "
                f"got {type(schedule).__name__}); pass its settings (shift, ...) as options"
            )
        for name, v in (("steps", steps), ("num_train_timesteps", num_train_timesteps)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v}")
        if _flag("invert_sigmas", invert_sigmas):
            raise ValueError(
                "invert_sigmas: True (Mochi's inverted sigma grid) is not implemented; "
                "expected False"
            )
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(
                f"time_shift_type: expected one of {list(TIME_SHIFT_TYPES)}, "
                f"got {time_shift_type!r}"
            )
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = _real("shift", shift, 0.0)
        self.use_dynamic_shifting = _flag("use_dynamic_shifting", use_dynamic_shifting)
        self.time_shift_type = time_shift_type
        self.shift_terminal = check_shift_terminal(shift_terminal)
        self.sigma_grid = pick_sigma_grid(
            use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
        )
        self.stochastic_sampling = _flag("stochastic_sampling", stochastic_sampling)
        if isinstance(strength, bool) or not isinstance(strength, Real):
            raise TypeError(f"strength: expected a float in (0, 1], got {type(strength).__name__}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength: expected a float in (0, 1], got {strength}")
        self.strength = float(strength)
        self.mu = self._resolve_mu(mu, image_seq_len, base_shift, max_shift,
                                   base_image_seq_len, max_image_seq_len)  # fmt: skip
        self.num_inference_steps = int(steps)
        full = self._grid(sigmas)  # float32 values as float64, [N + 1] with the terminal 0
        n = self.num_inference_steps
        # diffusers' img2img get_timesteps; at least one step remains for any strength > 0
        t_start = int(max(n - min(n * self.strength, n), 0))
        #: the index of the run's first step in the full grid of ``steps`` (img2img)
        self.t_start = t_start
        #: float64 ``[steps + 1]``: the (float32) noise levels of the run, then the final one
        self.sigmas = full[t_start:].copy()
        self.steps = self._num_calls()
        self.prediction_type = "velocity"
        self.schedule = None
        self._set_tables()

    def _set_tables(self) -> None:
        """The model timesteps, the rows and the noise flags of the grid ``self.sigmas``."""
        #: the model's timesteps sigma T, float32 ``[steps]`` (descending; the inverse's ascend)
        self.timesteps = self._call_timesteps()
        self._coef64 = self.coefficients()
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        self._tables: dict[torch.device, Tensor] = {}
        self._ts_dev: dict[torch.device, Tensor] = {}
        self._noise_steps = [bool(self._coef64[i, 5] != 0.0) for i in range(self.steps)]

    # ------------------------------------------------------------------ the sigma grid
    def _resolve_mu(self, mu, image_seq_len, base_shift, max_shift, base_len, max_len):
        if mu is not None:
            if image_seq_len is not None:
                raise ValueError("mu, image_seq_len: give one of them, not both")
            return _real("mu", mu)
        if image_seq_len is None:
            if self.use_dynamic_shifting:
                raise ValueError(
                    "mu: use_dynamic_shifting=True needs mu (or image_seq_len, from which "
                    "pipelines compute it), got neither"
                )
            return None
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)):
            raise TypeError(f"image_seq_len: expected an int, got {type(image_seq_len).__name__}")
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len: expected an int >= 1, got {image_seq_len}")
        for name, v in (("base_shift", base_shift), ("max_shift", max_shift)):
            if isinstance(v, bool) or not isinstance(v, Real):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        for name, v in (("base_image_seq_len", base_len), ("max_image_seq_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if max_len == base_len:
            raise ValueError(
                f"base_image_seq_len, max_image_seq_len: must differ, both are {base_len}"
            )
        return calculate_shift(int(image_seq_len), base_len, max_len, base_shift, max_shift)

    def _grid(self, custom: Sequence[float] | None) -> np.ndarray:
        """diffusers' sigmas after ``set_timesteps``: float32 values (as float64), the
        terminal 0 appended."""
        n, T = self.num_inference_steps, self.num_train_timesteps
        if custom is None:
            # the scheduler's training grid ends, float32 and shifted unless dynamic
            ends = torch.tensor([float(T), 1.0], dtype=torch.float32) / T
            if not self.use_dynamic_shifting:
                ends = self.shift * ends / (1 + (self.shift - 1) * ends)
            hi, lo = ends[0].item(), ends[1].item()
            s = np.linspace(hi * T, lo * T, n) / T
        else:  # float32, as diffusers' np.array(sigmas).astype(np.float32)
            s = check_custom_sigmas(custom, n, np.float32)
        # set_timesteps' shift, in s's dtype as diffusers' numpy (mu only with dynamic shifting)
        mu = self.mu if self.use_dynamic_shifting else None
        s = shift_flow_sigmas(s, self.shift, mu, self.time_shift_type)
        if self.shift_terminal is not None:
            s = stretch_to_terminal(s, self.shift_terminal)
        if self.sigma_grid is not None:
            s = make_sigma_grid(self.sigma_grid, float(s[-1]), float(s[0]), n)
        s32 = np.asarray(s).astype(np.float32)
        if not (np.all(np.isfinite(s32)) and np.all(s32 > 0)):
            raise ValueError(
                "shift, mu: the shifted sigma grid is not positive and finite "
                f"(got {s32.min()} .. {s32.max()}); check the shift settings"
            )
        return np.concatenate([s32.astype(np.float64), [0.0]])

    # ------------------------------------------------------------------ rows, helpers
    def _num_calls(self) -> int:
        return len(self.sigmas) - 1

    def _call_timesteps(self) -> Tensor:
        """float32 sigma T of each model call (diffusers' float32 product)."""
        return torch.from_numpy(self.sigmas[:-1].astype(np.float32)) * self.num_train_timesteps

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` rows of ``sampler_step`` (see the class docstring)."""
        rows = np.zeros((self.steps, 8), dtype=np.float64)
        for i in range(self.steps):
            s, s_next = self.sigmas[i], self.sigmas[i + 1]
            if self.stochastic_sampling:
                rows[i] = [1.0, s, 1.0 - s_next, 0.0, 0.0, s_next, 0.0, 0.0]
            else:
                rows[i] = [1.0, s, 0.0, s_next - s, 1.0, 0.0, 0.0, 0.0]
        return rows

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, shift={self.shift}, mu={self.mu}, "
            f"sigma_grid={self.sigma_grid!r}, stochastic_sampling={self.stochastic_sampling})"
        )

    def config(self) -> dict[str, Any]:
        return {"cls": type(self).__name__, "stochastic": self.stochastic_sampling}

    def _draw_noise(
        self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
    ) -> Tensor:
        # as diffusers' stochastic step: z is drawn in float32 whatever x's dtype (its step
        # upcasts the sample first; torch's fp16 / bf16 randn gives other values)
        return randn_like_with(torch.empty_like(x, dtype=torch.float32), generator)

    @property
    def init_sigma(self) -> float:
        """The noise level of the run's first step (1 for a full run with the default grid)."""
        return float(self.sigmas[0])

    def _noising(self, i: int) -> tuple[float, float]:
        """Rectified flow's forward process: (1 - sigma) x0 + sigma eps (``scale_noise``)."""
        sigma = float(self.sigmas[i])
        return 1.0 - sigma, sigma

    def scale_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        """img2img start: ``sigma noise + (1 - sigma) x0`` at the run's first sigma (diffusers'
        ``scale_noise``, in ``x0``'s dtype)."""
        if not isinstance(x0, Tensor) or not isinstance(noise, Tensor):
            raise TypeError("x0, noise: expected torch.Tensors")
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        sigma = torch.tensor(self.init_sigma, dtype=torch.float32).to(x0.device, x0.dtype)
        return sigma * noise + (1.0 - sigma) * x0

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
        """One Euler step sigma_i -> sigma_{i+1} (one fused ``sampler_step`` call).

        ``model_output`` is the velocity (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``, combined in the op). With ``stochastic_sampling`` the fresh noise
        is ``noise``, else in-kernel Philox from ``generator_state``, else a draw from
        ``generator``. ``coef`` overrides the table row (CUDA graphs). Returns x_{i+1}, or
        ``(x_{i+1}, x0)`` with ``return_x0``.
        """
        # the velocity in the op's eps slot (a = 1, s = sigma): x + (sigma' - sigma) v itself
        return self._one_op_step(model_output, i, x, noise, guidance_scale, generator, coef,
                                 generator_state, return_x0, prediction_type="epsilon")  # fmt: skip


class FlowMatchHeunSampler(TwoStageRun, FlowMatchEulerSampler):
    """Heun's method on the rectified-flow ODE: diffusers' ``FlowMatchHeunDiscreteScheduler``.

    Each step sigma_i -> sigma_{i+1} (h = sigma_{i+1} - sigma_i) is an Euler stage at the model
    call at sigma_i, x' = x_i + h v_1, then the trapezoidal correction with the velocity v_2 at
    (x', sigma_{i+1}): x_{i+1} = x_i + h (v_1 + v_2) / 2. The last step, to sigma = 0, is the
    Euler stage only: 2N - 1 model calls (``len(sampler)``, ``.timesteps`` = diffusers' ``[t_0,
    t_1, t_1, ..., t_{N-1}, t_{N-1}]``).

    Each call is one fused ``dpm_solver_2m_step`` with the velocity in the op's x0 slot
    (``prediction_type="sample"``: no cancellation through an x0 estimate). The correction reads
    the Euler stage's velocity v_1 (the op's x0 output of that call, exact in x's dtype) and
    input x_i as the op's two history operands x0_prev and x0_prev2: rows ``[1, sigma_i, 1, h,
    0, 0, 0, 0]`` (Euler stage) and ``[1, sigma_{i+1}, 0, h/2, h/2, 0, 1, 0]`` (correction:
    ``(h/2) v_2 + (h/2) v_1 + x_i`` from exact operands, x_i added last, so one rounding at x's
    scale as diffusers' ``sample + dt (d_1 + d_2) / 2``; it does not read x', whose rounding to
    fp16 / bf16 the former ``(x_i + x') / 2 + (h/2) v_2`` row carried: up to 2.7x diffusers'
    own error per call). The trajectory's x0 of a call is x - sigma v at its sigma (diffusers'
    ``denoised``; computed only when asked for).

    Args:
        schedule: must be None.
        steps: number of Heun steps N (2N - 1 model calls).
        num_train_timesteps, shift: as diffusers' ``FlowMatchHeunDiscreteScheduler`` (the grid
            is :class:`FlowMatchEulerSampler`'s with a static shift).
    """

    name = "flow_heun"
    # TwoStageRun: the run's bookkeeping (multistep, the correction reads the Euler stage's
    # input, kept with its version, and its velocity, kept in _v_prev; a CUDA graph keeps both
    # in its history buffers last and m_{i-1}, through step_with_history)
    graph_hist_buffers = 2  # and only those two (m_{i-2} is not read)
    strength_option = False  # img2img: the general start at call 2 t_start

    def __init__(
        self, schedule: None = None, steps: int = 50, *, num_train_timesteps: int = 1000,
        shift: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__(schedule, steps, num_train_timesteps=num_train_timesteps, shift=shift)
        self.reset()

    def _num_calls(self) -> int:
        return 2 * (len(self.sigmas) - 1) - 1

    def _call_timesteps(self) -> Tensor:
        t = super()._call_timesteps()
        return torch.cat([t[:1], t[1:].repeat_interleave(2)])

    def coefficients(self) -> np.ndarray:
        """float64 ``[2N - 1 x 8]`` rows of ``dpm_solver_2m_step`` (see the class docstring)."""
        sig = self.sigmas
        rows = np.zeros((self._num_calls(), 8), dtype=np.float64)
        for k in range(len(rows)):
            j = k // 2  # the step this call belongs to
            h = sig[j + 1] - sig[j]
            if k % 2 == 0:
                rows[k] = [1.0, sig[j], 1.0, h, 0.0, 0.0, 0.0, 0.0]
            else:
                rows[k] = [1.0, sig[j + 1], 0.0, 0.5 * h, 0.5 * h, 0.0, 1.0, 0.0]
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_inference_steps}, shift={self.shift})"

    def config(self) -> dict[str, Any]:
        return {"cls": type(self).__name__}

    def reset(self) -> None:
        super().reset()
        self._v_prev = None

    #: Heun's name for stage 2 (the odd calls)
    is_correction = TwoStageRun.is_second_stage

    def img2img_start(self, strength: float) -> int:
        """The SD3 / Flux img2img pipelines' ``get_timesteps``: ``t_start = int(max(N - N
        strength, 0))`` (no rounding of ``N strength`` first), call ``2 t_start``."""
        n = self.num_inference_steps
        return int(max(n - min(n * strength, n), 0)) * self.scheduler_order

    def _noising(self, i: int) -> tuple[float, float]:
        """(1 - sigma) x0 + sigma eps at call i's sigma (calls 2k - 1 and 2k: sigma_k)."""
        sigma = float(self.sigmas[(i + 1) // 2])
        return 1.0 - sigma, sigma

    def scale_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        """img2img start of a full run: :meth:`add_noise` at call 0 (use ``add_noise(x0,
        noise, img2img_start(strength))`` for a shortened one)."""
        return self.add_noise(x0, noise, 0)

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The data prediction x - sigma v of model call ``i`` at sample ``x`` from its velocity
        ``m`` (for trajectories; a torch expression, not part of the fused step)."""
        sigma = torch.tensor(self.sigmas[(i + 1) // 2], dtype=torch.float32, device=x.device)
        return (x.float() - sigma * m.float()).to(x.dtype)

    def step_with_history(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        coef: Tensor,
        last: Tensor | None,
        m_prev: Tensor | None,
        m_prev2: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One fused call with the caller's history and row (CUDA graphs): ``(x, v, x_next)``;
        ``last`` is the Euler stage's input x_i and ``m_prev`` its velocity v_1 (read by a
        correction row only: an Euler-stage row's zero weights drop them), ``m_prev2`` is not
        read. Returns this call's input (the next call's ``last``), its velocity (the next
        ``m_prev``) and the new sample. The sampler's own history is left alone."""
        self._check_step_args(model_output, i, x, None, guidance_scale)
        x_next, v = _ops().dpm_solver_2m_step(
            x,
            model_output,
            coef,
            m_prev,  # v_1, then x_i: the op adds x0_prev2's term after x0_prev's
            x0_prev2=None if m_prev is None else last,
            prediction_type="sample",
            guidance_scale=guidance_scale,
        )
        return x, v, x_next

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
        x0_prev2: Tensor | None | object = _UNSET,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Model call ``i``: the Euler stage (even ``i``) or the correction (odd ``i``), one
        fused op call. ``model_output`` is the velocity (``[2N, ...] = [uncond, cond]`` with
        ``guidance_scale``). The correction reads the input sample and the (guided) velocity of
        call ``i - 1``, which the sampler keeps (the input must not be modified in place in
        between); pass them as ``x0_prev`` and ``x0_prev2`` to manage them yourself (both, with
        ``coef`` from a static buffer: the row then decides what is read). ``noise``,
        ``generator`` and ``generator_state`` are unused (the ODE step is deterministic).
        Returns the new sample, or ``(sample, x0)`` with ``return_x0``."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        if (x0_prev is _UNSET) != (x0_prev2 is _UNSET):
            raise ValueError(
                "x0_prev, x0_prev2: pass both (the Euler stage's input sample and velocity, "
                "which the correction reads) or neither"
            )
        x0_prev, external = stage2_history(self, i, x, x0_prev, coef, "the Heun correction",
                                           "an Euler-stage")  # fmt: skip
        if not external:
            v_prev = self._v_prev if x0_prev is not None else None
        elif x0_prev2 is None and coef is None and i % 2 == 1:
            raise ValueError(
                f"x0_prev2: model call {i} is the Heun correction of call {i - 1} and needs "
                "that call's velocity, got None"
            )
        else:
            v_prev = x0_prev2
        if coef is None:
            coef = self.coef_table(x.device)[i]
        # v_1 in the op's x0_prev slot and x_i in x0_prev2's: x_i is added last
        x_next, v = _ops().dpm_solver_2m_step(
            x,
            model_output,
            coef,
            None if x0_prev is None else v_prev,  # type: ignore[arg-type]
            x0_prev2=None if v_prev is None else x0_prev,  # type: ignore[arg-type]
            prediction_type="sample",
            guidance_scale=guidance_scale,
        )
        if not external:  # the correction of this call reads its input and velocity
            self._keep(x, i)
            self._v_prev = v
        if not return_x0:
            return x_next
        # the data prediction x - sigma v at this call's sigma (the row's s: a graph's buffer)
        x0 = (x.float() - coef[1].float() * v.float()).to(x.dtype)
        return x_next, x0
