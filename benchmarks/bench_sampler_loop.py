"""One DDIM sampler step plus its loop bookkeeping: diffusers' DDIMScheduler.step vs fastdiff.

"eager" is diffusers (``scheduler.step(model_output, timesteps[i], x)``: per-step scalar lookups,
~13 elementwise passes); "fused" is ``DDIMSampler.step(model_output, i, x)``: a row view of the
device-resident coefficient table and one fused op call. Default DDIM config (eta 0, clip on).
"""

import pytest
import torch
from benchutil import bench

from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler

SHAPE = (16, 3, 64, 64)
GROUP = "ddim step+loop (16,3,64,64) fp32"
STEPS = 50


def _make(device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=g).to(device)
        mo = torch.randn(SHAPE, generator=g).to(device)
        return x, mo

    return make


def test_ddim_step_eager(benchmark, device):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(STEPS, device=device)
    ts = sched.timesteps
    state = {"i": 0}

    def step(x, mo):
        i = state["i"] % STEPS
        state["i"] += 1
        return sched.step(mo, ts[i], x).prev_sample

    n = torch.Size(SHAPE).numel()
    bench(benchmark, step, _make(device), group=GROUP, variant="eager", bytes=3 * 4 * n)


def test_ddim_step_fused(benchmark, device):
    smp = DDIMSampler(NoiseSchedule("linear"), STEPS)
    state = {"i": 0}

    def step(x, mo):
        i = state["i"] % STEPS
        state["i"] += 1
        return smp.step(mo, i, x)

    n = torch.Size(SHAPE).numel()
    bench(benchmark, step, _make(device), group=GROUP, variant="fused", bytes=3 * 4 * n)
