"""fastdiff: diffusion sampling on fused kernels.

    >>> import fastdiff
    >>> x = fastdiff.sample(model, steps=50)          # doctest: +SKIP

Public names are imported lazily so that ``import fastdiff`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastdiff._dispatch import (
    BACKENDS,
    available_backends,
    backend_available,
    dispatch_table,
    set_backend,
    use_backend,
)
from fastdiff._info import build_info

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str | None]] = {
    "sample": ("fastdiff.api", "sample"),
    "invert": ("fastdiff.inversion", "invert"),
    "repaint": ("fastdiff.repaint", "repaint"),
    "to_images": ("fastdiff.api", "to_images"),
    "NoiseSchedule": ("fastdiff.schedules", "NoiseSchedule"),
    "optimize": ("fastdiff.integrations.diffusers", "optimize"),
    "unoptimize": ("fastdiff.integrations.unoptimize", "unoptimize"),
    "train": ("fastdiff.training", "train"),
    "ops": ("fastdiff.ops", None),
    "nn": ("fastdiff.nn", None),
    "samplers": ("fastdiff.samplers", None),
    "models": ("fastdiff.models", None),
    "schedules": ("fastdiff.schedules", None),
}

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_available",
    "build_info",
    "dispatch_table",
    "set_backend",
    "use_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        module = importlib.import_module(mod)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
