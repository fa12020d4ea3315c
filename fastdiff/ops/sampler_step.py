"""Fused per-step sampler update ``x_t -> x_{t-1}`` and the DPM-Solver++ 2M multistep update.

One elementwise pass replaces the ~13 eager passes of a diffusers ``scheduler.step``: read
``x_t`` and the model output once, write ``x_prev`` once, with optional classifier-free
guidance, x0 clipping, learned variance and counter-based (Philox) noise generated in the kernel.

Memory contract of the kernels: every operand is a base address plus a per-sample (batch) stride,
with each sample's block dense in ``x``'s memory order (NCHW-contiguous or channels_last). The
CFG halves ``[uncond, cond]`` of a ``[2N x ...]`` batch and the learned-variance channel split of
a ``[N x 2C x ...]`` output are therefore free views. An operand whose per-sample block is not
dense in ``x``'s order (e.g. the channel split of a channels_last output, or a sliced ``x``) is
first made dense by one copy. ``x_prev`` (and ``x0``) come back in ``x``'s memory format.

Here: the torch reference (the math, fp32), the custom ops and their autograd, validation and
the public functions. The kernel launches (operand views, the cpu fast path) are in
:mod:`fastdiff.ops._sampler_step_kernels`, the Philox reference RNG in :mod:`fastdiff.ops._philox`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff import _dispatch, _ext
from fastdiff.ops._grads import _grads
from fastdiff.ops._philox import philox_randn
from fastdiff.ops._sampler_step_kernels import (
    _cached_cpu_step,
    _fast_cpu,
    _new_out,
    _order_of,
    _remember_validated,
    _run_kernel,
    _split_model_output,
)
from fastdiff.ops._step_checks import (
    PREDICTION_TYPES,
    _check_common,
    _check_deep_history,
    _check_like_x,
    _check_noise,
    _plain_eager,
)
from fastdiff.ops._term import term

__all__ = ["PREDICTION_TYPES", "dpm_solver_2m_step", "sampler_step"]

# The backend argument of the ops under torch.compile: resolved when the op runs (its body is
# opaque to dynamo), so use_backend / set_backend apply to every call of a compiled function,
# not only to the one that traced it, and a requested backend that cannot run raises then.
_AUTO = "auto"


# ----------------------------------------------------------------------------------------------
# torch reference backend (fp32 math)
# ----------------------------------------------------------------------------------------------
def _torch_x0_eps(
    x: Tensor,
    m: Tensor,
    a: Tensor,
    s: Tensor,
    pred: int,
    clip_range: float | None,
    recompute_eps: bool,
    need_eps: bool,
) -> tuple[Tensor, Tensor | None]:
    eps = None
    if pred == 0:
        eps = m
        x0 = (x - s * eps) / a
    elif pred == 1:
        x0 = a * x - s * m
        eps = a * m + s * x
    else:
        x0 = m
        if need_eps:
            eps = (x - a * x0) / s
    if clip_range is not None:
        x0 = torch.clamp(x0, -clip_range, clip_range)  # propagates NaN
        if recompute_eps and need_eps:
            eps = (x - a * x0) / s
    return x0, eps


def _torch_sampler_step(
    x, model_output, coef, noise, generator_state, pred, clip_range, recompute_eps,
    guidance_scale, learned_variance, return_x0, order,
):  # fmt: skip
    coef = coef.float()
    a, s, c_x0, c_eps, c_x, c_noise, lv_max, lv_min = (coef[i] for i in range(8))
    xf = x.float()
    cond, unc, var = _split_model_output(x, model_output, guidance_scale, learned_variance)
    m = cond.float()
    if unc is not None:
        u = unc.float()
        m = u + guidance_scale * (m - u)
    x0, eps = _torch_x0_eps(xf, m, a, s, pred, clip_range, recompute_eps, True)
    out = term(c_x0, x0) + term(c_eps, eps) + term(c_x, xf)
    if noise is not None or generator_state is not None:
        z = noise.float() if noise is not None else philox_randn(generator_state, tuple(x.shape))
        sigma = c_noise
        if var is not None:
            f = (var.float() + 1.0) * 0.5
            sigma = c_noise * torch.exp(0.5 * (f * lv_max + (1.0 - f) * lv_min))
        out = out + term(sigma, z)
    x_prev = _new_out(x, order).copy_(out)
    x0_out = _new_out(x, order).copy_(x0) if return_x0 else x.new_empty(0)
    return x_prev, x0_out


def _torch_guided_output(x: Tensor, model_output: Tensor, guidance_scale: float | None) -> Tensor:
    """The model output in fp32, CFG-combined ``u + w (c - u)`` from ``[uncond, cond]`` halves
    when ``guidance_scale`` is given (the multistep ops' torch references)."""
    cond, unc, _ = _split_model_output(x, model_output, guidance_scale, False)
    m = cond.float()
    if unc is not None:
        u = unc.float()
        m = u + guidance_scale * (m - u)
    return m


def _torch_dpm_2m(x, model_output, coef, x0_prev, noise, generator_state, pred, clip_range,
                  guidance_scale, order, x0_prev2=None, x0_prev3=None,
                  x0_prev4=None):  # fmt: skip
    coef = coef.float()
    a, s, c_x, c_x0, c_prev, c_noise, c_prev2, c_eps = (coef[i] for i in range(8))
    xf = x.float()
    m = _torch_guided_output(x, model_output, guidance_scale)
    # eps of the (clipped) x0: the c_eps term's operand (not formed where c_eps is 0)
    x0, eps = _torch_x0_eps(xf, m, a, s, pred, clip_range, True, True)
    out = term(c_x, xf) + term(c_x0, x0)
    if x0_prev is not None:
        out = out + term(c_prev, x0_prev.float())
    if x0_prev2 is not None:  # DPM-Solver++ 3M (the caller guarantees x0_prev is given too)
        out = out + term(c_prev2, x0_prev2.float())
    if x0_prev3 is not None:  # SA-Solver 3-4, singlestep SDE 3 (x0_prev2 given too)
        out = out + term(coef[8], x0_prev3.float())
    if x0_prev4 is not None:  # SA-Solver predictor 4 (x0_prev3 given too)
        out = out + term(coef[9], x0_prev4.float())
    if noise is not None or generator_state is not None:  # the SDE variant
        z = noise.float() if noise is not None else philox_randn(generator_state, tuple(x.shape))
        out = out + term(c_noise, z)
    out = out + term(c_eps, eps)  # last, as the kernels (sampler_math.h with_eps_term)
    return _new_out(x, order).copy_(out), _new_out(x, order).copy_(x0)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _sampler_step_impl(
    x, model_output, coef, noise, generator_state, backend, prediction_type, clip_range,
    recompute_eps, guidance_scale, learned_variance, return_x0,
):  # fmt: skip
    if backend == "torch":
        return _torch_sampler_step(
            x, model_output, coef, noise, generator_state, prediction_type, clip_range,
            recompute_eps, guidance_scale, learned_variance, return_x0, _order_of(x),
        )  # fmt: skip
    return _run_kernel(
        backend, 0, x, model_output, coef, noise, generator_state, prediction_type, clip_range,
        recompute_eps, guidance_scale, learned_variance, return_x0,
    )  # fmt: skip


@torch.library.custom_op("fastdiff::sampler_step", mutates_args=())
def _sampler_step_op(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    noise: Tensor | None,
    generator_state: Tensor | None,
    backend: str,
    prediction_type: int,
    clip_range: float | None,
    recompute_eps: bool,
    guidance_scale: float | None,
    learned_variance: bool,
    return_x0: bool,
) -> tuple[Tensor, Tensor]:
    if backend == _AUTO:
        backend = _dispatch.resolve("sampler_step", x.device, _unsupported(x))
        backend = _dispatch.forward_ad_backend("sampler_step", backend, x, model_output, coef,
                                               noise)  # fmt: skip
    return _sampler_step_impl(
        x, model_output, coef, noise, generator_state, backend, prediction_type, clip_range,
        recompute_eps, guidance_scale, learned_variance, return_x0,
    )  # fmt: skip


@_sampler_step_op.register_fake
def _(x, model_output, coef, noise, generator_state, backend, prediction_type, clip_range,
      recompute_eps, guidance_scale, learned_variance, return_x0):  # fmt: skip
    order = _order_of(x)
    return _new_out(x, order), (_new_out(x, order) if return_x0 else x.new_empty(0))


def _dpm_2m_impl(x, model_output, coef, x0_prev, noise, generator_state, backend,
                 prediction_type, clip_range, guidance_scale, x0_prev2=None, x0_prev3=None,
                 x0_prev4=None):  # fmt: skip
    if backend == "torch":
        return _torch_dpm_2m(
            x, model_output, coef, x0_prev, noise, generator_state, prediction_type, clip_range,
            guidance_scale, _order_of(x), x0_prev2, x0_prev3, x0_prev4,
        )  # fmt: skip
    return _run_kernel(
        backend, 1, x, model_output, coef, x0_prev, generator_state, prediction_type, clip_range,
        False, guidance_scale, False, True, fourth=noise, prev2=x0_prev2, prev3=x0_prev3,
        prev4=x0_prev4,
    )  # fmt: skip


@torch.library.custom_op("fastdiff::dpm_solver_2m_step", mutates_args=())
def _dpm_2m_op(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    x0_prev: Tensor | None,
    noise: Tensor | None,
    generator_state: Tensor | None,
    backend: str,
    prediction_type: int,
    clip_range: float | None,
    guidance_scale: float | None,
    x0_prev2: Tensor | None = None,
    x0_prev3: Tensor | None = None,
    x0_prev4: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    if backend == _AUTO:
        backend = _dispatch.resolve(
            "dpm_solver_2m_step", x.device, _unsupported(x, x0_prev2, dpm=True, x0_prev3=x0_prev3)
        )
        backend = _dispatch.forward_ad_backend("dpm_solver_2m_step", backend, x, model_output,
                                               coef, x0_prev, noise, x0_prev2, x0_prev3,
                                               x0_prev4)  # fmt: skip
    return _dpm_2m_impl(x, model_output, coef, x0_prev, noise, generator_state, backend,
                        prediction_type, clip_range, guidance_scale, x0_prev2, x0_prev3,
                        x0_prev4)  # fmt: skip


@_dpm_2m_op.register_fake
def _(x, model_output, coef, x0_prev, noise, generator_state, backend, prediction_type,
      clip_range, guidance_scale, x0_prev2=None, x0_prev3=None, x0_prev4=None):  # fmt: skip
    order = _order_of(x)
    return _new_out(x, order), _new_out(x, order)


# ----------------------------------------------------------------------------------------------
# autograd: through the torch reference (the update is elementwise; backward is never the hot path)
# ----------------------------------------------------------------------------------------------
def _step_setup(ctx, inputs, output):
    x, mo, coef, noise, gen, _backend, *opts = inputs
    # the samplers advance the Philox offset in place after the step: keep this step's state
    ctx.save_for_backward(x, mo, coef, noise, gen.clone() if gen is not None else None)
    ctx.opts = opts


def _step_backward(ctx, g_prev, g_x0):
    x, mo, coef, noise, gen = ctx.saved_tensors
    pred, clip, recompute, g, lv, return_x0 = ctx.opts

    def run(x_, mo_, coef_, noise_):
        return _torch_sampler_step(x_, mo_, coef_, noise_, gen, pred, clip, recompute, g, lv,
                                   return_x0, _order_of(x_))  # fmt: skip

    gx, gmo, gcoef, gnoise = _grads(ctx, run, (g_prev, g_x0), (x, mo, coef, noise), (0, 1, 2, 3))
    return gx, gmo, gcoef, gnoise, None, None, None, None, None, None, None, None


_sampler_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def _dpm_setup(ctx, inputs, output):
    x, mo, coef, x0_prev, noise, gen, _backend, pred, clip, g, *rest = inputs
    prev2, prev3, prev4 = (*rest, None, None, None)[:3]
    # the sampler advances the Philox offset in place after the step: keep this step's state
    gen = gen.clone() if gen is not None else None
    ctx.save_for_backward(x, mo, coef, x0_prev, noise, gen, prev2, prev3, prev4)
    ctx.opts = (pred, clip, g)


def _dpm_backward(ctx, g_next, g_x0):
    x, mo, coef, x0_prev, noise, gen, prev2, prev3, prev4 = ctx.saved_tensors
    pred, clip, g = ctx.opts

    def run(x_, mo_, coef_, prev_, noise_, prev2_, prev3_, prev4_):
        return _torch_dpm_2m(x_, mo_, coef_, prev_, noise_, gen, pred, clip, g, _order_of(x_),
                             prev2_, prev3_, prev4_)  # fmt: skip

    saved = (x, mo, coef, x0_prev, noise, prev2, prev3, prev4)
    # trailing x0_prev2 / x0_prev3 / x0_prev4 = None are dropped from the op's inputs: 10 to 13
    n_in = len(ctx.needs_input_grad)
    # slot 0 (never read: the operand is None) for an absent trailing operand
    slots = (0, 1, 2, 3, 4, *(k if n_in > k else 0 for k in (10, 11, 12)))
    gx, gmo, gcoef, gprev, gnoise, *gq = _grads(ctx, run, (g_next, g_x0), saved, slots)
    return (gx, gmo, gcoef, gprev, gnoise, None, None, None, None, None, *gq)[:n_in]


_dpm_2m_op.register_autograd(_dpm_backward, setup_context=_dpm_setup)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
_STALE = "stale build: run tools/dev_build.sh"
# [the _C module it was computed for, sampler_step, dpm_solver_2m_step, dpm with x0_prev2, dpm
# with x0_prev3 (and x0_prev4)]
_UNSUPPORTED: list = [object(), {}, {}, {}, {}]
# kernel backends without an x0_prev2 path yet
_PREV2_UNSUPPORTED: dict[str, str] = {}


def _unsupported(x: Tensor, x0_prev2: Tensor | None = None, dpm: bool = False,
                 x0_prev3: Tensor | None = None) -> dict[str, str]:  # fmt: skip
    """Backends that cannot run now: a fastdiff._C built before these kernels existed (for
    ``dpm_solver_2m_step`` (``dpm``), before its eps term, coef[7], which a stale kernel would
    ignore; for a call with ``x0_prev2``, before the second history operand; with
    ``x0_prev3``, before the third and fourth, which a stale binding would refuse or ignore)."""
    c = _ext._C
    if _UNSUPPORTED[0] is not c:
        out, out2, out3, out4 = {}, {}, {}, {}
        for b in ("cpu", "cuda"):
            if c is not None and not hasattr(c, f"sampler_step_{b}"):
                out[b] = f"fastdiff._C has no sampler_step_{b} ({_STALE})"
                continue
            if c is not None and not getattr(c, "sampler_step_eps", False):
                out2[b] = f"fastdiff._C's sampler_step_{b} has no eps term, coef[7] ({_STALE})"
            if c is not None and not getattr(c, "sampler_step_prev2", False):
                out3[b] = f"fastdiff._C's sampler_step_{b} has no x0_prev2 operand ({_STALE})"
            if c is not None and not getattr(c, "sampler_step_prev4", False):
                out4[b] = (
                    f"fastdiff._C's sampler_step_{b} has no x0_prev3 / x0_prev4 operands ({_STALE})"
                )
        for b, why in _PREV2_UNSUPPORTED.items():
            out3.setdefault(b, why)
        dpm2 = {**out, **out2}
        dpm3 = {**dpm2, **out3}
        _UNSUPPORTED[:] = [c, out, dpm2, dpm3, {**dpm3, **out4}]
    if not dpm:
        return _UNSUPPORTED[1]
    if x0_prev3 is not None:
        return _UNSUPPORTED[4]
    return _UNSUPPORTED[2] if x0_prev2 is None else _UNSUPPORTED[3]


_CACHEABLE_REAL = (float, int, type(None))  # exact types: a bool or float subclass is not cached


def _cacheable(clip_range: object, guidance_scale: object) -> bool:
    """Whether a validated call may be cached: its verdict must follow from the cache key,
    which holds these options' types and values (a tensor's value can change in place, a
    subclass may convert differently)."""
    return type(clip_range) in _CACHEABLE_REAL and type(guidance_scale) in _CACHEABLE_REAL


def sampler_step(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    *,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    recompute_eps: bool = False,
    guidance_scale: float | None = None,
    learned_variance: bool = False,
    noise: Tensor | None = None,
    generator_state: Tensor | None = None,
    return_x0: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One fused sampler update ``x_t -> x_{t-1}`` (DDPM, DDIM any eta, Euler, DPM-Solver-1).

    Args:
        x: ``[N x ...]`` current sample x_t (fp32/fp16/bf16, any layout).
        model_output: same shape as ``x``; ``[2N x ...] = [uncond, cond]`` with
            ``guidance_scale``; ``[N x 2C x ...]`` with ``learned_variance`` (first C channels
            eps/v/x0, last C the variance values v in [-1, 1]).
        coef: fp32 ``[8]`` on x's device (read by the kernel, so CUDA graphs can update it):
            ``[a=sqrt(ab_t), s=sqrt(1-ab_t), c_x0, c_eps, c_x, c_noise, log_var_max,
            log_var_min]``, computed in float64 by the sampler.
        prediction_type: "epsilon" | "v_prediction" | "sample".
        clip_range: clip x0 to ``[-r, r]`` (NaN propagates).
        recompute_eps: re-derive eps from the clipped x0 (diffusers use_clipped_model_output).
        guidance_scale: classifier-free guidance ``eps = out_u + s (out_c - out_u)`` on the raw
            model output halves, read straight from the ``[2N]`` batch (no extra pass). With
            ``learned_variance`` the variance values are taken from the cond half.
        learned_variance: improved-DDPM learned range (Nichol & Dhariwal 2021, eq. 15):
            ``sigma = c_noise * exp(0.5 (f log_var_max + (1 - f) log_var_min))``, f = (v + 1)/2.
        noise: z, same shape as ``x``.
        generator_state: int64 ``[2] = (seed, offset)`` on x's device: z is drawn in the kernel
            with Philox4x32-10; element e (row-major index in x's logical NCHW order, so layout
            independent) is lane ``e % 4`` of Triton's ``tl.randn4x(seed, offset + e // 4)``
            (Box-Muller on both output pairs: all 4 Philox outputs are used). One step uses
            the ``ceil(x.numel() / 4)`` counters ``offset ..``; the caller must advance the
            offset by at least that much before the next draw (the samplers advance it by
            ``x.numel()``, which keeps streams disjoint). The cpu, cuda, triton and torch
            backends produce the same uint32 stream for the same (seed, offset); normals agree
            to the float rounding of log/cos/sin (<= 1e-5 abs).
        return_x0: also return the (clipped) x0 prediction.

    Math per element, fp32 (DDIM: Song et al. 2021 eq. 12; DDPM posterior: Ho et al. 2020 eq. 7)::

        epsilon: x0 = (x - s eps)/a;  v: x0 = a x - s v, eps = a v + s x;
        sample:  x0 = m, eps = (x - a x0)/s
        x_prev = c_x0 x0 + c_eps eps + c_x x + sigma z   (z term only with noise/generator_state)

    Dynamic thresholding (Imagen) is NOT part of this op: it needs a per-sample quantile, which
    the sampler computes with a separate torch reduction (then passes ``prediction_type="sample"``).
    No host synchronisation anywhere; the CUDA kernel runs on torch's current stream.
    Autograd: gradients w.r.t. ``x``, ``model_output``, ``coef`` and ``noise`` (the backward
    recomputes the step through the torch reference; the Philox noise is that of the forward).

    Returns:
        ``x_prev`` in x's dtype and memory format, or ``(x_prev, x0)`` with ``return_x0``.
    """
    key = None
    # a repeat of a validated cpu call: no checks, no plan (the flags must be real bools: the key
    # holds them by value, and a mutable truthy object could change under an equal key)
    flags_ok = type(recompute_eps) is bool and type(learned_variance) is bool
    if flags_ok and type(return_x0) is bool and not torch.compiler.is_compiling():
        opts = (prediction_type, type(clip_range), clip_range, recompute_eps,
                type(guidance_scale), guidance_scale, learned_variance, return_x0)  # fmt: skip
        key, r = _cached_cpu_step("sampler_step", x, model_output, coef, noise, generator_state,
                                  opts)  # fmt: skip
        if r is not None:
            return r if return_x0 else r[0]
    gen_in = generator_state
    try:
        clip, g = _check_common(x, model_output, coef, prediction_type, clip_range,
                                guidance_scale, learned_variance)  # fmt: skip
        generator_state = _check_noise(x, noise, generator_state)
    except (TypeError, ValueError) as e:  # the op's name first, as the other ops' errors
        raise type(e)(f"sampler_step: {e}") from None
    x, model_output, coef, noise, generator_state = _ext.resolve_neg(
        x, model_output, coef, noise, generator_state
    )
    plain = _plain_eager(x, model_output, coef, noise, generator_state)
    if not plain and torch.compiler.is_compiling():  # the op resolves its backend when it runs
        x_prev, x0 = _sampler_step_op(
            x, model_output, coef, noise, generator_state, _AUTO, PREDICTION_TYPES[prediction_type],
            clip, bool(recompute_eps), g, bool(learned_variance), bool(return_x0),
        )  # fmt: skip
        return (x_prev, x0) if return_x0 else x_prev
    resolve = _dispatch.resolve_eager if plain else _dispatch.resolve  # plain: not compiling
    backend = resolve("sampler_step", x.device, _unsupported(x))
    backend = _dispatch.forward_ad_backend("sampler_step", backend, x, model_output, coef, noise)
    pred = PREDICTION_TYPES[prediction_type]
    if plain and backend == "cpu":
        r = _fast_cpu(0, x, model_output, coef, noise, generator_state, pred, clip,
                      bool(recompute_eps), g, bool(learned_variance), bool(return_x0))  # fmt: skip
        if r is not None:
            if (
                key is not None
                and generator_state is gen_in
                and _cacheable(clip_range, guidance_scale)
            ):
                _remember_validated(
                    key, 0, x, model_output, noise, pred, clip, bool(recompute_eps), g,
                    bool(learned_variance), bool(return_x0), _unsupported(x),
                )  # fmt: skip
            return r if return_x0 else r[0]
    fn = _sampler_step_impl if plain else _sampler_step_op
    x_prev, x0 = fn(
        x, model_output, coef, noise, generator_state, backend, pred, clip, bool(recompute_eps),
        g, bool(learned_variance), bool(return_x0),
    )  # fmt: skip
    return (x_prev, x0) if return_x0 else x_prev


def dpm_solver_2m_step(
    x: Tensor,
    model_output: Tensor,
    coef: Tensor,
    x0_prev: Tensor | None = None,
    *,
    x0_prev2: Tensor | None = None,
    x0_prev3: Tensor | None = None,
    x0_prev4: Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    guidance_scale: float | None = None,
    noise: Tensor | None = None,
    generator_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DPM-Solver++ 2M update (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction),
    and its SDE variant (SDE-DPM-Solver++(2M), same paper, appendix) with ``noise`` or
    ``generator_state``; with ``x0_prev2`` the third-order (3M) multistep update; with
    ``coef[7] != 0`` an eps term.

    ``x0`` is derived from ``model_output`` as in :func:`sampler_step` (with optional CFG and
    clipping), then ``x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_noise z`` with coef fp32
    ``[8] = [a, s, c_x, c_x0, c_prev, c_noise, 0, 0]``. The sampler folds the multistep terms
    into the coefficients: with ``h = lambda_t - lambda_s`` and ``r = h_prev / h``, midpoint
    form, ``c_x = sigma_t/sigma_s``, ``c_x0 = -alpha_t (e^{-h} - 1)(1 + 1/(2r))``,
    ``c_prev = alpha_t (e^{-h} - 1)/(2r)`` (ODE), or ``c_x = (sigma_t/sigma_s) e^{-h}``,
    ``c_x0 = alpha_t (1 - e^{-2h})(1 + 1/(2r))``, ``c_prev = -alpha_t (1 - e^{-2h})/(2r)``,
    ``c_noise = sigma_t sqrt(1 - e^{-2h})`` (SDE). ``x0_prev=None`` is the first-order step: the
    term is skipped (not multiplied by 0, so garbage or NaN in a stale buffer cannot leak).

    ``noise`` (z, x's shape) or ``generator_state`` (int64 ``[2] = (seed, offset)``: z drawn in
    the kernel with Philox, the stream contract of :func:`sampler_step`; the caller advances the
    offset) add the ``c_noise z`` term; without either it is skipped.

    ``x0_prev2`` (x0 of two steps ago, x's shape; requires ``x0_prev``) adds ``c_prev2 x0_prev2``
    with ``c_prev2 = coef[6]``, so that coef ``[8] = [a, s, c_x, c_x0, c_prev, c_noise, c_prev2,
    0]`` and ``x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_prev2 x0_prev2 + c_noise z``: the
    third-order update of DPM-Solver++ (diffusers' ``multistep_dpm_solver_third_order_update``,
    "DPM++ 3M" / "DPM++ 3M SDE") is linear in these operands, the sampler folds the rest into
    the coefficients. Absent, the term is skipped (as for ``x0_prev``).

    ``coef[7] = c_eps`` adds ``c_eps eps`` (last), eps the noise prediction of the x0 above
    (epsilon: the model output; v: ``a v + s x``; sample: ``(x - a x0) / s``; with
    ``clip_range``, ``(x - a x0) / s`` of the clipped x0): so ``coef [8] = [a, s, c_x, c_x0,
    c_prev, c_noise, c_prev2, c_eps]`` and ``x_next = c_x x + c_x0 x0 + c_prev x0_prev +
    c_prev2 x0_prev2 + c_noise z + c_eps eps``. A sampler whose update is naturally in eps
    forms it without cancelling x against x0: Heun's / DPM2's second stage ``x_sigma + h d``
    with the ODE derivative ``d = (x_sigma - x0) / sigma``, which is eps (Karras et al. 2022,
    eq. 4). ``c_eps = 0`` (every other sampler) forms no term, as any zero coefficient (a
    term whose coefficient is exactly 0 is absent on every backend: no ``0 * inf = NaN``);
    the coefficients are read on the device, so nothing about their values is validated
    here (no host synchronisation).

    ``x0_prev3`` (requires ``x0_prev2``) and ``x0_prev4`` (requires ``x0_prev3``), x's shape, add
    ``c_prev3 x0_prev3`` and ``c_prev4 x0_prev4`` with ``c_prev3 = coef[8]``, ``c_prev4 =
    coef[9]`` (coef then needs >= 9, >= 10 elements): ``coef [10] = [a, s, c_x, c_x0, c_prev,
    c_noise, c_prev2, c_eps, c_prev3, c_prev4]`` and ``x_next = c_x x + c_x0 x0 + c_prev x0_prev
    + c_prev2 x0_prev2 + c_prev3 x0_prev3 + c_prev4 x0_prev4 + c_noise z + c_eps eps`` (the
    terms added in this order). SA-Solver's predictor-corrector (Xue et al. 2023, eqs. 13-14)
    of predictor order 3 / 4 or corrector order 4 is one linear map of x_i, the model outputs
    m_i, ..., m_{i-4} and z_i (:class:`~fastdiff.samplers.SASolverSampler` folds the weights);
    the singlestep SDE-DPM-Solver++ of order 3 passes its group's anchor x_a as an operand.
    Absent, a term is skipped, and as every term it is not formed where its coefficient is
    exactly 0 (kernels without these operands: the 2M / 3M code as before). A call with them
    takes the general path on the cpu backend (no cached launch plan).

    Returns ``(x_next, x0)``; ``x0`` is the new history entry (clone it if the buffer will be
    overwritten, e.g. by CUDA graph replay).
    """
    key = None
    deep = x0_prev3 is not None or x0_prev4 is not None  # no cached plan (general path)
    # a repeat of a validated cpu call: no checks, no plan
    if not deep and not torch.compiler.is_compiling():
        opts = (prediction_type, type(clip_range), clip_range, type(guidance_scale), guidance_scale)
        key, r = _cached_cpu_step("dpm_solver_2m_step", x, model_output, coef, x0_prev,
                                  generator_state, opts, noise, x0_prev2)  # fmt: skip
        if r is not None:
            return r
    gen_in = generator_state
    try:
        clip, g = _check_common(x, model_output, coef, prediction_type, clip_range,
                                guidance_scale, False)  # fmt: skip
        if x0_prev is not None:
            _check_like_x("x0_prev", x0_prev, x)
        if x0_prev2 is not None:
            if x0_prev is None:
                raise ValueError("x0_prev2 (x0 two steps ago) needs x0_prev, got x0_prev=None")
            _check_like_x("x0_prev2", x0_prev2, x)
        if deep:
            _check_deep_history(x, coef, x0_prev2, x0_prev3, x0_prev4)
        generator_state = _check_noise(x, noise, generator_state)
    except (TypeError, ValueError) as e:  # the op's name first, as the other ops' errors
        raise type(e)(f"dpm_solver_2m_step: {e}") from None
    x, model_output, coef, x0_prev, noise, generator_state, x0_prev2, x0_prev3, x0_prev4 = (
        _ext.resolve_neg(x, model_output, coef, x0_prev, noise, generator_state, x0_prev2,
                         x0_prev3, x0_prev4)
    )  # fmt: skip
    plain = _plain_eager(x, model_output, coef, x0_prev, noise, generator_state, x0_prev2,
                         x0_prev3, x0_prev4)  # fmt: skip
    if not plain and torch.compiler.is_compiling():  # the op resolves its backend when it runs
        return _dpm_2m_op(x, model_output, coef, x0_prev, noise, generator_state, _AUTO,
                          PREDICTION_TYPES[prediction_type], clip, g, x0_prev2, x0_prev3,
                          x0_prev4)  # fmt: skip
    resolve = _dispatch.resolve_eager if plain else _dispatch.resolve  # plain: not compiling
    unsupported = _unsupported(x, x0_prev2, dpm=True, x0_prev3=x0_prev3)
    backend = resolve("dpm_solver_2m_step", x.device, unsupported)
    backend = _dispatch.forward_ad_backend("dpm_solver_2m_step", backend, x, model_output, coef,
                                           x0_prev, noise, x0_prev2, x0_prev3,
                                           x0_prev4)  # fmt: skip
    pred = PREDICTION_TYPES[prediction_type]
    if deep:
        fn = _dpm_2m_impl if plain else _dpm_2m_op
        return fn(x, model_output, coef, x0_prev, noise, generator_state, backend, pred, clip, g,
                  x0_prev2, x0_prev3, x0_prev4)  # fmt: skip
    if plain and backend == "cpu":
        r = _fast_cpu(1, x, model_output, coef, x0_prev, generator_state, pred, clip, False, g,
                      False, True, noise, x0_prev2)  # fmt: skip
        if r is not None:
            if (
                key is not None
                and generator_state is gen_in
                and _cacheable(clip_range, guidance_scale)
            ):
                _remember_validated(key, 1, x, model_output, x0_prev, pred, clip, False, g, False,
                                    True, unsupported, noise, x0_prev2)  # fmt: skip
            return r
    fn = _dpm_2m_impl if plain else _dpm_2m_op
    return fn(x, model_output, coef, x0_prev, noise, generator_state, backend, pred, clip, g,
              x0_prev2)  # fmt: skip
