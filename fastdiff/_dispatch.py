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
from collections.abc import Iterator, Mapping

import torch

from fastdiff import _ext

BACKENDS: tuple[str, ...] = ("torch", "cpu", "cuda", "triton", "sdpa")

# Automatic choice for CUDA tensors, fastest first. Justified by the GPU suite's results in
# benchmarks/results/ (see README "Backends").
CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    "sampler_step": ("cuda", "triton", "torch"),
    "dpm_solver_2m_step": ("cuda", "triton", "torch"),
    "group_norm_silu": ("triton", "cuda", "torch"),
    "attention": ("triton", "cuda", "sdpa", "torch"),
}
# Automatic choice for CPU tensors: the C++ kernels when built, else the reference.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "sampler_step": ("cpu", "torch"),
    "dpm_solver_2m_step": ("cpu", "torch"),
    "group_norm_silu": ("cpu", "torch"),
    "attention": ("cpu", "sdpa", "torch"),
}
# Backends each op implements.
IMPLEMENTED: dict[str, frozenset[str]] = {
    "sampler_step": frozenset({"torch", "cpu", "cuda", "triton"}),
    "dpm_solver_2m_step": frozenset({"torch", "cpu", "cuda", "triton"}),
    "group_norm_silu": frozenset({"torch", "cpu", "cuda", "triton"}),
    "attention": frozenset({"torch", "cpu", "cuda", "triton", "sdpa"}),
}

_ctx_override: contextvars.ContextVar[tuple[tuple[str | None, str], ...]] = contextvars.ContextVar(
    "fastdiff_backend_override", default=()
)
_global_override: dict[str | None, str] = {}


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
    """Force backend ``name`` for ``op`` (all ops when None) process-wide; ``name=None`` clears."""
    _check_op(op)
    if name is None:
        _global_override.pop(op, None)
        return
    _global_override[op] = _check_name(name)


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


@torch.compiler.assume_constant_result
def requested_backend(op: str) -> str | None:
    """The explicitly requested backend for ``op``, or None for the automatic choice.

    Under ``torch.compile`` this is evaluated once at trace time (dynamo cannot trace the
    ContextVar): the backend in force when a function is compiled is baked into its graph.
    """
    for o, name in reversed(_ctx_override.get()):
        if o is None or o == op:
            return name
    if op in _global_override:
        return _global_override[op]
    if None in _global_override:
        return _global_override[None]
    env = os.environ.get("FASTDIFF_BACKEND", "").strip()
    if env:
        table = _parse_env(env)
        return table.get(op, table.get(None))
    return None


def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on install
        return False, f"triton is not importable ({exc})"
    return True, ""


def backend_available(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` now; the reason when it cannot."""
    _check_name(name)
    dev = torch.device(device)
    if name in ("torch", "sdpa"):
        return True, ""
    if name == "cpu":
        if dev.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {dev.type} tensors"
        if not _ext.has_native():
            return False, f"fastdiff._C failed to import: {_ext.C_IMPORT_ERROR}"
        return True, ""
    if name == "cuda":
        if dev.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {dev.type} tensors"
        if not _ext.has_native_cuda():
            return False, "fastdiff._C was built without CUDA (no nvcc, or FASTDIFF_CUDA=0)"
        return True, ""
    # triton
    ok, why = _triton_importable()
    if not ok:
        return False, why
    if dev.type == "cuda":
        return True, ""
    if dev.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU tensors"
    return False, f"triton cannot run on {dev.type} tensors"


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends implemented for ``op`` that can run on ``device`` right now."""
    return [b for b in BACKENDS if b in IMPLEMENTED[op] and backend_available(b, device)[0]]


def resolve(op: str, device: torch.device, unsupported: Mapping[str, str] | None = None) -> str:
    """Pick the backend for ``op`` on ``device``.

    ``unsupported`` maps backend -> reason, for backends that cannot take these particular inputs.
    """
    unsupported = unsupported or {}
    req = requested_backend(op)
    if req is not None:
        if req not in IMPLEMENTED[op]:
            raise RuntimeError(
                f"fastdiff: backend {req!r} was requested for {op}, which implements "
                f"{sorted(IMPLEMENTED[op])}"
            )
        ok, why = backend_available(req, device)
        if not ok:
            raise RuntimeError(f"fastdiff: backend {req!r} was requested for {op} but {why}")
        if req in unsupported:
            raise RuntimeError(
                f"fastdiff: backend {req!r} was requested for {op} but {unsupported[req]}"
            )
        return req
    order = CUDA_PREFERENCE[op] if device.type == "cuda" else CPU_PREFERENCE[op]
    for b in order:
        if b in unsupported:
            continue
        if backend_available(b, device)[0]:
            return b
    return "torch"


def dispatch_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """The automatic-choice table: {op: {"cuda": order, "cpu": order}}."""
    return {op: {"cuda": CUDA_PREFERENCE[op], "cpu": CPU_PREFERENCE[op]} for op in IMPLEMENTED}
