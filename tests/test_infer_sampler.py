"""``fastdiff.sample(schedule=<diffusers scheduler>)`` without ``sampler=`` samples with the
fastdiff sampler that reproduces that scheduler class (and its settings), not silently DDIM."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastdiff
from fastdiff._sampler_setup import infer_sampler

diffusers = pytest.importorskip("diffusers")


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent stand-in for an eps model (no weights)."""
    return torch.tanh(x) * (0.5 + t.to(x.dtype)[:, None, None, None] / 2000.0)


# (diffusers scheduler, its settings, the sampler name it maps to)
CASES = [
    ("DDIMScheduler", {}, "ddim"),
    ("DDPMScheduler", {}, "ddpm"),
    ("DEISMultistepScheduler", {}, "deis"),
    ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, "deis"),
    ("DPMSolverMultistepScheduler", {}, "dpm++"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpm++"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpm++"),
    ("DPMSolverSinglestepScheduler", {}, "dpm++_single"),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "solver_type": "heun"}, "dpm++_single"),
    ("EulerDiscreteScheduler", {}, "euler"),
    ("EulerAncestralDiscreteScheduler", {}, "euler_a"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun"),
    ("UniPCMultistepScheduler", {}, "unipc"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "use_karras_sigmas": True}, "unipc"),
    ("SASolverScheduler", {}, "sa_solver"),
    ("SASolverScheduler", {"corrector_order": 3, "use_karras_sigmas": True}, "sa_solver"),
]


def _run(**kw: object) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    return fastdiff.sample(_model, steps=6, noise=noise, generator=gen, **kw)


@pytest.mark.parametrize("cls,settings,name", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
def test_scheduler_class_picks_its_sampler(cls, settings, name, as_config):
    sched = getattr(diffusers, cls)(**settings)
    # a saved scheduler_config.json names its class (an in-memory .config does not)
    arg = json.loads(sched.to_json_string()) if as_config else sched
    assert infer_sampler(arg) == name
    got = _run(schedule=arg)
    # the explicit name with the settings spelled out gives the same samples, bit for bit
    want = _run(schedule=fastdiff.NoiseSchedule.from_diffusers(sched), sampler=name, **settings)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if name != "ddim":  # the check can fail: DDIM on the same schedule samples differently
        ddim = _run(schedule=arg, sampler="ddim")
        assert not torch.allclose(got, ddim)


def test_explicit_sampler_wins():
    sched = diffusers.DPMSolverMultistepScheduler()
    got = _run(schedule=sched, sampler="euler")
    want = _run(schedule=fastdiff.NoiseSchedule.from_diffusers(sched), sampler="euler")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scheduler_without_sampler_warns_and_uses_ddim():
    sched = diffusers.UnCLIPScheduler()  # (SASolverScheduler has one now: "sa_solver")
    with pytest.warns(UserWarning, match=r"no sampler for UnCLIPScheduler.*DDIM") as rec:
        got = _run(schedule=sched)
    assert rec[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = _run(schedule=sched, sampler="ddim")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "schedule",
    [None, "linear", fastdiff.NoiseSchedule("cosine"), {"beta_schedule": "scaled_linear"}],
    ids=["none", "name", "NoiseSchedule", "plain-dict"],  # plain dict: no _class_name
)
def test_no_scheduler_class_is_ddim_silently(schedule):
    assert infer_sampler(schedule) == "ddim"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(schedule=schedule)
    want = _run(schedule=schedule, sampler="ddim")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unsupported_setting_of_inferred_sampler_is_refused():
    """The inferred sampler's scheduler checks still apply (no silent drop). (UniPC's solver_p:
    DPMSolverMultistepScheduler's use_dynamic_shifting, refused here before, is implemented.)"""
    solver_p = diffusers.DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="solver_p="):
        _run(schedule=diffusers.UniPCMultistepScheduler(solver_p=solver_p))
