"""Fused UniPC step (Zhao et al. 2023, arXiv:2302.04867): the UniC corrector of the previous
step and the UniP predictor (orders 1 to 3) of this one in one elementwise pass.

Per element, with the coefficient row ``coef`` fp32 ``[>= 12] = [a, s, c_x, c_last, c_m, c_m1,
c_m2, p_xc, p_m, p_m1, c_m3, p_m2]`` (computed in float64 by
:class:`fastdiff.samplers.UniPCSampler`)::

    m      = x0(x, model_output)                  as sampler_step: prediction type, CFG, clip
    x_c    = c_x x + c_last last + c_m m + c_m1 m_prev + c_m2 m_prev2 + c_m3 m_prev3  (UniC)
    x_next = p_xc x_c + p_m m + p_m1 m_prev + p_m2 m_prev2                           (UniP)

``m_prev3`` (and the weights c_m3, p_m2) serve solver_order 3 only. A term whose operand
(``last``, ``m_prev``, ``m_prev2``, ``m_prev3``) is None is skipped, not multiplied by zero, so
a stale buffer holding NaN cannot leak. x_c is kept in fp32 for the predictor (it is
also written, in x's dtype, as the next step's ``last``). The x0 derivation is the one of
:func:`fastdiff.ops.sampler_step.sampler_step` (shared code: ``_torch_x0_eps`` here, the
``predict_x0_eps`` of csrc/include/fastdiff/sampler_math.h in the C++ / CUDA kernels).

Memory contract as :mod:`fastdiff.ops.sampler_step`: each operand is a base address plus a
per-sample stride with every sample's block dense in x's memory order (NCHW or channels_last);
other layouts are made dense by one copy. Outputs come back in x's dtype and memory format.
Dynamic thresholding is not part of the op (the sampler thresholds x0 in a separate torch pass
and passes it with ``prediction_type="sample"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff import _dispatch, _ext
from fastdiff.ops import _make_callable
from fastdiff.ops._grads import _grads
from fastdiff.ops._sampler_step_kernels import (
    _batch_stride,
    _dense,
    _new_out,
    _order_of,
    _split_model_output,
)
from fastdiff.ops._step_checks import (
    PREDICTION_TYPES,
    _check_common,
    _check_like_x,
    _plain_eager,
)
from fastdiff.ops._term import term
from fastdiff.ops.sampler_step import _cacheable, _torch_guided_output, _torch_x0_eps

__all__ = ["COEF_LEN", "unipc_step"]

#: Length of a UniPC coefficient row:
#: [a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2].
COEF_LEN = 12
_AUTO = "auto"
_OP = "unipc_step"


# ----------------------------------------------------------------------------------------------
# torch reference backend (fp32 math)
# ----------------------------------------------------------------------------------------------
def _torch_unipc(x, model_output, coef, last, m_prev, m_prev2, m_prev3, pred, clip_range,
                 guidance_scale, order):  # fmt: skip
    coef = coef.float()
    a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2 = (
        coef[i] for i in range(COEF_LEN)
    )
    xf = x.float()
    mo = _torch_guided_output(x, model_output, guidance_scale)
    m, _ = _torch_x0_eps(xf, mo, a, s, pred, clip_range, False, False)
    xc = term(c_x, xf) + term(c_m, m)  # a term with a zero coefficient is not formed
    if last is not None:
        xc = xc + term(c_last, last.float())
    if m_prev is not None:
        xc = xc + term(c_m1, m_prev.float())
    if m_prev2 is not None:
        xc = xc + term(c_m2, m_prev2.float())
    if m_prev3 is not None:
        xc = xc + term(c_m3, m_prev3.float())
    xn = term(p_xc, xc) + term(p_m, m)
    if m_prev is not None:
        xn = xn + term(p_m1, m_prev.float())
    if m_prev2 is not None:
        xn = xn + term(p_m2, m_prev2.float())
    return (
        _new_out(x, order).copy_(xc),
        _new_out(x, order).copy_(m),
        _new_out(x, order).copy_(xn),
    )


# ----------------------------------------------------------------------------------------------
# kernel backends (cpu / cuda / triton)
# ----------------------------------------------------------------------------------------------
def _run_kernel(backend, x, model_output, coef, last, m_prev, m_prev2, m_prev3, pred, clip_range,
                g):  # fmt: skip
    order = _order_of(x)
    xd = _dense(x, order)
    cond, unc, _ = _split_model_output(x, model_output, g, False)
    cond = _dense(cond, order)
    if unc is not None:
        unc = _dense(unc.to(cond.dtype), order)
    hist = [
        None if t is None else _dense(t.to(x.dtype), order)
        for t in (last, m_prev, m_prev2, m_prev3)
    ]
    outs = tuple(_new_out(x, order) for _ in range(3))
    if x.numel() == 0:
        return outs
    coef = coef if coef.is_contiguous() else coef.contiguous()

    def op(t):
        return (0, 0) if t is None else (t.data_ptr(), _batch_stride(t))

    n, inner = x.shape[0], x[0].numel()
    if backend == "triton":
        from fastdiff.kernels.triton.unipc_step import unipc_step_forward

        with _ext.device_guard(x):
            unipc_step_forward(xd, cond, unc, *hist, coef, *outs, n=n, inner=inner, pred=pred,
                               clip_r=clip_range, g=g)  # fmt: skip
        return outs
    c = _ext.native()
    flat = [
        n, inner, *op(xd), *op(cond), *op(unc), *op(hist[0]), *op(hist[1]), *op(hist[2]),
        coef.data_ptr(), *(t.data_ptr() for t in outs), _ext.dtype_code(xd),
        _ext.dtype_code(cond), pred, clip_range is not None,
        float(clip_range) if clip_range is not None else 0.0, g is not None,
        float(g) if g is not None else 0.0, *op(hist[3]),
    ]  # fmt: skip
    if backend == "cuda":
        with _ext.device_guard(x):
            c.unipc_step_cuda(*flat, _ext.stream_handle(x))
    else:
        c.unipc_step_cpu(*flat)
    return outs


def _unsupported(x: Tensor) -> dict[str, str]:
    """Backends that cannot run now: a fastdiff._C built before this kernel existed, or before
    it took the 12-wide row and m_prev3 (order 3; an older kernel would skip p_m2's term)."""
    c = _ext._C
    out = {}
    for b in ("cpu", "cuda"):
        if c is not None and not hasattr(c, f"unipc_step_{b}"):
            out[b] = f"fastdiff._C has no unipc_step_{b} (stale build: run tools/dev_build.sh)"
        elif c is not None and not getattr(c, "unipc_step_m3", False):
            out[b] = (
                f"fastdiff._C's unipc_step_{b} predates the 12-wide row and m_prev3 "
                "(stale build: run tools/dev_build.sh)"
            )
    return out


# ----------------------------------------------------------------------------------------------
# validated-call cache: a repeat of a validated cpu call skips the checks and the operand views
# ----------------------------------------------------------------------------------------------
_VALIDATED: dict[tuple, tuple] = {}
_CPU = torch.device("cpu")
_fwad = torch.autograd.forward_ad


def _tensor_key(t: Tensor | None) -> tuple | None:
    """What the checks read of an optional operand; raises LookupError when it is not cacheable."""
    if t is None:
        return None
    if type(t) is not Tensor or t.requires_grad or t.is_neg():
        raise LookupError
    return (t.shape, t.stride(), t.dtype, t.is_cpu)


def _cached_cpu(x, mo, coef, last, m_prev, m_prev2, m_prev3,
                opts) -> tuple[tuple | None, tuple | None]:  # fmt: skip
    """``(key, (x_c, m, x_next))`` for a call whose exact combination was validated before and
    resolves to the cpu backend now; ``(key, None)`` when the general path must run, with key
    None when this call cannot be cached (as ``_cached_cpu_step`` of the sampler-step ops: a
    tensor subclass or non-tensor, x not on cpu, an operand that requires grad or is a lazily
    negated view, a dispatch mode, torch.func transform or forward-mode AD level active; the
    caller has checked that nothing is compiling). The key holds everything the checks read:
    exact tensor types, shapes, strides, dtypes, devices, which history operands are present,
    the options ``opts`` (with the types of the real ones) and the native module. Backend
    resolution is redone on every call; the operands' addresses are read on every call."""
    if (type(x) is not Tensor or type(mo) is not Tensor or type(coef) is not Tensor
            or not x.is_cpu or x.requires_grad or mo.requires_grad or coef.requires_grad
            or x.is_neg() or mo.is_neg() or coef.is_neg() or _ext.transforms_active()
            or _fwad._current_level >= 0):  # fmt: skip
        return None, None
    try:
        hist = tuple(_tensor_key(t) for t in (last, m_prev, m_prev2, m_prev3))
        key = (_ext._C, x.shape, x.stride(), x.dtype, mo.shape, mo.stride(), mo.dtype, mo.is_cpu,
               coef.shape, coef.stride(), coef.dtype, coef.is_cpu, hist, opts)  # fmt: skip
        ent = _VALIDATED.get(key)
    except (LookupError, RuntimeError, TypeError):  # no strides, an unhashable option
        return None, None
    if ent is None:
        return key, None
    run, like, order, geo, tail, unsupported = ent
    if _dispatch.resolve_eager(_OP, _CPU, unsupported) != "cpu":
        return None, None
    if like:
        outs = (torch.empty_like(x), torch.empty_like(x), torch.empty_like(x))
    else:
        outs = (_new_out(x, order), _new_out(x, order), _new_out(x, order))
    if geo is None:  # empty tensors
        return key, outs
    n, inner, bs_x, om, bs_m, ou, bs_u, bs_l, bs_1, bs_2, bs_3 = geo
    mp = mo.data_ptr()
    run(n, inner, x.data_ptr(), bs_x, mp + om, bs_m, 0 if ou is None else mp + ou, bs_u,
        0 if last is None else last.data_ptr(), bs_l, 0 if m_prev is None else m_prev.data_ptr(),
        bs_1, 0 if m_prev2 is None else m_prev2.data_ptr(), bs_2, coef.data_ptr(),
        outs[0].data_ptr(), outs[1].data_ptr(), outs[2].data_ptr(), *tail,
        0 if m_prev3 is None else m_prev3.data_ptr(), bs_3)  # fmt: skip
    return key, outs


def _remember(key, x, mo, coef, last, m_prev, m_prev2, m_prev3, pred, clip, g,
              unsupported) -> None:  # fmt: skip
    """Cache the validated call with ``key`` that ran on the cpu backend, when the kernel reads
    its operands in place (no copy or cast: every operand dense per sample in x's order, history
    in x's dtype, coef contiguous). The caller guarantees that the verdict only depends on
    ``key`` (clip_range / guidance_scale of exact type float, int or None)."""
    c = _ext._C
    if c is None or not hasattr(c, "unipc_step_cpu") or not coef.is_contiguous():
        return
    order = _order_of(x)
    cond, unc, _ = _split_model_output(x, mo, g, False)
    hist = (last, m_prev, m_prev2, m_prev3)
    if not all(t is None or _dense(t, order) is t for t in (x, cond, unc, *hist)):
        return
    if any(t is not None and t.dtype != x.dtype for t in hist) or (
        unc is not None and unc.dtype != cond.dtype
    ):
        return
    base = mo.data_ptr()
    geo = None
    if x.numel() > 0:
        geo = (
            x.shape[0], x[0].numel(), _batch_stride(x), cond.data_ptr() - base,
            _batch_stride(cond), None if unc is None else unc.data_ptr() - base,
            0 if unc is None else _batch_stride(unc),
            *(0 if t is None else _batch_stride(t) for t in hist),
        )  # fmt: skip
    tail = (
        _ext.dtype_code(x), _ext.dtype_code(cond), pred, clip is not None,
        float(clip) if clip is not None else 0.0, g is not None, float(g) if g is not None else 0.0,
    )  # fmt: skip
    like = x.stride() == _new_out(x, order).stride()  # empty_like(x) gives the output layout
    if len(_VALIDATED) >= 256:
        _VALIDATED.clear()
    _VALIDATED[key] = (c.unipc_step_cpu, like, order, geo, tail, unsupported)


# ----------------------------------------------------------------------------------------------
# custom op
# ----------------------------------------------------------------------------------------------
def _impl(x, model_output, coef, last, m_prev, m_prev2, m_prev3, backend, pred, clip_range, g):
    if backend == "torch":
        return _torch_unipc(x, model_output, coef, last, m_prev, m_prev2, m_prev3, pred,
                            clip_range, g, _order_of(x))  # fmt: skip
    return _run_kernel(backend, x, model_output, coef, last, m_prev, m_prev2, m_prev3, pred,
                       clip_range, g)  # fmt: skip


@torch.library.custom_op("fastdiff::unipc_step", mutates_args=())
def _unipc_op(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    last: Tensor | None,
    m_prev: Tensor | None,
    m_prev2: Tensor | None,
    m_prev3: Tensor | None,
    backend: str,
    prediction_type: int,
    clip_range: float | None,
    guidance_scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == _AUTO:
        backend = _dispatch.resolve(_OP, x.device, _unsupported(x))
        backend = _dispatch.forward_ad_backend(_OP, backend, x, model_output, coef, last, m_prev,
                                               m_prev2, m_prev3)  # fmt: skip
    return _impl(x, model_output, coef, last, m_prev, m_prev2, m_prev3, backend, prediction_type,
                 clip_range, guidance_scale)  # fmt: skip


@_unipc_op.register_fake
def _(x, model_output, coef, last, m_prev, m_prev2, m_prev3, backend, prediction_type, clip_range,
      guidance_scale):  # fmt: skip
    order = _order_of(x)
    return _new_out(x, order), _new_out(x, order), _new_out(x, order)


def _setup(ctx, inputs, output):
    x, mo, coef, last, m1, m2, m3, _backend, *opts = inputs
    ctx.save_for_backward(x, mo, coef, last, m1, m2, m3)
    ctx.opts = opts


def _backward(ctx, g_xc, g_m, g_xn):
    x, mo, coef, last, m1, m2, m3 = ctx.saved_tensors
    pred, clip, g = ctx.opts

    def run(x_, mo_, coef_, last_, m1_, m2_, m3_):
        return _torch_unipc(x_, mo_, coef_, last_, m1_, m2_, m3_, pred, clip, g, _order_of(x_))

    grads = _grads(ctx, run, (g_xc, g_m, g_xn), (x, mo, coef, last, m1, m2, m3), range(7))
    return (*grads, None, None, None, None)


_unipc_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def unipc_step(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    last: Tensor | None = None,
    m_prev: Tensor | None = None,
    m_prev2: Tensor | None = None,
    *,
    m_prev3: Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One UniPC step: ``(x_c, m, x_next)`` from ``x`` and the model output at ``x``.

    Args:
        x: ``[N x ...]`` the sample the model saw (the previous predictor's output), fp32 /
            fp16 / bf16, any layout.
        model_output: x's shape, or ``[2N x ...] = [uncond, cond]`` with ``guidance_scale``.
        coef: fp32 ``[>= 12]`` on x's device (see the module docstring for the layout).
        last: the previous step's corrected sample x_c (UniC's ``x_{t_{i-1}}``), or None.
        m_prev, m_prev2: the data predictions m_{i-1} and m_{i-2}, or None.
        m_prev3: m_{i-3} (solver_order 3's corrector), or None; needs m_prev2 and m_prev.
        prediction_type: "epsilon" | "v_prediction" | "sample".
        clip_range: clip m to ``[-r, r]`` (NaN propagates).
        guidance_scale: classifier-free guidance on the raw output halves.

    Returns:
        ``(x_c, m, x_next)`` in x's dtype and memory format: the corrected sample (the next
        step's ``last``), the data prediction (the next ``m_prev``) and the predictor's sample
        at the next noise level (the model's next input).
    """
    key = None
    if not torch.compiler.is_compiling():  # a repeat of a validated cpu call: no checks, no views
        opts = (prediction_type, type(clip_range), clip_range, type(guidance_scale), guidance_scale)
        key, r = _cached_cpu(x, model_output, coef, last, m_prev, m_prev2, m_prev3, opts)
        if r is not None:
            return r
    try:
        # before _check_common, whose message names the 8-wide rows of the other sampler ops
        if isinstance(coef, Tensor) and (coef.dim() != 1 or coef.shape[0] < COEF_LEN):
            raise ValueError(
                f"coef must have >= {COEF_LEN} elements in one dimension, "
                f"got shape {tuple(coef.shape)}"
            )
        clip, g = _check_common(x, model_output, coef, prediction_type, clip_range,
                                guidance_scale, False)  # fmt: skip
        if m_prev3 is not None and (m_prev2 is None or m_prev is None):
            missing = " and ".join(n for n, t in (("m_prev", m_prev), ("m_prev2", m_prev2))
                                   if t is None)  # fmt: skip
            raise ValueError(
                f"m_prev3 (m_{{i-3}}) needs m_prev and m_prev2, got m_prev3 without {missing}"
            )
        for name, t in (("last", last), ("m_prev", m_prev), ("m_prev2", m_prev2),
                        ("m_prev3", m_prev3)):  # fmt: skip
            if t is not None:
                _check_like_x(name, t, x)
    except (TypeError, ValueError) as e:  # the op's name first, as the other ops' errors
        raise type(e)(f"unipc_step: {e}") from None
    x, model_output, coef, last, m_prev, m_prev2, m_prev3 = _ext.resolve_neg(
        x, model_output, coef, last, m_prev, m_prev2, m_prev3
    )
    pred = PREDICTION_TYPES[prediction_type]
    plain = _plain_eager(x, model_output, coef, last, m_prev, m_prev2, m_prev3)
    if not plain and torch.compiler.is_compiling():  # the op resolves its backend when it runs
        return _unipc_op(x, model_output, coef, last, m_prev, m_prev2, m_prev3, _AUTO, pred, clip,
                         g)  # fmt: skip
    resolve = _dispatch.resolve_eager if plain else _dispatch.resolve
    unsupported = _unsupported(x)
    backend = resolve(_OP, x.device, unsupported)
    backend = _dispatch.forward_ad_backend(_OP, backend, x, model_output, coef, last, m_prev,
                                           m_prev2, m_prev3)  # fmt: skip
    fn = _impl if plain else _unipc_op
    out = fn(x, model_output, coef, last, m_prev, m_prev2, m_prev3, backend, pred, clip, g)
    if plain and backend == "cpu" and key is not None and _cacheable(clip_range, guidance_scale):
        _remember(key, x, model_output, coef, last, m_prev, m_prev2, m_prev3, pred, clip, g,
                  unsupported)  # fmt: skip
    return out


_make_callable(__name__)
