"""Argument checks shared by the sampler ops (:mod:`fastdiff.ops.sampler_step`,
:mod:`fastdiff.ops.unipc_step`): dtypes, devices, shapes, prediction types, real-valued options,
the noise operand, and whether a call may skip the custom op's Python overhead. Each error is a
``ValueError`` / ``TypeError`` naming the argument, what was expected and what it got."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from fastdiff import _ext

PREDICTION_TYPES: dict[str, int] = {"epsilon": 0, "v_prediction": 1, "sample": 2}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")


def _check_like_x(name: str, t: Tensor, x: Tensor) -> None:
    """A per-element operand (noise, x0_prev): a float tensor on x's device with x's shape."""
    _check_float(name, t)
    _check_device(name, t, x)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _check_common(x, model_output, coef, prediction_type, clip_range, guidance_scale, lv):
    _check_float("x", x)
    _check_float("model_output", model_output)
    dev = x.device
    if model_output.device != dev:
        _check_device("model_output", model_output, x)
    if not isinstance(coef, Tensor) or coef.dtype != torch.float32:
        got = coef.dtype if isinstance(coef, Tensor) else type(coef).__name__
        raise TypeError(f"coef must be a float32 tensor, got {got}")
    if coef.device != dev:
        _check_device("coef", coef, x)
    if coef.dim() != 1 or coef.shape[0] < 8:
        raise ValueError(
            f"coef must have >= 8 elements in one dimension, got shape {tuple(coef.shape)}"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {sorted(PREDICTION_TYPES)}"
        )
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [N x ...]")
    clip = None if clip_range is None else _real("clip_range", clip_range)
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip_range must be a float >= 0, got {clip_range!r}")
    g = None if guidance_scale is None else _real("guidance_scale", guidance_scale)
    if g is not None and not math.isfinite(g):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if g is None and not lv:  # the common case: torch.Size compare (~2x cheaper than lists)
        if model_output.shape != x.shape:
            raise ValueError(
                f"model_output must have shape {tuple(x.shape)} for x of shape {tuple(x.shape)}"
                f" (guidance_scale=None, learned_variance={lv}), "
                f"got {tuple(model_output.shape)}"
            )
        return clip, g
    exp = list(x.shape)
    if guidance_scale is not None:
        exp[0] *= 2
        if model_output.dim() < 1 or model_output.shape[0] != exp[0]:
            raise ValueError(
                f"guidance_scale needs model_output with batch 2N = {exp[0]} ([uncond, cond]), "
                f"got shape {tuple(model_output.shape)}"
            )
    if lv:
        if x.dim() < 2:
            raise ValueError("learned_variance needs x of shape [N x C x ...]")
        exp[1] *= 2
    if list(model_output.shape) != exp:
        raise ValueError(
            f"model_output must have shape {tuple(exp)} for x of shape {tuple(x.shape)}"
            f" (guidance_scale={guidance_scale}, learned_variance={lv}), "
            f"got {tuple(model_output.shape)}"
        )
    return clip, g


def _check_noise(x: Tensor, noise: Tensor | None, generator_state: Tensor | None) -> Tensor | None:
    """Validate the noise arguments (at most one; noise like x, generator_state int64 [2] on x's
    device); returns generator_state, contiguous."""
    if noise is not None and generator_state is not None:
        raise ValueError("pass at most one of noise and generator_state, got both")
    if noise is not None:
        _check_like_x("noise", noise, x)
    if generator_state is not None:
        if not isinstance(generator_state, Tensor) or generator_state.dtype != torch.int64:
            got = getattr(generator_state, "dtype", type(generator_state).__name__)
            raise TypeError(f"generator_state must be an int64 tensor [2], got {got}")
        if generator_state.shape != (2,):
            raise ValueError(
                f"generator_state must have shape (2,), got {tuple(generator_state.shape)}"
            )
        _check_device("generator_state", generator_state, x)
        if not generator_state.is_contiguous():
            generator_state = generator_state.contiguous()
    return generator_state


def _real(name: str, v: object) -> float:
    """``v`` as a float: a real number (not a bool) or a one-element non-bool tensor."""
    if type(v) is float:  # the common case, ~25x cheaper than the isinstance(Real) ABC check
        return v
    if isinstance(v, Real) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Tensor) and v.numel() == 1 and v.dtype != torch.bool:
        return float(v)
    raise TypeError(f"{name} must be a real number or None, got {type(v).__name__}")


def _plain_eager(*tensors: Tensor | None) -> bool:
    """True when nothing traces these tensors (no torch.compile, no dispatch mode, no subclass,
    no autograd), so calling the op's implementation directly is the same as calling the op and
    skips ~50 us of custom-op Python overhead per sampler step."""
    if torch.compiler.is_compiling() or _ext.transforms_active():
        return False
    for t in tensors:  # noqa: SIM110 (a plain loop: ~2x faster than all() over a generator)
        if t is not None and (type(t) is not Tensor or t.requires_grad):
            return False
    return True


def _check_deep_history(x: Tensor, coef: Tensor, x0_prev2: Tensor | None,
                        x0_prev3: Tensor | None, x0_prev4: Tensor | None) -> None:  # fmt: skip
    """The x0_prev3 / x0_prev4 operands of :func:`dpm_solver_2m_step` (at least one given):
    each like x, each needing the one before it, and coef long enough for their columns."""
    if x0_prev3 is None:
        raise ValueError("x0_prev4 (the fourth history operand) needs x0_prev3, got x0_prev3=None")
    if x0_prev2 is None:
        raise ValueError("x0_prev3 (the third history operand) needs x0_prev2, got x0_prev2=None")
    _check_like_x("x0_prev3", x0_prev3, x)
    need = 9
    if x0_prev4 is not None:
        _check_like_x("x0_prev4", x0_prev4, x)
        need = 10
    if coef.shape[0] < need:
        which = "x0_prev4 (c_prev4 = coef[9])" if need == 10 else "x0_prev3 (c_prev3 = coef[8])"
        raise ValueError(
            f"coef must have >= {need} elements with {which}, got shape {tuple(coef.shape)}"
        )
