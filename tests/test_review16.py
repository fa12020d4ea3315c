"""Review 16: img2img's ``add_noise`` at every model call, its index / dtype contract, awkward
strengths, a sampler object reused across strengths, and whole DDIM / flow inversions in
fp16 / bf16 under the FlashAttention rule (vs a diffusers / eager loop in the same dtype).

Killing tests for mutants that survived test_img2img / test_inversion / test_inversion_flow
(log: notes/s16/review16_log.md).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_img2img import (
    CASES,
    GRID_STRENGTH,
    _image,
    _model,
    _rel,
    _run_pair,
    _scheduler,
    _t_start,
)
from test_inversion import LABELS, _ours, _ref_loop, _their_loop
from test_inversion import _image as _inv_image

import fastdiff
from fastdiff._sampler_setup import resolve_sampler
from fastdiff.samplers import FlowMatchEulerInverseSampler

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5
# every sampler whose add_noise a start can reach (flow_euler / LCM / TCD take the strength as
# a grid option and always start at call 0); dpm2's odd calls are left out: its sample there
# is at the midpoint sigma (KDPM2's sigma_interpol, which scale_model_input uses), while
# diffusers' add_noise reads the interleaved sigma_{k+1}, an incoherent pair no run takes
ADD_NOISE = sorted(set(CASES) - set(GRID_STRENGTH) - {"flow_euler"})


def _sampler(name: str, steps: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_sampler(None, name, steps, _scheduler(name), None, None, {})


def _diffusers_start(name: str, steps: int, i: int, image, z):
    """diffusers: set_begin_index(i), add_noise / scale_noise at timesteps[i], then
    scale_model_input (the model-input units fastdiff's state is in)."""
    sch = _scheduler(name)
    sch.set_timesteps(steps)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(i)
    t = sch.timesteps[i : i + 1].repeat(image.shape[0])
    out = (
        sch.scale_noise(image, t, z) if hasattr(sch, "scale_noise") else sch.add_noise(image, z, t)
    )
    if hasattr(sch, "scale_model_input"):
        out = sch.scale_model_input(out, sch.timesteps[i])
    return out


@pytest.mark.parametrize("name", ADD_NOISE)
def test_add_noise_at_every_call_is_diffusers_start(name):
    """add_noise(x0, z, i) for every call i (not only the even starts of Heun-type samplers:
    flow_heun's correction calls 2k + 1 are at sigma_{k+1})."""
    image, z = _image(21), torch.randn(_image(0).shape, generator=torch.Generator().manual_seed(3))
    smp = _sampler(name, 7)
    for i in range(smp.steps):
        if name == "dpm2" and i % 2 == 1:
            continue
        ref = _diffusers_start(name, 7, i, image, z)
        assert _rel(smp.add_noise(image, z, i), ref) <= RTOL, (name, i)


@pytest.mark.parametrize("name", ADD_NOISE + ["flow_euler", "lcm"])
def test_add_noise_refuses_a_call_index_outside_the_grid(name):
    """i = steps (one past the last call), -1, a bool or a float: ValueError naming i."""
    smp = _sampler(name, CASES[name][2])
    x0 = torch.zeros(2, 3)
    for bad in (smp.steps, smp.steps + 1, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"i: expected a model call index in \[0, "):
            smp.add_noise(x0, x0, bad)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "flow_heun", "edm_euler", "lms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_is_in_x0s_dtype_whatever_the_noise(name, dtype):
    """A float32 noise with a half x0: the result is in x0's dtype, the noise rounded first."""
    smp = _sampler(name, 10)
    x0, z = _image(5).to(dtype), torch.randn(_image(0).shape, generator=torch.Generator())
    s = smp.img2img_start(0.6)
    got = smp.add_noise(x0, z, s)
    assert got.dtype == dtype
    assert torch.equal(got, smp.add_noise(x0, z.to(dtype), s))


@pytest.mark.parametrize("name", ["ddim", "dpm2", "flow_heun", "unipc", "pndm", "plms"])
def test_awkward_strengths_and_step_counts_match_diffusers_or_are_refused(name):
    """steps 7 / 13 with strengths whose int(N strength) rounds down to 0 / 1 / N - 1: the run
    is diffusers' pipeline loop, or, where the pipeline's ``timesteps[t_start * order:]`` is
    empty (its loop then fails), a ValueError naming strength. PNDM / PLMS keep diffusers'
    quirk: t_start counts grid steps but indexes the longer call list (PRK's warm-up calls,
    PLMS's repeated timestep), so even int(N strength) = 0 leaves calls to run."""
    base = CASES[name]
    try:
        for steps in (7, 13):
            CASES[name] = (base[0], base[1], steps)
            for strength in (0.01, 0.07, 0.15, 0.5, 0.99):
                sch = _scheduler(name)
                sch.set_timesteps(steps)
                if len(sch.timesteps[_t_start(name, steps, strength) * sch.order :]) == 0:
                    with pytest.raises(ValueError, match="strength: .* leaves no step"):
                        fastdiff.sample(_model, steps, sampler=name, schedule=_scheduler(name),
                                        image=_image(1), strength=strength)  # fmt: skip
                    continue
                ours, theirs, _ = _run_pair(name, strength)
                assert _rel(ours, theirs) <= RTOL, (name, steps, strength)
    finally:
        CASES[name] = base


@pytest.mark.parametrize("name", ["dpm++", "unipc", "heun", "pndm", "lms", "dpm++_single"])
def test_a_sampler_object_reused_across_strengths_equals_fresh_runs(name):
    """One Sampler object, strengths 0.8, 0.4, 0.8: each run = a run with a fresh sampler
    (multistep history and warm-up restart at every start)."""
    obj = _sampler(name, 10)
    for strength in (0.8, 0.4, 0.8):
        kw = dict(image=_image(2), strength=strength)
        fresh = fastdiff.sample(_model, 10, sampler=name, schedule=_scheduler(name),
                                generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
        again = fastdiff.sample(
            _model, sampler=obj, generator=torch.Generator().manual_seed(0), **kw
        )
        assert torch.equal(again, fresh), (name, strength)


SD_INV = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gs", [None, 3.0])
def test_half_precision_inversion_fa_rule(dtype, pred, gs):
    """A whole fp16 / bf16 inversion (SD's config, 50 steps) vs the float64 loop: at most 2x
    the error of diffusers' DDIMInverseScheduler loop run in that dtype (measured ratios
    0.36 - 1.27), and the result in the image's dtype."""
    cfg = dict(SD_INV, prediction_type=pred)
    x = _inv_image(2, shape=(2, 4, 16, 16))
    sched = diffusers.DDIMInverseScheduler
    ref = _ref_loop(sched(**cfg), 50, x, gs=gs, labels=LABELS)
    theirs = _their_loop(sched(**cfg), 50, x.to(dtype), gs=gs, labels=LABELS)
    ours = _ours(sched(**cfg), 50, x.to(dtype), gs=gs)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    err, their_err = _rel(ours, ref), _rel(theirs, ref)
    assert err <= 2 * their_err, f"{err:.2e} > 2 x {their_err:.2e}"


def _velocity(x, t):
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000
    return torch.tanh(x) * (0.5 + tt) - 0.3 * x + 0.2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_flow_inversion_fa_rule(dtype):
    """Whole flow-matching inversions in fp16 / bf16 vs the float64 Euler loop on the same grid:
    at most 2x the error of the plain eager loop in that dtype (measured 1.00)."""
    steps = 30
    u = FlowMatchEulerInverseSampler(None, steps, shift=3.0).sigmas

    def loop(x, dt):
        x = x.to(dt)
        for i in range(steps):
            t = torch.full((x.shape[0],), u[i] * 1000, dtype=torch.float64)
            x = x + (u[i + 1] - u[i]) * _velocity(x, t if dt == torch.float64 else t.to(dt))
        return x

    x = _inv_image(3, shape=(2, 4, 16, 16))
    ref, eager = loop(x, torch.float64), loop(x, dtype)
    ours = fastdiff.invert(_velocity, x.to(dtype), steps, sampler="flow_euler_inverse", shift=3.0)
    assert ours.dtype == dtype
    assert _rel(ours, ref) <= 2 * _rel(eager, ref)


def test_invert_a_float64_image_names_the_image():
    """A float64 image with a parameter-free model: a TypeError naming image (it named
    sample()'s noise and advised dtype=, which invert does not take); with a float module the
    image follows the module's dtype, as before."""

    def model(x, t):
        return torch.tanh(x)

    with pytest.raises(TypeError, match=r"image: expected torch.float32.* got torch.float64"):
        fastdiff.invert(model, torch.zeros(2, 3, 4, 4, dtype=torch.float64), 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return torch.tanh(x) * self.w

    image = _inv_image(4, shape=(2, 3, 4, 4))
    got = fastdiff.invert(Net(), image.double(), 4)
    assert got.dtype == torch.float32
    assert torch.equal(got, fastdiff.invert(Net(), image, 4))


def test_cuda_graph_inversions_with_other_clipping_do_not_share_a_capture(
    fake_cuda_graphs, monkeypatch
):
    """The graph cache key holds clip_sample / clip_sample_range (the op's clip is baked into
    a capture): graphed inversions of one model with clipping on, off and at another range
    each equal their eager run, three captures."""
    from fastdiff import api

    eager_loop = api._sample_eager
    image = _inv_image(7)
    opts = [{"clip_sample": True}, {"clip_sample": False}, {"clip_sample_range": 0.5}]
    eager = [_ours(None, 5, image, 2.0, **o) for o in opts]
    monkeypatch.setattr(api, "_sample_eager", api._sample_graphed)
    for o, want in zip(opts, eager, strict=True):
        torch.testing.assert_close(_ours(None, 5, image, 2.0, **o), want, rtol=1e-6, atol=1e-6)
    assert eager_loop is not api._sample_eager
    assert len(fake_cuda_graphs) == 3
    assert _rel(eager[0], eager[1]) > 1e-3 and _rel(eager[0], eager[2]) > 1e-3
