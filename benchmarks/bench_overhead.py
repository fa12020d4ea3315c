"""Per-call host overhead of the public fused ops on tiny tensors, vs the eager equivalent.

At batch 1 a diffusion UNet step is launch-bound: each op's Python (validation, dispatch, launch
set-up) costs as much as its kernel. These groups time one call on tiny tensors, where the work
itself is negligible, so the numbers are the wrappers' host cost. Each round runs ``REPEAT`` calls;
``extra_info["us_per_call"]`` is the per-call median.

Groups ``overhead <op> <case>``: variant "eager" (the plain PyTorch equivalent, the baseline),
"fused" (the fastdiff op on the backend the dispatch picks for the device) and, on a GPU,
"fused-triton" / "fused-cuda" (each backend's launch path). On CPU the fused
variants run the C++ kernels (group_norm_silu) and SDPA (attention); the Triton launch path is only
timed on a GPU machine, where the same groups run on CUDA tensors in fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchutil import BENCH_DEVICE, bench

import fastdiff
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu

REPEAT = 100
DTYPE = torch.float16 if BENCH_DEVICE.startswith("cuda") else torch.float32


def _gn_args(device: str, with_add: bool):
    def make():
        x = torch.randn(1, 32, 4, 4, device=device, dtype=DTYPE)  # [N x C x H x W]
        w = torch.randn(32, device=device, dtype=DTYPE)
        b = torch.randn(32, device=device, dtype=DTYPE)
        add = torch.randn(1, 32, device=device, dtype=DTYPE) if with_add else None  # [N x C]
        return x, w, b, add

    return make


def _gn_eager(x, w, b, add):
    if add is not None:
        x = x + add[:, :, None, None]
    return F.silu(F.group_norm(x, 8, w, b, 1e-5))


def _gn_fused(x, w, b, add):
    return group_norm_silu(x, 8, w, b, 1e-5, add=add)


def _attn_args(device: str):
    def make():
        q, k, v = (torch.randn(1, 1, 16, 32, device=device, dtype=DTYPE) for _ in range(3))
        return q, k, v  # [B x H x L x D]

    return make


CASES = {
    "group_norm_silu": (_gn_eager, _gn_fused, lambda d: _gn_args(d, False)),
    "group_norm_silu+add": (_gn_eager, _gn_fused, lambda d: _gn_args(d, True)),
    "attention": (F.scaled_dot_product_attention, attention, _attn_args),
}


def _repeat(fn):
    def run(*args):
        for _ in range(REPEAT):
            fn(*args)

    return run


def _on_backend(fn, op: str, backend: str):
    name = op.split("+")[0]

    def run(*args):
        with fastdiff.use_backend(backend, op=name):
            return fn(*args)

    return run


@pytest.mark.parametrize("variant", ["eager", "fused", "fused-triton", "fused-cuda"])
@pytest.mark.parametrize("op", list(CASES))
def test_overhead(benchmark, device, op, variant):
    """ "fused" is the dispatch's choice; on a GPU "fused-triton" / "fused-cuda" time each backend's
    launch path (the csrc one is a single pybind call), which is what the dispatch table's order
    for small, launch-bound calls should follow."""
    eager, fused, make_args = CASES[op]
    fn = eager if variant == "eager" else fused
    if variant.startswith("fused-"):
        backend = variant.split("-", 1)[1]
        if not device.startswith("cuda"):
            pytest.skip("per-backend launch paths are timed on a GPU")
        ok, why = fastdiff.backend_available(backend, device)
        if not ok:
            pytest.skip(why)
        fn = _on_backend(fused, op, backend)
    with torch.inference_mode():
        bench(
            benchmark,
            _repeat(fn),
            make_args(device),
            group=f"overhead {op} tiny {str(DTYPE).removeprefix('torch.')}",
            variant=variant,
            rounds=30,
        )
    if benchmark.stats is not None:  # None under --benchmark-disable
        per_call = benchmark.stats.stats.median / REPEAT
        benchmark.extra_info["us_per_call"] = round(per_call * 1e6, 2)
