"""Flow-matching sigma grids of the multistep solvers (DPM-Solver++, UniPC) on flow models.

diffusers' ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` with
``use_flow_sigmas=True`` (SANA, Wan 2.1, ...) step on rectified-flow noise levels sigma in
(0, 1): the forward process is ``x_sigma = (1 - sigma) x0 + sigma eps``, i.e. the solvers'
alpha_t = 1 - sigma and sigma_t = sigma, so lambda = log((1 - sigma) / sigma). The model is
called at ``int(sigma T)``. These helpers rebuild the two schedulers' grids (they differ: DPM's
starts one training step below sigma = 1, UniPC's at 1 - 1e-6 and takes ``mu`` /
``time_shift_type`` / ``shift_terminal`` / custom sigmas) and check the options; the shift,
the ``shift_terminal`` stretch and the option checks also serve ``"flow_euler"``'s grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np

__all__ = [
    "FlowGridMixin",
    "FlowOptions",
    "check_custom_sigmas",
    "check_shift_terminal",
    "dpm_flow_sigmas",
    "flow_timesteps",
    "shift_flow_sigmas",
    "stretch_to_terminal",
    "unipc_flow_sigmas",
]

TIME_SHIFT_TYPES = ("exponential", "linear")


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


def _finite(name: str, v: Any) -> float:
    """``v`` as a finite float: TypeError for a non-number (a str, None, a bool: as every option
    validator of fastdiff, True is not a number here), ValueError for NaN / inf."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name}: expected a finite float, got {type(v).__name__}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name}: expected a finite float, got {v!r}")
    return float(v)


def check_shift_terminal(v: Any) -> float | None:
    """The ``shift_terminal`` option as diffusers reads it: None for None or a falsy value (no
    stretching), else a float in (0, 1) (TypeError / ValueError naming it otherwise)."""
    terminal = None if v is None else _finite("shift_terminal", v)
    if not terminal:  # diffusers: a falsy value (None, 0) means no stretching
        return None
    if not 0.0 < terminal < 1.0:
        raise ValueError(f"shift_terminal: expected a float in (0, 1), got {v!r}")
    return terminal


def check_custom_sigmas(custom: Any, n: int, dtype: type = np.float64) -> np.ndarray:
    """Custom flow sigmas (``set_timesteps(sigmas=...)``) as a ``dtype`` array ``[n]``: a
    sequence of ``n`` (= steps) finite values in (0, 1] (TypeError / ValueError otherwise)."""
    if isinstance(custom, (str, bytes)):
        raise TypeError(f"sigmas: expected a sequence of floats, got {custom!r}")
    try:
        s = np.array(custom, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas: expected a sequence of floats, got {custom!r}") from None
    if s.ndim != 1 or len(s) != n:
        raise ValueError(f"sigmas: expected {n} (= steps) values, got shape {s.shape}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(s <= 1)):
        raise ValueError(f"sigmas: expected values in (0, 1], got {s.tolist()}")
    return s


def shift_flow_sigmas(
    s: np.ndarray, shift: float, dynamic_mu: float | None, time_shift_type: str
) -> np.ndarray:
    """The timestep shift of diffusers' flow grids, in ``s``'s dtype (Esser et al. 2024,
    arXiv:2403.03206): with dynamic shifting (``dynamic_mu``, the mu to use) ``e^mu / (e^mu +
    1/s - 1)``, or ``mu / (mu + 1/s - 1)`` for ``time_shift_type="linear"``; else the static
    ``shift s / (1 + (shift - 1) s)``. An e^mu past float range is a ValueError naming mu."""
    if dynamic_mu is None:
        return shift * s / (1 + (shift - 1) * s)
    try:
        if time_shift_type == "exponential":
            return math.exp(dynamic_mu) / (math.exp(dynamic_mu) + (1 / s - 1) ** 1.0)
        return dynamic_mu / (dynamic_mu + (1 / s - 1) ** 1.0)
    except OverflowError:
        raise ValueError(f"mu: e^mu overflows a float, got mu = {dynamic_mu}") from None


def stretch_to_terminal(s: np.ndarray, terminal: float) -> np.ndarray:
    """``shift_terminal``'s stretch (diffusers' ``stretch_shift_to_terminal``): ``1 - s``
    scaled so that the grid ``s`` ends at ``terminal``."""
    one_minus = 1 - s
    if one_minus[-1] == 0:  # diffusers: 0 / 0, a NaN grid
        raise ValueError(
            "shift_terminal: the grid's last sigma is 1 (steps = 1), which cannot be "
            f"stretched to end at {terminal}; use more steps"
        )
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


class FlowOptions:
    """The checked flow-sigma options of a multistep sampler.

    Args:
        use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, mu, shift_terminal:
            as the diffusers scheduler's config / ``set_timesteps(mu=...)``.
        dpm: DPM-Solver's rules (also DEIS's and singlestep DPM-Solver's): ``time_shift_type``
            only ``"exponential"``, and ``mu`` only with ``use_dynamic_shifting`` (diffusers
            asserts both); else UniPC's.
        name: the sampler named in errors (default ``"dpm++"`` / ``"unipc"``).
    """

    def __init__(
        self,
        use_flow_sigmas: Any,
        flow_shift: Any,
        use_dynamic_shifting: Any,
        time_shift_type: Any,
        mu: Any,
        shift_terminal: Any = None,
        *,
        dpm: bool = False,
        name: str | None = None,
    ) -> None:
        sampler = name or ("dpm++" if dpm else "unipc")
        time_shift_types = ("exponential",) if dpm else TIME_SHIFT_TYPES
        mu_needs_dynamic = dpm
        self.on = _flag("use_flow_sigmas", use_flow_sigmas)
        self.dynamic = _flag("use_dynamic_shifting", use_dynamic_shifting)
        self.shift = _finite("flow_shift", flow_shift)
        if self.shift <= 0.0:
            raise ValueError(f"flow_shift: expected a float > 0, got {flow_shift!r}")
        if time_shift_type not in time_shift_types:
            raise ValueError(
                f"time_shift_type: expected one of {list(time_shift_types)}, "
                f"got {time_shift_type!r}"
            )
        self.time_shift_type = time_shift_type
        self.mu = None if mu is None else _finite("mu", mu)
        if self.mu is not None and mu_needs_dynamic and not self.dynamic:
            raise ValueError(
                f"mu: {sampler} takes mu only with use_dynamic_shifting=True (diffusers asserts "
                f"it), got mu={mu!r} with use_dynamic_shifting=False"
            )
        self.shift_terminal = check_shift_terminal(shift_terminal)
        if self.shift_terminal is not None and not self.on:
            raise ValueError(
                "shift_terminal: only with use_flow_sigmas=True (as diffusers), got "
                f"shift_terminal={shift_terminal!r} with use_flow_sigmas=False"
            )


def dpm_flow_sigmas(n: int, T: int, shift: float) -> np.ndarray:
    """``DPMSolverMultistepScheduler.set_timesteps``' flow grid (float64, ``[n]``, descending):
    ``s = 1 - linspace(1, 1/T, n + 1)`` shifted ``shift s / (1 + (shift - 1) s)``, flipped,
    its last point (0) dropped."""
    s = 1.0 - np.linspace(1, 1 / T, n + 1)
    return np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()


def unipc_flow_sigmas(
    n: int, T: int, opts: FlowOptions, custom: Sequence[float] | None = None
) -> np.ndarray:
    """``UniPCMultistepScheduler.set_timesteps``' flow grid (float64, ``[n]``): custom sigmas or
    ``linspace(1, 1/T, n + 1)[:-1]``, then the dynamic shift with ``mu`` (exponential
    ``e^mu / (e^mu + 1/s - 1)`` or linear ``mu / (mu + 1/s - 1)``) or the static shift,
    ``shift_terminal``'s stretch, and a first sigma within 1e-6 of 1 moved down by 1e-6."""
    if custom is None:
        s = np.linspace(1, 1 / T, n + 1)[:-1]
    else:
        s = check_custom_sigmas(custom, n)
    if opts.dynamic and opts.mu is None:
        raise ValueError("mu: use_dynamic_shifting=True needs mu (as diffusers), got None")
    s = shift_flow_sigmas(s, opts.shift, opts.mu if opts.dynamic else None, opts.time_shift_type)
    if opts.shift_terminal is not None:
        s = stretch_to_terminal(s, opts.shift_terminal)
    s = np.array(s, dtype=np.float64)
    if np.fabs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return s


def flow_timesteps(sig: np.ndarray, T: int, name: str) -> np.ndarray:
    """The model timesteps ``int64(sigma T)`` (diffusers truncates); the grid must lie in (0, 1)."""
    s32 = sig.astype(np.float32)
    if not (np.all(np.isfinite(s32)) and np.all(s32 > 0) and np.all(s32 < 1)):
        raise ValueError(
            f"flow_shift, mu: {name}'s flow sigma grid must lie in (0, 1), got "
            f"{s32.min()} .. {s32.max()}; check the shift settings"
        )
    return (sig * T).astype(np.int64)


class FlowGridMixin:
    """The flow-sigma parts of :class:`~fastdiff.samplers.dpm_solver.DPMSolverPPSampler` (and
    its subclasses): option checks, (alpha_t, sigma_t) of the grid, DPM's flow grid."""

    _flow: FlowOptions
    steps: int
    schedule: Any
    final_sigmas_type: str
    prediction_type: str
    flow_prediction = False
    use_flow_sigmas = False

    @property
    def _op_prediction(self) -> str:
        """The prediction type the fused ops read: a flow velocity is their "epsilon" with the
        row's a = 1, s = sigma (x0 = x - sigma v)."""
        return "epsilon" if self.flow_prediction else self.prediction_type

    def _check_flow(self, grids: list[str], timesteps: object, prediction_type: str) -> str:
        """Flow options against the others; the prediction type the fused op reads (a flow
        velocity is its "epsilon" with a = 1, s = sigma: x0 = x - sigma v)."""
        flow = self._flow
        #: diffusers' flow-matching grid (alpha_t = 1 - sigma, sigma_t = sigma)
        self.use_flow_sigmas = flow.on
        #: the flow grid's shift (e^mu when mu is given, as diffusers' set_timesteps)
        self.flow_shift = math.exp(flow.mu) if flow.mu is not None else flow.shift
        self.flow_prediction = prediction_type == "flow_prediction"
        if self.flow_prediction and not flow.on:
            raise ValueError(
                "prediction_type: 'flow_prediction' needs use_flow_sigmas=True (x0 = x - sigma v "
                "on the flow grid), got use_flow_sigmas=False"
            )
        if flow.on and grids:
            g = grids[0]
            raise ValueError(
                f"use_flow_sigmas: not with use_{g}_{'lambdas' if g == 'lu' else 'sigmas'}=True "
                f"(diffusers' {type(self).__name__.replace('Sampler', '')} builds that grid from "
                "the VP betas and reads it as flow sigmas, alpha = 1 - sigma < 0)"
            )
        if flow.on and timesteps is not None:
            raise ValueError("timesteps: custom timesteps cannot be combined with use_flow_sigmas")
        return "epsilon" if self.flow_prediction else prediction_type

    def _alpha_sigma(self, levels: Sequence[float]) -> tuple[list[float], list[float]]:
        """(alpha_t, sigma_t) of diffusers' ``sigmas`` (``_sigma_to_alpha_sigma_t``): flow
        (1 - s, s), else the VP pair of the noise-to-signal ratio s."""
        if self.use_flow_sigmas:
            return [1.0 - s for s in levels], [float(s) for s in levels]
        alpha = [1.0 / math.sqrt(r * r + 1.0) for r in levels]
        return alpha, [r * a for r, a in zip(levels, alpha, strict=True)]

    def _flow_timesteps(self) -> np.ndarray:
        """The flow grid's model timesteps; sets ``self._grid`` as :meth:`_grid_timesteps`."""
        T = self.schedule.num_train_timesteps
        sig = dpm_flow_sigmas(self.steps, T, self.flow_shift)
        last = 0.0
        if self.final_sigmas_type == "sigma_min":  # the VP sigma_min of the betas, as diffusers
            last = self._train_sigmas32()[0]  # type: ignore[attr-defined]
        self._grid = np.append(sig, last).astype(np.float32).astype(np.float64)
        return flow_timesteps(sig, T, type(self).__name__)
