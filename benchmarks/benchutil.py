"""Shared benchmark plumbing.

Every benchmark calls :func:`bench` so that results carry what the GPU suite's summary needs:
``group`` (one comparison: op, shape, dtype, layout), ``variant`` ("eager" is the baseline of its
group; others are e.g. "fused", "compile", "sdpa-best"), and the minimum ``bytes`` / ``flops`` of
the work, from which GB/s and TFLOP/s are derived. Ratios are only ever taken between variants of
one group measured in the same run.

On CUDA each timed round runs the function ``inner`` times and then synchronises; inputs rotate
over enough copies to exceed twice the L2 cache so that repeated rounds read HBM, not L2.
On CPU, glibc is told not to hand large tensors fresh pages every call (see ANCHORS.md section 6).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _steady_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: keep big blocks in the heap
        libc.mallopt(-1, 1 << 36)  # M_TRIM_THRESHOLD: never give them back
    except OSError:
        pass


_steady_malloc()

BENCH_DEVICE = os.environ.get("FASTDIFF_BENCH_DEVICE") or (
    "cuda" if torch.cuda.is_available() else "cpu"
)
# The torch.compile variants (GroupNorm+SiLU "compile"; bench_e2e's also need
# FASTDIFF_BENCH_E2E_COMPILE=1): on unless FASTDIFF_BENCH_COMPILE=0.
COMPILE = os.environ.get("FASTDIFF_BENCH_COMPILE", "1") != "0"


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def bench(
    benchmark,
    fn: Callable[..., Any],
    make_args: Callable[[], Sequence[Any]],
    *,
    group: str,
    variant: str,
    bytes: int = 0,
    flops: int = 0,
    device: str = BENCH_DEVICE,
    rounds: int | None = None,
) -> None:
    """Time ``fn(*make_args())`` under pytest-benchmark and record group/variant/bytes/flops."""
    benchmark.group = group
    on_cuda = device.startswith("cuda")
    first = tuple(make_args())
    sets = [first]
    if on_cuda:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        per = max(_nbytes(first), 1)
        n_sets = min(max(2, (2 * l2) // per + 1), 64)
        sets += [tuple(make_args()) for _ in range(n_sets - 1)]
    fn(*first)  # warm-up: compilation, autotuning, module load
    if on_cuda:
        torch.cuda.synchronize()
        inner = 20
        state = {"i": 0}

        def target():
            for _ in range(inner):
                fn(*sets[state["i"] % len(sets)])
                state["i"] += 1
            torch.cuda.synchronize()

        benchmark.pedantic(target, rounds=rounds or 30, iterations=1, warmup_rounds=2)
    else:
        inner = 1
        benchmark.pedantic(lambda: fn(*first), rounds=rounds or 15, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(
        variant=variant, bytes=int(bytes), flops=int(flops), inner=inner, device=device
    )
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, nothing timed
        return
    median = benchmark.stats.stats.median / inner
    if bytes:
        benchmark.extra_info["GB/s"] = round(bytes / median / 1e9, 2)
    if flops:
        benchmark.extra_info["TFLOP/s"] = round(flops / median / 1e12, 3)
