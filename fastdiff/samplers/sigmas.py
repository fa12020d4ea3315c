"""Noise-level (sigma) grids shared by the samplers: Karras, exponential and beta.

sigma is the variance-exploding noise level sigma_t = sqrt((1 - ab_t) / ab_t) of Karras et al.
2022 (arXiv:2206.00364); DPM-Solver++ calls it the noise-to-signal ratio sigma_t / alpha_t.
A grid replaces the spaced timesteps: the sampler steps between the grid's noise levels and calls
the model at the training timestep whose noise level matches (:func:`sigma_to_t`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff.schedules import NoiseSchedule, _cosine_betas

__all__ = [
    "SIGMA_GRIDS",
    "beta_sigmas",
    "clipped_end",
    "exponential_sigmas",
    "karras_sigmas",
    "make_sigma_grid",
    "pick_sigma_grid",
    "sigma_to_t",
    "train_alphas_cumprod32",
    "train_sigmas32",
]

SIGMA_GRIDS = ("karras", "exponential", "beta")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """The ``n`` noise levels of Karras et al. 2022 (arXiv:2206.00364), eq. 5, descending::

        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    rho = 7 (the paper's choice) spends the steps near sigma_min; i = 0 .. n-1 (n = 1: sigma_max).
    """
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` noise levels evenly spaced in log sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(
    sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """``n`` noise levels at the Beta(alpha, beta) quantiles of 1 - i/(n-1) (Lee et al. 2024,
    "Beta Sampling is All You Need", arXiv:2407.12173): sigma_min + ppf * (sigma_max -
    sigma_min); alpha = beta = 0.6 puts more steps at both ends. Needs scipy."""
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # pragma: no cover - scipy is a test dependency
        raise ImportError("use_beta_sigmas: needs scipy (pip install scipy)") from e
    ppf = beta_dist.ppf(1.0 - np.linspace(0.0, 1.0, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def make_sigma_grid(grid: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The ``n``-point grid called ``grid`` ("karras", "exponential", "beta"), descending."""
    if grid == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if grid == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    if grid == "beta":
        return beta_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"sigma grid: expected one of {list(SIGMA_GRIDS)}, got {grid!r}")


def pick_sigma_grid(
    use_karras_sigmas: bool, use_exponential_sigmas: bool, use_beta_sigmas: bool
) -> str | None:
    """The grid the three diffusers flags ask for (None: none); ValueError if more than one."""
    flags = (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    grids = [g for g, on in zip(SIGMA_GRIDS, flags, strict=True) if on]
    if len(grids) > 1:
        raise ValueError(
            "use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: at most one may be "
            f"True, got {', '.join(f'use_{g}_sigmas=True' for g in grids)}"
        )
    return grids[0] if grids else None


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of noise levels ``sigma``: piecewise-linear interpolation
    of log sigma over the training grid ``log_sigmas`` (ascending in t), clamped to
    [0, T - 1]; the same arithmetic as diffusers' ``_sigma_to_t`` so rounding agrees."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    if len(log_sigmas) < 2:  # a single training timestep
        return np.zeros_like(log_sigma)
    lo = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    hi = lo + 1
    w = np.clip((log_sigmas[lo] - log_sigma) / (log_sigmas[lo] - log_sigmas[hi]), 0.0, 1.0)
    return (1.0 - w) * lo + w * hi


def train_sigmas32(schedule: NoiseSchedule) -> np.ndarray:
    """diffusers' float32 training noise levels sqrt((1 - ab_t) / ab_t), t = 0 .. T-1.

    diffusers builds its betas and alpha_bar in float32 and derives a grid's end points and the
    sigma -> t map from them; rebuilding them the same way keeps the rounded model timesteps
    identical (float64 ones move a t across a rounding boundary now and then). Zero-SNR
    schedules are rescaled in float32 too (last value 2^-24, as diffusers); user betas given
    with the rescale (not kept before it) use fastdiff's float64 alpha_bar, cast.
    """
    ab = train_alphas_cumprod32(schedule)
    return (((1 - ab) / ab) ** 0.5).numpy()


def train_alphas_cumprod32(schedule: NoiseSchedule) -> torch.Tensor:
    """diffusers' float32 alpha_bar_t, t = 0 .. T-1 (a value of 0 as 2^-24), as
    :func:`train_sigmas32` uses it."""
    sch = schedule
    T = sch.num_train_timesteps
    if sch.beta_schedule == "linear":
        b = torch.linspace(sch.beta_start, sch.beta_end, T, dtype=torch.float32)
    elif sch.beta_schedule == "scaled_linear":
        lo, hi = sch.beta_start**0.5, sch.beta_end**0.5
        b = torch.linspace(lo, hi, T, dtype=torch.float32) ** 2
    elif sch.beta_schedule == "cosine":  # computed in float64, then cast, as diffusers
        b = _cosine_betas(T).to(torch.float32)
    elif sch.rescale_betas_zero_snr:  # user betas, given before the rescale: not kept
        ab = sch.alphas_cumprod.clone()
        ab[-1] = 2.0**-24  # as diffusers: keep sigma finite at zero terminal SNR
        ab[ab == 0] = 2.0**-24
        return ab.to(torch.float32)
    else:
        b = sch.betas.to(torch.float32)
    if sch.rescale_betas_zero_snr:
        b = _rescale_zero_snr32(b)
    ab = torch.cumprod(1.0 - b, 0)
    if sch.rescale_betas_zero_snr:
        ab[-1] = 2.0**-24  # as diffusers: keep sigma finite at zero terminal SNR
    ab[ab == 0] = 2.0**-24
    return ab


def _rescale_zero_snr32(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``rescale_zero_terminal_snr`` in its float32 order of operations (the float64
    :func:`fastdiff.schedules.rescale_zero_terminal_snr`, rounded as diffusers rounds it)."""
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    ab = sqrt_ab**2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])


def clipped_end(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
    """One past the largest timestep the spaced grid uses: diffusers' ``T - clipped_idx``, the
    number of training timesteps whose lambda_t >= ``lambda_min_clipped``, with diffusers'
    float32 lambda_t = log(sqrt(ab_t)) - log(sqrt(1 - ab_t)) and its ``torch.searchsorted`` (so
    a ``lambda_min_clipped`` equal to one of them cuts where diffusers does)."""
    T = schedule.num_train_timesteps
    if lambda_min_clipped == -math.inf:
        return T
    ab = train_alphas_cumprod32(schedule)
    lam = torch.log(torch.sqrt(ab)) - torch.log(torch.sqrt(1 - ab))  # float32, descending in t
    last = T - int(torch.searchsorted(torch.flip(lam, [0]), lambda_min_clipped))
    if last < 1:
        raise ValueError(
            f"lambda_min_clipped: expected <= lambda at t = 0 ({float(lam[0]):.6g}), got "
            f"{lambda_min_clipped}"
        )
    return last
