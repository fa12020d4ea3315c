"""Triton kernel of the fused UniPC step (fastdiff/ops/unipc_step.py).

One program walks (sample, tile) pairs with a grid-stride loop (grid capped), int64 offsets.
Operands are base pointers plus per-sample strides, each sample's block dense in x's memory
order; outputs are dense. Per element (fp32): m = x0(x, model output) as the sampler_step kernel
derives it, x_c = c_x x + c_last last + c_m m + c_m1 m1 + c_m2 m2 + c_m3 m3, x_next = p_xc x_c +
p_m m + p_m1 m1 + p_m2 m2, absent operands' terms skipped (HAS_M3 false: order 1 / 2, the m3
load and term are not generated).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastdiff.kernels.triton import _compat
from fastdiff.kernels.triton.sampler_step import _guided, _load, _t, _tile, _x0_eps, grid

_compat.patch_interpreter()


@triton.jit
def _unipc_step_kernel(
    X,  # [N x inner] x (the model's input), batch stride bs_x
    M,  # [N x inner] model output (cond half with CFG)
    MU,  # [N x inner] uncond half (CFG only)
    LAST,  # [N x inner] previous corrected sample (HAS_LAST only)
    M1,  # [N x inner] m_{i-1} (HAS_M1 only)
    M2,  # [N x inner] m_{i-2} (HAS_M2 only)
    M3,  # [N x inner] m_{i-3} (HAS_M3 only: order 3's corrector)
    COEF,  # fp32 [12] [a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2]
    XC,  # [N x inner] x_c output, dense
    X0,  # [N x inner] m output, dense
    XN,  # [N x inner] x_next output, dense
    bs_x,
    bs_m,
    bs_mu,
    bs_last,
    bs_m1,
    bs_m2,
    bs_m3,
    inner,  # elements per sample
    tiles_per_sample,  # cdiv(inner, BLOCK)
    total_tiles,  # N * tiles_per_sample
    clip_r,  # x0 clip range
    g,  # guidance scale
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,
    CFG: tl.constexpr,
    HAS_LAST: tl.constexpr,
    HAS_M1: tl.constexpr,
    HAS_M2: tl.constexpr,
    HAS_M3: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a = tl.load(COEF + 0)
    s = tl.load(COEF + 1)
    c_x = tl.load(COEF + 2)
    c_last = tl.load(COEF + 3)
    c_m = tl.load(COEF + 4)
    c_m1 = tl.load(COEF + 5)
    c_m2 = tl.load(COEF + 6)
    p_xc = tl.load(COEF + 7)
    p_m = tl.load(COEF + 8)
    p_m1 = tl.load(COEF + 9)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    for t in range(pid, total_tiles, nprog):
        _t64, n, offs, mask = _tile(t, tiles_per_sample, lane, inner, BLOCK)
        x = _load(X, n, bs_x, offs, mask)
        mo = _guided(M, MU, n, offs, mask, bs_m, bs_mu, g, CFG)
        m, _eps = _x0_eps(x, mo, a, s, clip_r, PRED, CLIP, False, False)  # x0 of the output
        xc = _t(c_x, x) + _t(c_m, m)  # a zero coefficient's term is not formed
        if HAS_LAST:
            last = _load(LAST, n, bs_last, offs, mask)
            xc = xc + _t(c_last, last)
        if HAS_M1:
            m1 = _load(M1, n, bs_m1, offs, mask)
            xc = xc + _t(c_m1, m1)
        if HAS_M2:
            m2 = _load(M2, n, bs_m2, offs, mask)
            xc = xc + _t(c_m2, m2)
        if HAS_M3:
            c_m3 = tl.load(COEF + 10)
            m3 = _load(M3, n, bs_m3, offs, mask)
            xc = xc + _t(c_m3, m3)
        xn = _t(p_xc, xc) + _t(p_m, m)
        if HAS_M1:
            xn = xn + _t(p_m1, m1)
        if HAS_M2:
            p_m2 = tl.load(COEF + 11)
            xn = xn + _t(p_m2, m2)
        tl.store(XC + n * inner + offs, xc.to(XC.dtype.element_ty), mask=mask)
        tl.store(X0 + n * inner + offs, m.to(X0.dtype.element_ty), mask=mask)
        tl.store(XN + n * inner + offs, xn.to(XN.dtype.element_ty), mask=mask)


def unipc_step_forward(
    x: Tensor,
    m: Tensor,
    mu: Tensor | None,
    last: Tensor | None,
    m1: Tensor | None,
    m2: Tensor | None,
    m3: Tensor | None,
    coef: Tensor,
    xc: Tensor,
    x0: Tensor,
    xn: Tensor,
    *,
    n: int,
    inner: int,
    pred: int,
    clip_r: float | None,
    g: float | None,
) -> None:
    """Launch the kernel. Tensors per-sample dense in x's order (batch strides read from them
    when the batch has more than one sample); absent operands are None (never read)."""
    block = 1024
    tiles = triton.cdiv(inner, block)
    total = n * tiles

    def bs(t: Tensor | None) -> int:
        return 0 if t is None else (t.stride(0) if t.shape[0] > 1 else inner)

    _unipc_step_kernel[grid(x, total)](
        x, m, mu if mu is not None else m, last if last is not None else x,
        m1 if m1 is not None else x, m2 if m2 is not None else x, m3 if m3 is not None else x,
        coef, xc, x0, xn, bs(x), bs(m), bs(mu), bs(last), bs(m1), bs(m2), bs(m3), inner, tiles,
        total,
        float(clip_r) if clip_r is not None else 0.0, float(g) if g is not None else 0.0,
        PRED=pred, CLIP=clip_r is not None, CFG=g is not None, HAS_LAST=last is not None,
        HAS_M1=m1 is not None, HAS_M2=m2 is not None, HAS_M3=m3 is not None, BLOCK=block,
    )  # fmt: skip
