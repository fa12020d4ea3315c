"""Triton kernels of fused ``act(GroupNorm(x + add) * (1 + scale) + shift)``.

Logical view: element (n, c, s) of x lives at ``n*C*HW + c*stride_c + s*stride_s`` with
``(stride_c, stride_s) = (HW, 1)`` for NCHW and ``(1, C)`` for channels-last, so every kernel
serves both layouts natively (Triton specialises the stride equal to 1, giving coalesced,
vectorised accesses along HW for NCHW and along C for NHWC).

Two plans, chosen by :func:`_plan` from shape, dtype and layout:

* ``fused`` - one program per (n, g) holding the whole slab in registers: one read of x, an
  exact two-pass mean/variance on chip, then ``y = act(a*x + b)``. For slabs up to 16K elements.
* ``split`` - when the slab is large or N*G too small to fill the GPU (e.g. (2, 320, 64, 64) has
  only 64 groups): (1) ``_gn_stats_kernel`` splits HW across programs and writes per-channel
  shifted partial sums; (2) ``_gn_finalize_kernel`` merges them per (n, g) (Chan et al.) and
  folds mean, rstd, weight, bias, add, scale and shift into per-(n, c) ``a, b``;
  (3) ``_gn_apply_kernel`` streams ``y = act(a*x + b)`` (x re-read mostly from L2).

Statistics are fp32; SiLU is evaluated in fp32 and rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastdiff.kernels.triton import _compat
from fastdiff.kernels.triton._device import sm_count

_compat.patch_interpreter()

_MAX_FUSED = 16384  # elements of one (n, g) slab held in registers by the fused kernel


@triton.jit
def _silu_f32(v):
    return v / (1.0 + tl.exp(-v))


@triton.jit
def _fold_affine(
    mean, rstd,  # fp32 group statistics (scalars)
    add,  # [BLOCK_C] fp32 per-channel add (zeros when absent)
    W, B, SCALE, SHIFT,  # (C,) weight/bias, (N, C) scale/shift rows; unused when absent
    n, c, c_ok,  # sample index, [BLOCK_C] channel indices and their mask
    stride_scale, stride_shift,  # row strides of SCALE / SHIFT
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,  # weight / bias given (else 1 / 0)
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,  # scale / shift given (else 0)
    BLOCK_C: tl.constexpr,  # >= CPG, power of 2: channels of the group
):  # fmt: skip
    """Fold mean, rstd, weight, bias, (1 + scale) and shift into y = a * x + b per channel."""
    ws = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_W:
        ws = ws * tl.load(W + c, mask=c_ok, other=1.0).to(tl.float32)
    bb = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        bb = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
    b = (add - mean) * ws + bb
    a = ws
    if HAS_SCALE:
        s1 = 1.0 + tl.load(SCALE + n * stride_scale + c, mask=c_ok, other=0.0).to(tl.float32)
        a = a * s1
        b = b * s1
    if HAS_SHIFT:
        b = b + tl.load(SHIFT + n * stride_shift + c, mask=c_ok, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _gn_fused_kernel(
    X,  # (N, C, HW) input, strides (C*HW, stride_c, stride_s)
    Y,  # (N, C, HW) output, same strides as X
    W,  # (C,) weight, fp32/fp16/bf16, read as fp32 (unused when not HAS_W)
    B,  # (C,) bias
    ADD,  # (N, C) row stride stride_add, unit channel stride; added to x before the statistics
    SCALE,  # (N, C) row stride stride_scale; output * (1 + scale)
    SHIFT,  # (N, C) row stride stride_shift; output + shift
    C,  # channels
    HW,  # spatial size (product of spatial dims)
    G,  # groups
    CPG,  # channels per group
    stride_c,  # element stride between channels (HW for NCHW, 1 for NHWC)
    stride_s,  # element stride between spatial positions (1 for NCHW, C for NHWC)
    stride_add,  # element stride between rows (samples) of ADD
    stride_scale,  # element stride between rows of SCALE
    stride_shift,  # element stride between rows of SHIFT
    cnt,  # float(CPG * HW): elements per group
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given (else 1)
    HAS_B: tl.constexpr,  # bias given (else 0)
    HAS_ADD: tl.constexpr,  # add given (else 0)
    HAS_SCALE: tl.constexpr,  # scale given (else 0)
    HAS_SHIFT: tl.constexpr,  # shift given (else 0)
    SILU: tl.constexpr,  # apply SiLU (else plain GroupNorm)
    BLOCK_C: tl.constexpr,  # >= CPG, power of 2
    BLOCK_S: tl.constexpr,  # >= HW, power of 2
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    g = pid % G
    c_loc = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_ok = c_loc < CPG
    c = g * CPG + c_loc  # (BLOCK_C,) channel ids
    mask = c_ok[:, None] & (s[None, :] < HW)
    offs = n * C * HW + c[:, None] * stride_c + s[None, :].to(tl.int64) * stride_s
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_C x BLOCK_S]
    add = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_ADD:
        add = tl.load(ADD + n * stride_add + c, mask=c_ok, other=0.0).to(tl.float32)
    # Shift k = u at the slab's first element: mean = k + mean(u - k) is exact for a constant group.
    k = tl.load(X + n * C * HW + g * CPG * stride_c).to(tl.float32)
    if HAS_ADD:
        k = k + tl.load(ADD + n * stride_add + g * CPG).to(tl.float32)
    u = tl.where(mask, x + add[:, None] - k, 0.0)
    mean = k + tl.sum(tl.sum(u, axis=1), axis=0) / cnt
    u = tl.where(mask, x + add[:, None], 0.0)
    d = tl.where(mask, u - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / cnt
    rstd = tl.where(var == 0.0, 0.0, 1.0 / tl.sqrt(var + eps))
    a, b = _fold_affine(mean, rstd, add, W, B, SCALE, SHIFT, n, c, c_ok,
                        stride_scale, stride_shift, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT,
                        BLOCK_C)  # fmt: skip
    v = x * a[:, None] + b[:, None]
    if SILU:
        v = _silu_f32(v)
    tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    X,  # (N, C, HW) input
    S1,  # (N, C, SPLIT) fp32 out: sum(x - k_c) over this program's spatial chunk
    S2,  # (N, C, SPLIT) fp32 out: sum((x - k_c)^2)
    C,  # channels
    HW,  # spatial size
    SPLIT,  # programs along HW
    CHUNK,  # spatial positions per program (multiple of BLOCK_S)
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    pid = tl.program_id(0).to(tl.int64)
    n_cb = tl.cdiv(C, BLOCK_C)
    sp = pid % SPLIT
    cb = (pid // SPLIT) % n_cb
    n = pid // (SPLIT * n_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = X + n * C * HW
    # Shift k_c: the channel's first element, inside the data range, so sums do not cancel.
    k = tl.load(base + c * stride_c, mask=c_ok, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    s0 = sp * CHUNK
    for i in range(0, CHUNK, BLOCK_S):
        s = s0 + i + tl.arange(0, BLOCK_S).to(tl.int64)
        mask = c_ok[:, None] & (s[None, :] < HW)
        x = tl.load(base + c[:, None] * stride_c + s[None, :] * stride_s, mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - k[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    out = (n * C + c) * SPLIT + sp
    tl.store(S1 + out, tl.sum(acc1, axis=1), mask=c_ok)
    tl.store(S2 + out, tl.sum(acc2, axis=1), mask=c_ok)


@triton.jit
def _gn_finalize_kernel(
    X,  # (N, C, HW) input (for the shifts k_c)
    S1,  # (N, C, SPLIT) fp32 partial sums of x - k_c
    S2,  # (N, C, SPLIT) fp32 partial sums of (x - k_c)^2
    A,  # (N, C) fp32 out: y = act(A * x + Bo)
    Bo,  # (N, C) fp32 out
    W,  # (C,) weight, fp32/fp16/bf16, read as fp32
    B,  # (C,) bias
    ADD,  # (N, C) row stride stride_add, unit channel stride
    SCALE,  # (N, C) row stride stride_scale
    SHIFT,  # (N, C) row stride stride_shift
    C,  # channels
    HW,  # spatial size
    G,  # groups
    CPG,  # channels per group
    SPLIT,  # partials per channel
    stride_c,  # element stride between channels of X
    stride_add,  # element stride between rows (samples) of ADD
    stride_scale,  # element stride between rows of SCALE
    stride_shift,  # element stride between rows of SHIFT
    m,  # float(HW): elements per channel
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given (else 1)
    HAS_B: tl.constexpr,  # bias given (else 0)
    HAS_ADD: tl.constexpr,  # add given (else 0)
    HAS_SCALE: tl.constexpr,  # scale given (else 0)
    HAS_SHIFT: tl.constexpr,  # shift given (else 0)
    BLOCK_C: tl.constexpr,  # >= CPG
    BLOCK_P: tl.constexpr,  # >= SPLIT
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    g = pid % G
    c_loc = tl.arange(0, BLOCK_C)
    c_ok = c_loc < CPG
    c = g * CPG + c_loc
    p = tl.arange(0, BLOCK_P)
    m2d = c_ok[:, None] & (p[None, :] < SPLIT)
    offs = (n * C + c)[:, None] * SPLIT + p[None, :]
    s1 = tl.sum(tl.load(S1 + offs, mask=m2d, other=0.0), axis=1)  # [BLOCK_C]
    s2 = tl.sum(tl.load(S2 + offs, mask=m2d, other=0.0), axis=1)
    k = tl.load(X + n * C * HW + c * stride_c, mask=c_ok, other=0.0).to(tl.float32)
    dm = s1 / m
    add = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_ADD:
        add = tl.load(ADD + n * stride_add + c, mask=c_ok, other=0.0).to(tl.float32)
    mean_c = k + dm + add  # channel means of u = x + add
    v = s2 - s1 * dm
    # max(v, 0) keeping NaN (an inf in the group): tl.maximum drops NaN on a GPU (fmaxf)
    m2_c = tl.where(v < 0.0, 0.0, v)
    # group mean relative to the first channel's: exact when all channel means agree
    kg = tl.sum(tl.where(c_loc == 0, mean_c, 0.0), axis=0)
    mean = kg + tl.sum(tl.where(c_ok, mean_c - kg, 0.0), axis=0) / CPG
    dc = tl.where(c_ok, mean_c - mean, 0.0)
    m2 = tl.sum(tl.where(c_ok, m2_c, 0.0), axis=0) + m * tl.sum(dc * dc, axis=0)
    var = m2 / (m * CPG)
    rstd = tl.where(var == 0.0, 0.0, 1.0 / tl.sqrt(var + eps))
    a, b = _fold_affine(mean, rstd, add, W, B, SCALE, SHIFT, n, c, c_ok,
                        stride_scale, stride_shift, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT,
                        BLOCK_C)  # fmt: skip
    tl.store(A + n * C + c, a, mask=c_ok)
    tl.store(Bo + n * C + c, b, mask=c_ok)


@triton.jit
def _gn_apply_kernel(
    X,  # (N, C, HW) input
    Y,  # (N, C, HW) output, same strides
    A,  # (N, C) fp32 per-channel slope
    Bo,  # (N, C) fp32 per-channel offset
    C,  # channels
    HW,  # spatial size
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    SILU: tl.constexpr,  # apply SiLU (else plain GroupNorm)
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    pid = tl.program_id(0).to(tl.int64)
    n_sb = tl.cdiv(HW, BLOCK_S)
    n_cb = tl.cdiv(C, BLOCK_C)
    sb = pid % n_sb
    cb = (pid // n_sb) % n_cb
    n = pid // (n_sb * n_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    c_ok = c < C
    mask = c_ok[:, None] & (s[None, :] < HW)
    a = tl.load(A + n * C + c, mask=c_ok, other=0.0)
    b = tl.load(Bo + n * C + c, mask=c_ok, other=0.0)
    offs = n * C * HW + c[:, None] * stride_c + s[None, :] * stride_s
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    v = x * a[:, None] + b[:, None]
    if SILU:
        v = _silu_f32(v)
    tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=mask)


def _p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


@functools.lru_cache(maxsize=512)
def _plan(n: int, c: int, hw: int, g: int, itemsize: int, nhwc: bool, sms: int) -> dict:
    """Kernel plan (block sizes, split, warps, grids) keyed on shape, dtype size, layout, SM
    count; memoised, so a launch does no Python-side planning after the first call."""
    cpg = c // g
    slab = _p2(cpg) * _p2(hw)
    vec = 16 // itemsize  # elements per 16-byte access
    # NHWC slabs are C/G-wide strips of C-long rows: fuse only when a strip covers a 32-byte
    # sector, else the row-wise split plan reads whole rows.
    narrow = nhwc and cpg * itemsize < 32 and hw > 64
    if slab <= _MAX_FUSED and (n * g >= sms or slab <= 4096) and not narrow:
        return {
            "kind": "fused",
            "BLOCK_C": _p2(cpg),
            "BLOCK_S": _p2(hw),
            "num_warps": 4 if slab <= 2048 else (8 if slab <= 8192 else 16),
            "grid": (n * g,),
        }
    if nhwc:
        block_c = min(_p2(c), 16 * vec)  # contiguous along C
        block_s = max(1, min(_p2(hw), 2048 // block_c))
    else:
        block_s = min(_p2(hw), 64 * vec)  # contiguous along HW
        block_c = max(1, min(_p2(c), 2048 // block_s))
    n_cb = triton.cdiv(c, block_c)
    tiles = triton.cdiv(hw, block_s)
    target = 4 * sms
    split = max(1, min(tiles, 64, triton.cdiv(target, n * n_cb)))
    chunk = triton.cdiv(tiles, split) * block_s
    split = triton.cdiv(hw, chunk)
    return {
        "kind": "split",
        "BLOCK_C": block_c,
        "BLOCK_S": block_s,
        "SPLIT": split,
        "CHUNK": chunk,
        "num_warps": 4 if block_c * block_s <= 1024 else 8,
        "BLOCK_P": _p2(split),
        "grid_stats": (n * n_cb * split,),
        "grid_finalize": (n * g,),
        "grid_apply": (n * n_cb * triton.cdiv(hw, block_s),),
    }


def _sm_count_of(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 4


def group_norm_silu_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    add: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    nhwc: bool | None = None,
) -> None:
    """Launch the plan for ``x`` [N x C x *spatial] (contiguous or channels-last) into ``out``
    (same strides). ``weight``/``bias`` [C] contiguous and ``add``/``scale``/``shift`` [N x C]
    with unit channel stride (any row stride, e.g. ``chunk`` views of an [N x 2C] projection):
    fp32, fp16 or bf16 (read as fp32 in the kernels), or None. ``nhwc``: whether ``x`` is
    channels-last (computed from ``x`` when None).

    Per-call host work is kept to the plan lookup and the launches: absent optional tensors are
    passed as ``x`` (never read: their ``HAS_*`` flag is off), so nothing is allocated for them.
    """
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    g = num_groups
    if nhwc is None:
        from fastdiff.ops.group_norm_silu import is_channels_last

        nhwc = is_channels_last(x)
    stride_c, stride_s = (1, c) if nhwc else (hw, 1)
    plan = _plan(n, c, hw, g, x.element_size(), nhwc, _sm_count_of(x.device))
    has_w, has_b = weight is not None, bias is not None
    has_add, has_sc, has_sh = add is not None, scale is not None, shift is not None
    w_ = weight if has_w else x
    b_ = bias if has_b else x
    add_ = add if has_add else x
    sc_ = scale if has_sc else x
    sh_ = shift if has_sh else x
    rows = (
        add.stride(0) if has_add else 0,
        scale.stride(0) if has_sc else 0,
        shift.stride(0) if has_sh else 0,
    )
    if plan["kind"] == "fused":
        cpg = c // g
        _gn_fused_kernel[plan["grid"]](
            x, out, w_, b_, add_, sc_, sh_, c, hw, g, cpg, stride_c, stride_s, *rows,
            float(cpg * hw), float(eps),
            HAS_W=has_w, HAS_B=has_b, HAS_ADD=has_add, HAS_SCALE=has_sc, HAS_SHIFT=has_sh,
            SILU=silu, BLOCK_C=plan["BLOCK_C"], BLOCK_S=plan["BLOCK_S"],
            num_warps=plan["num_warps"],
        )  # fmt: skip
        return
    split, chunk = plan["SPLIT"], plan["CHUNK"]
    bc, bs = plan["BLOCK_C"], plan["BLOCK_S"]
    s1 = torch.empty((n, c, split), device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    a = torch.empty((n, c), device=x.device, dtype=torch.float32)
    b = torch.empty_like(a)
    _gn_stats_kernel[plan["grid_stats"]](
        x, s1, s2, c, hw, split, chunk, stride_c, stride_s,
        BLOCK_C=bc, BLOCK_S=bs, num_warps=plan["num_warps"],
    )  # fmt: skip
    cpg = c // g
    _gn_finalize_kernel[plan["grid_finalize"]](
        x, s1, s2, a, b, w_, b_, add_, sc_, sh_, c, hw, g, cpg, split, stride_c, *rows,
        float(hw), float(eps),
        HAS_W=has_w, HAS_B=has_b, HAS_ADD=has_add, HAS_SCALE=has_sc, HAS_SHIFT=has_sh,
        BLOCK_C=_p2(cpg), BLOCK_P=plan["BLOCK_P"], num_warps=4,
    )  # fmt: skip
    _gn_apply_kernel[plan["grid_apply"]](
        x, out, a, b, c, hw, stride_c, stride_s,
        SILU=silu, BLOCK_C=bc, BLOCK_S=bs, num_warps=plan["num_warps"],
    )  # fmt: skip
