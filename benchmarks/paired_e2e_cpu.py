"""The CPU end-to-end variants of ``bench_e2e.py``, interleaved round-robin, with paired ratios.

On a shared or virtual machine whose speed drifts between minutes, pytest-benchmark's one-group-
at-a-time ratios swing widely. Here every round runs each variant once, back to back, and the
ratio eager / variant is taken within the round; the median and quartiles over rounds are the
robust comparison the README quotes.

    python benchmarks/paired_e2e_cpu.py --threads 2 --rounds 30
    python benchmarks/paired_e2e_cpu.py --model diffusers --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_e2e as B  # noqa: E402
import benchutil  # noqa: E402,F401  (steady malloc, as in the benchmarks)

import fastdiff  # noqa: E402


def _digits():
    from fastdiff.models import UNet

    torch.manual_seed(0)
    model = UNet.from_preset("digits").eval()
    fns = {
        "eager": B.ddim_loop(B.torch_twin(model), B.CPU_STEPS),
        "eager-channels-last": B.ddim_loop(
            B.torch_twin(model).to(memory_format=torch.channels_last), B.CPU_STEPS
        ),
        "fused-nchw": B._variant_fn(model, "fused-nchw", B.CPU_STEPS),
        "fused": B._variant_fn(model, "fused", B.CPU_STEPS),
    }
    return fns, torch.randn(8, 1, 16, 16)


def _diffusers():
    unet = B.small_diffusers_unet()
    fns = {
        "eager": B.diffusers_loop(copy.deepcopy(unet), B.CPU_STEPS),
        "optimize-nchw": B.fastdiff_loop(
            fastdiff.optimize(copy.deepcopy(unet), channels_last=False), B.CPU_STEPS
        ),
        "optimize": B.fastdiff_loop(fastdiff.optimize(copy.deepcopy(unet)), B.CPU_STEPS),
    }
    return fns, torch.randn(4, 3, 32, 32)


def _positive_int(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["digits", "diffusers"], default="digits")
    ap.add_argument("--threads", type=_positive_int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=_positive_int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fns, x = _digits() if args.model == "digits" else _diffusers()
    times: dict[str, list[float]] = {v: [] for v in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)  # warm-up
        for _ in range(args.rounds):
            for v, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[v].append(time.perf_counter() - t0)
    print(f"{args.model}, {B.CPU_STEPS} DDIM steps, {args.threads} threads, {args.rounds} rounds")
    for v, ts in times.items():
        ratios = sorted(e / t for e, t in zip(times["eager"], ts, strict=True))
        n = len(ratios)
        med_ms = statistics.median(ts) * 1e3
        print(f"  {v:22s} {med_ms:8.1f} ms   eager/this {statistics.median(ratios):.2f}x "
              f"[{ratios[n // 4]:.2f}-{ratios[3 * n // 4]:.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
