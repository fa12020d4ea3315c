"""The ops under torch.func.functionalize and forward-mode AD, and the cpu sampler-step cache
with non-bool flags.

Under a torch.func transform the inputs are C++ wrapper tensors whose Python type is plain
``torch.Tensor``: the ops' raw-pointer fast paths took them for plain tensors and passed the
kernels a null address ("null operand"). The validated-call cache of the cpu sampler step held
its flags by object, so a 0-d bool tensor flipped in place was served its old verdict.
Forward-mode AD dual tensors also look plain: the fused kernels dropped their tangents.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step

COEF = torch.tensor([0.8, 0.6, 0.9, 0.1, 0.05, 0.3, -1.0, -3.0])
OPS = ["sampler_step", "dpm_solver_2m_step", "group_norm_silu", "attention"]


def _functionalized(fn, *args):
    return torch.func.functionalize(fn)(*args)


def test_sampler_step_under_functionalize():
    x, mo = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    sampler_step(x, mo, COEF)  # the same geometry cached first
    out = _functionalized(lambda a, b: sampler_step(a, b, COEF), x, mo)
    torch.testing.assert_close(out, sampler_step(x, mo, COEF), rtol=0, atol=0)


def test_dpm_solver_2m_step_under_functionalize():
    x, mo, prev = (torch.randn(2, 3, 4, 5) for _ in range(3))
    out = _functionalized(lambda a, b, c: dpm_solver_2m_step(a, b, COEF, c)[0], x, mo, prev)
    torch.testing.assert_close(out, dpm_solver_2m_step(x, mo, COEF, prev)[0], rtol=0, atol=0)


def test_group_norm_silu_under_functionalize():
    x, w = torch.randn(2, 8, 3, 5), torch.randn(8)
    out = _functionalized(lambda a: group_norm_silu(a, 4, w), x)
    torch.testing.assert_close(out, group_norm_silu(x, 4, w), rtol=1e-6, atol=1e-6)


def test_attention_under_functionalize():
    q, k, v = (torch.randn(1, 2, 9, 32) for _ in range(3))
    out = _functionalized(lambda a, b, c: attention(a, b, c), q, k, v)
    torch.testing.assert_close(out, attention(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flag", ["learned_variance", "recompute_eps", "return_x0"])
def test_sampler_step_cache_reads_flag_values_not_objects(flag):
    """A 0-d bool tensor flipped in place between two calls: the second call must see True."""
    x, mo = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    f = torch.tensor(False)
    kw = {flag: f, "clip_range": 1.0}
    for _ in range(2):
        sampler_step(x, mo, COEF, **kw)
    f.fill_(True)
    if flag == "learned_variance":
        with pytest.raises(ValueError, match="model_output must have shape"):
            sampler_step(x, mo, COEF, **kw)
        return
    out = sampler_step(x, mo, COEF, **kw)
    ref = sampler_step(x, mo, COEF, **{flag: True, "clip_range": 1.0})
    if flag == "return_x0":
        assert isinstance(out, tuple) and out[1] is not None
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
        out, ref = out[0], ref[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _ops_with_inputs():
    g = torch.Generator().manual_seed(5)
    x, mo, prev = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    xg = torch.randn(2, 8, 3, 5, generator=g)
    q = torch.randn(1, 2, 9, 32, generator=g)
    return {
        "sampler_step": (lambda a: sampler_step(a, mo, COEF), x),
        "dpm_solver_2m_step": (lambda a: dpm_solver_2m_step(a, mo, COEF, prev)[0], x),
        "group_norm_silu": (lambda a: group_norm_silu(a, 4), xg),
        "attention": (lambda a: attention(a, q, q), q),
    }


@pytest.mark.parametrize("op", OPS)
def test_forward_ad_tangent_is_propagated(op):
    """A dual input under torch.autograd.forward_ad: the automatic choice runs the torch
    reference (the fused kernels would drop the tangent silently); an explicitly requested
    fused backend is an error."""
    import torch.autograd.forward_ad as fwad

    import fastdiff

    fn, inp = _ops_with_inputs()[op]
    fn(inp)
    fn(inp)  # the cpu sampler step's validated-call cache is warm for this geometry
    tangent = torch.randn_like(inp)
    with fastdiff.use_backend("torch"), fwad.dual_level():
        ref = fwad.unpack_dual(fn(fwad.make_dual(inp, tangent))).tangent
    assert ref is not None and ref.abs().max() > 0
    with fwad.dual_level():
        got = fwad.unpack_dual(fn(fwad.make_dual(inp, tangent))).tangent
        assert got is not None
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        fused = [b for b in fastdiff.available_backends(op, "cpu") if b not in ("torch", "sdpa")]
        for b in fused:
            with fastdiff.use_backend(b, op=op), pytest.raises(RuntimeError, match="tangent"):
                fn(fwad.make_dual(inp, tangent))
