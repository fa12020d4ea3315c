"""Fused GroupNorm (+ time-embedding add, + scale/shift) + SiLU.

    y = act( GN(x + add) * (1 + scale) + shift )

GN is group normalisation (Wu & He 2018, eq. 1-3): for each sample n and group g of C/G
channels, ``xhat = (u - mean_ng) / sqrt(var_ng + eps)`` with the biased variance over the group's
channels and all spatial positions, then the per-channel affine ``xhat * weight + bias``.
``add`` is a DDPM ResBlock's time embedding added before the norm; ``scale``/``shift`` are ADM's
``use_scale_shift_norm`` (Dhariwal & Nichol 2021, sec. 3). ``act`` is SiLU, ``v * sigmoid(v)``
(Elfwing et al. 2018), or the identity for ``activation=None``.

Every fused kernel folds mean, rstd, weight, bias, scale and shift into one ``a * u + b`` per
element and applies SiLU in fp32; statistics are always fp32.

Memory format: a contiguous input gives a contiguous output; a channels-last input (``C`` stride
1, spatial dims dense, i.e. ``torch.channels_last`` / ``channels_last_3d`` or an ``N x L x C``
buffer viewed as ``N x C x L``) is processed natively and gives a channels-last output. Any other
stride pattern (slices, transposes) is first made contiguous with ``x.contiguous()``.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff import _dispatch, _ext
from fastdiff.ops import _make_callable

__all__ = ["group_norm_silu", "group_norm_silu_reference"]

_OP = "group_norm_silu"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = ("silu", None)


# ----------------------------------------------------------------------------------- layouts
_CL_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(x: Tensor) -> bool:
    """True when ``x`` [N x C x *spatial] is dense with C innermost and not plain contiguous."""
    if x.is_contiguous():
        return False
    fmt = _CL_FORMATS.get(x.dim())
    # same answer as the permuted check below, without building a view; not inside vmap, which
    # does not implement is_contiguous(memory_format=...) for its batched tensors
    if fmt is not None and (
        torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active()
    ):
        return x.is_contiguous(memory_format=fmt)
    perm = (0, *range(2, x.dim()), 1)
    return x.permute(perm).is_contiguous()


def _canon(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels-last dense, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


# --------------------------------------------------------------------------------- reference
def group_norm_silu_reference(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    add: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Eager reference. Computes in ``compute_dtype`` (default: fp32, or fp64 for fp64 input)
    and returns ``x.dtype``. ``add``/``scale``/``shift`` are [N x C]."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, c = x.shape[:2]
    bshape = (n, c) + (1,) * (x.dim() - 2)
    u = x.to(compute_dtype)
    if add is not None:
        u = u + add.to(compute_dtype).reshape(bshape)
    ug = u.reshape(n, num_groups, math.prod(u.shape[1:]) // num_groups)  # not -1: N may be 0
    k = ug[..., :1]  # shift by a member: the mean of a constant group is then exact
    mean = k + (ug - k).mean(-1, keepdim=True)
    d = ug - mean
    var = (d * d).mean(-1, keepdim=True)
    y = (d * torch.rsqrt(var + eps)).reshape(u.shape)
    cshape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute_dtype).reshape(cshape)
    if bias is not None:
        y = y + bias.to(compute_dtype).reshape(cshape)
    if scale is not None:
        y = y * (1 + scale.to(compute_dtype).reshape(bshape))
    if shift is not None:
        y = y + shift.to(compute_dtype).reshape(bshape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


# -------------------------------------------------------------------------------- validation
def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_vec(name: str, t: Tensor | None, x: Tensor, dev: torch.device, c: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"group_norm_silu: {name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"group_norm_silu: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != dev:
        raise ValueError(
            f"group_norm_silu: {name} is on {t.device} but x is on {dev}; "
            "all tensors must be on one device"
        )
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(
            f"group_norm_silu: Expected {name} to be a vector of size equal to the number of "
            f"channels in input, but got {name} of shape {_shape(t)} and input of shape {_shape(x)}"
        )


def _check_nc(
    name: str, t: Tensor | None, x: Tensor, dev: torch.device, n: int, c: int
) -> Tensor | None:
    """Validate an optional [N x C] (or [N x C x 1 ...]) tensor; return it as [N x C]."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"group_norm_silu: {name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"group_norm_silu: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != dev:
        raise ValueError(
            f"group_norm_silu: {name} is on {t.device} but x is on {dev}; "
            "all tensors must be on one device"
        )
    shape = t.shape
    nd = len(shape)
    if nd == 2 and shape[0] == n and shape[1] == c:
        return t  # the common case: already [N x C]
    ok = nd >= 2 and shape[0] == n and shape[1] == c and all(s == 1 for s in shape[2:])
    ok = ok and nd <= x.dim()
    if not ok:
        raise ValueError(
            f"group_norm_silu: expected {name} of shape [N, C] = {[n, c]} (optionally with "
            f"trailing singleton dims), got {name} of shape {_shape(t)} for input of shape "
            f"{_shape(x)}"
        )
    return t.reshape(n, c)


_ALL_DTYPES = frozenset((*_DTYPES, torch.float64))


def _validate(x, num_groups, weight, bias, eps, add, scale, shift, activation):
    if not isinstance(x, Tensor):
        raise TypeError(f"group_norm_silu: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _ALL_DTYPES:
        raise ValueError(
            "group_norm_silu: x must be float32, float16 or bfloat16 (float64: torch backend "
            f"only), got dtype {x.dtype}"
        )
    shape = x.shape
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            "group_norm_silu: expected x of shape [N, C, *spatial] with 1 to 3 spatial dims, "
            f"got shape {_shape(x)}"
        )
    if type(num_groups) is not int and (
        isinstance(num_groups, bool) or not isinstance(num_groups, Integral)
    ):
        raise TypeError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    if num_groups <= 0:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    n, c = shape[0], shape[1]
    if c % num_groups != 0:
        raise ValueError(
            "group_norm_silu: Expected number of channels in input to be divisible by "
            f"num_groups, but got input of shape {_shape(x)} and num_groups={num_groups}"
        )
    if type(eps) is not float and (not isinstance(eps, Real) or isinstance(eps, bool)):
        raise TypeError(f"group_norm_silu: eps must be a non-negative float, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"group_norm_silu: eps must be a non-negative float, got {eps!r}")
    if activation != "silu" and activation is not None:
        raise ValueError(f"group_norm_silu: activation must be 'silu' or None, got {activation!r}")
    dev = x.device
    _check_vec("weight", weight, x, dev, c)
    _check_vec("bias", bias, x, dev, c)
    return (
        _check_nc("add", add, x, dev, n, c),
        _check_nc("scale", scale, x, dev, n, c),
        _check_nc("shift", shift, x, dev, n, c),
    )


@functools.lru_cache(maxsize=1)
def _stale_build() -> tuple[tuple[str, str], ...]:
    """Native backends whose entry point is missing from the loaded fastdiff._C."""
    out = []
    if _ext.has_native():
        for b, sym in (("cpu", "group_norm_silu_cpu"), ("cuda", "group_norm_silu_cuda")):
            if not hasattr(_ext.native(), sym):
                out.append((b, f"fastdiff._C lacks {sym} (stale build: run tools/dev_build.sh)"))
    return tuple(out)


def _interpreting() -> bool:
    return _dispatch._getenv("TRITON_INTERPRET") == "1"


_NO_F64 = "the fused kernels take float32, float16 or bfloat16, got float64"


def _unsupported(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Backends that cannot take these inputs, with the reason (a shared, memoised dict: do not
    mutate). An empty input is no reason: every backend returns it without launching a kernel."""
    interp = dtype == torch.bfloat16 and device.type == "cpu" and _interpreting()
    return _unsupported_memo(device.type, dtype, interp)


@functools.cache
def _unsupported_memo(dev_type: str, dtype: torch.dtype, interp_bf16: bool) -> dict[str, str]:
    out: dict[str, str] = dict(_stale_build())
    if dtype == torch.float64:
        out.update(cpu=_NO_F64, cuda=_NO_F64, triton=_NO_F64)
    elif interp_bf16:
        out.setdefault("triton", "the Triton interpreter has no bfloat16 arithmetic")
    return out


# The backend argument of the op under torch.compile: resolved when the op runs (its body is
# opaque to dynamo), so use_backend / set_backend apply to every call of a compiled function,
# not only to the one that traced it, and a requested backend that cannot run raises then.
_AUTO = "auto"


# ------------------------------------------------------------------------------- custom op
def _f32(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    add: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    silu: bool,
    backend: str,
) -> Tensor:
    if backend == _AUTO:
        backend = _dispatch.resolve(_OP, x.device, _unsupported(x.device, x.dtype))
    return _forward_impl(x, num_groups, weight, bias, eps, add, scale, shift, silu, backend)


def _forward_impl(x, num_groups, weight, bias, eps, add, scale, shift, silu, backend):
    x = _canon(x)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    if backend == "triton":
        # The Triton kernels read weight/bias/add/scale/shift in their own dtype (converted to
        # fp32 in registers, exactly as .to(float32) would) and take the [N x C] operands' row
        # stride: no cast or copy kernels per call.
        bf16 = x.is_cuda  # the interpreter (CPU tensors) has no bf16
        with _ext.device_guard(x):
            _triton_forward()(
                x, out, num_groups, _triton_operand(weight, bf16), _triton_operand(bias, bf16),
                eps, _triton_rows(add, bf16), _triton_rows(scale, bf16), _triton_rows(shift, bf16),
                silu, nhwc=not x.is_contiguous(),
            )  # fmt: skip
        return out
    if backend == "torch":
        out.copy_(
            group_norm_silu_reference(x, num_groups, weight, bias, eps, add, scale, shift, silu)
        )
        return out
    if backend == "cuda":
        _cuda_forward(x, out, num_groups, weight, bias, eps, add, scale, shift, silu)
    elif backend == "cpu":
        _native_forward(x, out, num_groups, _f32(weight), _f32(bias), eps, _f32(add),
                        _f32(scale), _f32(shift), silu, nhwc=not x.is_contiguous())  # fmt: skip
    else:
        raise RuntimeError(f"group_norm_silu: unknown backend {backend!r}")
    return out


_TRITON_READS = (torch.float32, torch.float16)
_TRITON_READS_GPU = (torch.float32, torch.float16, torch.bfloat16)


def _triton_operand(t: Tensor | None, bf16: bool) -> Tensor | None:
    """A [C] operand as the Triton kernels read it: contiguous, in a dtype they load (fp32/fp16,
    bf16 on a GPU), else cast to fp32."""
    if t is None:
        return None
    if t.dtype not in (_TRITON_READS_GPU if bf16 else _TRITON_READS):
        t = t.to(torch.float32)
    return t.contiguous()


def _triton_rows(t: Tensor | None, bf16: bool) -> Tensor | None:
    """An [N x C] operand as the Triton kernels read it: unit channel stride (any row stride),
    in a dtype they load, else cast to fp32."""
    if t is None:
        return None
    if t.dtype not in (_TRITON_READS_GPU if bf16 else _TRITON_READS):
        t = t.to(torch.float32)
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return t


@functools.cache
def _triton_forward():
    """The Triton launcher, imported on first use (triton stays an optional import)."""
    from fastdiff.kernels.triton.group_norm_silu import group_norm_silu_forward

    return group_norm_silu_forward


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, add, scale, shift, silu, backend):
    return torch.empty_like(_canon(x))


def _common_args(x, out, num_groups, weight, bias, eps, add, scale, shift, silu, nhwc):
    """The leading arguments of the csrc entry points (addresses, sizes, flags)."""
    shape = x.shape
    n, c = shape[0], shape[1]
    return (
        x.data_ptr(), out.data_ptr(), n, c, x.numel() // max(n * c, 1), num_groups, nhwc,
        _ext.DTYPE_CODES[x.dtype], 0 if weight is None else weight.data_ptr(),
        0 if bias is None else bias.data_ptr(), 0 if add is None else add.data_ptr(),
        0 if scale is None else scale.data_ptr(), 0 if shift is None else shift.data_ptr(),
        float(eps), bool(silu),
    )  # fmt: skip


def _native_forward(x, out, num_groups, weight, bias, eps, add, scale, shift, silu, *, nhwc):
    """The cpu kernel: fp32 contiguous operands."""
    common = _common_args(x, out, num_groups, weight, bias, eps, add, scale, shift, silu, nhwc)
    _ext.native().group_norm_silu_cpu(*common)


_CUDA_READS = (torch.float32, torch.float16, torch.bfloat16)


def _same_dtype(ts: list[Tensor | None]) -> tuple[list[Tensor | None], int]:
    """Operands that share one dtype slot of the CUDA kernel: kept in their dtype when it is one
    the kernel loads (fp32/fp16/bf16) and they agree, else cast to fp32. Returns the code too."""
    dts = {t.dtype for t in ts if t is not None}
    if not dts:
        return ts, 0
    dt = dts.pop()
    if dts or dt not in _CUDA_READS:
        ts, dt = [None if t is None else t.float() for t in ts], torch.float32
    return ts, _ext.DTYPE_CODES[dt]


def _cuda_forward(x, out, num_groups, weight, bias, eps, add, scale, shift, silu):
    """The csrc CUDA kernel. It loads weight/bias and add/scale/shift in their own dtype and the
    rows of add/scale/shift at their row stride, so an fp16 model's parameters and ``chunk`` /
    ``expand`` views cost no cast or copy kernels; the split plan's fp32 workspace is allocated
    only when the kernel asks for one (its return value)."""
    (weight, bias), wb_dt = _same_dtype([weight, bias])
    (add, scale, shift), cond_dt = _same_dtype([add, scale, shift])
    weight = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()

    def rows(t: Tensor | None) -> tuple[Tensor | None, int]:
        if t is None:
            return None, -1
        if t.stride(1) != 1 and t.shape[1] > 1:
            t = t.contiguous()
        return t, t.stride(0)

    (add, add_rs), (scale, scale_rs), (shift, shift_rs) = rows(add), rows(scale), rows(shift)
    nhwc = not x.is_contiguous()
    common = _common_args(x, out, num_groups, weight, bias, eps, add, scale, shift, silu, nhwc)
    common = (*common, wb_dt, cond_dt, add_rs, scale_rs, shift_rs)
    fn, stream = _ext.native().group_norm_silu_cuda, _ext.stream_handle(x)
    with _ext.device_guard(x):
        need = fn(*common, 0, 0, stream)
        if need:  # the split plan: partial sums in an fp32 workspace
            ws = torch.empty(need, device=x.device, dtype=torch.float32)
            fn(*common, ws.data_ptr(), need, stream)


# ---------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, add, scale, shift, silu, _backend = inputs
    ctx.save_for_backward(x, weight, bias, add, scale, shift)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _backward(ctx, grad_out):
    """Analytic GN backward in fp32 torch ops (traceable; no graph recompute)."""
    x, weight, bias, add, scale, shift = ctx.saved_tensors
    g, eps, silu = ctx.num_groups, ctx.eps, ctx.silu
    if x.numel() == 0:  # no statistics to differentiate: zero gradients of the right shapes
        return tuple(
            None if t is None or i in (1, 4, 8, 9) else torch.zeros_like(t)
            for i, t in enumerate((x, None, weight, bias, None, add, scale, shift, None, None))
        )
    n, c = x.shape[:2]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    bshape = (n, c) + (1,) * (x.dim() - 2)
    sp = tuple(range(2, x.dim()))
    u = x.to(cd)
    if add is not None:
        u = u + add.to(cd).reshape(bshape)
    ug = u.reshape(n, g, -1)
    mean = ug.mean(-1, keepdim=True)
    var = ug.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = ((ug - mean) * rstd).reshape(u.shape)
    wv = weight.to(cd).reshape((1, c) + (1,) * len(sp)) if weight is not None else None
    z = xhat * wv if wv is not None else xhat
    if bias is not None:
        z = z + bias.to(cd).reshape((1, c) + (1,) * len(sp))
    s = 1 + scale.to(cd).reshape(bshape) if scale is not None else None
    v = z * s if s is not None else z
    if shift is not None:
        v = v + shift.to(cd).reshape(bshape)
    dv = grad_out.to(cd)
    if silu:
        sig = torch.sigmoid(v)
        dv = dv * sig * (1 + v * (1 - sig))
    dshift = dv.sum(sp) if shift is not None else None
    dscale = (dv * z).sum(sp) if scale is not None else None
    dz = dv * s if s is not None else dv
    dbias = dz.sum((0, *sp)) if bias is not None else None
    dweight = (dz * xhat).sum((0, *sp)) if weight is not None else None
    dxhat = (dz * wv if wv is not None else dz).reshape(n, g, -1)
    xh = xhat.reshape(n, g, -1)
    du = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xh * (dxhat * xh).mean(-1, keepdim=True))
    du = du.reshape(u.shape)
    dadd = du.sum(sp) if add is not None else None

    def cast(gt, ref):
        return None if gt is None or ref is None else gt.to(ref.dtype).reshape(ref.shape)

    return (
        du.to(x.dtype),
        None,
        cast(dweight, weight),
        cast(dbias, bias),
        None,
        cast(dadd, add),
        cast(dscale, scale),
        cast(dshift, shift),
        None,
        None,
    )


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- public API
def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    add: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Fused ``act(GroupNorm(x + add) * (1 + scale) + shift)``.

    Args:
        x: ``[N x C x *spatial]`` with 1-3 spatial dims; float32, float16 or bfloat16 (float64
            is accepted and runs on the torch reference backend only).
        num_groups: G, dividing C.
        weight, bias: optional per-channel affine ``[C]`` (as ``nn.GroupNorm``).
        eps: added to the variance.
        add: optional ``[N x C]`` added to ``x`` before the statistics (time embedding).
        scale, shift: optional ``[N x C]``; the normalised output is ``* (1 + scale) + shift``.
        activation: ``"silu"`` or ``None`` (plain GroupNorm).

    Returns:
        ``y`` with ``x``'s shape and dtype, in ``x``'s memory format (contiguous or channels-last;
        any other strides are made contiguous first). Statistics are fp32.

    Under autograd with the automatic backend choice (training) it runs PyTorch's native
    ``F.group_norm`` (+ add, scale/shift, SiLU), whose backward is one fused kernel; an explicitly
    requested backend runs the fused forward with the op's analytic backward.

    Raises:
        ValueError / TypeError: on bad arguments, before any kernel runs.
        RuntimeError: when an explicitly requested backend cannot run.
    """
    add, scale, shift = _validate(x, num_groups, weight, bias, eps, add, scale, shift, activation)
    x, weight, bias, add, scale, shift = _ext.resolve_neg(x, weight, bias, add, scale, shift)
    args = (int(num_groups), weight, bias, float(eps), add, scale, shift, activation == "silu")
    if torch.compiler.is_compiling():
        return _group_norm_silu_op(_canon(x), *args, _AUTO)
    dev = x.device
    backend = _dispatch.resolve(_OP, dev, _unsupported(dev, x.dtype))
    backend = _dispatch.forward_ad_backend(_OP, backend, x, weight, bias, add, scale, shift)
    if _needs_op(x, weight, bias, add, scale, shift):
        if _native_training(x, weight, bias, add, scale, shift):
            if _ext.autocast_on(x.device.type):  # CUDA autocast: F.group_norm in fp32
                with torch.autocast(x.device.type, enabled=False):
                    return _native_autograd(x, *args)
            return _native_autograd(x, *args)
        return _group_norm_silu_op(_canon(x), *args, backend)
    # Eager inference: nothing to record for autograd and no tracing, so skip the dispatcher
    # round trip of the custom op (tens of microseconds, the size of a small GPU kernel).
    return _forward_impl(x, *args, backend)


def _native_training(*tensors: Tensor | None) -> bool:
    """Autograd on plain tensors with the backend chosen automatically: training. PyTorch's
    native GroupNorm has a one-kernel backward; the op's analytic backward is ~20 torch ops
    (a digits-model training step on CPU: 333 ms through the op, 228 ms native). An explicitly
    requested backend keeps the fused forward and the analytic backward."""
    if _dispatch.requested_backend(_OP) is not None or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


def _native_autograd(x, num_groups, weight, bias, eps, add, scale, shift, silu):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)`` in PyTorch's native ops, for autograd."""
    bshape = x.shape[:2] + (1,) * (x.dim() - 2)
    u = x if add is None else x + add.reshape(bshape).to(x.dtype)
    w, b = (None if t is None else t.to(x.dtype) for t in (weight, bias))  # F.group_norm: one dtype
    y = F.group_norm(u, num_groups, w, b, eps)
    if scale is not None:
        y = y * (1 + scale.reshape(bshape).to(y.dtype))
    if shift is not None:
        y = y + shift.reshape(bshape).to(y.dtype)
    return F.silu(y) if silu else y


def _needs_op(*tensors: Tensor | None) -> bool:
    """True when the call must go through the custom op: autograd or a tensor subclass/mode."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return True
        if grad and t.requires_grad:
            return True
    return _ext.transforms_active()


_make_callable(__name__)
