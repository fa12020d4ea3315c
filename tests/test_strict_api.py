"""Strict checks of fastdiff.sample's plumbing (mutation testing, round 2): conditioning kwargs
under guidance, learned variance read from a config, encoder_hidden_states' dtype, and the
CUDA-graph capture cache (on CPU with a fake graph that replays the captured step's body)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import api


class _AffineNet(nn.Module):
    """eps = 0.3 x + a per-sample bias from a batched kwarg ``extra`` [N] (and a class shift)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1, 1))
        self.in_channels, self.sample_size = 3, 4
        self.null_class = 4
        self.emb = nn.Embedding(5, 3)

    def forward(self, x, t, class_labels, extra):
        return (
            0.3 * torch.tanh(self.w * x)
            + self.emb(class_labels)[:, :, None, None]
            + extra.reshape(-1, 1, 1, 1)
        )


def test_guidance_repeats_batched_model_kwargs_for_both_halves():
    """With guidance the model sees [x, x]: a batch-N model kwarg must come as [v, v]."""
    torch.manual_seed(0)
    net = _AffineNet().eval()
    noise = torch.randn(3, 3, 4, 4)
    extra = torch.randn(3)
    cond = torch.tensor([0, 2, 1])
    out = fastdiff.sample(net, steps=3, noise=noise, cond=cond, guidance_scale=2.0,
                          model_kwargs={"extra": extra})  # fmt: skip
    for k in range(3):
        one = fastdiff.sample(
            net,
            steps=3,
            noise=noise[k : k + 1],
            cond=cond[k : k + 1],
            guidance_scale=2.0,
            model_kwargs={"extra": extra[k : k + 1]},
        )
        torch.testing.assert_close(out[k : k + 1], one, rtol=1e-5, atol=1e-5)


class _ConfigLV(nn.Module):
    """A learned-variance model known only from its config (out_channels == 2 in_channels)."""

    def __init__(self):
        super().__init__()
        self.config = {"in_channels": 2, "out_channels": 4, "sample_size": 4}
        self.w = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x, t):
        return 0.5 * torch.tanh(self.w * torch.cat([x, -x], 1))


def test_learned_variance_from_config_drops_the_variance_channels_for_ddim():
    torch.manual_seed(0)
    net = _ConfigLV().eval()
    noise = torch.randn(2, 2, 4, 4)
    out = fastdiff.sample(net, steps=3, noise=noise)
    ref = fastdiff.sample(lambda x, t: net(x, t)[:, :2], steps=3, noise=noise)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class _CtxNet(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.proj = nn.Linear(4, 3).to(dtype)
        self.null_cond = torch.zeros(1, 2, 4)

    def forward(self, x, t, encoder_hidden_states):
        return 0.3 * x + self.proj(encoder_hidden_states.mean(1))[:, :, None, None]


def test_encoder_hidden_states_follow_the_models_dtype():
    """fp32 conditioning for a bf16 model: cast to the model's dtype (else Linear raises)."""
    torch.manual_seed(0)
    net = _CtxNet(torch.bfloat16).eval()
    ctx = torch.randn(2, 2, 4)
    out = fastdiff.sample(
        net,
        steps=2,
        shape=(3, 2, 2),
        batch_size=2,
        cond=ctx,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _graphed(model, **kw):
    """sample(cuda_graph=True) on CPU: the device check is for real CUDA, so call the loop."""
    from fastdiff._conditioning import model_kwargs_for
    from fastdiff._sampler_setup import resolve_sampler

    gs = kw.pop("guidance_scale", None)
    noise = kw.pop("noise")
    cond = kw.pop("cond", None)
    mkw = kw.pop("model_kwargs", None)
    smp = resolve_sampler(model, kw.pop("sampler"), kw.pop("steps"), None, None, gs, kw)
    kwargs = model_kwargs_for(model, cond, None, gs, mkw, noise.shape[0], noise.device,
                              noise.dtype)  # fmt: skip
    return api._sample_graphed(model, smp, noise.clone(), kwargs, gs, None, False, None, False)


@torch.no_grad()
def test_graph_cache_is_keyed_by_the_guidance_scale(fake_cuda_graphs):
    torch.manual_seed(0)
    net = _AffineNet().eval()
    fwd = net.forward
    net.forward = lambda x, t, class_labels: fwd(x, t, class_labels, torch.ones(x.shape[0]))
    noise = torch.randn(2, 3, 4, 4)
    cond = torch.tensor([0, 3])
    for gs in (2.0, 5.0):
        got = _graphed(net, sampler="ddim", steps=3, noise=noise, cond=cond, guidance_scale=gs)
        ref = fastdiff.sample(net, sampler="ddim", steps=3, noise=noise, cond=cond,
                              guidance_scale=gs)  # fmt: skip
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(fake_cuda_graphs) == 2


@torch.no_grad()
def test_graphed_dpm_solver_reuse_starts_without_history(fake_cuda_graphs):
    """A cached DPM-Solver++ graph run twice: the second run equals the first (history reset)."""
    torch.manual_seed(0)
    net = _ConfigLV().eval()
    net.config = {"in_channels": 2, "out_channels": 2, "sample_size": 4}
    fwd = net.forward
    net.forward = lambda x, t: fwd(x, t)[:, :2]
    noise = torch.randn(2, 2, 4, 4)
    first = _graphed(net, sampler="dpm++", steps=4, noise=noise)
    second = _graphed(net, sampler="dpm++", steps=4, noise=noise)
    assert len(fake_cuda_graphs) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    ref = fastdiff.sample(net, sampler="dpm++", steps=4, noise=noise)
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_graph_cache_is_keyed_by_the_kwargs_dtype(fake_cuda_graphs):
    """The capture's static kwarg buffers keep their dtype: a kwarg of another dtype recaptures."""

    def model(x, t, extra):
        sign = 1.0 if extra.dtype == torch.float64 else -1.0
        return (0.3 * x + sign * extra.reshape(-1, 1, 1, 1)).to(x.dtype)

    torch.manual_seed(0)
    model.in_channels, model.sample_size = 2, 3
    noise = torch.randn(2, 2, 3, 3)
    extra = torch.randn(2)
    for dt in (torch.float64, torch.float32):
        kw = {"extra": extra.to(dt)}
        got = _graphed(model, sampler="ddim", steps=3, noise=noise, model_kwargs=kw)
        ref = fastdiff.sample(model, sampler="ddim", steps=3, noise=noise, model_kwargs=kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(fake_cuda_graphs) == 2


@pytest.mark.parametrize("w", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_guidance_scale_is_a_value_error(w):
    net = _AffineNet().eval()
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
        fastdiff.sample(net, steps=2, batch_size=1, cond=torch.tensor([1]), guidance_scale=w,
                        model_kwargs={"extra": torch.ones(1)})  # fmt: skip


@pytest.mark.parametrize("shape", [(3, 0, 4), (0, 2, 2)])
def test_zero_sized_shape_is_a_value_error(shape):
    with pytest.raises(ValueError, match="shape: expected positive sizes"):
        fastdiff.sample(lambda x, t: x, steps=2, shape=shape)


@pytest.mark.parametrize("shape", [(3, 4.5, 4), (3, True, 4), "344", (3, "4", 4)])
def test_non_integer_shape_is_a_type_error(shape):
    """shape=(3, 4.5, 4) was truncated to (3, 4, 4) by int(): samples of another shape than
    asked for."""
    with pytest.raises(TypeError, match="shape: expected"):
        fastdiff.sample(lambda x, t: x, steps=2, shape=shape)


def test_numpy_shape_and_batch_size_are_taken():
    import numpy as np

    x = fastdiff.sample(lambda x, t: x, steps=2, shape=(np.int64(2), 3), batch_size=np.int32(2))
    assert x.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        fastdiff.sample(lambda x, t: x, steps=2, shape=(2, 3), batch_size=2.0)


def test_non_square_sample_size_from_config_keeps_its_order():
    class Rect(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = {"in_channels": 2, "sample_size": (3, 5)}
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return 0.1 * self.w * x

    out = fastdiff.sample(Rect().eval(), steps=2, batch_size=2)
    assert out.shape == (2, 2, 3, 5)


def test_batch_one_tensors_inside_a_dict_kwarg_are_expanded_to_the_batch():
    """diffusers' added_cond_kwargs-style dict: a batch-1 tensor inside is expanded to batch N."""
    seen = []

    def model(x, t, added):
        seen.append(added["a"].shape[0])
        return 0.3 * x + added["a"].reshape(-1, 1, 1, 1)

    model.in_channels, model.sample_size = 2, 3
    fastdiff.sample(
        model, steps=2, batch_size=3, model_kwargs={}, cond={"added": {"a": torch.ones(1)}}
    )
    assert seen and all(b == 3 for b in seen)
