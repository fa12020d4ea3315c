"""Regression tests from the session-13 review (review13) of the session-12 samplers (DPM++ 3M /
3M SDE and the new DPM++ options, UniPC order 3, DPM2 / DPM2 a) and of scheduler inference from
diffusers scheduler objects, as a demanding diffusers user calls them.

Each test failed before its fix (the commit that fixed it names the test); the non-bugs that were
checked are listed in notes/s13/review13_log.md.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import fastdiff
from fastdiff._sampler_setup import resolve_sampler

try:
    import diffusers
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers")

# google/ddpm-cat-256 style: the DDPMScheduler config a DDPMPipeline ships (clip_sample=True)
DDPM_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small",
    "clip_sample": True,
}


def _toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in model whose x0 predictions leave [-1, 1] (so that clipping would show)."""
    return 0.7 * torch.tanh(x) + 0.05 * torch.sin(t.float().round() / 50.0).reshape(-1, 1, 1, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _diffusers_loop(sch, steps: int, x: torch.Tensor) -> torch.Tensor:
    """A pipeline's loop body (init_noise_sigma = 1 for these schedulers)."""
    sch.set_timesteps(steps)
    kw = {"generator": None} if "generator" in inspect.signature(sch.step).parameters else {}
    for t in sch.timesteps:
        x = sch.step(_toy(sch.scale_model_input(x, t), t.reshape(1)), t, x, **kw).prev_sample
    return x


@needs_diffusers
@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "saved-config"])
@pytest.mark.parametrize(
    "cls,opts",
    [("DPMSolverMultistepScheduler", {"solver_order": 3}),
     ("UniPCMultistepScheduler", {"solver_order": 3})],
)  # fmt: skip
def test_from_config_leftover_clip_sample_is_not_applied(cls, opts, as_dict):
    """``DPMSolverMultistepScheduler.from_config(ddpm_pipe.scheduler.config)`` (diffusers' way to
    swap a pipeline's scheduler) keeps the DDPM config's ``clip_sample=True`` in its config,
    which DPMSolverMultistepScheduler / UniPCMultistepScheduler do not have and ignore.
    fastdiff took it as the sampler's ``clip_sample`` (a fastdiff extension of these samplers)
    and clipped every x0 prediction: samples silently unlike diffusers' (rel. error 0.99)."""
    sch = getattr(diffusers, cls).from_config(DDPM_CONFIG, **opts)
    assert sch.config["clip_sample"] is True  # the leftover, as diffusers keeps it
    schedule = dict(sch.config) if as_dict else sch
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_loop(sch, 7, x_T)
    got = fastdiff.sample(_toy, steps=7, schedule=schedule, noise=x_T)
    assert _rel(got, ref) <= 1e-5
    smp = resolve_sampler(_toy, None, 7, schedule, None, None, {})
    assert smp.clip_sample is False and smp.solver_order == 3
    # an explicit option still wins, and another class's scheduler still lends its settings
    assert resolve_sampler(_toy, None, 7, schedule, None, None, {"clip_sample": True}).clip_sample
    ddpm = diffusers.DDPMScheduler.from_config(DDPM_CONFIG)
    assert resolve_sampler(_toy, "dpm++", 7, ddpm.config, None, None, {}).clip_sample
    assert math.isfinite(float(got.abs().max()))


def _diffusers_sde_loop(sch, steps: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    for t in sch.timesteps:
        x = sch.step(_toy(x, t.reshape(1)), t, x, generator=g).prev_sample
    return x


@needs_diffusers
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_lu_lambdas_to_sigma_min_on_cosine_builds_and_matches(order):
    """DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_lu_lambdas=True,
    final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++"): the lambda grid's last
    sigma is one float32 ulp below sigma_min, so the last step went up in sigma (h ~ -2e-7) and
    building the sampler failed with a bare ``ValueError: math domain error`` (sqrt(1 - e^{-2h})
    of a negative number) for every step count, where diffusers (h = 0 in float32) samples."""
    sch = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", use_lu_lambdas=True, final_sigmas_type="sigma_min",
        algorithm_type="sde-dpmsolver++", solver_order=order,
    )  # fmt: skip
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_sde_loop(sch, 6, x_T, seed=4)
    got = fastdiff.sample(_toy, steps=6, schedule=sch, noise=x_T,
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert _rel(got, ref) <= 1e-5
    smp = resolve_sampler(_toy, None, 6, sch, None, None, {})
    assert smp.coef64[-1, 5] == 0.0  # no noise on the (identity) last step


@needs_diffusers
@pytest.mark.parametrize(
    "cls,beta_schedule",
    [("DPMSolverMultistepScheduler", "squaredcos_cap_v2"),
     ("DPMSolverMultistepScheduler", "linear"),
     ("UniPCMultistepScheduler", "squaredcos_cap_v2")],
)  # fmt: skip
def test_final_sigma_min_on_spaced_timesteps_is_diffusers_float32_one(cls, beta_schedule):
    """``final_sigmas_type="sigma_min"`` on the spaced timesteps (no sigma grid), 15+ steps, so
    the last step is a third-order one: fastdiff ended at the float64 sigma_min, diffusers at
    the one of its float32 alpha_bar (1 - ab_0 ~ 4e-5 on cosine: ~3 digits), as fastdiff's own
    sigma grids do. Whole runs were up to 2.2e-4 (DPM++, cosine) / 9e-5 (DPM++, linear) /
    1.3e-5 (UniPC) from diffusers' loop with ``prediction_type="sample"`` (claimed: 1e-5)."""
    sch = getattr(diffusers, cls)(
        beta_schedule=beta_schedule, solver_order=3, final_sigmas_type="sigma_min",
        prediction_type="sample",
    )  # fmt: skip
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (15, 25):
        ref = _diffusers_loop(sch, steps, x_T)
        got = fastdiff.sample(_toy, steps=steps, schedule=sch, noise=x_T)
        assert _rel(got, ref) <= 1e-5, steps


@needs_diffusers
def test_leftover_sigma_min_max_of_a_euler_config():
    """diffusers' sigma grids read ``sigma_min`` / ``sigma_max`` from the config even where the
    class does not take them: ``DPMSolverMultistepScheduler.from_config(euler.config)`` with
    Euler's ``sigma_min=0.1, sigma_max=5`` and Karras sigmas steps on a 0.1 .. 5 grid.
    fastdiff's "dpm++" (no sigma_min option) silently used the full 0.03 .. 14.6 grid (other
    timesteps, final rel. error 1.8); now a ValueError naming them. KDPM2 (whose fastdiff
    sampler takes them) keeps using them, as diffusers."""
    euler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, sigma_min=0.1,
        sigma_max=5.0, use_karras_sigmas=True,
    )  # fmt: skip
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(euler.config)
    with pytest.raises(ValueError, match=r"sets sigma_min=0.1, sigma_max=5.0, which .*'dpm\+\+'"):
        fastdiff.sample(_toy, steps=5, schedule=dpm, shape=(3, 4, 4))
    kdpm2 = diffusers.KDPM2DiscreteScheduler.from_config(euler.config)
    smp = resolve_sampler(_toy, None, 5, kdpm2, None, None, {})
    assert (smp.sigma_min, smp.sigma_max) == (0.1, 5.0)
    kdpm2.set_timesteps(5)
    assert smp.timesteps.tolist() == kdpm2.timesteps.round().long().tolist()


# an SD 2.x zero-terminal-SNR fine-tune's DDIMScheduler config (Lin et al. 2023's fixes)
ZERO_SNR_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "set_alpha_to_one": False,
}


@needs_diffusers
def test_leftover_rescale_betas_zero_snr_is_not_applied():
    """``KDPM2DiscreteScheduler.from_config(zero_snr_ddim.config)`` keeps the leftover
    ``rescale_betas_zero_snr=True`` in its config, but KDPM2 (like Heun, PNDM, LMS) has no such
    setting: diffusers samples the plain scaled_linear betas (sigma_max 14.6). fastdiff's
    schedule took the leftover and rescaled to zero terminal SNR (sigma_max 4096): other model
    timesteps and samples (rel. error 0.04 at 20 steps, 27 at 4)."""
    sch = diffusers.KDPM2DiscreteScheduler.from_config(ZERO_SNR_CONFIG)
    assert sch.config["rescale_betas_zero_snr"] is True  # the leftover, as diffusers keeps it
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sch.set_timesteps(4)
    ref = _diffusers_loop(sch, 4, z * sch.init_noise_sigma)
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return _toy(x, t)

    got = fastdiff.sample(model, steps=4, schedule=sch, noise=z)  # x_T: init_noise_sigma z
    assert calls == sch.timesteps.round().long().tolist()
    assert _rel(got, ref) <= 1e-5
    for cls in ("HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        other = getattr(diffusers, cls).from_config(ZERO_SNR_CONFIG)
        smp = resolve_sampler(_toy, None, 4, other, None, None, {})
        assert not smp.schedule.rescale_betas_zero_snr
    # schedulers that have the setting keep it
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(ZERO_SNR_CONFIG)
    assert resolve_sampler(_toy, None, 4, dpm, None, None, {}).schedule.rescale_betas_zero_snr


@needs_diffusers
@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "saved-config"])
def test_learned_variance_scheduler_drops_the_variance_channels_of_a_plain_model(as_dict):
    """A plain callable returning 2C channels (no config saying so) with a
    DPMSolverMultistepScheduler(variance_type="learned_range") was refused ("2C channels are
    allowed only with variance_type='learned_range' (DDPM)"); diffusers keeps the first
    channels. Now the sample is diffusers' loop's."""
    sch = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")

    def model(x, t):
        eps = _toy(x, t)
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)  # [eps | variance channels]

    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    cfg = {**sch.config, "_class_name": "DPMSolverMultistepScheduler"}  # as saved
    got = fastdiff.sample(model, 8, schedule=cfg if as_dict else sch, noise=x_t)
    sch.set_timesteps(8)
    x = x_t.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, t.reshape(1)), t, x).prev_sample
    assert _rel(got, x) < 1e-5
    with pytest.raises(ValueError, match="2C channels"):  # without the scheduler: still refused
        fastdiff.sample(model, 8, sampler="dpm++", noise=x_t)
