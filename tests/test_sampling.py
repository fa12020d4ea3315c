"""fastdiff.nn.Upsample's folded path: nearest 2x + 3x3 conv as one stride-2 transposed conv."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fa_rule

from fastdiff.nn import Upsample, sampling
from fastdiff.nn.sampling import fold_upsample_conv


@pytest.fixture(autouse=True)
def always_fold(monkeypatch, request):
    """The tests below use small maps: fold at any size (fold_pays is tested on its own)."""
    if "fold_threshold" not in request.node.name:
        monkeypatch.setattr(sampling, "FOLD_MIN_PIXELS", {False: 0, True: 0})


def _reference(x, conv):
    """The definition: nearest 2x upsampling, then the 3x3 conv (float64)."""
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    return F.conv2d(up, conv.weight.double(), conv.bias.double(), padding=1)


def _eager(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 16, 1, 1), (3, 8, 4, 9), (1, 32, 16, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_upsample_matches_definition(shape, channels_last):
    torch.manual_seed(sum(shape))
    up = Upsample(shape[1])
    x = torch.randn(shape)
    if channels_last:
        up = up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = up(x)
        eager = _eager(x, up.conv)
    assert out.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert_fa_rule(out, _reference(x, up.conv), eager, name=f"{shape} cl={channels_last}")
    if channels_last and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_folded_weight_is_a_w_at():
    """W' = A W A^T per axis, checked on a one-hot 3x3 kernel against the hand derivation."""
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 0, 2] = 1.0  # tap (dy=-1, dx=+1)
    folded = fold_upsample_conv(w)[0, 0]
    # rows: tap w0 goes to k = 2, 3; columns: tap w2 goes to k = 0, 1
    expect = torch.zeros(4, 4)
    expect[2:, :2] = 1.0
    assert torch.equal(folded, expect)


def test_nan_and_inf_propagate():
    """NaN masks equal the definition's. With an inf input the definition adds w1*inf + w2*inf,
    which is NaN where the taps have opposite signs, while the folded kernel multiplies
    (w1 + w2)*inf: the limit value. Same non-finite positions, possibly inf for NaN."""
    torch.manual_seed(1)
    up = Upsample(4)
    x = torch.randn(1, 4, 6, 5)
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        out, ref = up(x), _reference(x, up.conv)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    x = torch.randn(1, 4, 6, 5)
    x[0, 2, 0, 0] = float("inf")
    with torch.no_grad():
        out, ref = up(x), _reference(x, up.conv)
    assert (~ref.isfinite()).any()
    assert torch.equal(out.isfinite(), ref.isfinite())


@pytest.mark.parametrize("how", ["in-place", "data", "inference-mode-then-grad"])
def test_weight_updates_are_always_seen(how):
    """No folded weight is cached: in-place and ``.data`` updates (EMA swaps) are seen at once,
    and a forward under inference_mode leaves nothing that breaks a later autograd forward."""
    torch.manual_seed(2)
    up = Upsample(4)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        first = up(x)
    if how == "in-place":
        with torch.no_grad():
            up.conv.weight.mul_(-0.5)
    elif how == "data":
        up.conv.weight.data.copy_(torch.randn_like(up.conv.weight))
    else:
        up.requires_grad_(False)
        with torch.inference_mode():
            up(x)
        xg = x.clone().requires_grad_(True)
        up(xg).sum().backward()  # would raise if an inference tensor had been kept
        assert xg.grad is not None
        up.conv.weight.data.mul_(2.0)
    with torch.no_grad():
        second, eager = up(x), _eager(x, up.conv)
    assert not torch.allclose(first, second)
    assert_fa_rule(second, _reference(x, up.conv), eager, name=how)


def test_hooked_or_replaced_conv_runs_as_a_module():
    """A hook (pruning, LoRA wrappers, ...) or a parametrization must see the conv called."""
    torch.manual_seed(5)
    up = Upsample(4)
    x = torch.randn(1, 4, 3, 3)
    calls = []
    handle = up.conv.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        up(x)
    handle.remove()
    assert calls == [torch.Size([1, 4, 6, 6])]

    class Negate(torch.nn.Module):
        def forward(self, w):
            return -w

    torch.nn.utils.parametrize.register_parametrization(up.conv, "weight", Negate())
    with torch.no_grad():
        torch.testing.assert_close(up(x), _eager(x, up.conv), rtol=0, atol=0)


def test_float64_fold_is_exact():
    torch.manual_seed(6)
    up = Upsample(3).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(up(x), _eager(x, up.conv), rtol=1e-12, atol=1e-12)


def test_gradients_match_the_definition():
    torch.manual_seed(3)
    up = Upsample(3)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    g = torch.randn(2, 3, 8, 10)
    up(x).backward(g)
    got = (x.grad.clone(), up.conv.weight.grad.clone(), up.conv.bias.grad.clone())
    x.grad = None
    up.zero_grad()
    _eager(x, up.conv).backward(g)
    want = (x.grad, up.conv.weight.grad, up.conv.bias.grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_and_attributes_unchanged():
    up = Upsample(4)
    before = set(vars(up))
    with torch.no_grad():
        up(torch.randn(1, 4, 3, 3))
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}
    assert set(vars(up)) == before  # nothing cached on the module


def test_fold_rejects_non_3x3():
    with pytest.raises(ValueError, match="3 x 3"):
        fold_upsample_conv(torch.randn(4, 4, 5, 5))


def test_torch_compile_fullgraph():
    """The folded path traces without graph breaks (the fold is recomputed inside the graph)."""
    torch.manual_seed(4)
    up = Upsample(4).eval()
    x = torch.randn(2, 4, 5, 3)
    compiled = torch.compile(up, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), up(x), rtol=1e-6, atol=1e-6)


def test_fold_matrix_cached_under_inference_mode_serves_autograd():
    """The cached kron(A, A) constant is built outside inference mode even when the first call
    runs inside it, so a later autograd forward may save it for backward."""
    from fastdiff.nn import sampling

    sampling._KRON.clear()
    torch.manual_seed(7)
    up = Upsample(4)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        up(x)
    assert not any(k.is_inference() for k in sampling._KRON.values())
    xg = x.clone().requires_grad_(True)
    up(xg).sum().backward()
    assert xg.grad is not None and up.conv.weight.grad is not None


@pytest.mark.parametrize(
    "shape,channels_last,folds",
    [((1, 8, 4, 4), False, False), ((1, 8, 8, 8), False, True), ((4, 8, 4, 4), False, True),
     ((1, 8, 8, 8), True, False), ((4, 8, 4, 4), True, False), ((1, 8, 16, 16), True, True),
     ((16, 8, 4, 4), True, True)],
)  # fmt: skip
def test_fold_threshold(shape, channels_last, folds, monkeypatch):
    """The fold runs where it is faster (N*H*W >= 64 NCHW, >= 256 channels_last); smaller maps
    take nearest 2x + conv. Both give the definition's result: the FA rule, plus for the fold the
    error its folded weights add. Each is a sum of up to 4 of the 3x3 weights rounded in fp32
    (<= 3u sum|w|, u = 2^-24), so an output moves by <= 3u (|W| * nearest2x(|x|)); eager has no
    such term. At atol 0, (1, 8, 16, 16) channels_last failed on 2 of 200 seeds (oneDNN's
    transposed conv, 1.21x the bound); with the floor 0 of 200 (max 0.43), every shape <= 0.43."""
    calls = []
    real = sampling.upsample_conv
    monkeypatch.setattr(sampling, "upsample_conv", lambda x, c: calls.append(1) or real(x, c))
    torch.manual_seed(7)
    up = Upsample(shape[1])
    x = torch.randn(shape)
    if channels_last:
        up = up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    assert sampling.fold_pays(x) is folds
    with torch.no_grad():
        out = up(x)
    assert bool(calls) is folds
    floor = 0.0
    if folds:
        near = F.interpolate(x.double().abs(), scale_factor=2.0, mode="nearest")
        floor = 3 * 2.0**-24 * F.conv2d(near, up.conv.weight.double().abs(), padding=1).max().item()
    assert_fa_rule(out, _reference(x, up.conv), _eager(x, up.conv), atol=floor, name=str(shape))


def test_fold_pays_only_for_4d_maps():
    assert not sampling.fold_pays(torch.randn(64, 32, 32))  # [C x H x W]: never folded
    assert sampling.fold_pays(torch.randn(1, 4, 16, 16))
