"""Mutation testing, round 6 (session 11): tests that kill the mutants of today's UniPC code
(fastdiff/samplers/unipc.py, fastdiff/ops/unipc_step.py, its Triton and C++ kernels, the UniPC
part of the CUDA-graph loop) that tests/test_unipc.py and tests/test_review11b.py let live. Each
test names the behaviour it pins; /work/notes/s11/mutation6_log.md lists the mutants."""

from __future__ import annotations

import pytest
import torch
from helpers import PARITY_SHAPE
from test_unipc import _loop, _pair

from fastdiff import NoiseSchedule
from fastdiff.samplers import UniPCSampler

pytest.importorskip("diffusers")


@pytest.mark.parametrize("solver_type", ["bh2", "bh1"])
def test_unipc_karras_sigma_min_without_lower_order_final_matches_diffusers(solver_type):
    """The Karras grid with final_sigmas_type="sigma_min" ends on sigma_min twice: the last
    step has h = 0 and is the identity (x_n = x_c); with lower_order_final=False its UniP-2
    would divide by that h = 0 (the row builder's h == 0 guard)."""
    for steps in (6, 11):
        ours, theirs = _pair(
            steps,
            use_karras_sigmas=True,
            final_sigmas_type="sigma_min",
            lower_order_final=False,
            solver_type=solver_type,
        )
        _loop(ours, theirs)


def test_unipc_sampler_reused_at_the_same_shape_for_img2img_drops_its_history():
    """A sampler that ran a whole run, then starts another at i = 3 with x of the same shape
    (img2img with the same batch), must not use the old run's history: it equals a fresh
    sampler and diffusers with set_begin_index(3). Also a skipped step (i jumps by 2)."""
    fresh, theirs = _pair(10)
    ref = _loop(fresh, theirs, begin=3, seed=4)
    reused, theirs2 = _pair(10)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(PARITY_SHAPE, generator=g)
    for i in range(10):
        y = reused.step(torch.randn(y.shape, generator=g), i, y)
    got = _loop(reused, theirs2, begin=3, seed=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    # steps 0, 1, then 3: step 3 starts a new run (no corrector), as a fresh sampler at 3
    x = torch.randn(PARITY_SHAPE, generator=g)
    mo = torch.randn(PARITY_SHAPE, generator=g)
    skip = UniPCSampler(NoiseSchedule("scaled_linear"), 10)
    for i in (0, 1):
        skip.step(torch.randn(x.shape, generator=g), i, torch.randn(x.shape, generator=g))
    want = UniPCSampler(NoiseSchedule("scaled_linear"), 10).step(mo, 3, x)
    assert torch.equal(skip.step(mo, 3, x), want)


@pytest.mark.parametrize("i", [0, 4])
def test_unipc_clip_sample_clips_the_data_prediction(i):
    """clip_sample=True (a fastdiff extension) clips m = x0 to [-r, r] before the corrector and
    predictor use it: the returned m is the unclipped sampler's m clamped, x_next follows it."""
    r = 0.5
    sch = NoiseSchedule("linear")
    plain = UniPCSampler(sch, 10)
    clipped = UniPCSampler(sch, 10, clip_sample=True, clip_sample_range=r)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(PARITY_SHAPE, generator=g)
    hist = [torch.randn(PARITY_SHAPE, generator=g) for _ in range(3)]
    mo = torch.randn(PARITY_SHAPE, generator=g)
    coef = plain.coef_table("cpu")[i]
    last, m1, m2 = hist if i else (None, None, None)
    _, m_plain, _ = plain.step_with_history(mo, i, x, coef, last, m1, m2)
    x_c, m_clip, xn_clip = clipped.step_with_history(mo, i, x, coef, last, m1, m2)
    assert m_plain.abs().max() > 2 * r  # the clip matters here
    torch.testing.assert_close(m_clip, m_plain.clamp(-r, r), rtol=0, atol=0)
    c = coef.double()
    want = c[7] * x_c.double() + c[8] * m_clip.double()
    if m1 is not None:
        want = want + c[9] * m1.double()
    torch.testing.assert_close(xn_clip.double(), want, rtol=1e-6, atol=1e-6)
    # and through step(): the clipped sampler's data prediction stays in range
    _, m_step = UniPCSampler(sch, 10, clip_sample=True, clip_sample_range=r).step(
        mo, 0, x, return_x0=True
    )
    assert m_step.abs().max() <= r
