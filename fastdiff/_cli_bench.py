"""``fastdiff bench``: fused vs eager timings per op and end to end (the table or JSON)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_ms(fn: Callable[[], Any], dev: torch.device, reps: int, warmup: int = 2) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bench_cases(dev: torch.device) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(name, shape text, dispatch op, fn) for each op and the end-to-end run."""
    from fastdiff.ops.attention import attention
    from fastdiff.ops.group_norm_silu import group_norm_silu
    from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step

    gpu = dev.type == "cuda"
    dt = torch.float16 if gpu else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=dev).to(dt)

    n, c, hw = (16, 256, 32) if gpu else (4, 64, 32)
    x_gn, w, b = rnd(n, c, hw, hw), rnd(c), rnd(c)
    bh, L, d = (8, 1024, 64) if gpu else (4, 256, 32)
    q, k, v = rnd(2, bh, L, d), rnd(2, bh, L, d), rnd(2, bh, L, d)
    xs, eps, x0p = rnd(16, 3, 64, 64), rnd(16, 3, 64, 64), rnd(16, 3, 64, 64)
    coef = torch.tensor([0.8, 0.6, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0], device=dev)
    coef2 = torch.tensor([0.8, 0.6, 0.7, 0.2, 0.1, 0.0, 0.0, 0.0], device=dev)
    return [
        ("group_norm_silu", f"{n}x{c}x{hw}x{hw} {str(dt)[6:]}", "group_norm_silu",
         lambda: group_norm_silu(x_gn, 32, w, b)),
        ("attention", f"2x{bh}x{L}x{d} {str(dt)[6:]}", "attention",
         lambda: attention(q, k, v)),
        ("sampler_step (ddim)", f"16x3x64x64 {str(dt)[6:]}", "sampler_step",
         lambda: sampler_step(xs, eps, coef)),
        ("dpm_solver_2m_step", f"16x3x64x64 {str(dt)[6:]}", "dpm_solver_2m_step",
         lambda: dpm_solver_2m_step(xs, eps, coef2, x0p)),
    ]  # fmt: skip


def run_bench(a: argparse.Namespace, dev: torch.device) -> None:
    """``fastdiff bench``: each op's median time fused vs eager (``use_backend("torch")``) on
    ``dev``, and the end-to-end digits run when its weights are present."""
    import fastdiff
    from fastdiff import _dispatch, use_backend
    from fastdiff.cli import sampler_options

    rows: list[dict[str, Any]] = []
    cases = _bench_cases(dev)
    model = None
    if not a.ops_only:
        from fastdiff.models.pretrained import load_pretrained

        try:
            model = load_pretrained("digits", device=dev)
        except (FileNotFoundError, ValueError):
            model = None
    if model is not None:
        nb = 256 if dev.type == "cuda" else 16
        labels = torch.arange(nb, device=dev) % 10

        def e2e() -> Any:
            with torch.no_grad():
                return fastdiff.sample(
                    model, steps=10, batch_size=nb, cond=labels, guidance_scale=2.0, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(0),
                    **sampler_options("ddim", 2.0),
                )  # fmt: skip

        cases.append(("end to end: digits, 10 DDIM steps, CFG", f"batch {nb}", "", e2e))
    for name, shape, op, fn in cases:
        with use_backend("torch"):
            eager = _median_ms(fn, dev, a.repeat)
        fused = _median_ms(fn, dev, a.repeat)
        if op:
            backend = _dispatch.resolve(op, dev)
        else:
            backend = ",".join(
                sorted({_dispatch.resolve(o, dev) for o in _dispatch.IMPLEMENTED})
            )  # fmt: skip
        rows.append(
            dict(op=name, shape=shape, device=dev.type, eager_ms=round(eager, 4),
                 fused_ms=round(fused, 4), fused_backend=backend,
                 speedup=round(eager / fused, 2) if fused > 0 else None)
        )  # fmt: skip
    if a.json:
        print(json.dumps({"device": str(dev), "rows": rows}, indent=2))
        return
    head = ("op", "shape", "eager ms", "fused ms", "backend", "speedup")
    table = [
        (r["op"], r["shape"], f"{r['eager_ms']:.3f}", f"{r['fused_ms']:.3f}",
         r["fused_backend"], f"{r['speedup']:.2f}x")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(f"fastdiff bench on {dev} (median of {a.repeat}; eager = use_backend('torch'))")
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for r in table:
        print(line.format(*r))
