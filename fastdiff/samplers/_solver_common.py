"""What the exponential-integrator solvers share beyond :mod:`fastdiff.samplers.base`: DPM-Solver++
(multistep, singlestep, inverse), UniPC, DEIS and SA-Solver read the same diffusers options and
build the same spaced grid, and their dynamic thresholding is the same separate torch pass before
the fused step."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import custom_steps as custom_steps  # its users import it here
from fastdiff.samplers.base import threshold_x0
from fastdiff.samplers.ddim import _combine_cfg, _x0_eps
from fastdiff.samplers.sigmas import make_sigma_grid, sigma_to_t

FINAL_SIGMAS = ("zero", "sigma_min")
# diffusers' DPM-Solver schedulers read UniPC's / DEIS's solver types as "midpoint"
SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint",
                "bh2": "midpoint"}  # fmt: skip


def check_lambda_min_clipped(value: Any) -> float:
    """diffusers' ``lambda_min_clipped`` as a float: a real number (TypeError naming it
    otherwise, a bool included) below inf (ValueError: NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"lambda_min_clipped: expected a float, got {type(value).__name__}")
    if math.isnan(value) or value == math.inf:
        raise ValueError(f"lambda_min_clipped: expected a float < inf, got {value!r}")
    return float(value)


def spaced_over_steps_plus_one(
    T: int, n: int, spacing: str, steps_offset: int, last: int
) -> np.ndarray:
    """The ``n`` model timesteps of diffusers' DPM-Solver / DEIS ``set_timesteps`` (int64,
    descending), below ``last`` (T, or where ``lambda_min_clipped`` cuts the schedule):
    ``linspace`` / ``leading`` space n + 1 points and drop the last (t = 0), ``trailing``
    steps by T / n down from ``last`` (fewer than n points when ``last`` < T)."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1


def sigma_grid_timesteps(
    grid: str, train: np.ndarray, n: int, *, rounded: bool, ascending: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``n``-level sigma grid ``grid`` (``"karras"``, ``"exponential"``, ``"beta"``:
    :func:`~fastdiff.samplers.sigmas.make_sigma_grid`) between the float32 training noise
    levels ``train`` (sigma/alpha, ascending in t) and its model timesteps, descending
    (``ascending``: an inversion's, the builders given the two ends the other way round, as
    diffusers' inverse scheduler does). The timesteps are those of the matching
    training levels (:func:`~fastdiff.samplers.sigmas.sigma_to_t`), rounded with ``rounded``
    (where diffusers rounds), else truncated by the int64 cast."""
    lo, hi = train[0].item(), train[-1].item()
    sig = make_sigma_grid(grid, hi, lo, n) if ascending else make_sigma_grid(grid, lo, hi, n)
    ts = sigma_to_t(sig, np.log(train))
    return sig, (ts.round() if rounded else ts).astype(np.int64)


def thresholded_x0(
    smp: Any,
    x: Tensor,
    model_output: Tensor,
    guidance_scale: float | None,
    a: Tensor | float,
    s: Tensor | float,
    prediction_type: str,
    *,
    in_x_dtype: bool = False,
) -> Tensor:
    """The separate torch pass of dynamic thresholding (Imagen, arXiv:2205.11487, section 2.3)
    before a fused step, which then takes the result as a ``"sample"`` prediction: the x0 of
    the CFG-combined ``model_output`` at ``x`` from the row's (a, s) under ``prediction_type``
    (DDPM eq. 4 inverted; v: Salimans & Ho 2022), thresholded with ``smp``'s ratio and max
    value (:func:`~fastdiff.samplers.base.threshold_x0`). ``in_x_dtype``: cast to x's dtype,
    after the op's model_output dtype check (which the cast would hide)."""
    if in_x_dtype and model_output.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"model_output: must be float32, float16 or bfloat16, got {model_output.dtype}"
        )
    x0, _ = _x0_eps(x, _combine_cfg(model_output, guidance_scale), a, s, prediction_type)
    x0 = threshold_x0(x0, smp.dynamic_thresholding_ratio, smp.sample_max_value)
    return x0.to(x.dtype) if in_x_dtype else x0


def threshold_config(smp: Any) -> dict[str, Any]:
    """The thresholding entries of a sampler's ``config()`` (a CUDA-graph cache key): whether
    it is on, and the Python floats a captured graph bakes into its threshold pass (None when
    off)."""
    on = smp.thresholding
    return {
        "thresholding": on,
        "threshold_ratio": smp.dynamic_thresholding_ratio if on else None,
        "sample_max_value": smp.sample_max_value if on else None,
    }
