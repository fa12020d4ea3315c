"""torch.compile and the dispatch seam: a compiled sampler step resolves its backend each time
it runs (use_backend / set_backend per call, a requested backend that cannot run raises then),
and sample()'s channels_last conversion of a model with 5-D weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES
from torch import nn

import fastdiff
from fastdiff.ops import sampler_step as smod

_OPS = ["sampler_step", "dpm_solver_2m_step"]


def _coef(device: str = "cpu") -> torch.Tensor:
    ab, ab_prev = 0.5, 0.7
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    vals = [math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_prev),
            math.sqrt(1 - ab_prev - var), 0.1, math.sqrt(var), 0.0, 0.0]  # fmt: skip
    return torch.tensor(vals, dtype=torch.float64).float().to(device)


def _compiled(op: str, coef: torch.Tensor):
    """A fullgraph-compiled function calling ``op`` (clipping, and Philox noise for the
    sampler step, so the kernels' extra paths are part of the graph)."""
    gs = torch.tensor([7, 0], device=coef.device)
    if op == "sampler_step":

        def fn(x, mo, prev):
            return smod.sampler_step(x, mo, coef, clip_range=1.0, generator_state=gs)
    else:

        def fn(x, mo, prev):
            return smod.dpm_solver_2m_step(x, mo, coef, prev, clip_range=1.0)[0]

    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _spy(monkeypatch, op: str) -> list[str]:
    """Records the backend each run of ``op``'s implementation gets (the argument the op's body
    passes on after resolving it)."""
    ran: list[str] = []
    name, slot = ("_sampler_step_impl", 5) if op == "sampler_step" else ("_dpm_2m_impl", 6)
    orig = getattr(smod, name)

    def spy(*args):
        ran.append(args[slot])
        return orig(*args)

    monkeypatch.setattr(smod, name, spy)
    return ran


def _inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (2, 3, 5, 3)  # odd sizes
    return tuple(torch.randn(shape, device=device) for _ in range(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", _OPS)
def test_compiled_sampler_op_follows_use_backend_per_call(op, device, monkeypatch):
    """A function compiled once must run the backend in force at each call, not the one of its
    first trace (README: use_backend wins; there is no silent fallback)."""
    ran = _spy(monkeypatch, op)
    fn = _compiled(op, _coef(device))
    x, mo, prev = _inputs(device)
    auto = fastdiff._dispatch.resolve(op, torch.device(device))
    ref = fn(x, mo, prev)
    assert ran == [auto]
    others = [b for b in fastdiff.available_backends(op, device) if b != auto]
    assert "torch" in others or auto == "torch"
    for b in others:
        ran.clear()
        with fastdiff.use_backend(b):
            got = fn(x, mo, prev)
        assert ran == [b]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ran.clear()
    fn(x, mo, prev)  # the context is gone: the automatic choice again
    assert ran == [auto]


@pytest.mark.parametrize("op", _OPS)
def test_compiled_sampler_op_follows_set_backend_and_op_scoped_requests(op, monkeypatch):
    ran = _spy(monkeypatch, op)
    fn = _compiled(op, _coef())
    x, mo, prev = _inputs()
    auto = fastdiff._dispatch.resolve(op, torch.device("cpu"))
    other = "torch" if auto != "torch" else None
    if other is None:
        pytest.skip("only the torch backend runs here")
    fn(x, mo, prev)
    try:
        fastdiff.set_backend(other, op=op)
        fn(x, mo, prev)
    finally:
        fastdiff.set_backend(None, op=op)
    with fastdiff.use_backend(other, op="attention"):  # another op's request: not this one's
        fn(x, mo, prev)
    assert ran == [auto, other, auto]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", _OPS)
def test_compiled_sampler_op_raises_for_an_unavailable_requested_backend(op, device):
    fn = _compiled(op, _coef(device))
    x, mo, prev = _inputs(device)
    fn(x, mo, prev)  # traced with the automatic choice
    other = "cuda" if device == "cpu" else "cpu"  # a backend for the other device's tensors
    with fastdiff.use_backend(other), pytest.raises(RuntimeError, match=f"'{other}' was requested"):
        fn(x, mo, prev)
    with fastdiff.use_backend("sdpa"), pytest.raises(RuntimeError, match="'sdpa' was requested"):
        fn(x, mo, prev)


@pytest.mark.parametrize("op", _OPS)
def test_op_with_auto_backend_passes_opcheck(op):
    x, mo, prev = _inputs()
    coef = _coef()
    if op == "sampler_step":
        args = (x, mo, coef, None, torch.tensor([3, 0]), "auto", 0, 1.0, False, None, False, True)
        torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args)
    else:
        args = (x, mo, coef, prev, None, None, "auto", 1, None, None)
        torch.library.opcheck(torch.ops.fastdiff.dpm_solver_2m_step.default, args)


def test_eager_call_never_passes_auto(monkeypatch):
    """The eager paths keep resolving before the op (the fast paths need the backend)."""
    seen: list[str] = []
    orig = smod._sampler_step_impl
    monkeypatch.setattr(smod, "_sampler_step_impl", lambda *a: (seen.append(a[5]), orig(*a))[1])
    x, mo, _ = _inputs()
    with fastdiff.use_backend("torch"):
        smod.sampler_step(x.requires_grad_(), mo, _coef())  # autograd: through the custom op
    assert seen == ["torch"]


# ------------------------------------------------------------- sample(): channels_last models
class _Mixed(nn.Module):
    """A Conv2d and a Conv3d (5-D weight, as UNet3DConditionModel's temporal convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv1x1 = nn.Conv2d(3, 3, 1)
        self.conv2b = nn.Conv2d(3, 3, 3, padding=1)
        self.conv3 = nn.Conv3d(3, 3, (1, 3, 3), padding=(0, 1, 1))
        self.register_buffer("scale5d", torch.rand(1, 3, 1, 1, 1) + 0.5)
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        y = self.conv2b(self.conv1x1(self.conv2(x)))
        return (self.conv3(y.unsqueeze(2)) * self.scale5d).squeeze(2) * 0.1


def _sample(model, **kw):
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    return fastdiff.sample(model, steps=2, noise=noise, **kw)


def test_sample_channels_last_converts_a_model_with_5d_weights():
    torch.manual_seed(0)
    model = _Mixed()
    ref = _sample(_copy(model), channels_last=False)
    params = dict(model.named_parameters())
    w3 = model.conv3.weight.detach().clone()
    out = _sample(model, channels_last=True)
    assert model.layouts and all(model.layouts)
    cl = torch.channels_last
    for m in (model.conv2, model.conv1x1, model.conv2b):  # restrided as model.to() does
        want = m.weight.detach().to(memory_format=torch.contiguous_format).to(memory_format=cl)
        assert m.weight.stride() == want.stride()
    assert model.conv1x1.weight.stride() != torch.empty(3, 3, 1, 1).stride()
    assert torch.equal(model.conv3.weight, w3) and model.conv3.weight.is_contiguous()
    assert model.scale5d.is_contiguous()
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sample_default_layout_on_a_partly_channels_last_model_with_5d_weights():
    """channels_last=None follows the weights (first unambiguous conv channels_last): the
    remaining 4-D weights are converted, the 5-D ones left as they are."""
    torch.manual_seed(0)
    model = _Mixed()
    ref = _sample(_copy(model), channels_last=False)
    with torch.no_grad():
        w = model.conv2.weight
        w.data = w.data.contiguous(memory_format=torch.channels_last)
    out = _sample(model)
    assert model.layouts and all(model.layouts)
    assert model.conv2b.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1x1.weight.stride() == (3, 1, 3, 3)  # restrided as model.to() does
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _copy(model: nn.Module) -> nn.Module:
    twin = _Mixed()
    twin.load_state_dict(model.state_dict())
    return twin
