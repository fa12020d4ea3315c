"""User-level misuse and edge cases of the public ops and nn modules (exploration, session 6)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_cases, case_id
from torch import nn

import fastdiff
from fastdiff.nn import Attention, GroupNormSiLU, fuse_group_norm_silu
from fastdiff.nn.stacked import stacked_linear
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step


# ------------------------------------------------------------------ fuse_group_norm_silu
class _GatedSequential(nn.Sequential):
    """A Sequential subclass whose forward does not run its children in order."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x) + emb)


class _SteepSiLU(nn.SiLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(2 * x)


def test_fuse_leaves_sequential_subclass_with_own_forward_alone():
    torch.manual_seed(0)
    net = _GatedSequential(nn.GroupNorm(4, 8), nn.SiLU())
    x, emb = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 1, 1)
    want = net(x, emb)
    assert fuse_group_norm_silu(net) == 0
    torch.testing.assert_close(net(x, emb), want)


def test_fuse_leaves_silu_subclass_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.GroupNorm(4, 8), _SteepSiLU())
    x = torch.randn(2, 8, 3, 3)
    want = net(x)
    assert fuse_group_norm_silu(net) == 0
    torch.testing.assert_close(net(x), want)


def test_fuse_still_fuses_plain_sequential_subclass():
    class Plain(nn.Sequential):  # no forward of its own: runs children in order
        pass

    torch.manual_seed(0)
    net = Plain(nn.GroupNorm(4, 8), nn.SiLU(inplace=True))
    nn.init.normal_(net[0].weight)
    x = torch.randn(2, 8, 3, 3)
    want = net(x)
    assert fuse_group_norm_silu(net) == 1
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ stacked_linear
@pytest.mark.parametrize("lead", [(), (4,), (4, 8), (2, 3, 8)])
def test_stacked_linear_any_leading_dims(lead):
    """[lin(x) for lin in lins] for x [... x E], also when a leading dim equals sum(C_i)."""
    torch.manual_seed(0)
    lins = [nn.Linear(10, 3), nn.Linear(10, 5)]
    x = torch.randn(*lead, 10)
    got = stacked_linear(lins, x)
    assert got is not None
    for g, lin in zip(got, lins, strict=True):
        assert g.shape == (*lead, lin.out_features)
        torch.testing.assert_close(g, lin(x))


# -------------------------------------------------------------------- sampler_step coef
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("shape", [(2, 4), (8, 1), (1, 8)])
def test_sampler_coef_must_be_one_dimensional(case, shape):
    device, backend = case
    x = torch.randn(2, 3, 4, 5, device=device)
    coef = torch.rand(8, device=device).reshape(shape)
    msg = r"coef must have >= 8 elements in one dimension, got shape"
    with fastdiff.use_backend(backend):
        with pytest.raises(ValueError, match=msg):
            sampler_step(x, x, coef)
        with pytest.raises(ValueError, match=msg):
            dpm_solver_2m_step(x, x, coef)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"guidance_scale": "2"}, TypeError, "guidance_scale must be a real number"),
        ({"guidance_scale": True}, TypeError, "guidance_scale must be a real number"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be finite"),
        ({"guidance_scale": [2.0]}, TypeError, "guidance_scale must be a real number"),
        ({"clip_range": "1.0"}, TypeError, "clip_range must be a real number"),
        ({"clip_range": "a"}, TypeError, "clip_range must be a real number"),
        ({"clip_range": float("nan")}, ValueError, "clip_range must be a float >= 0"),
    ],
)
def test_sampler_scalar_options_are_type_checked(kw, exc, match):
    x = torch.randn(2, 3, 4, 5)
    mo = torch.cat([x, x]) if "guidance_scale" in kw else x
    coef = torch.rand(8)
    with pytest.raises(exc, match=match):
        sampler_step(x, mo, coef, **kw)
    with pytest.raises(exc, match=match):
        dpm_solver_2m_step(x, mo, coef, **kw)


def test_sampler_scalar_options_accept_ints_and_numpy():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    x, coef = torch.randn(2, 3, 4, 5), torch.rand(8) + 0.1
    mo = torch.randn(4, 3, 4, 5)
    want = sampler_step(x, mo, coef, guidance_scale=2.0, clip_range=1.0)
    for g, c in ((2, 1), (np.float32(2.0), np.float64(1.0)), (np.int64(2), 1.0)):
        torch.testing.assert_close(sampler_step(x, mo, coef, guidance_scale=g, clip_range=c), want)


# ------------------------------------------------------------------ module constructors
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GroupNormSiLU(0, 8), "num_groups must be a positive int"),
        (lambda: GroupNormSiLU(-2, 8), "num_groups must be a positive int"),
        (lambda: Attention(64, num_heads=0, num_groups=8), "num_heads must be a positive int"),
        (lambda: Attention(64, head_dim=0, num_groups=8), "head_dim must be a positive int"),
        (lambda: Attention(64, num_heads=-2, num_groups=8), "num_heads must be a positive int"),
    ],
)
def test_module_constructors_name_bad_sizes(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------- Attention context
def test_attention_context_width_is_checked():
    torch.manual_seed(0)
    block = Attention(64, num_heads=2, num_groups=8, context_dim=24)
    x = torch.randn(2, 64, 3, 3)
    with pytest.raises(ValueError, match=r"context must be \[B=2 x Lc x 24\], got \(2, 7, 20\)"):
        block(x, torch.randn(2, 7, 20))


def test_attention_module_deepcopy_fp16_matches_reference():
    from fastdiff.nn.attention import _reference_forward

    torch.manual_seed(0)
    block = Attention(64, head_dim=32, num_groups=8, context_dim=24)
    nn.init.normal_(block.to_out.weight, std=0.1)
    x, ctx = torch.randn(2, 64, 3, 5), torch.randn(2, 7, 24)
    half = copy.deepcopy(block).half()
    got = half(x.half().to(memory_format=torch.channels_last), ctx.half()).float()
    x16, ctx16 = x.half(), ctx.half()
    want64 = _reference_forward(copy.deepcopy(half).double(), x16.double(), ctx16.double())
    eager = _reference_forward(half, x.half(), ctx.half()).float()
    err, err_eager = (got - want64).abs().max(), (eager - want64).abs().max()
    assert err <= 2 * err_eager + 1e-3


def test_group_norm_silu_module_grads_match_eager_in_float64():
    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 4).double()
    nn.init.normal_(gn.weight)
    m = GroupNormSiLU.from_group_norm(gn)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: m(t, add=t.mean(-1)), (x,))
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    got = torch.autograd.grad(m(x), (x, gn.weight), g)
    want = torch.autograd.grad(F.silu(gn(x)), (x, gn.weight), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------- group_norm_silu: dynamic shapes, empty
def test_group_norm_silu_compiles_for_a_second_batch_size():
    """torch.compile marks a changed size dynamic on the second shape (automatic dynamic)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    torch._dynamo.reset()
    w, b = torch.randn(8), torch.randn(8)

    def fn(x, add):
        return group_norm_silu(x, 4, w, b, add=add)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for n, h in ((2, 4), (3, 4), (5, 6)):
        x, add = torch.randn(n, 8, h, 3), torch.randn(n, 8)
        torch.testing.assert_close(compiled(x, add), fn(x, add))
    block = Attention(64, head_dim=32, num_groups=8)
    compiled_block = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (1, 2):
        x = torch.randn(n, 64, 3, 2)
        torch.testing.assert_close(compiled_block(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", backend_cases("group_norm_silu"), ids=case_id)
@pytest.mark.parametrize("shape", [(0, 8, 3), (2, 8, 0), (0, 8, 2, 2)])
def test_group_norm_silu_empty_input_on_a_requested_backend(case, shape):
    from fastdiff.ops.group_norm_silu import group_norm_silu

    device, backend = case
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    add = torch.randn(shape[0], 8, device=device, requires_grad=True)
    with fastdiff.use_backend(backend):
        y = group_norm_silu(x, 4, w, None, add=add)
    assert y.shape == x.shape
    gx, gw, ga = torch.autograd.grad(y.sum(), (x, w, add), allow_unused=True)
    assert gx.shape == x.shape and ga.shape == add.shape
    assert gw is None or torch.equal(gw, torch.zeros_like(w))


# ------------------------------------------------------------------ scalars from numpy
def test_numpy_scalars_are_accepted_like_python_numbers():
    np = pytest.importorskip("numpy")
    from fastdiff.ops.attention import attention
    from fastdiff.ops.group_norm_silu import group_norm_silu

    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 3)
    want = group_norm_silu(x, 4, eps=1e-3)
    torch.testing.assert_close(group_norm_silu(x, np.int64(4), eps=np.float32(1e-3)), want)
    torch.testing.assert_close(GroupNormSiLU(np.int64(4), np.int64(8))(x), group_norm_silu(x, 4))
    q = torch.randn(1, 2, 5, 32)
    want = attention(q, q, q, scale=0.25)
    torch.testing.assert_close(attention(q, q, q, scale=np.float32(0.25)), want)
    with pytest.raises(TypeError, match="scale must be a float or None, got bool"):
        attention(q, q, q, scale=True)
    with pytest.raises(TypeError, match="num_groups must be a positive int, got True"):
        group_norm_silu(x, True)
    with pytest.raises(TypeError, match="num_groups must be a positive int, got '4'"):
        group_norm_silu(x, "4")


# -------------------------------------------------------------------- timestep_embedding
@pytest.mark.parametrize("t", [torch.tensor(5), torch.tensor([[1, 2]]), [1, 2]])
def test_timestep_embedding_names_bad_t(t):
    from fastdiff.nn import timestep_embedding

    exc = TypeError if isinstance(t, list) else ValueError
    with pytest.raises(exc, match=r"timestep_embedding: t must be a 1-D tensor \[N\], got"):
        timestep_embedding(t, 16)


def test_op_modules_are_callable_as_their_op():
    """`fastdiff.ops.group_norm_silu(x, g)` and `fastdiff.ops.attention(q, k, v)` (the issue texts'
    spelling) call the op; the module attributes stay reachable."""
    import fastdiff.ops

    x = torch.randn(2, 6, 5, 3)
    ref = fastdiff.ops.group_norm_silu.group_norm_silu(x, 3, add=torch.randn(2, 6))
    torch.manual_seed(1)
    add = torch.randn(2, 6)
    got = fastdiff.ops.group_norm_silu(x, 3, add=add)
    torch.testing.assert_close(got, fastdiff.ops.group_norm_silu.group_norm_silu(x, 3, add=add))
    assert not torch.equal(got, ref)
    q, k, v = (torch.randn(1, 2, 7, 32) for _ in range(3))
    torch.testing.assert_close(
        fastdiff.ops.attention(q, k, v, scale=0.3),
        fastdiff.ops.attention.attention_reference(q, k, v, scale=0.3),
    )
    with pytest.raises(ValueError, match="num_groups"):
        fastdiff.ops.group_norm_silu(x, 4)
