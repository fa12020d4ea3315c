"""Launching the sampler-step kernels (cpu / cuda / triton) of :mod:`fastdiff.ops.sampler_step`.

The kernels take each operand as a base address plus a per-sample (batch) stride, each sample's
block dense in ``x``'s memory order (NCHW or channels_last; see the memory contract in
:mod:`fastdiff.ops.sampler_step`). Here: the layout helpers, the views of the model output (CFG
halves, learned-variance channels), the general launch, the eager fast path of the cpu
backend that caches the per-layout work, and the cache of validated cpu calls that lets a
repeated call skip validation and launch geometry altogether.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastdiff import _dispatch, _ext


# ----------------------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------------------
def _expected_inner_strides(shape: tuple[int, ...], order: str) -> tuple[int, ...]:
    # strides of dims 1.. for a per-sample block dense in ``order``
    rest = shape[1:]
    if order == "nhwc":
        c, h, w = rest
        return (1, w * c, c)
    strides, acc = [], 1
    for s in reversed(rest):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _inner_dense(t: Tensor, order: str) -> bool:
    if order == "nhwc" and t.dim() != 4:
        return False
    exp = _expected_inner_strides(tuple(t.shape), order)
    dims = zip(t.shape[1:], t.stride()[1:], exp, strict=True)
    return all(sz <= 1 or st == e for sz, st, e in dims)


def _order_of(x: Tensor) -> str:
    """Memory order of ``x``'s per-sample block: "nchw" (row-major) or "nhwc" (channels_last).

    Channels_last is kept only when it is the unambiguous dense order (C > 1, H*W > 1).
    Anything not dense in either order is treated as NCHW (and made contiguous by the kernels).
    """
    big = x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1
    if big and _inner_dense(x, "nhwc") and not _inner_dense(x, "nchw"):
        return "nhwc"
    return "nchw"


def _memory_format(order: str) -> torch.memory_format:
    return torch.channels_last if order == "nhwc" else torch.contiguous_format


def _dense(t: Tensor, order: str) -> Tensor:
    """``t`` itself when each sample's block is dense in ``order``; otherwise a dense copy."""
    if _inner_dense(t, order):
        return t
    return t.contiguous(memory_format=_memory_format(order))


def _batch_stride(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else math.prod(t.shape[1:])


def _new_out(x: Tensor, order: str) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(order))


def _split_model_output(
    x: Tensor, mo: Tensor, guidance_scale: float | None, learned_variance: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(main [cond] half, uncond half or None, variance values or None), all views of ``mo``."""
    n, c = x.shape[0], (x.shape[1] if x.dim() > 1 else 0)
    cond = mo[n:] if guidance_scale is not None else mo
    unc = mo[:n] if guidance_scale is not None else None
    var = None
    if learned_variance:
        var = cond[:, c:]
        cond = cond[:, :c]
        if unc is not None:
            unc = unc[:, :c]
    return cond, unc, var


# ----------------------------------------------------------------------------------------------
# kernel backends (cpu / cuda / triton): operands as (tensor, batch stride), dense per sample
# ----------------------------------------------------------------------------------------------
def _kernel_operands(x, model_output, third, guidance_scale, learned_variance, fourth=None,
                     fifth=None, deep=(None, None)):  # fmt: skip
    """Dense-per-sample views for the kernels, in x's memory order.

    Returns (order, x, cond, unc, var, third, fourth, fifth) where ``third`` is noise
    (sampler_step) or x0_prev (dpm_solver_2m_step), ``fourth`` the noise and ``fifth`` the
    x0_prev2 of dpm_solver_2m_step, each cast to the dtype its kernel slot expects (``deep``:
    its x0_prev3, x0_prev4, made dense and cast in place of the tuple's entries).
    """
    order = _order_of(x)
    xd = _dense(x, order)
    cond, unc, var = _split_model_output(x, model_output, guidance_scale, learned_variance)
    cond = _dense(cond, order)
    unc = _dense(unc, order) if unc is not None else None
    var = _dense(var, order) if var is not None else None
    if unc is not None and unc.dtype != cond.dtype:
        unc = unc.to(cond.dtype)
    if var is not None and var.dtype != cond.dtype:
        var = var.to(cond.dtype)
    if third is not None:
        third = _dense(third.to(x.dtype), order)
    if fourth is not None:
        fourth = _dense(fourth.to(x.dtype), order)
    if fifth is not None:
        fifth = _dense(fifth.to(x.dtype), order)
    if isinstance(deep, list):
        deep[:] = [None if t is None else _dense(t.to(x.dtype), order) for t in deep]
    return order, xd, cond, unc, var, third, fourth, fifth


def _run_kernel(backend, mode, x, model_output, coef, third, generator_state, pred, clip_range,
                recompute_eps, guidance_scale, learned_variance, return_x0,
                fourth=None, prev2=None, prev3=None, prev4=None):  # fmt: skip
    """Launch one step on ``backend``; ``fourth`` is the noise tensor and ``prev2`` / ``prev3`` /
    ``prev4`` the x0_prev2 / x0_prev3 / x0_prev4 of a dpm step (mode 1), ``generator_state``
    draws the noise in the kernel in either mode."""
    deep = [prev3, prev4]
    order, xd, cond, unc, var, third, fourth, prev2 = _kernel_operands(
        x, model_output, third, guidance_scale, learned_variance, fourth, prev2, deep
    )
    prev3, prev4 = deep
    x_prev = _new_out(x, order)
    x0 = _new_out(x, order) if return_x0 else x.new_empty(0)
    if x.numel() == 0:
        return x_prev, x0
    n = x.shape[0]
    inner = x[0].numel()
    nhwc_c = x.shape[1] if order == "nhwc" else 0
    hw = x.shape[2] * x.shape[3] if order == "nhwc" else inner
    coef = coef if coef.is_contiguous() else coef.contiguous()

    def op(t):
        return (0, 0) if t is None else (t.data_ptr(), _batch_stride(t))

    args = dict(
        mode=mode,
        n=n,
        inner=inner,
        nhwc_c=nhwc_c,
        hw=hw,
        x=op(xd),
        m=op(cond),
        mu=op(unc),
        v=op(var),
        z=op(third),
        w=op(fourth),
        gen=generator_state.data_ptr() if generator_state is not None else 0,
        coef=coef.data_ptr(),
        out=x_prev.data_ptr(),
        x0=x0.data_ptr() if return_x0 else 0,
        dtype_x=_ext.dtype_code(xd),
        dtype_m=_ext.dtype_code(cond),
        pred=pred,
        clip=clip_range is not None,
        clip_r=float(clip_range) if clip_range is not None else 0.0,
        recompute=bool(recompute_eps),
        cfg=guidance_scale is not None,
        g=float(guidance_scale) if guidance_scale is not None else 0.0,
    )
    if backend == "triton":
        from fastdiff.kernels.triton.sampler_step import sampler_step_forward

        bs = [args[k][1] for k in ("x", "m", "mu", "v", "z", "w")]
        with _ext.device_guard(x):
            sampler_step_forward(
                xd, cond, unc, var, third, generator_state, coef, x_prev,
                x0 if return_x0 else None, w=fourth, q=prev2, bs_q=op(prev2)[1], q3=prev3,
                bs_q3=op(prev3)[1], q4=prev4, bs_q4=op(prev4)[1], mode=mode, n=n,
                inner=inner, nhwc_c=nhwc_c, hw=hw, bs=bs, pred=pred, clip=clip_range is not None,
                clip_r=args["clip_r"], recompute=bool(recompute_eps),
                cfg=guidance_scale is not None, g=args["g"],
            )  # fmt: skip
    else:
        c = _ext.native()
        fn = c.sampler_step_cpu if backend == "cpu" else c.sampler_step_cuda
        flat = [
            args["mode"], n, inner, nhwc_c, hw, *args["x"], *args["m"], *args["mu"], *args["v"],
            *args["z"], *args["w"], args["gen"], args["coef"], args["out"], args["x0"],
            args["dtype_x"], args["dtype_m"], pred, args["clip"], args["clip_r"],
            args["recompute"], args["cfg"], args["g"],
        ]  # fmt: skip
        # x0_prev2 (x0_prev3, x0_prev4) trail, passed only when given: a 2M call runs on a build
        # without them
        tail = [] if prev2 is None else [*op(prev2)]
        if prev3 is not None:
            tail += [*op(prev3), *op(prev4)]
        if backend == "cuda":
            with _ext.device_guard(x):
                fn(*flat, _ext.stream_handle(x), *tail)
        else:
            fn(*flat, *tail)
    return x_prev, x0


# ----------------------------------------------------------------------------------------------
# eager fast path of the cpu backend: the per-layout work of _run_kernel, cached
# ----------------------------------------------------------------------------------------------
_PLANS: dict[tuple, tuple | None] = {}


def _cpu_plan(x: Tensor, mo: Tensor, third: Tensor | None, cfg: bool, lv: bool,
              fourth: Tensor | None = None,
              fifth: Tensor | None = None) -> tuple | None:  # fmt: skip
    """Launch geometry for this layout, or None when an operand needs a copy or a cast (then
    the general path runs). Model-output operands are byte offsets from ``mo``'s address."""
    order = _order_of(x)
    cond, unc, var = _split_model_output(x, mo, 1.0 if cfg else None, lv)
    ops = (x, cond, unc, var, third, fourth, fifth)
    if any(t is not None and not _inner_dense(t, order) for t in ops):
        return None
    if any(t is not None and t.dtype != x.dtype for t in (third, fourth, fifth)):
        return None
    base = mo.data_ptr()

    def geo(t: Tensor | None) -> tuple[int, int]:
        return (0, 0) if t is None else (t.data_ptr() - base, _batch_stride(t))

    like = x.stride() == _new_out(x, order).stride()  # empty_like(x) gives the output layout
    nhwc = order == "nhwc"
    inner = math.prod(x.shape[1:])
    return (
        order, like, x.shape[0], inner, x.shape[1] if nhwc else 0,
        x.shape[2] * x.shape[3] if nhwc else inner, _batch_stride(x), *geo(cond), *geo(unc),
        *geo(var), _batch_stride(third) if third is not None else 0, _ext.dtype_code(x),
        _ext.dtype_code(cond), _batch_stride(fourth) if fourth is not None else 0,
        _batch_stride(fifth) if fifth is not None else 0,
    )  # fmt: skip


def _fast_cpu(mode, x, mo, coef, third, gen, pred, clip_range, recompute, g, lv, return_x0,
              fourth=None, fifth=None):  # fmt: skip
    """``(x_prev, x0 or None)`` computed by the cpu kernel with cached launch geometry, or None
    when this call needs the general path (copies, casts, a non-contiguous coef). ``fourth``:
    the noise tensor, ``fifth`` the x0_prev2 of a dpm step (mode 1)."""
    key = (mode, x.shape, x.stride(), x.dtype, mo.shape, mo.stride(), mo.dtype, g is not None,
           lv, None if third is None else (third.stride(), third.dtype),
           None if fourth is None else (fourth.stride(), fourth.dtype),
           None if fifth is None else (fifth.stride(), fifth.dtype))  # fmt: skip
    plan = _PLANS.get(key, False)
    if plan is False:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = _cpu_plan(x, mo, third, g is not None, lv, fourth, fifth)
    if plan is None or not coef.is_contiguous():
        return None
    (order, like, n, inner, nhwc_c, hw, bs_x, om, bs_m, ou, bs_u, ov, bs_v, bs_z, dt_x, dt_m,
     bs_w, bs_q) = plan  # fmt: skip
    out = torch.empty_like(x) if like else _new_out(x, order)
    x0 = None
    if return_x0:
        x0 = torch.empty_like(x) if like else _new_out(x, order)
    if n * inner == 0:
        return out, x0
    mp = mo.data_ptr()
    _ext._C.sampler_step_cpu(
        mode, n, inner, nhwc_c, hw, x.data_ptr(), bs_x, mp + om, bs_m, mp + ou if g is not None
        else 0, bs_u, mp + ov if lv else 0, bs_v, third.data_ptr() if third is not None else 0,
        bs_z, fourth.data_ptr() if fourth is not None else 0, bs_w,
        gen.data_ptr() if gen is not None else 0, coef.data_ptr(), out.data_ptr(),
        x0.data_ptr() if x0 is not None else 0, dt_x, dt_m, pred, clip_range is not None,
        clip_range if clip_range is not None else 0.0, recompute, g is not None,
        g if g is not None else 0.0, *(() if fifth is None else (fifth.data_ptr(), bs_q)),
    )  # fmt: skip
    return out, x0


# ----------------------------------------------------------------------------------------------
# validated-call cache: a repeat of a validated cpu call skips the checks and the plan lookup
# ----------------------------------------------------------------------------------------------
_VALIDATED: dict[tuple, tuple] = {}
_CPU = torch.device("cpu")
_transforms_active = _ext.transforms_active
_fwad = torch.autograd.forward_ad


def _cached_cpu_step(op: str, x, mo, coef, third, gen, opts, fourth=None,
                     fifth=None) -> tuple[tuple | None, tuple | None]:  # fmt: skip
    """``(key, (x_prev, x0 or None))`` for a call whose exact combination was validated before
    and resolves to the cpu backend now; ``(key, None)`` when the general path must run, with
    key None when this call cannot be cached: a tensor subclass or non-tensor, x not on cpu, an
    operand that requires grad or is a lazily negated view (``is_neg``: its memory holds
    -values; the general path materialises it), a dispatch mode, torch.func transform or
    forward-mode AD level active (the caller has checked that nothing is compiling). The key
    holds everything the checks read: exact tensor types, shapes, strides, dtypes, devices, the
    options ``opts`` (with the types of the real ones) and the native module. Backend
    resolution is redone on every call. ``fourth``: the noise tensor, ``fifth`` the x0_prev2
    of a dpm step (present or absent, it is part of the key)."""
    if (type(x) is not Tensor or type(mo) is not Tensor or type(coef) is not Tensor
            or not x.is_cpu or x.requires_grad or mo.requires_grad or coef.requires_grad
            or x.is_neg() or mo.is_neg() or coef.is_neg() or _transforms_active()
            or _fwad._current_level >= 0):  # fmt: skip
        return None, None
    try:
        if third is None:
            tk = None
        elif type(third) is Tensor and not third.requires_grad and not third.is_neg():
            tk = (third.shape, third.stride(), third.dtype, third.is_cpu)
        else:
            return None, None
        if gen is None:
            gk = None
        elif type(gen) is Tensor and not gen.is_neg():
            gk = (gen.shape, gen.stride(), gen.dtype, gen.is_cpu)
        else:
            return None, None
        if fourth is None:
            wk = None
        elif type(fourth) is Tensor and not fourth.requires_grad and not fourth.is_neg():
            wk = (fourth.shape, fourth.stride(), fourth.dtype, fourth.is_cpu)
        else:
            return None, None
        if fifth is None:
            qk = None
        elif type(fifth) is Tensor and not fifth.requires_grad and not fifth.is_neg():
            qk = (fifth.shape, fifth.stride(), fifth.dtype, fifth.is_cpu)
        else:
            return None, None
        key = (_ext._C, x.shape, x.stride(), x.dtype, mo.shape, mo.stride(), mo.dtype, mo.is_cpu,
               coef.shape, coef.stride(), coef.dtype, coef.is_cpu, tk, gk, wk, qk,
               opts)  # fmt: skip
        ent = _VALIDATED.get(key)
    except (RuntimeError, TypeError):  # no strides, an unhashable option: the general path
        return None, None
    if ent is None:
        return key, None
    plan, like, order, empty, return_x0, clip_r, g, unsupported, run = ent
    if _dispatch.resolve_eager(op, _CPU, unsupported) != "cpu":
        return None, None
    out = torch.empty_like(x) if like else _new_out(x, order)
    x0 = None
    if return_x0:
        x0 = torch.empty_like(x) if like else _new_out(x, order)
    if empty:
        pass
    elif fourth is None and fifth is None:
        run(plan, x.data_ptr(), mo.data_ptr(), 0 if third is None else third.data_ptr(),
            0 if gen is None else gen.data_ptr(), coef.data_ptr(), out.data_ptr(),
            0 if x0 is None else x0.data_ptr(), clip_r, g)  # fmt: skip
    elif fifth is None:
        run(plan, x.data_ptr(), mo.data_ptr(), 0 if third is None else third.data_ptr(),
            0 if gen is None else gen.data_ptr(), coef.data_ptr(), out.data_ptr(),
            0 if x0 is None else x0.data_ptr(), clip_r, g, fourth.data_ptr())  # fmt: skip
    else:
        run(plan, x.data_ptr(), mo.data_ptr(), 0 if third is None else third.data_ptr(),
            0 if gen is None else gen.data_ptr(), coef.data_ptr(), out.data_ptr(),
            0 if x0 is None else x0.data_ptr(), clip_r, g,
            0 if fourth is None else fourth.data_ptr(), fifth.data_ptr())  # fmt: skip
    return key, (out, x0)


def _remember_validated(key, mode, x, mo, third, pred, clip_range, recompute, g, lv, return_x0,
                        unsupported, fourth=None, fifth=None) -> None:  # fmt: skip
    """Cache the call with ``key`` that passed every check and ran through :func:`_fast_cpu`
    (so its layout needs no copy or cast). The caller guarantees that the cached verdict only
    depends on ``key``: clip_range / guidance_scale of exact type float, int or None, a
    contiguous generator state used as given."""
    c = _ext._C
    if c is None or not hasattr(c, "sampler_step_cpu_run"):  # stale build: _fast_cpu only
        return
    geo = _cpu_plan(x, mo, third, g is not None, lv, fourth, fifth)
    if geo is None:
        return
    (order, like, n, inner, nhwc_c, hw, bs_x, om, bs_m, ou, bs_u, ov, bs_v, bs_z, dt_x, dt_m,
     bs_w, bs_q) = geo  # fmt: skip
    plan = c.sampler_step_cpu_plan(
        mode, n, inner, nhwc_c, hw, bs_x, om, bs_m, ou if g is not None else 0, bs_u,
        ov if lv else 0, bs_v, bs_z, dt_x, dt_m, pred, clip_range is not None, recompute,
        g is not None, lv, bs_w, *(() if fifth is None else (bs_q,)),
    )  # fmt: skip
    if len(_VALIDATED) >= 256:
        _VALIDATED.clear()
    _VALIDATED[key] = (
        plan, like, order, n * inner == 0, return_x0,
        0.0 if clip_range is None else clip_range, 0.0 if g is None else g, unsupported,
        c.sampler_step_cpu_run,
    )  # fmt: skip
