"""Kernels on a tensor that lives on a GPU other than the current one (device guard)."""

import contextlib

import pytest
import torch

import fastdiff
from fastdiff import _ext
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import sampler_step


def test_device_guard_is_a_no_op_on_cpu():
    assert isinstance(_ext.device_guard(torch.empty(1)), contextlib.nullcontext)


def _backends():
    dev = torch.device("cuda:1")
    return [b for b in ("cuda", "triton") if fastdiff.backend_available(b, dev)[0]]


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["sampler_step", "group_norm_silu", "attention"])
def test_ops_on_a_non_current_gpu(op):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.manual_seed(0)
    dev = torch.device("cuda:1")
    if op == "sampler_step":
        x, m = torch.randn(2, 3, 9, 7, device=dev), torch.randn(2, 3, 9, 7, device=dev)
        coef = torch.tensor([0.8, 0.6, 0.9, 0.4, 0, 0.1, 0, 0], device=dev)
        gen = torch.tensor([7, 0], device=dev)

        def run():
            return sampler_step(x, m, coef, clip_range=1.0, generator_state=gen)
    elif op == "group_norm_silu":
        x = torch.randn(2, 64, 9, 7, device=dev, dtype=torch.float16)

        def run():
            return group_norm_silu(x, 32)
    else:
        q, k, v = (torch.randn(2, 4, 77, 64, device=dev, dtype=torch.float16) for _ in range(3))

        def run():
            return attention(q, k, v)

    backends = _backends()
    if not backends:
        pytest.skip("neither the cuda nor the triton backend can run on cuda:1")
    for backend in backends:
        with fastdiff.use_backend(backend, op):
            with torch.cuda.device(1):
                want = run()
            with torch.cuda.device(0):
                got = run()
        torch.cuda.synchronize(dev)
        assert got.device == dev
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{op} {backend}")
