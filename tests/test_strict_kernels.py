"""Kernel-path checks the op tests did not pin down (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_cases, case_id

import fastdiff
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.sampler_step import sampler_step

SHAPE = (3, 4, 5, 7)  # [N x C x H x W], odd spatial sizes


def _coef() -> torch.Tensor:
    # [a, s, c_x0, c_eps, c_x, c_noise, log_var_max, log_var_min]
    return torch.tensor([0.8, 0.6, 0.5, 0.3, 0.4, 0.2, -1.0, -3.0])


def _torch_step(x, mo, coef, **kw):
    with fastdiff.use_backend("torch", "sampler_step"):
        return sampler_step(x, mo, coef, **kw)


@pytest.mark.skipif(
    "cpu" not in fastdiff.available_backends("sampler_step", "cpu"),
    reason="needs the cpu backend",
)
def test_cpu_fast_path_plan_follows_model_output_strides():
    """The cpu eager fast path caches launch geometry per layout: a model output of the same
    shape and dtype but other strides (channels_last, a batch-strided slice) must not reuse the
    geometry of a contiguous one."""
    coef = _coef()
    x = torch.randn(SHAPE)
    n = SHAPE[0]
    big = torch.randn(2 * n, *SHAPE[1:])
    mos = [
        torch.randn(SHAPE),  # contiguous first: its plan is cached
        torch.randn(SHAPE).to(memory_format=torch.channels_last),
        big[::2],  # batch stride 2 C H W
        big[1::2],
        torch.randn(SHAPE),
    ]
    for k, mo in enumerate(mos):
        for g in (None, 1.7):
            m = torch.cat([torch.randn_like(mo), mo]) if g is not None else mo
            got = sampler_step(x, m, coef, guidance_scale=g, clip_range=1.0)
            ref = _torch_step(x, m, coef, guidance_scale=g, clip_range=1.0)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"model output {k}")


GN_CASES = backend_cases("group_norm_silu")


@pytest.mark.parametrize("case", GN_CASES, ids=[case_id(c) for c in GN_CASES])
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_is_relatively_accurate_deep_in_the_negative_range(case, channels_last):
    """silu(v) for v in [-87.9, -60] is a normal fp32 number (down to -6e-37), not -0: the
    kernels' underflow select must start only where e^-v overflows (v < -88). The SiLU range
    test allows 1e-12 absolute, which a kernel returning -0 below -80 passed."""
    dev, backend = case
    c = 64
    x = torch.randn(1, c, 3, 5, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.linspace(-87.9, -60.0, c, device=dev)
    with fastdiff.use_backend(backend, op="group_norm_silu"):
        y = group_norm_silu(x, 8, torch.zeros(c, device=dev), v)  # weight 0: y = silu(bias)
    want = F.silu(v.double())[None, :, None, None].expand_as(y)
    assert (want.abs() > 1e-37).all()
    rtol = 1e-5 if dev == "cpu" else 1e-4  # CUDA's __expf: 2 + 1.17|x| ulp
    rel = ((y.double() - want).abs() / want.abs()).max().item()
    assert rel <= rtol, (backend, rel)
