"""Fused ops. Each module holds validation, the torch.library custom op, dispatch, and the eager
torch reference beside it:

* :func:`fastdiff.ops.sampler_step.sampler_step` / ``dpm_solver_2m_step`` - one sampler step
* :func:`fastdiff.ops.group_norm_silu.group_norm_silu` - GroupNorm (+ add, scale-shift) + SiLU
* :func:`fastdiff.ops.attention.attention` - flash-style attention

Submodules load on first use (``fastdiff.ops.attention`` works without importing it first).
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("sampler_step", "group_norm_silu", "attention")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.ops.{name}")
    if name == "dpm_solver_2m_step":
        return importlib.import_module("fastdiff.ops.sampler_step").dpm_solver_2m_step
    raise AttributeError(f"module 'fastdiff.ops' has no attribute {name!r}")
