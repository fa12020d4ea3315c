"""Fused scaled-dot-product attention (non-causal), the hot op of a diffusion UNet.

    O = softmax(scale * Q K^T) V                  (Vaswani et al. 2017, eq. 1)

computed flash-style (Dao et al. 2022, FlashAttention, Alg. 1): key/value tiles stream past a
query tile while running row statistics m (max) and l (sum of exponentials) are kept in fp32, so
memory is O(L) and the L x L matrix is never materialised.

Backends (picked by :func:`fastdiff._dispatch.resolve`):
  * ``triton`` - flash forward in Triton (fastdiff/kernels/triton/attention.py)
  * ``cuda``   - tensor-core (mma.sync m16n8k16) flash forward in csrc/cuda/attention.cu
  * ``sdpa`` / ``cpu`` - ``torch.nn.functional.scaled_dot_product_attention`` (``cpu`` = on CPU
    tensors, where SDPA is already a fused flash kernel)
  * ``torch`` - the math reference (query-chunked so it stays O(chunk x Lk) in memory)

Head dims outside :data:`SUPPORTED_HEAD_DIMS` (e.g. the SD VAE's 512) are reported unsupported for
``triton``/``cuda``, so the automatic choice goes to ``sdpa``; requesting triton/cuda explicitly
for them raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from fastdiff import _dispatch, _ext
from fastdiff.ops import _make_callable

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "attention_reference", "unsupported_backends"]

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (32, 40, 64, 80, 96, 128, 160)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query-tile count limit of the fused kernels' grid axis 1 (65535 tiles of >= 16 rows).
_MAX_LQ_FUSED = 65535 * 16
# Element budget of one chunk of logits in the torch reference ([B x H x chunk x Lk]).
_REF_CHUNK_ELEMS = 1 << 26
# The backend argument of the op under torch.compile: resolved when the op runs (its body is
# opaque to dynamo), so use_backend / set_backend apply to every call of a compiled function,
# not only to the one that traced it, and a requested backend that cannot run raises then.
_AUTO = "auto"


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"attention: {name} must be float16, bfloat16 or float32, got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D [B x H x L x D], got {t.dim()}-D shape "
                f"{tuple(t.shape)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"attention: q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    qdev = q.device
    if k.device != qdev or v.device != qdev:
        raise ValueError(
            f"attention: q, k, v must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}"
        )
    B, H, Lq, D = q.shape
    ks = k.shape
    if ks != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape [B x H x Lk x D], got k "
            f"{tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if ks[0] != B or ks[1] != H or ks[3] != D:
        raise ValueError(
            f"attention: k/v must be [B={B} x H={H} x Lk x D={D}] to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if B < 1 or H < 1 or Lq < 1 or ks[2] < 1 or D < 1:
        raise ValueError(
            f"attention: every dimension must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if (
        scale is not None
        and type(scale) is not float
        and (isinstance(scale, bool) or not isinstance(scale, Real))
    ):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"attention: scale must be finite, got {scale}")


def unsupported_backends(q: torch.Tensor, k: torch.Tensor) -> dict[str, str]:
    """Backends that cannot take these particular inputs, with the reason (for ``resolve``)."""
    return dict(_unsupported(q))


def _unsupported(q: torch.Tensor) -> dict[str, str]:
    """:func:`unsupported_backends`, memoised (a shared dict: do not mutate)."""
    shape = q.shape
    cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    lq = shape[-2]
    key = (shape[-1], lq if lq > _MAX_LQ_FUSED else 0, cpu_bf16)
    hit = _UNSUPPORTED.get(key)
    if hit is None:
        hit = _UNSUPPORTED[key] = _unsupported_table(*key)
    return hit


# (D, Lq if over the limit else 0, cpu bf16) -> table. A plain dict, not lru_cache: dynamo traces
# it without warnings under torch.compile.
_UNSUPPORTED: dict[tuple[int, int, bool], dict[str, str]] = {}


def _unsupported_table(D: int, long_lq: int, cpu_bf16: bool) -> dict[str, str]:
    """``long_lq``: Lq when it exceeds the fused kernels' limit, else 0."""
    out: dict[str, str] = {}
    if D not in SUPPORTED_HEAD_DIMS:
        why = (
            f"head dim {D} is not one of the fused kernels' {list(SUPPORTED_HEAD_DIMS)} "
            f"(attention goes to sdpa)"
        )
        out["triton"] = why
        out["cuda"] = why
    if long_lq:
        why = f"Lq={long_lq} exceeds the fused kernels' limit {_MAX_LQ_FUSED}"
        out.setdefault("triton", why)
        out.setdefault("cuda", why)
    if cpu_bf16:
        out.setdefault("triton", "the Triton CPU interpreter has no bfloat16 arithmetic")
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Math reference: softmax(scale * Q K^T) V in fp32 (float64 stays float64), chunked over Lq.

    Returns the result in ``q``'s dtype. Memory is O(chunk x Lk) per (batch, head).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Lq, _ = q.shape
    Lk = k.shape[-2]
    chunk = max(1, min(Lq, _REF_CHUNK_ELEMS // max(1, B * H * Lk)))
    k32, v32 = k.to(acc), v.to(acc)
    outs = []
    for s in range(0, Lq, chunk):
        qc = q[:, :, s : s + chunk].to(acc)
        p = torch.softmax(torch.matmul(qc, k32.transpose(-1, -2)) * scale, dim=-1)
        outs.append(torch.matmul(p, v32))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(q.dtype).contiguous()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.contiguous()


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """Inputs for the CUDA kernel: unit stride on D and 16-byte aligned rows, else a copy."""
    es = t.element_size()
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all((t.stride(i) * es) % 16 == 0 for i in range(3) if t.shape[i] > 1)
    )
    return t if ok else t.contiguous()


def _cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    with _ext.device_guard(q):
        _ext.native().attention_forward_cuda(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            B, H, Lq, Lk, D,
            list(q.stride()), list(k.stride()), list(v.stride()),
            float(scale), _ext.dtype_code(q), _ext.stream_handle(q),
        )  # fmt: skip
    return out


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str):
    if backend == _AUTO:
        backend = _dispatch.resolve("attention", q.device, unsupported=_unsupported(q))
    if _ext.autocast_on(q.device.type):
        # The op's contract (q's dtype, fp32 statistics) holds under autocast too: SDPA would
        # return bf16 for fp32 inputs and the reference's matmuls would run in bf16.
        with torch.autocast(q.device.type, enabled=False):
            return _run_backend(q, k, v, scale, backend)
    return _run_backend(q, k, v, scale, backend)


def _run_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str):
    if backend == "torch":
        return attention_reference(q, k, v, scale)
    if backend in ("sdpa", "cpu"):
        return _sdpa(q, k, v, scale)
    if backend == "triton":
        from fastdiff.kernels.triton.attention import attention_forward

        with _ext.device_guard(q):
            return attention_forward(q, k, v, scale)
    if backend == "cuda":
        return _cuda(q, k, v, scale)
    raise RuntimeError(f"attention: unknown backend {backend!r}")


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    return _run(q, k, v, scale, backend)


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, _backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    """Backward through the math reference (materialises P; for training small models).

    P = softmax(s Q K^T), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = s dS K, dK = s dS^T Q   (FlashAttention-2, Dao 2023, eq. in sec. 2.2)
    """
    q, k, v = ctx.saved_tensors
    s = ctx.scale
    acc = torch.float32
    q32, k32, v32, do = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    p = torch.softmax(torch.matmul(q32, k32.transpose(-1, -2)) * s, dim=-1)
    o = torch.matmul(p, v32)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v32.transpose(-1, -2))
    ds = p * (dp - (do * o).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k32) * s
    dk = torch.matmul(ds.transpose(-1, -2), q32) * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Non-causal attention ``softmax(scale * q k^T) v``, flash-style (O(L) memory).

    Args:
        q: queries ``[B x H x Lq x D]``; fp16, bf16 or fp32. Strided views (e.g. slices of a fused
            QKV projection) are accepted.
        k: keys ``[B x H x Lk x D]``; Lk may differ from Lq (cross-attention).
        v: values ``[B x H x Lk x D]``.
        scale: logit scale, default ``1/sqrt(D)``.

    Returns:
        ``[B x H x Lq x D]`` contiguous, in q's dtype. Softmax statistics and accumulators are fp32.

    The backend comes from :func:`fastdiff._dispatch.resolve`; head dims outside
    :data:`SUPPORTED_HEAD_DIMS` go to SDPA in the automatic choice. Under autograd with the
    automatic choice (training) it runs SDPA, whose backward is O(L) memory; an explicitly
    requested backend uses the op's math backward (materialises P).
    """
    _validate(q, k, v, scale)
    q, k, v = _ext.resolve_neg(q, k, v)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, s, _AUTO)
    backend = _dispatch.resolve("attention", q.device, unsupported=_unsupported(q))
    backend = _dispatch.forward_ad_backend("attention", backend, q, k, v)
    if _plain_call(q, k, v):
        # Inference on plain tensors: skip the custom-op dispatcher (~10+ us per call, which is
        # most of the time of a short-sequence attention). Autograd, torch.compile and tensor
        # subclasses (fake/functional tensors) go through the registered op.
        return _run(q, k, v, s, backend)
    if _native_training(q, k, v):
        # Training with the automatic choice: SDPA's own O(L)-memory backward (the op's backward
        # materialises P). An explicitly requested backend keeps the custom op. Under autocast
        # too the result is in q's dtype (as the inference path gives), so autocast is off here.
        if _ext.autocast_on(q.device.type):
            with torch.autocast(q.device.type, enabled=False):
                return _sdpa(q, k, v, s)
        return _sdpa(q, k, v, s)
    return _attention_op(q, k, v, s, backend)


def _native_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if _dispatch.requested_backend("attention") is not None:
        return False
    return type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor


def _plain_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or _ext.transforms_active():
        return False
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return False
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
    return not (needs_grad and torch.is_grad_enabled())


def resolved_backend(q: torch.Tensor, k: torch.Tensor) -> str:
    """The backend :func:`attention` would run for these inputs now."""
    return _dispatch.resolve("attention", q.device, unsupported=unsupported_backends(q, k))


_make_callable(__name__)
