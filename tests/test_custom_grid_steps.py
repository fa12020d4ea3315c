"""``fastdiff.sample`` with a custom grid and no ``steps``: the number of steps is the grid's
length (diffusers' ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)`` take no
``num_inference_steps`` either); with ``steps`` given, a mismatch is still a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import FlowMatchEulerSampler, LCMSampler

SHAPE = (2, 3, 4, 4)


def _eps(x, t):
    return 0.3 * x + torch.cos(t.double() / 300).to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_custom_timesteps_without_steps(sampler):
    ts = [999, 759, 499, 259, 80]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return _eps(x, t)

    got = fastdiff.sample(model, sampler=sampler, timesteps=ts, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert seen == ts  # 5 steps, not LCM's default 4
    ref = fastdiff.sample(_eps, steps=5, sampler=sampler, timesteps=ts, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"steps: got 3 but 5 custom timesteps"):
        fastdiff.sample(_eps, steps=3, sampler=sampler, timesteps=ts, noise=z)


def test_custom_sigmas_without_steps_flow():
    sig = np.linspace(1.0, 1 / 7, 7)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    got = fastdiff.sample(_eps, sampler="flow_euler", sigmas=sig, noise=z)
    smp = FlowMatchEulerSampler(None, 7, sigmas=sig)
    x = z
    for i, t in enumerate(smp.timesteps):
        x = smp.step(_eps(x, t.expand(SHAPE[0])), i, x)
    assert torch.equal(got, x)
    assert LCMSampler(NoiseSchedule("linear"), timesteps=[999, 10]).steps == 2
