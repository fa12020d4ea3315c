"""Fused attention vs eager math attention and PyTorch SDPA (default and each of its backends).

GPU: fp16 on the UNet shapes, variants "eager" (softmax(QK^T)V, the group's baseline), "sdpa",
"sdpa-flash" / "sdpa-efficient" / "sdpa-cudnn" (each where available), "fused-triton",
"fused-cuda". flops = 4 * B * H * Lq * Lk * D (two matmuls).
CPU: what the dispatch picks ("fused") vs eager math attention on one small shape.
"""

from __future__ import annotations

import math

import pytest
import torch
from benchutil import BENCH_DEVICE, bench

import fastdiff
from fastdiff.ops.attention import attention, resolved_backend

GPU_SHAPES = [
    (2, 8, 4096, 40),
    (2, 8, 1024, 80),
    (2, 8, 256, 160),
    (16, 4, 1024, 64),
    (1, 8, 4096, 64),
]
CPU_SHAPES = [(1, 4, 1024, 64)]
SHAPES = GPU_SHAPES if BENCH_DEVICE.startswith("cuda") else CPU_SHAPES
DTYPE = torch.float16 if BENCH_DEVICE.startswith("cuda") else torch.float32
GPU_VARIANTS = [
    "eager",
    "sdpa",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "fused-triton",
    "fused-cuda",
]
VARIANTS = GPU_VARIANTS if BENCH_DEVICE.startswith("cuda") else ["eager", "fused"]
_EAGER_MAX_BYTES = 8 << 30  # skip eager when the L x L matrices would exceed this


def _eager(q, k, v):
    s = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * s, dim=-1) @ v


def _sdpa_with(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend_name]

    def fn(q, k, v):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fn


def _fused(backend):
    def fn(q, k, v):
        with fastdiff.use_backend(backend, "attention"):
            return attention(q, k, v)

    return fn


def _variant_fn(variant, device):
    if variant == "eager":
        return _eager
    if variant == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention
    if variant.startswith("sdpa-"):
        return _sdpa_with(variant)
    if variant == "fused":
        return attention
    backend = variant.split("-", 1)[1]
    ok, why = fastdiff.backend_available(backend, device)
    if not ok:
        pytest.skip(why)
    return _fused(backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(benchmark, device, shape, variant):
    B, H, L, D = shape
    if variant == "eager" and B * H * L * L * (2 + 4) > _EAGER_MAX_BYTES:
        pytest.skip("eager attention's L x L matrices are too large")
    fn = _variant_fn(variant, device)

    def make():
        return tuple(torch.randn(B, H, L, D, device=device, dtype=DTYPE) for _ in range(3))

    args = make()
    try:
        fn(*args)
    except RuntimeError as exc:  # an SDPA backend that cannot take this shape/GPU
        pytest.skip(f"{variant} unavailable: {exc}")
    if variant == "fused":
        benchmark.extra_info["dispatch"] = resolved_backend(args[0], args[1])
    dtype_name = str(DTYPE).replace("torch.", "")
    bench(
        benchmark,
        fn,
        make,
        group=f"attention ({B},{H},{L},{D}) {dtype_name}",
        variant=variant,
        bytes=4 * B * H * L * D * args[0].element_size(),
        flops=4 * B * H * L * L * D,
    )
