"""Device-copy bandwidth: the roofline every memory-bound kernel is measured against."""

import torch
from benchutil import bench


def test_copy_bandwidth(benchmark, device):
    n = (256 << 20) // 4 if device.startswith("cuda") else (64 << 20) // 4

    def make():
        return torch.randn(n, device=device), torch.empty(n, device=device)

    bench(
        benchmark,
        lambda src, dst: dst.copy_(src),
        make,
        group="copy",
        variant="copy",
        bytes=2 * n * 4,
    )
