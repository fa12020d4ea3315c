"""Regression tests of review 14b (session-14 changes: unipc_step CPU kernel, unoptimize,
guidance_rescale, dpm++ custom timesteps, LMS / DEIS weights)."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")

from test_optimize import unet2d  # noqa: E402


@torch.no_grad()
def test_unoptimize_after_optimizing_twice_restores_nchw_weights():
    """optimize(channels_last=True) then optimize(channels_last=False) (or the CPU default, then
    False): the second report said channels_last=False, so unoptimize() left the weights
    channels_last that the first call had converted (outputs no longer diffusers' bitwise)."""
    model = unet2d()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = model(x, t).sample
    strides = [p.stride() for p in model.parameters()]
    fastdiff.optimize(model, channels_last=True)
    fastdiff.optimize(model, channels_last=False)  # converts nothing back (documented)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.fastdiff_report.channels_last  # the weights are channels_last: it says so
    fastdiff.unoptimize(model)
    assert [p.stride() for p in model.parameters()] == strides
    assert torch.equal(model(x, t).sample, ref)
