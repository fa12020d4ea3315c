"""The one dispatch seam: which backend runs an op for a given device.

Backends:
  * ``torch``  - the eager PyTorch reference (always present)
  * ``cpu``    - csrc C++ kernels (fastdiff._C), CPU tensors
  * ``cuda``   - csrc CUDA kernels (fastdiff._C built with nvcc), CUDA tensors
  * ``triton`` - Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  * ``sdpa``   - attention only: ``torch.nn.functional.scaled_dot_product_attention``

Choice, highest priority first: ``use_backend(...)`` context, ``set_backend(...)``, the
``FASTDIFF_BACKEND`` env var (``"triton"`` or ``"attention=cuda,group_norm_silu=triton"``), then the
automatic table below. An explicitly requested backend that cannot run is a ``RuntimeError``;
there is never a silent fallback. The automatic choice skips backends that are unavailable or
that an op reports it cannot run for the given inputs (e.g. attention with head dim 512 -> sdpa).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from collections.abc import Iterator, Mapping

import torch

from fastdiff import _ext

BACKENDS: tuple[str, ...] = ("torch", "cpu", "cuda", "triton", "sdpa")

# Automatic choice for CUDA tensors, first available wins. Evidence so far (README "Backends",
# benchmarks/results/): the triton kernels of group_norm_silu and the sampler ran on an H100 inside
# whole sampling runs (tests passed; 4.6x eager with CUDA graphs); the csrc CUDA kernels compile
# but have not yet run on a GPU, so they come second until the GPU suite measures them. Attention
# defaults to PyTorch's SDPA (flash / cuDNN) until our kernels are measured against it there;
# triton and cuda attention are available explicitly.
CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    "sampler_step": ("triton", "cuda", "torch"),
    "dpm_solver_2m_step": ("triton", "cuda", "torch"),
    "unipc_step": ("triton", "cuda", "torch"),
    "group_norm_silu": ("triton", "cuda", "torch"),
    "attention": ("sdpa", "triton", "cuda", "torch"),
}
# Automatic choice for CPU tensors: the C++ kernels when built, else the reference.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "sampler_step": ("cpu", "torch"),
    "dpm_solver_2m_step": ("cpu", "torch"),
    "unipc_step": ("cpu", "torch"),
    "group_norm_silu": ("cpu", "torch"),
    "attention": ("cpu", "sdpa", "torch"),
}
# Backends each op implements.
IMPLEMENTED: dict[str, frozenset[str]] = {
    "sampler_step": frozenset({"torch", "cpu", "cuda", "triton"}),
    "dpm_solver_2m_step": frozenset({"torch", "cpu", "cuda", "triton"}),
    "unipc_step": frozenset({"torch", "cpu", "cuda", "triton"}),
    "group_norm_silu": frozenset({"torch", "cpu", "cuda", "triton"}),
    "attention": frozenset({"torch", "cpu", "cuda", "triton", "sdpa"}),
}

_ctx_override: contextvars.ContextVar[tuple[tuple[str | None, str], ...]] = contextvars.ContextVar(
    "fastdiff_backend_override", default=()
)
_global_override: dict[str | None, str] = {}
# Snapshot of _global_override (hashable): part of the key of resolve's verdict cache.
_global_key: tuple[tuple[str | None, str], ...] = ()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown fastdiff backend {name!r}; valid backends are {list(BACKENDS)}")
    return name


def _check_op(op: str | None) -> str | None:
    if op is not None and op not in IMPLEMENTED:
        raise ValueError(f"unknown fastdiff op {op!r}; valid ops are {sorted(IMPLEMENTED)}")
    return op


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Context manager forcing backend ``name`` for ``op`` (or every op when ``op`` is None)."""
    _check_name(name)
    _check_op(op)
    token = _ctx_override.set(_ctx_override.get() + ((op, name),))
    try:
        yield
    finally:
        _ctx_override.reset(token)


def set_backend(name: str | None, op: str | None = None) -> None:
    """Force backend ``name`` for ``op`` (all ops when None) process-wide; ``name=None`` clears
    that setting only: ``set_backend(None)`` clears the all-ops one, a per-op setting is cleared
    with ``set_backend(None, op=...)`` (and wins over the all-ops one while set)."""
    global _global_key
    _check_op(op)
    if name is None:
        _global_override.pop(op, None)
    else:
        _global_override[op] = _check_name(name)
    _global_key = tuple(_global_override.items())


@functools.lru_cache(maxsize=8)
def _parse_env(value: str) -> dict[str | None, str]:
    out: dict[str | None, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            out[_check_op(op)] = _check_name(name)
        else:
            out[None] = _check_name(part)
    return out


def forward_ad_backend(op: str, backend: str, *tensors: torch.Tensor | None) -> str:
    """``backend``, or the torch reference when forward-mode AD is on and an input carries a
    tangent (``torch.autograd.forward_ad`` dual tensors look like plain tensors): the fused
    kernels read memory by address and would drop the tangent silently. An explicitly requested
    fused backend is a RuntimeError instead (never a silent fallback)."""
    if backend == "torch" or torch.autograd.forward_ad._current_level < 0:
        return backend
    unpack = torch.autograd.forward_ad.unpack_dual
    if not any(t is not None and unpack(t).tangent is not None for t in tensors):
        return backend
    if requested_backend(op) is not None:
        raise RuntimeError(
            f"fastdiff: backend {backend!r} was requested for {op} but an input carries a "
            "forward-mode AD tangent, which only the torch backend propagates"
        )
    return "torch"


@torch.compiler.assume_constant_result
def requested_backend(op: str) -> str | None:
    """The explicitly requested backend for ``op``, or None for the automatic choice.

    Under ``torch.compile`` a call traced by dynamo is evaluated once, at trace time (dynamo
    cannot trace the ContextVar), and its value is a constant of the graph. The ops do not pick
    their backend that way: in a compiled function each op gets an ``"auto"`` backend argument
    and resolves it when it runs (its body is opaque to dynamo), so ``use_backend`` /
    ``set_backend`` apply per call. What a trace-time call still fixes is a Python-level choice
    made around an op, e.g. where ``fastdiff.nn.Attention`` sends float64 inputs, or whether
    ``FastAttnProcessor`` raises for inputs that only SDPA runs.
    """
    ctx = _ctx_override.get()
    if ctx:
        for o, name in reversed(ctx):
            if o is None or o == op:
                return name
    if _global_override:
        if op in _global_override:
            return _global_override[op]
        if None in _global_override:
            return _global_override[None]
    env = _getenv("FASTDIFF_BACKEND")
    if env:
        try:
            table = _parse_env(env)
        except ValueError as exc:  # say where the bad name came from
            raise ValueError(f"FASTDIFF_BACKEND={env!r}: {exc}") from None
        if table:
            return table.get(op, table.get(None))
    return None


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)`` without its per-call key/value re-encoding (~1 us -> ~0.2 us).
    Reads the live mapping, so ``os.environ[...] = ...`` and ``monkeypatch.setenv`` are seen."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    raw = _ENV_DATA.get(name.encode())
    return None if raw is None else raw.decode(_FS_ENCODING, "surrogateescape")


# The bytes-keyed dict behind os.environ (CPython on POSIX); None elsewhere (os.environ.get).
_ENV_DATA: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)
if os.name != "posix" or not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None
_FS_ENCODING = sys.getfilesystemencoding()


def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on install
        return False, f"triton is not importable ({exc})"
    return True, ""


def _available(name: str, dev_type: str, interpret: bool) -> tuple[bool, str]:
    """What :func:`backend_available` memoises: everything it reads is fixed for the process
    except ``TRITON_INTERPRET``, which is part of the key."""
    if name in ("torch", "sdpa"):
        return True, ""
    if name == "cpu":
        if dev_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {dev_type} tensors"
        if not _ext.has_native():
            return False, f"fastdiff._C is unavailable: {_ext.C_IMPORT_ERROR}"
        return True, ""
    if name == "cuda":
        if dev_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {dev_type} tensors"
        if not _ext.has_native():
            return False, f"fastdiff._C is unavailable: {_ext.C_IMPORT_ERROR}"
        if not _ext.has_native_cuda():
            return False, "fastdiff._C was built without CUDA (no nvcc, or FASTDIFF_CUDA=0)"
        return True, ""
    # triton
    ok, why = _triton_importable()
    if not ok:
        return False, why
    if dev_type == "cuda":
        return True, ""
    if dev_type == "cpu":
        if interpret:
            return True, ""
        return False, "triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU tensors"
    return False, f"triton cannot run on {dev_type} tensors"


# (backend, device type, interpret) -> (ok, why). A plain dict, not lru_cache: dynamo traces it
# without warnings when an op resolves inside torch.compile.
_AVAILABLE: dict[tuple[str, str, bool], tuple[bool, str]] = {}


def _available_on(name: str, dev_type: str) -> tuple[bool, str]:
    # Only triton on CPU tensors depends on the environment.
    interpret = name == "triton" and dev_type == "cpu" and _getenv("TRITON_INTERPRET") == "1"
    key = (name, dev_type, interpret)
    hit = _AVAILABLE.get(key)
    if hit is None:
        hit = _AVAILABLE[key] = _available(name, dev_type, interpret)
    return hit


def backend_available(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` now; the reason when it cannot."""
    _check_name(name)
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _available_on(name, dev_type)


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends implemented for ``op`` that can run on ``device`` right now."""
    return [b for b in BACKENDS if b in IMPLEMENTED[op] and backend_available(b, device)[0]]


def resolve(op: str, device: torch.device, unsupported: Mapping[str, str] | None = None) -> str:
    """Pick the backend for ``op`` on ``device``.

    ``unsupported`` maps backend -> reason, for backends that cannot take these particular inputs.
    Cheap enough to call per kernel launch (~1 us): in eager mode the verdict is cached, keyed on
    everything it depends on (see :func:`resolve_eager`); under ``torch.compile`` it is computed.
    """
    if torch.compiler.is_compiling():
        return _resolve(op, device, unsupported)
    return resolve_eager(op, device, unsupported)


# (op, device, use_backend context, set_backend snapshot, FASTDIFF_BACKEND, TRITON_INTERPRET,
# unsupported items) -> backend; valid for the _AVAILABLE memo it was computed with.
_VERDICTS: dict[tuple, str] = {}
_VERDICTS_FOR: list = [None]  # the _AVAILABLE dict the verdicts were computed with


def resolve_eager(
    op: str, device: torch.device, unsupported: Mapping[str, str] | None = None
) -> str:
    """:func:`resolve` for callers that are not traced by ``torch.compile`` (it reads the
    ``use_backend`` ContextVar, which dynamo cannot trace). The verdict is cached under a key of
    everything it depends on: the op, the device, the ``use_backend`` context, the
    ``set_backend`` state, the ``FASTDIFF_BACKEND`` and ``TRITON_INTERPRET`` values read now (so
    changes to the environment are seen on the next call) and ``unsupported``'s items.
    Errors are not cached: a request that cannot run raises on every call."""
    env = _ENV_DATA
    if env is not None:
        fb, ti = env.get(b"FASTDIFF_BACKEND"), env.get(b"TRITON_INTERPRET")
    else:
        fb, ti = os.environ.get("FASTDIFF_BACKEND"), os.environ.get("TRITON_INTERPRET")
    key = (op, device, _ctx_override.get(), _global_key, fb, ti,
           tuple(unsupported.items()) if unsupported else None)  # fmt: skip
    if _VERDICTS_FOR[0] is not _AVAILABLE:  # availability was reset (tests): start over
        _VERDICTS.clear()
        _VERDICTS_FOR[0] = _AVAILABLE
    try:
        hit = _VERDICTS.get(key)
    except TypeError:  # an unhashable device or reason: no caching
        return _resolve(op, device, unsupported)
    if hit is None:
        hit = _resolve(op, device, unsupported)
        if len(_VERDICTS) >= 1024:
            _VERDICTS.clear()
        _VERDICTS[key] = hit
    return hit


def _resolve(op: str, device: torch.device, unsupported: Mapping[str, str] | None) -> str:
    """The verdict of :func:`resolve`, computed."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    req = requested_backend(op)
    if req is not None:
        if req not in IMPLEMENTED[op]:
            msg = (
                f"fastdiff: backend {req!r} was requested for {op}, which implements "
                f"{sorted(IMPLEMENTED[op])}"
            )
            ops = sorted(o for o, names in IMPLEMENTED.items() if req in names)
            if ops:  # e.g. sdpa, attention's only: the request was probably meant for that op
                msg += f"; to request it for one op, use e.g. use_backend({req!r}, op={ops[0]!r})"
            raise RuntimeError(msg)
        ok, why = _available_on(req, dev_type)
        if not ok:
            raise RuntimeError(f"fastdiff: backend {req!r} was requested for {op} but {why}")
        if unsupported and req in unsupported:
            raise RuntimeError(
                f"fastdiff: backend {req!r} was requested for {op} but {unsupported[req]}"
            )
        return req
    for b in _auto_order(op, dev_type):
        if not unsupported or b not in unsupported:
            return b
    return "torch"


# (op, device type, TRITON_INTERPRET on) -> the preference order filtered to available backends.
_ORDERS: dict[tuple[str, str, bool], tuple[str, ...]] = {}


def _auto_order(op: str, dev_type: str) -> tuple[str, ...]:
    """The automatic-choice order for ``op`` on ``dev_type`` restricted to the backends that
    can run now (memoised: availability only changes with ``TRITON_INTERPRET``, part of the key).
    """
    interpret = dev_type == "cpu" and _getenv("TRITON_INTERPRET") == "1"
    key = (op, dev_type, interpret)
    hit = _ORDERS.get(key)
    if hit is None:
        prefs = CUDA_PREFERENCE[op] if dev_type == "cuda" else CPU_PREFERENCE[op]
        hit = _ORDERS[key] = tuple(b for b in prefs if _available_on(b, dev_type)[0])
    return hit


def dispatch_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """The automatic-choice table: {op: {"cuda": order, "cpu": order}}."""
    return {op: {"cuda": CUDA_PREFERENCE[op], "cpu": CPU_PREFERENCE[op]} for op in IMPLEMENTED}
