"""GroupNorm + SiLU: eager ``F.silu(F.group_norm(...))`` vs torch.compile vs the fused backends.

GPU: fp16, Stable Diffusion shapes, NCHW and channels_last; variants "eager", "compile",
"fused-triton", "fused-cuda" ("compile" skipped with FASTDIFF_BENCH_COMPILE=0). CPU: fp32,
NCHW and channels_last; variants "eager", "fused-cpu".
``bytes`` is the minimum traffic: read x once, write y once, plus weight and bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchutil import BENCH_DEVICE, COMPILE, bench

import fastdiff
from fastdiff.ops.group_norm_silu import group_norm_silu

GROUPS = 32
ON_CUDA = BENCH_DEVICE.startswith("cuda")
if ON_CUDA:
    SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (16, 128, 32, 32)]
    SHAPES += [(2, 1280, 8, 8)]
    DTYPE, LAYOUTS = torch.float16, ["nchw", "channels_last"]
    VARIANTS = ["eager", "compile", "fused-triton", "fused-cuda"]
else:
    SHAPES = [(16, 128, 32, 32), (8, 256, 16, 16), (2, 320, 64, 64)]
    DTYPE, LAYOUTS = torch.float32, ["nchw", "channels_last"]
    VARIANTS = ["eager", "fused-cpu"]

_DT = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}


def _eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b))


_compiled = None


def _compiled_fn():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager)
    return _compiled


def _fused(backend):
    def fn(x, w, b):
        with fastdiff.use_backend(backend, op="group_norm_silu"):
            return group_norm_silu(x, GROUPS, w, b)

    return fn


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, device, shape, layout, variant):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]

    def make():
        x = torch.randn(shape, device=device, dtype=DTYPE).to(memory_format=fmt)
        w = torch.randn(c, device=device, dtype=DTYPE)
        b = torch.randn(c, device=device, dtype=DTYPE)
        return x, w, b

    if variant == "eager":
        fn = _eager
    elif variant == "compile":
        if not COMPILE:
            pytest.skip("FASTDIFF_BENCH_COMPILE=0: torch.compile variants off")
        fn = _compiled_fn()
        try:
            fn(*make())
        except Exception as exc:  # no C compiler / inductor unsupported here
            pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: {exc}")
    else:
        backend = variant.split("-", 1)[1]
        ok, why = fastdiff.backend_available(backend, device)
        if not ok:
            pytest.skip(why)
        fn = _fused(backend)
    itemsize = torch.tensor([], dtype=DTYPE).element_size()
    numel = 1
    for s in shape:
        numel *= s
    nbytes = 2 * numel * itemsize + 2 * c * itemsize
    group = f"group_norm_silu ({','.join(map(str, shape))}) {_DT[DTYPE]} {layout}"
    bench(benchmark, fn, make, group=group, variant=variant, bytes=nbytes)
