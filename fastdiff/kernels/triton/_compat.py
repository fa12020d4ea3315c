"""Compatibility shims across the Triton releases fastdiff supports (3.x; checked on 3.6 and 3.9).

Each shim detects the behaviour it works around (never a version number) and does nothing where
the installed Triton behaves.

* Interpreter scalar ``__index__`` (Triton <= 3.6 with NumPy >= 2.4): under ``TRITON_INTERPRET=1``
  a scalar kernel argument or ``tl.program_id`` is a 1-element NumPy array, and Triton 3.6's
  interpreter turns it into a Python int with ``int(array)``, which NumPy 2.4 rejects for arrays
  with ``ndim > 0`` ("only 0-dimensional arrays can be converted to Python scalars"). Every
  ``range(start, Lk, BLOCK)`` over a runtime bound in a kernel then fails. Triton 3.9 squeezes the
  array first; :func:`patch_interpreter` installs that same conversion when the installed
  interpreter's fails. The compiled (GPU) path never calls it.
* Interpreter fp32 -> bf16 rounding (Triton 3.9 and earlier): ``x.to(tl.bfloat16)`` compiles to
  ``arith.truncf``, round-to-nearest-even on the GPU (``cvt.rn.bf16.f32``), but the interpreter's
  cast drops the low 16 bits (round toward zero: up to 1 bf16 ulp, twice RNE's error; its RTNE
  mode rounds ties up and can carry into the wrong exponent). Every bf16 store of a fused
  kernel then erred up to 2x eager's error under ``TRITON_INTERPRET=1`` (unipc_step's x0 on 6 of
  60 seeds, tests/test_unipc3.py). :func:`patch_interpreter` makes that cast (default and RTNE
  modes; RTZ stays truncation) round to nearest even, as the GPU does, when a probe shows the
  installed interpreter does not.
"""

from __future__ import annotations

import os
import types

import numpy as np

_PATCHED = False


def interpreting() -> bool:
    """Whether ``@triton.jit`` builds interpreted functions now (``TRITON_INTERPRET``), read as
    Triton reads it (``triton.knobs.runtime.interpret``; the environment variable where Triton
    has no knobs). Triton decides at decoration time, i.e. when a kernel module is imported."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _index_broken(index_fn) -> bool:
    """Whether the interpreter's ``tensor.__index__`` fails on a 1-element 1-D scalar handle."""
    probe = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([3], dtype=np.int32)))
    try:
        return index_fn(probe) != 3
    except TypeError:
        return True


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter(force: bool = False) -> bool:
    """Make the Triton interpreter's scalar ``__index__`` NumPy-2.4-safe where it is not.

    Wraps ``triton.runtime.interpreter._patch_lang_tensor`` (called at each interpreted launch) so
    that after it installs its ``__index__`` on ``tl.tensor`` a broken one is replaced, through
    the same restore scope, by ``int(data.squeeze())``. Only when :func:`interpreting` (or
    ``force``): a compiled-kernel process never imports the interpreter. Idempotent; returns
    whether the wrapper is installed. A Triton without that hook (a future layout) is left alone.
    """
    global _PATCHED
    if _PATCHED:
        return True
    if not (force or interpreting()):
        return False
    try:
        from triton.runtime import interpreter
    except Exception:  # no interpreter module in this Triton: nothing to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        if _index_broken(tensor.__index__):
            scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor.__wrapped__ = original
    interpreter._patch_lang_tensor = _patch_lang_tensor
    _patch_bf16_rounding(interpreter)
    _PATCHED = True
    return True


def f32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of fp32 values rounded to nearest, ties to even (IEEE,
    the GPU's ``cvt.rn.bf16.f32``); NaN stays a (quiet) NaN of the same sign."""
    u = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x40, rounded)
    return out.astype(np.uint16).reshape(np.shape(data))


# fp32 probes whose nearest-even bf16 differs from truncation or from rounding ties up:
# 1 + 0.75 ulp -> 1 + ulp, 1 + 0.5 ulp -> 1 (tie to even), 1 + 1.5 ulp -> 1 + 2 ulp (tie to even),
# bf16-max-exponent carry: (2 - 0.5 ulp) * 2 -> 4.
_BF16_PROBES = np.array([1 + 0.75 * 2**-7, 1 + 2**-8, 1 + 3 * 2**-8, 4 - 2**-7], np.float32)


def _bf16_rounding_broken(cast) -> bool:
    """Whether the interpreter's fp32 -> bf16 ``cast(values)`` (uint16 bits) is not RNE."""
    try:
        got = np.asarray(cast(_BF16_PROBES)).view(np.uint16)
    except Exception:  # a layout this check does not know: leave the interpreter alone
        return False
    return not np.array_equal(got, f32_to_bf16_bits(_BF16_PROBES))


def _patch_bf16_rounding(interpreter) -> bool:
    """Install RNE fp32 -> bf16 casts on the interpreter's builder where its own are not RNE."""
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder, "_fd_bf16_rne", False):
        return False
    import triton.language as tl

    cast_impl = builder.cast_impl
    to_fp = builder.create_fp_to_fp

    def probe(values):
        return cast_impl(builder(), handle(values, tl.float32), tl.bfloat16).data

    if not _bf16_rounding_broken(probe):
        return False

    def is_f32_to_bf16(src, dst_type):
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def cast_rne(self, src, dst_type):
        if is_f32_to_bf16(src, dst_type):
            return handle(f32_to_bf16_bits(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    def fp_to_fp_rne(self, src, dst_type, rounding_mode):
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode).upper()
        if is_f32_to_bf16(src, dst_type) and not rtz:
            return handle(f32_to_bf16_bits(src.data), dst_type.scalar)
        return to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_rne
    builder.create_fp_to_fp = fp_to_fp_rne
    builder._fd_bf16_rne = True
    return True
