"""fastdiff.build_info(): what was compiled in and what can run now."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

import torch

from fastdiff import _dispatch, _ext


def _native_error() -> str | None:
    """Why fastdiff._C is unusable, in words: with no compiled module at all, Python's own message
    blames a "partially initialized module ... (most likely due to a circular import)"."""
    if _ext.has_native():
        return None
    if importlib.util.find_spec("fastdiff._C") is None:
        pkg = os.path.dirname(os.path.abspath(_ext.__file__))
        return (
            f"fastdiff._C is not built (no compiled extension in {pkg}): install with "
            "`pip install .`, or run tools/dev_build.sh in a source checkout"
        )
    return _ext.C_IMPORT_ERROR


def build_info() -> dict[str, Any]:
    """Build and runtime facts: CUDA compiled in (archs, compiler), OpenMP, backends, versions."""
    info: dict[str, Any] = {"native": _ext.has_native(), "native_error": _native_error()}
    if _ext.has_native():
        b = dict(_ext.native().BUILD_INFO)
        info.update(
            cuda_compiled=b["cuda"],
            cuda_archs=b["cuda_archs"].split(),
            cuda_compiler=b["cuda_compiler"],
            cxx_compiler=b["cxx_compiler"],
            openmp=b["openmp"],
            cpu_dispatch=b.get("cpu_dispatch", ""),
        )
        if b["cuda"]:
            info["cuda_runtime_version"] = _ext.native().cuda_runtime_version()
    else:
        info.update(
            cuda_compiled=False,
            cuda_archs=[],
            cuda_compiler="",
            cxx_compiler="",
            openmp=False,
            cpu_dispatch="",
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["python"] = platform.python_version()
    info["cuda_available"] = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {
        d: {op: _dispatch.available_backends(op, d) for op in _dispatch.IMPLEMENTED}
        for d in devices
    }
    info["dispatch_table"] = _dispatch.dispatch_table()
    return info
