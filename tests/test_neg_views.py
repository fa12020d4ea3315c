"""Lazily negated inputs on every kernel backend.

A real tensor can carry PyTorch's negative bit (``z.conj().imag`` of a complex ``z``, or
``torch._neg_view``): its memory holds -values. The csrc and Triton kernels read memory by
address, so such an operand must be materialised first; before the fix every fused backend
returned results computed from the wrong sign (sampler_step also after a cached call of the
same geometry). Each case compares a neg-view operand with the same values materialised.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_cases, case_id

import fastdiff
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step


def _neg_view(t: torch.Tensor) -> torch.Tensor:
    """A view with the negative bit whose values equal ``t``'s (memory holds -t)."""
    v = torch._neg_view(-t)
    assert v.is_neg() and torch.equal(v.resolve_neg(), t)
    return v


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("which", ["x", "model_output", "coef", "noise"])
def test_sampler_step_neg_view_operand(case, which):
    dev, backend = case
    g = torch.Generator().manual_seed(0)
    args = {
        "x": torch.randn(2, 3, 5, 7, generator=g),
        "model_output": torch.randn(2, 3, 5, 7, generator=g),
        "coef": torch.tensor([0.8, 0.6, 0.9, 0.1, 0.05, 0.3, -1.0, -3.0]),
        "noise": torch.randn(2, 3, 5, 7, generator=g),
    }
    args = {k: v.to(dev) for k, v in args.items()}
    with fastdiff.use_backend(backend, op="sampler_step"):
        sampler_step(**args)  # the same geometry once (the cpu backend caches validated calls)
        ref = sampler_step(**args)
        out = sampler_step(**{**args, which: _neg_view(args[which])})
    _close(out, ref)


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
@pytest.mark.parametrize("which", [0, 1, 3])
def test_dpm_solver_2m_step_neg_view_operand(case, which):
    dev, backend = case
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(2, 3, 4, 5, generator=g).to(dev) for _ in range(2)]
    args += [torch.tensor([0.9, 0.4, 0.7, 0.2, -0.1, 0, 0, 0], device=dev)]
    args += [torch.randn(2, 3, 4, 5, generator=g).to(dev)]
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        ref = dpm_solver_2m_step(*args)
        neg = list(args)
        neg[which] = _neg_view(args[which])
        out = dpm_solver_2m_step(*neg)
    _close(out[0], ref[0])
    _close(out[1], ref[1])


@pytest.mark.parametrize("case", backend_cases("group_norm_silu"), ids=case_id)
@pytest.mark.parametrize("which", ["x", "weight", "add", "shift"])
def test_group_norm_silu_neg_view_operand(case, which):
    dev, backend = case
    g = torch.Generator().manual_seed(2)
    args = {
        "x": torch.randn(2, 8, 3, 5, generator=g),
        "weight": torch.randn(8, generator=g),
        "bias": torch.randn(8, generator=g),
        "add": torch.randn(2, 8, generator=g),
        "shift": torch.randn(2, 8, generator=g),
    }
    args = {k: v.to(dev) for k, v in args.items()}
    with fastdiff.use_backend(backend, op="group_norm_silu"):
        ref = group_norm_silu(num_groups=4, **args)
        out = group_norm_silu(num_groups=4, **{**args, which: _neg_view(args[which])})
    _close(out, ref)


@pytest.mark.parametrize("case", backend_cases("attention"), ids=case_id)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_attention_neg_view_operand(case, which):
    dev, backend = case
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(1, 2, 9, 32, generator=g).to(dev) for _ in range(3)]
    with fastdiff.use_backend(backend, op="attention"):
        ref = attention(*qkv)
        neg = list(qkv)
        neg[which] = _neg_view(qkv[which])
        out = attention(*neg)
    _close(out, ref)
