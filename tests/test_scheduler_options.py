"""A diffusers scheduler's settings as sampler options (``_scheduler_options``): a key listed
in the config's ``_use_default_values`` is skipped only while its value is the class default;
a value changed afterwards (a hand-edited config dict, ``register_to_config``) is applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff._sampler_setup import _same, _scheduler_options, resolve_sampler

diffusers = pytest.importorskip("diffusers")


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * (0.5 + t.to(x.dtype)[:, None, None, None] / 2000.0)


def _run(**kw: object) -> torch.Tensor:
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    return fastdiff.sample(_model, steps=5, noise=noise, **kw)


def _edited(cls: str, **changes: object) -> dict:
    """``dict(scheduler.config)`` (no ``_class_name``; every key listed as a default) with
    ``changes`` made by hand afterwards."""
    cfg = dict(getattr(diffusers, cls)().config)
    assert set(changes) <= set(cfg["_use_default_values"])
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("with_class", [False, True], ids=["plain-dict", "class-name"])
def test_hand_edited_flow_settings_are_applied(with_class):
    cfg = _edited("DPMSolverMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0)
    if with_class:
        cfg["_class_name"] = "DPMSolverMultistepScheduler"
    opts = _scheduler_options(cfg, "dpm++")
    assert opts["use_flow_sigmas"] is True and opts["flow_shift"] == 3.0
    assert "solver_order" not in opts  # unchanged defaults stay skipped
    smp = resolve_sampler(_model, "dpm++", 5, cfg, None, None, {})
    assert smp.use_flow_sigmas and smp.flow_shift == 3.0
    got = _run(schedule=cfg, sampler="dpm++")
    want = _run(sampler="dpm++", use_flow_sigmas=True, flow_shift=3.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the check can fail: the default grid samples differently
    assert not torch.equal(got, _run(sampler="dpm++"))


def test_hand_edited_value_of_a_vp_sampler_is_applied():
    cfg = _edited("DDIMScheduler", set_alpha_to_one=False, timestep_spacing="trailing")
    opts = _scheduler_options(cfg, "ddim")
    assert opts == {"set_alpha_to_one": False, "timestep_spacing": "trailing"}
    smp = resolve_sampler(_model, "ddim", 5, cfg, None, None, {})
    assert smp.timestep_spacing == "trailing"
    want = fastdiff.samplers.DDIMSampler(
        fastdiff.NoiseSchedule("linear"), 5, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    np.testing.assert_array_equal(smp.timesteps, want.timesteps)
    np.testing.assert_array_equal(smp.coef64, want.coef64)


def test_register_to_config_change_is_applied():
    """diffusers itself changes a listed key (set_timesteps(mu=...) sets flow_shift = e^mu,
    singlestep's set_timesteps sets lower_order_final): the object's current value applies."""
    sched = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True)
    sched.register_to_config(flow_shift=5.0)
    assert "flow_shift" in sched.config["_use_default_values"]
    assert _scheduler_options(sched, "unipc")["flow_shift"] == 5.0
    assert resolve_sampler(_model, None, 4, sched, None, None, {}).flow_shift == 5.0


def test_another_class_defaults_stay_skipped():
    """PNDM's default set_alpha_to_one=False must not override DDIM's True (the reason for the
    skip); PNDM's changed value does."""
    pndm = diffusers.PNDMScheduler()
    assert "set_alpha_to_one" in pndm.config["_use_default_values"]
    assert pndm.config["set_alpha_to_one"] is False
    assert "set_alpha_to_one" not in _scheduler_options(pndm, "ddim")
    assert resolve_sampler(_model, "ddim", 5, pndm, None, None, {}).set_alpha_to_one is True
    pndm.register_to_config(set_alpha_to_one=True, steps_offset=1)
    assert _scheduler_options(pndm, "ddim") == {"set_alpha_to_one": True, "steps_offset": 1}
    # a DDIMScheduler built from PNDM's config: every key a default of DDIM's now
    ddim = diffusers.DDIMScheduler.from_config(diffusers.PNDMScheduler().config)
    assert _scheduler_options(ddim, "ddim") == {}


def test_unknown_class_keeps_the_list():
    """A plain dict whose keys are not all of the sampler's diffusers class (another class's
    config without _class_name): the class of the list is unknown, every listed key skipped."""
    cfg = _edited("DDPMScheduler", timestep_spacing="trailing", clip_sample=False)
    assert "variance_type" in cfg  # not a DDIMScheduler parameter
    assert _scheduler_options(cfg, "ddim") == {}
    # the same change in a config naming its class is applied
    cfg["_class_name"] = "DDPMScheduler"
    assert _scheduler_options(cfg, "ddim") == {"timestep_spacing": "trailing", "clip_sample": False}


def test_listed_key_outside_the_class_keeps_the_list():
    """A listed key that is no parameter of the config's class (a leftover, another diffusers
    version): no class default to compare with, the list is trusted (skipped, no error)."""
    cfg = dict(diffusers.DDPMScheduler().config, _class_name="DDPMScheduler")
    cfg["set_alpha_to_one"] = False  # DDIM's, not DDPM's
    cfg["_use_default_values"] = [*cfg["_use_default_values"], "set_alpha_to_one"]
    assert _scheduler_options(cfg, "ddim") == {}
    cfg["_use_default_values"].remove("set_alpha_to_one")
    assert _scheduler_options(cfg, "ddim") == {"set_alpha_to_one": False}


def test_unlisted_keys_are_applied_as_before():
    sched = diffusers.DEISMultistepScheduler(solver_order=3, lower_order_final=False)
    opts = _scheduler_options(sched, "deis")
    assert opts["solver_order"] == 3 and opts["lower_order_final"] is False
    assert "prediction_type" not in opts  # listed, still the default


def test_hand_edited_unsupported_setting_is_refused():
    """The changed value now reaches the sampler, which refuses what it cannot do (instead of
    dropping it silently)."""
    cfg = _edited("UniPCMultistepScheduler", shift_terminal=0.5)
    cfg["_class_name"] = "UniPCMultistepScheduler"
    with pytest.raises(ValueError, match="shift_terminal"):
        _run(schedule=cfg)


def test_same():
    assert _same(1.0, 1.0) and _same(False, False) and _same(None, None) and _same("a", "a")
    assert not _same(3.0, 1.0) and not _same("linspace", "leading") and not _same(None, 0.5)
    assert not _same(np.ones(3), np.ones(3))  # an array: never "the default"
    assert _same([], [])  # a list from a saved JSON config equals the default list
