"""Device facts the Triton launchers size their grids by, read once per device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (a ``torch.device`` of type cuda or an
    index), cached: the launchers ask on every call, and the property lookup is host time."""
    if isinstance(device, torch.device):
        device = device.index if device.index is not None else torch.cuda.current_device()
    return _sms(int(device))
