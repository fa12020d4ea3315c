"""Every sampler's update over a whole run vs its diffusers scheduler (the model left out).

One case per sampler, two variants measured in the same run:

* "eager": diffusers, as its pipelines drive it: ``set_timesteps(N)``, then per model call
  ``scale_model_input`` (for the schedulers that scale) and ``scheduler.step(model_output, t,
  x)`` (noise from a ``torch.Generator``); per-step scalar lookups on the host, ~10-25
  elementwise passes per step;
* "fused": fastdiff, as ``fastdiff.sample`` drives it: the sampler built for the run (its
  float64 coefficient table, one host -> device copy), then one fused op call per model call
  (noise from the in-kernel Philox generator).

The model output is a fixed tensor (the schedulers' work only: what a UNet call would hide on a
big model and what dominates a small or distilled one). ``bytes`` is the minimum traffic of the
updates (read x and the model output, write x, per model call), for GB/s.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from benchutil import bench

from fastdiff import NoiseSchedule
from fastdiff.samplers import make_sampler

SHAPE = (8, 4, 64, 64)  # SD 1.5 latents of eight 512x512 images
STEPS = 20

# (case id, diffusers scheduler class and config, fastdiff sampler name and options, steps)
CASES = [
    ("ddim", "DDIMScheduler", {}, "ddim", {}, STEPS),
    ("ddim_inverse", "DDIMInverseScheduler", {}, "ddim_inverse", {}, STEPS),
    ("ddpm", "DDPMScheduler", {}, "ddpm", {}, STEPS),
    ("dpm++2m", "DPMSolverMultistepScheduler", {}, "dpm++", {}, STEPS),
    ("dpm++3m-sde-karras", "DPMSolverMultistepScheduler",
     dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), "dpm++",
     dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), STEPS),
    ("euler", "EulerDiscreteScheduler", {}, "euler", {}, STEPS),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, "euler_a", {}, STEPS),
    ("heun", "HeunDiscreteScheduler", {}, "heun", {}, STEPS),
    ("dpm2", "KDPM2DiscreteScheduler", {}, "dpm2", {}, STEPS),
    ("unipc", "UniPCMultistepScheduler", {}, "unipc", {}, STEPS),
    ("plms", "PNDMScheduler", dict(skip_prk_steps=True), "plms", {}, STEPS),
    ("lms", "LMSDiscreteScheduler", {}, "lms", {}, STEPS),
    ("deis", "DEISMultistepScheduler", {}, "deis", {}, STEPS),
    ("dpm++_single", "DPMSolverSinglestepScheduler", {}, "dpm++_single", {}, STEPS),
    ("lcm", "LCMScheduler", {}, "lcm", {}, 4),
    ("flow_euler", "FlowMatchEulerDiscreteScheduler", {}, "flow_euler", {}, STEPS),
    ("edm_dpm++", "EDMDPMSolverMultistepScheduler", {}, "edm_dpm++", {}, STEPS),
]  # fmt: skip


def _make(device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=g).to(device)
        mo = torch.randn(SHAPE, generator=g).to(device)
        return x, mo

    return make


def _bytes(calls: int) -> int:
    return 3 * 4 * torch.Size(SHAPE).numel() * calls


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scheduler_run_eager(benchmark, device, case):
    diffusers = pytest.importorskip("diffusers")
    cid, cls_name, cfg, _, _, steps = case
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls_name}")
    sched = cls(**cfg)
    scales = hasattr(sched, "scale_model_input")
    kw = {}
    if "generator" in inspect.signature(sched.step).parameters:  # the stochastic ones
        kw["generator"] = torch.Generator(device=device).manual_seed(0)

    def run(x, mo):
        sched.set_timesteps(steps, device=device)
        for t in sched.timesteps:
            if scales:
                sched.scale_model_input(x, t)  # what the pipeline feeds the model
            x = sched.step(mo, t, x, **kw).prev_sample
        return x

    sched.set_timesteps(steps)
    calls = len(sched.timesteps)
    bench(benchmark, run, _make(device), group=f"sampler run {cid} ({calls} calls) {SHAPE} fp32",
          variant="eager", bytes=_bytes(calls))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scheduler_run_fused(benchmark, device, case):
    cid, _, _, name, opts, steps = case
    schedule = None if name.startswith(("flow", "edm")) else NoiseSchedule("linear")
    state = torch.tensor([1234, 0], dtype=torch.int64, device=device)  # in-kernel Philox

    def run(x, mo):
        smp = make_sampler(name, schedule, steps, **opts)
        smp.coef_table(x.device)
        smp.reset()
        for i in range(smp.steps):
            kw = {"generator_state": state} if smp.needs_noise(i) else {}
            x = smp.step(mo, i, x, **kw)
        return x

    calls = make_sampler(name, schedule, steps, **opts).steps
    bench(benchmark, run, _make(device), group=f"sampler run {cid} ({calls} calls) {SHAPE} fp32",
          variant="fused", bytes=_bytes(calls))  # fmt: skip
