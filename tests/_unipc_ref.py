"""The ``unipc_step`` op's math (float64 reference and plain PyTorch in x's dtype) and its test
inputs, shared by tests/test_unipc.py (order 2) and tests/test_unipc3.py (order 3: m_prev3)."""

from __future__ import annotations

import torch

_XC_COLS = (3, 5, 6, 10)  # c_last, c_m1, c_m2, c_m3: the corrector's history weights
_XN_COLS = (9, 11)  # p_m1, p_m2: the predictor's


def _pad(hist):
    return [*hist, *[None] * (4 - len(hist))]


def _combine(x, mo, c, hist, pred, clip, g, cast):
    n = x.shape[0]
    m = mo if g is None else mo[:n] + g * (mo[n:] - mo[:n])
    x0 = {"epsilon": (x - c[1] * m) / c[0], "v_prediction": c[0] * x - c[1] * m, "sample": m}[pred]
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    hist = _pad(hist)
    xc = c[2] * x + c[4] * x0
    for t, k in zip(hist, _XC_COLS, strict=True):
        if t is not None:
            xc = xc + c[k] * cast(t)
    xn = c[7] * xc + c[8] * x0
    for t, k in zip(hist[1:3], _XN_COLS, strict=True):
        if t is not None:
            xn = xn + c[k] * cast(t)
    return xc, x0, xn


def ref64(x, mo, coef, hist, pred, clip, g):
    """The op's math in float64; ``hist`` = [last, m1, m2, m3] (each or None; a shorter list
    has no further operands). Returns (x_c, m, x_next)."""
    return _combine(x.double(), mo.double(), coef.double(), hist, pred, clip, g,
                    lambda t: t.double())  # fmt: skip


def eager(x, mo, coef, hist, pred, clip, g):
    """Plain PyTorch in x's dtype (the FlashAttention rule's yardstick)."""
    return _combine(x, mo, coef.to(x.dtype), hist, pred, clip, g, lambda t: t)


def inputs(shape, dtype, device, layout, g, cfg=False, n_hist=4):
    """x, the model output ([uncond, cond] halves with ``cfg``) and ``n_hist`` history operands,
    in ``layout``: contiguous, channels_last, or strided (a non-contiguous view)."""

    def mk(s):
        t = torch.randn(s, generator=g).to(device=device, dtype=dtype)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "strided":  # a non-contiguous view
            return torch.randn((*s[:-1], 2 * s[-1]), generator=g).to(device, dtype)[..., ::2]
        return t

    x = mk(shape)
    mo = mk((2 * shape[0], *shape[1:]) if cfg else shape)
    return x, mo, [mk(shape) for _ in range(n_hist)]
