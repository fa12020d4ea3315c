"""Fused ops. Each module holds validation, the torch.library custom op, dispatch, and the eager
torch reference beside it:

* :func:`fastdiff.ops.sampler_step.sampler_step` / ``dpm_solver_2m_step`` - one sampler step
* :func:`fastdiff.ops.group_norm_silu.group_norm_silu` - GroupNorm (+ add, scale-shift) + SiLU
* :func:`fastdiff.ops.attention.attention` - flash-style attention
* :func:`fastdiff.ops.unipc_step.unipc_step` - one UniPC step (corrector + predictor)

Layers, Liger-style: ``_x_kernel`` (Triton) -> ``x_forward()`` launcher (fastdiff/kernels/triton)
or the csrc entry point -> the ``torch.library.custom_op`` here, whose ``register_autograd``
backward plays the role of an ``autograd.Function`` (one object carries the op, its fake
implementation and its backward for torch.compile) -> the ``nn.Module`` s in fastdiff/nn.

Submodules load on first use (``fastdiff.ops.attention`` works without importing it first).
Each op module is also callable as its op, so ``fastdiff.ops.group_norm_silu(x, 32)`` and
``fastdiff.ops.attention(q, k, v)`` work as the issue texts and papers' pseudo-code write them,
while ``fastdiff.ops.group_norm_silu.group_norm_silu`` stays the function itself.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_SUBMODULES = ("sampler_step", "group_norm_silu", "attention", "unipc_step")


class _OpModule(types.ModuleType):
    """A module that calls its op (the function of the same name) when called."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    """Let ``fastdiff.ops.<op>(...)`` call ``fastdiff.ops.<op>.<op>(...)``."""
    sys.modules[module_name].__class__ = _OpModule


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.ops.{name}")
    if name == "dpm_solver_2m_step":
        return importlib.import_module("fastdiff.ops.sampler_step").dpm_solver_2m_step
    raise AttributeError(f"module 'fastdiff.ops' has no attribute {name!r}")
