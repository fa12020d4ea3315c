"""Shared machinery of the samplers: timestep spacing, the fp32 coefficient table, validation.

Every sampler precomputes, on the host and in float64, one row of 8 coefficients per step when it
is built. The table is cast to fp32 and moved to a device once (the first time a step runs on
that device), so the sampling loop does no ``.item()``, no ``nonzero`` and no host-device sync:
each step is one indexed view ``table[i]`` and one call of the fused op
:func:`fastdiff.ops.sampler_step.sampler_step` (or ``dpm_solver_2m_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.schedules import PREDICTION_TYPES, NoiseSchedule

__all__ = ["Sampler", "spaced_timesteps", "TIMESTEP_SPACINGS"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Column names of the coefficient table (sampler_step layout).
COLUMNS = ("a", "s", "c_x0", "c_eps", "c_x", "c_noise", "log_var_max", "log_var_min")


def _ops():
    from fastdiff.ops import sampler_step as mod

    return mod


def _unipc_ops():
    from fastdiff.ops import unipc_step as mod

    return mod


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """The ``steps`` model timesteps, descending, as diffusers' ``set_timesteps`` spaces them.

    Table 2 of Lin et al. 2023 (arXiv:2305.08891), with T = ``num_train_timesteps``:

    * ``leading``:  arange(steps) * (T // steps), reversed, + steps_offset (DDIM paper spacing)
    * ``trailing``: round(arange(T, 0, -T/steps)) - 1 (always starts at T - 1)
    * ``linspace``: round(linspace(0, T - 1, steps)), reversed

    As in diffusers, ``steps_offset`` may push ``leading`` timesteps past T - 1 (the samplers
    reject such a list).
    """
    T = num_train_timesteps
    for name, v, lo in (("num_train_timesteps", T, 1), ("steps", steps, 1),
                        ("steps_offset", steps_offset, 0)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if steps > T:
        raise ValueError(f"steps: expected 1 <= steps <= num_train_timesteps = {T}, got {steps}")
    if spacing == "leading":
        ratio = T // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    else:
        raise ValueError(
            f"timestep_spacing: expected one of {list(TIMESTEP_SPACINGS)}, got {spacing!r}"
        )
    return ts


def custom_timesteps(timesteps: Sequence[int], T: int, *, whole: bool = False) -> np.ndarray:
    """A user timestep list as diffusers' ``set_timesteps(timesteps=...)`` accepts it: strictly
    descending, below T (and, here, >= 0: diffusers would index alpha_bar from the end).
    Fractional values are truncated, as diffusers' int64 cast does, or with ``whole`` (samplers
    whose diffusers scheduler keeps them fractional, interpolating sigma there) refused."""
    if isinstance(timesteps, (str, bytes)):  # iterable, but "999" is not [9, 9, 9]
        raise TypeError(f"timesteps: expected a list of ints, got {timesteps!r}")
    try:
        vals = [float(t) for t in timesteps]
        ts = np.asarray([int(t) for t in vals], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"timesteps: expected a list of ints, got {timesteps!r}") from None
    if whole and any(v != t for v, t in zip(vals, ts.tolist(), strict=True)):
        raise ValueError(
            "timesteps: expected whole numbers (diffusers interpolates sigma at fractional "
            f"timesteps here; fastdiff does not), got {vals}"
        )
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"timesteps: expected a non-empty list of ints, got {timesteps!r}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps: expected strictly descending timesteps, got {ts.tolist()}")
    if ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"timesteps: expected values in [0, {T - 1}], got {ts.tolist()}")
    return ts


def custom_steps(
    timesteps: Sequence[int],
    T: int,
    steps: int | None,
    *,
    label: str = "custom timesteps",
    hint: str = " (or the same number)",
) -> tuple[np.ndarray, int | None]:
    """User ``timesteps`` (:func:`custom_timesteps`) and the step count: ``steps`` may be None
    (their number) or their number; otherwise ValueError naming ``steps``, the list called
    ``label`` and the sampler's ``hint`` appended."""
    custom = custom_timesteps(timesteps, T)
    if steps is None:
        steps = len(custom)
    elif steps != len(custom):
        raise ValueError(f"steps: got {steps} but {len(custom)} {label}; pass one of them{hint}")
    return custom, steps


def check_choice(name: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    """ValueError naming ``name`` unless ``value`` is one of the strings ``choices``."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}{hint}")


def check_solver_order(order: Any) -> int:
    """A multistep solver's order: 1, 2 or 3 (not a bool)."""
    if (
        isinstance(order, bool)
        or not isinstance(order, (int, np.integer))
        or order not in (1, 2, 3)
    ):
        raise ValueError(f"solver_order: expected 1, 2 or 3, got {order!r}")
    return int(order)


def check_thresholding(ratio: float, max_value: float) -> None:
    """ValueError unless dynamic thresholding's options are usable: the quantile ``ratio`` in
    (0, 1] and the largest threshold ``max_value`` > 0 (a negative one flipped x0's sign)."""
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio: expected in (0, 1], got {ratio}")
    if not 0.0 < float(max_value) < math.inf:
        raise ValueError(f"sample_max_value: expected a finite float > 0, got {max_value}")


def check_clip_range(clip_sample: object, clip_sample_range: object) -> float:
    """diffusers' ``clip_sample_range`` as a float: a real number (TypeError naming it
    otherwise, a bool included), > 0 when ``clip_sample`` is on (ValueError; NaN fails)."""
    if isinstance(clip_sample_range, bool) or not isinstance(clip_sample_range, Real):
        raise TypeError(
            f"clip_sample_range: expected a float, got {type(clip_sample_range).__name__} "
            f"{clip_sample_range!r}"
        )
    if clip_sample and not float(clip_sample_range) > 0:
        raise ValueError(f"clip_sample_range: expected > 0, got {clip_sample_range}")
    return float(clip_sample_range)


def set_x0_options(smp: Any, clip_sample: bool, clip_sample_range: float, thresholding: bool,
                   ratio: float, max_value: float) -> None:  # fmt: skip
    """Check and store diffusers' x0 post-processing options on the sampler ``smp`` (DDIM,
    DDPM): ``clip_sample`` (x0 clipped to +-``clip_sample_range``, which must be > 0 when on)
    and dynamic ``thresholding`` (its ``ratio`` / ``max_value`` checked by
    :func:`check_thresholding` when on). ValueError before anything is stored."""
    clip_range = check_clip_range(clip_sample, clip_sample_range)
    if thresholding:
        check_thresholding(ratio, max_value)
    smp.clip_sample = bool(clip_sample)
    smp.clip_sample_range = clip_range
    smp.thresholding = bool(thresholding)
    smp.dynamic_thresholding_ratio = float(ratio)
    smp.sample_max_value = float(max_value)


def threshold_x0(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, arXiv:2205.11487, section 2.3).

    Per sample, s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 <- clamp(x0, -s, s) / s.
    A separate torch reduction pass (it needs the per-sample quantile before the update).
    """
    n = x0.shape[0]
    flat = x0.reshape(n, -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value).unsqueeze(1)
    return (torch.clamp(work, -s, s) / s).to(x0.dtype).reshape(x0.shape)


class Sampler:
    """Base class: a fixed list of model timesteps and a per-step coefficient table.

    Subclasses set ``coefficients()`` (float64 ``[steps x 8]``) and the per-step update.

    Args:
        schedule: the :class:`~fastdiff.schedules.NoiseSchedule` the model was trained with.
        steps: number of sampling steps (1 .. num_train_timesteps).
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (see
            :func:`spaced_timesteps`); ``steps_offset`` is added under ``leading``.
    """

    name = "base"
    default_spacing = "leading"
    is_multistep = False
    coef_width = 8  # columns of the coefficient table (UniPC's rows are wider)
    #: the steps ``fastdiff.sample`` runs when none are given (diffusers' pipelines: 50)
    default_steps = 50
    #: ``fastdiff.sample`` drops the second half of a 2C-channel model output (learned
    #: variance) for this sampler: set when its diffusers scheduler says
    #: ``variance_type="learned"`` / ``"learned_range"`` and the sampler does not use it
    drop_variance_channels = False
    #: diffusers' ``scheduler.order``: model calls per step of the grid (2 for Heun / DPM2);
    #: an img2img run starts at call ``t_start * scheduler_order`` (:meth:`img2img_start`)
    scheduler_order = 1
    #: the sampler takes img2img ``strength`` as an option of its grid (LCM, TCD, flow Euler,
    #: as their diffusers schedulers' ``set_timesteps(strength=...)`` / the SD3 pipeline): its
    #: run is already the shortened one, and an img2img run starts at call 0
    strength_option = False
    #: the sampler runs the ODE upwards, x_0 -> x_T (DDIM inversion): no img2img start
    inverts = False
    #: ``fastdiff.sample`` starts from x_T = init_noise_scale z (z the N(0, I) draw or the
    #: ``noise`` given): diffusers' ``init_noise_sigma`` z in this sampler's units (1 for VP
    #: samplers; Euler-family / EDM / consistency samplers override it)
    init_noise_scale: float = 1.0
    #: ``fastdiff.sample(image=...)``'s strength when none is given (diffusers' img2img
    #: pipelines: StableDiffusionImg2ImgPipeline 0.8)
    default_strength = 0.8

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule: expected a fastdiff.NoiseSchedule, got {type(schedule).__name__}"
            )
        T = schedule.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
        if not 1 <= int(steps) <= T:
            raise ValueError(
                f"steps: expected 1 <= steps <= num_train_timesteps = {T}, got {steps}"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: expected one of {list(PREDICTION_TYPES)}, "
                f"got {prediction_type!r}"
            )
        spacing = self.default_spacing if timestep_spacing is None else timestep_spacing
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing: expected one of {list(TIMESTEP_SPACINGS)}, got {spacing!r}"
            )
        if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
            raise ValueError(f"steps_offset: expected an int >= 0, got {steps_offset!r}")
        self.schedule = schedule
        self.steps = int(steps)
        self.prediction_type = prediction_type
        self.timestep_spacing = spacing
        self.steps_offset = int(steps_offset)
        ts = self._make_timesteps()
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(
                f"steps_offset: timesteps {ts.max()}..{ts.min()} fall outside [0, {T - 1}]"
            )
        self._ts = ts
        #: model timesteps, descending, int64 [steps] (CPU; ``timesteps_on(device)`` caches copies)
        self.timesteps = torch.from_numpy(ts.copy())
        self._coef64 = self.coefficients()
        assert self._coef64.shape == (self.steps, self.coef_width)
        self._table_cpu = torch.from_numpy(self._coef64).to(torch.float32)
        self._tables: dict[torch.device, Tensor] = {}
        self._ts_dev: dict[torch.device, Tensor] = {}
        self._noise_steps = [bool(self._needs_noise_row(i)) for i in range(self.steps)]

    # ------------------------------------------------------------------ subclass interface
    def _make_timesteps(self) -> np.ndarray:
        return spaced_timesteps(
            self.schedule.num_train_timesteps, self.steps, self.timestep_spacing, self.steps_offset
        )

    def coefficients(self) -> np.ndarray:
        """float64 ``[steps x 8]`` coefficient table (layout: :data:`COLUMNS`)."""
        raise NotImplementedError

    def _needs_noise_row(self, i: int) -> bool:
        return self._coef64[i, 5] != 0.0

    # ------------------------------------------------------------------ public helpers
    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, prediction_type={self.prediction_type!r},"
            f" timestep_spacing={self.timestep_spacing!r}, schedule={self.schedule!r})"
        )

    def needs_noise(self, i: int) -> bool:
        """Whether step ``i`` adds fresh noise (host-side, known at construction)."""
        return self._noise_steps[i]

    @property
    def coef64(self) -> np.ndarray:
        """The float64 coefficient table ``[steps x 8]`` (read-only copy)."""
        return self._coef64.copy()

    def coef_table(self, device: torch.device | str) -> Tensor:
        """The fp32 ``[steps x 8]`` table on ``device``, moved there once and cached."""
        dev = torch.device(device)
        return cached(self._tables, dev, lambda: self._table_cpu.to(dev))

    def timesteps_on(self, device: torch.device | str) -> Tensor:
        """The int64 timesteps on ``device``, moved there once and cached."""
        dev = torch.device(device)
        return cached(self._ts_dev, dev, lambda: self.timesteps.to(dev))

    def reset(self) -> None:
        """Forget multistep history (no-op for one-step samplers)."""

    # ------------------------------------------------------------------ img2img (SDEdit)
    def img2img_start(self, strength: float) -> int:
        """The first model call of an img2img run of ``strength`` in (0, 1] (SDEdit, Meng et
        al. 2022, arXiv:2108.01073): diffusers' ``get_timesteps`` with N grid steps,
        ``init = min(int(N strength), N)``, ``t_start = max(N - init, 0)``, call
        ``t_start * scheduler_order`` (its ``set_begin_index``). ``steps`` when no step
        remains (``int(N strength) = 0``); 0 for a sampler whose grid takes the strength."""
        if self.strength_option:
            return 0
        n = int(getattr(self, "num_inference_steps", self.steps))
        init = min(int(n * strength), n)
        return max(n - init, 0) * self.scheduler_order

    def add_noise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """The image ``x0`` noised to the sample model call ``i`` gets, in this sampler's own
        state units: ``a_i x0 + s_i noise`` with the ``(a_i, s_i)`` of :meth:`_noising`
        (diffusers' ``add_noise`` / ``scale_noise`` at ``set_begin_index(i)``, then
        ``scale_model_input``). In ``x0``'s dtype."""
        if not isinstance(x0, Tensor) or not isinstance(noise, Tensor):
            raise TypeError(
                f"x0, noise: expected torch.Tensors, got {type(x0).__name__} and "
                f"{type(noise).__name__}"
            )
        if tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.steps:
            raise ValueError(f"i: expected a model call index in [0, {self.steps}), got {i!r}")
        a, s = self._noising(int(i))
        return x0 * a + noise.to(x0.dtype) * s

    def _noising(self, i: int) -> tuple[float, float]:
        """VP forward process (DDPM, Ho et al. 2020, eq. 4): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t)
        eps at call i's timestep t (diffusers' DDIM / DDPM / PNDM / LCM / TCD ``add_noise``)."""
        ab = float(self.schedule.alphas_cumprod[int(self._ts[i])])
        return math.sqrt(ab), _sqrt(1.0 - ab)

    def run_row(self, i: int, start: int, device: torch.device | str) -> Tensor:
        """The fp32 coefficient row model call ``i`` takes in a run that started at call
        ``start`` (the CUDA-graph loop's row; multistep samplers warm up again after a start
        > 0, as their eager ``step``): for a one-step sampler, the table's row ``i``."""
        return self.coef_table(device)[i]

    def config(self) -> dict[str, Any]:
        """Options that change the structure of a step (used as a CUDA-graph cache key)."""
        return {"cls": type(self).__name__, "prediction_type": self.prediction_type}

    # ------------------------------------------------------------------ validation
    def _check_step_args(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None,
        guidance_scale: float | None,
        learned_variance: bool = False,
    ) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():  # before a noise draw like x (randn of an int: no kernel)
            raise TypeError(f"x: expected a float tensor, got {x.dtype}")
        if not isinstance(model_output, Tensor):
            raise TypeError(
                f"model_output: expected a torch.Tensor, got {type(model_output).__name__}"
            )
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"i: expected the int step index, got {type(i).__name__}")
        if not 0 <= i < self.steps:
            raise ValueError(f"i: expected a step index in [0, {self.steps}), got {i}")
        check_guidance_scale(guidance_scale)
        check_model_output(model_output, x, guidance_scale, learned_variance)
        if noise is not None and tuple(noise.shape) != tuple(x.shape):
            raise ValueError(f"noise: expected shape {tuple(x.shape)}, got {tuple(noise.shape)}")

    def _draw_noise(
        self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
    ) -> Tensor:
        return randn_like_with(x, generator)

    def _noise_kwargs(
        self,
        i: int,
        x: Tensor,
        noise: Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        generator_state: Tensor | None,
    ) -> dict[str, Tensor]:
        """The op's noise argument for step ``i``: none when the step adds no noise, else the
        given ``noise``, else in-kernel Philox from ``generator_state``, else a torch draw."""
        if not self._noise_steps[i]:
            return {}
        if noise is not None:
            return {"noise": noise}
        if generator_state is not None:
            return {"generator_state": generator_state}
        return {"noise": self._draw_noise(x, generator)}

    def _one_op_step(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None,
        guidance_scale: float | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        coef: Tensor | None,
        generator_state: Tensor | None,
        return_x0: bool,
        prediction_type: str | None = None,
        clip_range: float | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """A step that is one fused :func:`~fastdiff.ops.sampler_step.sampler_step` call with
        row ``coef`` (default: the table's row ``i``), x0 clipped to +-``clip_range`` (None: not
        clipped) and this step's noise operand (see :meth:`_noise_kwargs`); a Philox
        ``generator_state`` then moves past the values used."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        nkw = self._noise_kwargs(i, x, noise, generator, generator_state)
        if coef is None:
            coef = self.coef_table(x.device)[i]
        out = _ops().sampler_step(
            x,
            model_output,
            coef,
            prediction_type=prediction_type or self.prediction_type,
            clip_range=clip_range,
            guidance_scale=guidance_scale,
            return_x0=return_x0,
            **nkw,
        )
        advance_generator_state(nkw, x)
        return out


def cached(cache: dict, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
    """``cache[key]``, made by ``make()`` the first time (a table moved to a device once)."""
    out = cache.get(key)
    if out is None:
        out = cache[key] = make()
    return out


def advance_generator_state(nkw: dict[str, Tensor], x: Tensor) -> None:
    """After a Philox draw, move the counter past the ``x.numel()`` values used (on device)."""
    state = nkw.get("generator_state")
    if state is not None:
        state[1:].add_(x.numel())


def check_guidance_scale(guidance_scale: Any) -> None:
    """None, a finite real number or a one-element tensor (not checked for finiteness: that
    would sync with the device). The thresholding paths combine CFG in Python, before the op's
    own check, and took NaN silently."""
    if guidance_scale is None:
        return
    if isinstance(guidance_scale, Tensor):
        if guidance_scale.numel() == 1 and guidance_scale.dtype != torch.bool:
            return
    elif isinstance(guidance_scale, Real) and not isinstance(guidance_scale, bool):
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        return
    raise TypeError(
        f"guidance_scale must be a real number or None, got {type(guidance_scale).__name__}"
    )


def check_model_output(
    model_output: Tensor, x: Tensor, guidance_scale: float | None, learned_variance: bool
) -> None:
    """ValueError unless ``model_output`` fits ``x`` (2N with guidance, 2C learned variance)."""
    exp = list(x.shape)
    if guidance_scale is not None:
        exp[0] *= 2
    if learned_variance:
        exp[1] *= 2
    if list(model_output.shape) != exp:
        why = []
        if guidance_scale is not None:
            why.append("2N = [uncond, cond] with guidance")
        if learned_variance:
            why.append("2C channels with learned variance")
        elif x.ndim > 1 and model_output.ndim == x.ndim and model_output.shape[1] == 2 * x.shape[1]:
            why.append("2C channels are allowed only with variance_type='learned_range' (DDPM)")
        extra = f" ({'; '.join(why)})" if why else ""
        raise ValueError(
            f"model_output: expected shape {tuple(exp)} for x of shape {tuple(x.shape)}{extra}, "
            f"got {tuple(model_output.shape)}"
        )


def randn_like_with(
    x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> Tensor:
    """N(0, I) shaped like ``x``; a list of generators draws one ``(1, ...)`` slice per sample.

    As diffusers' ``randn_tensor``: a generator on another device (e.g. a CPU generator for CUDA
    sampling) draws there and the result is moved, so results do not depend on the device.
    """
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(
            x.device
        )
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(
            f"generator: a list of generators needs one per sample ({x.shape[0]}), got {len(gens)}"
        )
    one = (1, *x.shape[1:])
    return torch.cat(
        [torch.randn(one, generator=g, dtype=x.dtype, device=g.device).to(x.device) for g in gens]
    )


def vp_of_sigma(sigma: float) -> tuple[float, float]:
    """(a, s) = (1, sigma) / sqrt(1 + sigma^2): the VP sample a x0 + s eps of diffusers'
    x0 + sigma eps (Karras et al. 2022's sigma = sqrt((1 - ab) / ab)) after
    ``scale_model_input``; also DPM-Solver's (alpha_t, sigma_t) of a grid sigma."""
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return a, sigma * a


def alpha_bar_prev(schedule: NoiseSchedule, prev_t: int, final: float) -> float:
    """alpha_bar at ``prev_t``, or ``final`` when ``prev_t < 0`` (the end of the chain)."""
    return float(schedule.alphas_cumprod[prev_t]) if prev_t >= 0 else final


def _sqrt(v: float) -> float:
    return math.sqrt(max(v, 0.0))
