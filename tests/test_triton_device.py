"""The Triton launchers' SM count (fastdiff.kernels.triton._device): read once per device,
whichever launcher asks, and the grid sizes built from it (faked CUDA properties on the CPU)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from fastdiff.kernels.triton import _device, sampler_step  # noqa: E402


@pytest.fixture
def fake_props(monkeypatch):
    """torch.cuda.get_device_properties faked: device i has 100 + i SMs; the calls recorded."""
    calls: list[int] = []

    def props(index):
        calls.append(index)
        return types.SimpleNamespace(multi_processor_count=100 + index)

    _device._sms.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    yield calls
    _device._sms.cache_clear()


def test_sm_count_is_read_once_per_device(fake_props):
    for _ in range(5):
        assert _device.sm_count(torch.device("cuda", 0)) == 100
        assert _device.sm_count(2) == 102
    assert _device.sm_count(torch.device("cuda")) == 101  # no index: the current device
    assert sorted(fake_props) == [0, 1, 2]


def test_grid_stride_launch_size(fake_props):
    """16 programs per SM on a GPU, at most one per tile, at least one; 4 under the interpreter."""

    def on(dev: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(device=torch.device(dev))

    assert sampler_step.grid(on("cuda:0"), 10**9) == (1600,)
    assert sampler_step.grid(on("cuda:3"), 10**9) == (1648,)
    assert sampler_step.grid(on("cuda:0"), 7) == (7,)
    assert sampler_step.grid(on("cuda:0"), 0) == (1,)
    assert sampler_step.grid(on("cpu"), 10**9) == (4,)
    assert fake_props.count(0) == 1
