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


@pytest.mark.parametrize("kind", ["unet2d", "vae"])
def test_optimize_and_unoptimize_keep_an_eval_model_in_eval_mode(kind):
    """optimize() replaced conv_act by a new nn.Identity and unoptimize() put back a new
    nn.SiLU, both in training mode: an eval() model (UNet2DModel's conv_act, the VAE encoder's
    / decoder's) came back with modules in training mode; a train() model stays in train."""
    from test_unoptimize import _vae

    model = (unet2d() if kind == "unet2d" else _vae()).eval()
    fastdiff.optimize(model)
    assert not [n for n, m in model.named_modules() if m.training]
    fastdiff.unoptimize(model)
    assert not [n for n, m in model.named_modules() if m.training]
    model.train()
    fastdiff.optimize(model)
    assert all(m.training for m in model.modules())
    fastdiff.unoptimize(model)
    assert all(m.training for m in model.modules())
