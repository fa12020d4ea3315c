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
    _PATCHED = True
    return True
