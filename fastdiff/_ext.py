"""The native extension fastdiff._C and the helpers that pass tensors across its raw-pointer ABI."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

# Must equal FASTDIFF_ABI_VERSION in csrc/include/fastdiff/common.h (the entry points' argument
# lists); bumped together with it on every signature change.
ABI_VERSION = 2


def _load_native():
    """(fastdiff._C or None, why it is unusable or None). A module built from sources with another
    ABI_VERSION (an old in-place build left behind) is refused here, with a warning, rather than
    failing on some later call with pybind11's "incompatible function arguments"."""
    try:
        from fastdiff import _C as mod  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        if importlib.util.find_spec("fastdiff._C") is None:
            here = os.path.dirname(os.path.abspath(__file__))
            return None, (
                f"fastdiff._C is not built (no compiled extension in {here}): install with "
                "`pip install .`, or run tools/dev_build.sh in a source checkout"
            )
        return None, str(exc)
    got = getattr(mod, "ABI_VERSION", None)
    if got != ABI_VERSION:
        why = (
            f"fastdiff._C at {mod.__file__} is a stale build (ABI_VERSION {got}, this fastdiff "
            f"needs {ABI_VERSION}): reinstall with `pip install .` (or run tools/dev_build.sh "
            "in a source checkout)"
        )
        warnings.warn(why + "; the cpu/cuda backends are disabled until then", stacklevel=3)
        return None, why
    return mod, None


_C, C_IMPORT_ERROR = _load_native()

# Must match csrc/include/fastdiff/common.h `enum class DType`.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}


def dtype_code(t: torch.Tensor) -> int:
    """The csrc DType code of ``t``'s dtype."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"fastdiff: unsupported dtype {t.dtype}") from None


def transforms_active() -> bool:
    """A torch.func transform (functionalize, vmap, grad, jvp) or a TorchDispatchMode is active:
    tensors may be wrappers whose Python type is plain ``torch.Tensor`` but which have no
    storage a kernel could read by address, so an op must go through its registered custom op
    (or fail there) rather than a raw-pointer fast path."""
    return torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack() > 0


def autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False for a device type autocast does not
    know (``meta``: shape inference), for which it raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def resolve_neg(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``ts`` with every lazily negated view materialised. A real tensor can carry PyTorch's
    negative bit (``z.conj().imag`` of a complex ``z``): its memory holds -values, and the
    kernels read memory by address. Other tensors (and None) pass through unchanged."""
    if torch.compiler.is_compiling():  # is_neg() is not traceable; resolve_neg() is
        return tuple(None if t is None else t.resolve_neg() for t in ts)
    for t in ts:  # the common case, no negative bit: ts as given (a plain loop, the hot path)
        if t is not None and t.is_neg():
            return tuple(None if u is None else u.resolve_neg() for u in ts)
    return ts


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for a kernel launch (a no-op when it already is, or for
    CPU tensors). Kernels launch on the current device: a tensor on another GPU would otherwise
    fail with "invalid resource handle" or run on the wrong device."""
    idx = t.device.index
    if t.device.type != "cuda" or idx is None or torch.cuda.current_device() == idx:
        return contextlib.nullcontext()
    return torch.cuda.device(idx)


def stream_handle(t: torch.Tensor) -> int:
    """Raw cudaStream_t of torch's *current* stream on ``t``'s device (0 for CPU tensors).

    Using the current stream (not the legacy default stream) keeps kernels capturable in CUDA
    graphs and ordered with torch's own work. Reads the raw handle directly (what inductor's
    launchers do) instead of building a ``torch.cuda.Stream`` object per call.
    """
    dev = t.device
    if dev.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        idx = dev.index
        return _RAW_STREAM(torch.cuda.current_device() if idx is None else idx)
    return torch.cuda.current_stream(dev).cuda_stream


# torch._C._cuda_getCurrentRawStream(device_index) -> int; only in CUDA builds of torch.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def has_native() -> bool:
    """True when fastdiff._C imported."""
    return _C is not None


def has_native_cuda() -> bool:
    """True when fastdiff._C was compiled with the CUDA kernels."""
    return _C is not None and bool(_C.BUILD_INFO["cuda"])


def native():
    """The fastdiff._C module; raises RuntimeError naming the import error if it is missing."""
    if _C is None:
        raise RuntimeError(f"fastdiff._C is not available: {C_IMPORT_ERROR}")
    return _C
