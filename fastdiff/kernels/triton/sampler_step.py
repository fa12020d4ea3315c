"""Triton kernel of the fused sampler update and the DPM-Solver++ 2M step.

One program walks (sample, tile) pairs with a grid-stride loop (grid capped), int64 offsets.
Operands are base pointers plus per-sample strides; each sample's block is dense in x's memory
order (see fastdiff/ops/sampler_step.py). In-kernel noise: element ``e`` (logical NCHW row-major
index) is lane ``e % 4`` of ``tl.randn4x(seed, offset + e // 4)``, the stream the cpu/cuda/torch
backends reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from fastdiff.kernels.triton import _compat
from fastdiff.kernels.triton._device import sm_count

_compat.patch_interpreter()


@triton.jit
def _t(c, v):
    """The term ``c * v``, not formed (0) when the coefficient ``c`` is exactly 0: no
    ``0 * inf = NaN`` (csrc/include/fastdiff/sampler_math.h, formed_operand)."""
    return c * tl.where(c == 0.0, 0.0, v)


@triton.jit
def _tile(t, tiles_per_sample, lane, inner, BLOCK: tl.constexpr):
    """Tile ``t`` of a grid-stride loop over (sample, tile) pairs: ``(t, n, offs, mask)``, the
    tile index as int64, its sample n, its [BLOCK] memory offsets within the sample (``lane`` =
    0 .. BLOCK - 1, int64) and which of them lie inside the sample's ``inner`` elements."""
    t64 = tl.full((), t, tl.int64)
    n = t64 // tiles_per_sample
    offs = (t64 - n * tiles_per_sample) * BLOCK + lane
    return t64, n, offs, offs < inner


@triton.jit
def _load(P, n, bs, offs, mask):
    """Sample n's elements ``offs`` of an operand with batch stride ``bs``, as fp32 (0 masked)."""
    return tl.load(P + n * bs + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _guided(M, MU, n, offs, mask, bs_m, bs_mu, g, CFG: tl.constexpr):
    """The model output, fp32; with CFG the guided ``u + g (m - u)`` (classifier-free guidance,
    Ho & Salimans 2022) of the cond half M and the uncond half MU."""
    m = _load(M, n, bs_m, offs, mask)
    if CFG:
        u = _load(MU, n, bs_mu, offs, mask)
        m = u + g * (m - u)
    return m


@triton.jit
def _x0_eps(
    x, m, a, s, clip_r,
    PRED: tl.constexpr, CLIP: tl.constexpr, RECOMPUTE: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    """x0 and eps from the model output m (DDIM eq. 9; v-parameterisation, Salimans & Ho 2022),
    x0 clamped to [-clip_r, clip_r] with NaN kept (CLIP) and eps then recomputed from it
    (RECOMPUTE); csrc/include/fastdiff/sampler_math.h, predict_x0_eps. EPS false: eps is not
    needed and not computed (m is returned in its place)."""
    if PRED == 0:
        x0 = (x - s * m) / a
    elif PRED == 1:
        x0 = a * x - s * m
    else:
        x0 = m
    eps = m  # PRED 0's eps
    if EPS:
        if PRED == 1:
            eps = a * m + s * x
        elif PRED == 2:
            eps = (x - a * x0) / s
    if CLIP:
        x0 = tl.where(x0 < -clip_r, -clip_r, x0)  # NaN-propagating clamp
        x0 = tl.where(x0 > clip_r, clip_r, x0)
        if RECOMPUTE:
            eps = (x - a * x0) / s
    return x0, eps


def grid(x: Tensor, total: int) -> tuple[int]:
    """Programs of a grid-stride launch over ``total`` tiles: 16 per multiprocessor on a GPU, 4
    under the interpreter (few programs, each a vectorised numpy tile loop)."""
    cap = sm_count(x.device) * 16 if x.device.type == "cuda" else 4
    return (max(1, min(total, cap)),)


@triton.jit
def _philox_noise(
    GEN,  # int64 [2] (seed, offset)
    n,  # sample index (int64)
    t64,  # tile index (int64)
    offs,  # [BLOCK] memory offsets within the sample (int64)
    quad,  # [BLOCK // 4] counter lanes 0 .. BLOCK // 4 - 1 (int64)
    inner,  # elements per sample
    tiles_per_sample,  # cdiv(inner, BLOCK)
    nhwc_c,  # C when the per-sample order is HWC
    hw,  # H * W (HWC order only)
    NHWC: tl.constexpr,  # per-sample memory order HWC
    QUAD: tl.constexpr,  # NCHW order and inner % 4 == 0: the tile starts on a counter boundary
    BLOCK: tl.constexpr,  # elements per tile
):
    """[BLOCK] normals: logical element e is lane e % 4 of tl.randn4x(seed, offset + e // 4)."""
    seed = tl.load(GEN)
    offset = tl.load(GEN + 1)
    if QUAD:  # BLOCK // 4 counters, 4 lanes
        q0 = offset + (n * inner + (t64 - n * tiles_per_sample) * BLOCK) // 4
        z0, z1, z2, z3 = tl.randn4x(seed, q0 + quad)
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK,))
    else:
        if NHWC:
            logical = (offs % nhwc_c) * hw + offs // nhwc_c
        else:
            logical = offs
        e = n * inner + logical
        z0, z1, z2, z3 = tl.randn4x(seed, offset + e // 4)
        r = e % 4
        z = tl.where(r == 0, z0, tl.where(r == 1, z1, tl.where(r == 2, z2, z3)))
    return z


@triton.jit
def _sampler_step_kernel(
    X,  # [N x inner] x_t, per-sample dense, batch stride bs_x
    M,  # [N x inner] model output (cond half with CFG; first C channels with learned variance)
    MU,  # [N x inner] uncond half (CFG only)
    V,  # [N x inner] variance values v in [-1, 1] (learned variance only)
    Z,  # [N x inner] noise z (mode 0) or x0_prev (mode 1)
    W,  # [N x inner] noise z of the SDE dpm step (mode 1, HAS_NOISE == 1 only)
    Q,  # [N x inner] x0_prev2 of the DPM++ 3M step (mode 1, HAS_PREV2 only)
    Q3,  # [N x inner] x0_prev3 (mode 1, HAS_PREV3 only; coef[8])
    Q4,  # [N x inner] x0_prev4 (mode 1, HAS_PREV4 only; coef[9])
    GEN,  # int64 [2] (seed, offset) for in-kernel Philox noise
    COEF,  # fp32 [8] step coefficients ([9] / [10] with HAS_PREV3 / HAS_PREV4)
    OUT,  # [N x inner] x_prev / x_next, dense
    X0,  # [N x inner] x0 output, dense (WRITE_X0 only)
    bs_x,  # batch stride of X (elements)
    bs_m,  # batch stride of M
    bs_mu,  # batch stride of MU
    bs_v,  # batch stride of V
    bs_z,  # batch stride of Z
    bs_w,  # batch stride of W
    bs_q,  # batch stride of Q
    bs_q3,  # batch stride of Q3
    bs_q4,  # batch stride of Q4
    inner,  # elements per sample
    tiles_per_sample,  # cdiv(inner, BLOCK)
    total_tiles,  # N * tiles_per_sample
    nhwc_c,  # C when the per-sample order is HWC, else 1 (unused)
    hw,  # H * W (HWC order only)
    clip_r,  # x0 clip range
    g,  # guidance scale
    MODE: tl.constexpr,  # 0 sampler_step, 1 dpm_solver_2m_step
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,  # clamp x0
    RECOMPUTE: tl.constexpr,  # eps from the clipped x0
    CFG: tl.constexpr,  # classifier-free guidance from MU/M
    LV: tl.constexpr,  # learned variance from V
    HAS_Z: tl.constexpr,  # 0 none, 1 tensor Z, 2 Philox from GEN
    HAS_NOISE: tl.constexpr,  # mode 1: 0 none, 1 tensor W, 2 Philox from GEN
    HAS_PREV2: tl.constexpr,  # mode 1: x0_prev2 from Q (3M; with x0_prev)
    HAS_PREV3: tl.constexpr,  # mode 1: x0_prev3 from Q3 (with x0_prev2)
    HAS_PREV4: tl.constexpr,  # mode 1: x0_prev4 from Q4 (with x0_prev3)
    WRITE_X0: tl.constexpr,  # store x0
    NHWC: tl.constexpr,  # per-sample memory order HWC (logical index for Philox)
    QUAD: tl.constexpr,  # Philox noise with NCHW order and inner % 4 == 0 (4 lanes per counter)
    BLOCK: tl.constexpr,  # elements per tile
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a = tl.load(COEF + 0)
    s = tl.load(COEF + 1)
    k2 = tl.load(COEF + 2)
    k3 = tl.load(COEF + 3)
    k4 = tl.load(COEF + 4)
    k5 = tl.load(COEF + 5)
    k6 = tl.load(COEF + 6)
    k7 = tl.load(COEF + 7)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    quad = tl.arange(0, BLOCK // 4).to(tl.int64)
    for t in range(pid, total_tiles, nprog):
        t64, n, offs, mask = _tile(t, tiles_per_sample, lane, inner, BLOCK)
        x = _load(X, n, bs_x, offs, mask)
        m = _guided(M, MU, n, offs, mask, bs_m, bs_mu, g, CFG)
        x0, eps = _x0_eps(x, m, a, s, clip_r, PRED, CLIP, RECOMPUTE, True)
        if MODE == 0:
            # a term with a zero coefficient is not formed (sampler_math.h, formed_operand)
            out = _t(k2, x0) + _t(k3, eps) + _t(k4, x)
            if HAS_Z != 0:
                if HAS_Z == 1:
                    z = _load(Z, n, bs_z, offs, mask)
                else:
                    z = _philox_noise(GEN, n, t64, offs, quad, inner, tiles_per_sample, nhwc_c,
                                      hw, NHWC, QUAD, BLOCK)  # fmt: skip
                sigma = k5
                if LV:
                    v = _load(V, n, bs_v, offs, mask)
                    f = (v + 1.0) * 0.5
                    sigma = k5 * tl.exp(0.5 * (f * k6 + (1.0 - f) * k7))
                out = out + _t(sigma, z)
        else:
            if CLIP:  # the eps term follows the clipped x0 (sampler_math.h, with_eps_term)
                eps = (x - a * x0) / s
            out = _t(k2, x) + _t(k3, x0)
            if HAS_Z == 1:
                xp = _load(Z, n, bs_z, offs, mask)
                out = out + _t(k4, xp)
            if HAS_PREV2:
                q = _load(Q, n, bs_q, offs, mask)
                out = out + _t(k6, q)
            if HAS_PREV3:
                q3 = _load(Q3, n, bs_q3, offs, mask)
                out = out + _t(tl.load(COEF + 8), q3)
            if HAS_PREV4:
                q4 = _load(Q4, n, bs_q4, offs, mask)
                out = out + _t(tl.load(COEF + 9), q4)
            if HAS_NOISE == 1:
                w = _load(W, n, bs_w, offs, mask)
                out = out + _t(k5, w)
            elif HAS_NOISE == 2:
                w = _philox_noise(GEN, n, t64, offs, quad, inner, tiles_per_sample, nhwc_c, hw,
                                  NHWC, QUAD, BLOCK)  # fmt: skip
                out = out + _t(k5, w)
            out = out + _t(k7, eps)  # the eps term, last (0 and not formed for c_eps = 0)
        tl.store(OUT + n * inner + offs, out.to(OUT.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(X0 + n * inner + offs, x0.to(X0.dtype.element_ty), mask=mask)


def sampler_step_forward(
    x: Tensor,  # [N x ...] x_t
    m: Tensor,  # model output (the cond half with CFG)
    mu: Tensor | None,  # the uncond half (CFG only), or None
    v: Tensor | None,  # learned-variance channels, or None
    z: Tensor | None,  # caller's noise (mode 0) or x0_prev (mode 1), or None
    gen: Tensor | None,  # [2] int64 Philox (seed, offset), or None
    coef: Tensor,  # [>= 8] fp32 step coefficients
    out: Tensor,  # [N x ...] x_{t-1} (written)
    x0: Tensor | None,  # [N x ...] x0 estimate (written), or None
    *,
    w: Tensor | None = None,  # noise of the SDE dpm step (mode 1), or None
    q: Tensor | None = None,  # x0_prev2 of the DPM++ 3M step (mode 1, with z), or None
    bs_q: int = 0,  # batch stride of q
    q3: Tensor | None = None,  # x0_prev3 (mode 1, with q), or None
    bs_q3: int = 0,  # batch stride of q3
    q4: Tensor | None = None,  # x0_prev4 (mode 1, with q3), or None
    bs_q4: int = 0,  # batch stride of q4
    mode: int,  # 0 sampler step, 1 DPM-Solver++ 2M
    n: int,  # batch
    inner: int,  # elements per sample
    nhwc_c: int,  # C for channels_last inputs, else 0
    hw: int,  # spatial positions per sample
    bs: Sequence[int],  # batch strides of x, m, mu, v, z[, w] (elements)
    pred: int,  # 0 epsilon, 1 v_prediction, 2 sample
    clip: bool,  # clamp x0 to [-clip_r, clip_r]
    clip_r: float,
    recompute: bool,  # eps from the clipped x0
    cfg: bool,  # eps = mu + g (m - mu)
    g: float,  # guidance scale
) -> None:
    """Launch the kernel. Tensors per-sample dense in x's order; ``bs`` = batch strides
    (x, m, mu, v, z[, w]), ``bs_q`` / ``bs_q3`` / ``bs_q4`` q's / q3's / q4's; absent operands
    are None (a dummy pointer is passed, never read). ``gen`` draws the noise of sampler_step
    (mode 0) or, without ``w``, of the dpm step."""
    block = 1024
    tiles = triton.cdiv(inner, block)
    total = n * tiles
    has_z = 2 if (gen is not None and mode == 0) else (1 if z is not None else 0)
    has_noise = 0 if mode == 0 else (1 if w is not None else (2 if gen is not None else 0))
    bs = [*bs, 0][:6]
    _sampler_step_kernel[grid(x, total)](
        x, m, mu if mu is not None else m, v if v is not None else m, z if z is not None else x,
        w if w is not None else x, q if q is not None else x, q3 if q3 is not None else x,
        q4 if q4 is not None else x, gen if gen is not None else coef,
        coef, out, x0 if x0 is not None else out,
        *bs, bs_q, bs_q3, bs_q4, inner, tiles, total, max(nhwc_c, 1), hw, float(clip_r), float(g),
        MODE=mode, PRED=pred, CLIP=bool(clip), RECOMPUTE=bool(recompute), CFG=bool(cfg),
        LV=v is not None and mode == 0, HAS_Z=has_z, HAS_NOISE=has_noise,
        HAS_PREV2=q is not None and mode == 1, HAS_PREV3=q3 is not None and mode == 1,
        HAS_PREV4=q4 is not None and mode == 1,
        WRITE_X0=x0 is not None, NHWC=nhwc_c > 0,
        QUAD=(has_z == 2 or has_noise == 2) and nhwc_c == 0 and inner % 4 == 0, BLOCK=block,
    )  # fmt: skip
