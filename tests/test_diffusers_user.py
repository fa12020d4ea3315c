"""User-level checks of fastdiff with diffusers models and schedulers (session-6 findings)."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@torch.no_grad()
def _diffusers_loop(unet, sched, steps: int, noise: torch.Tensor) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x).prev_sample
    return x


# ------------------------------------------- scheduler settings the sampler cannot reproduce
UNSUPPORTED = [
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_order=3), "solver_order"),
    ("dpm-solver++", DPMSolverMultistepScheduler, dict(solver_order=1), "solver_order"),
    ("dpm++", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), "use_karras_sigmas"),
    ("dpm++", DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "algorithm"),
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_type="heun"), "solver_type"),
    ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=True), "use_karras_sigmas"),
    ("euler", EulerDiscreteScheduler, dict(interpolation_type="log_linear"), "interpolation"),
    ("euler", EulerDiscreteScheduler, dict(timestep_type="continuous"), "timestep_type"),
    ("euler", EulerDiscreteScheduler, dict(final_sigmas_type="sigma_min"), "final_sigmas"),
]


@pytest.mark.parametrize("sampler,cls,kw,word", UNSUPPORTED, ids=lambda v: str(v)[:24])
def test_scheduler_settings_the_sampler_cannot_honour_raise(sampler, cls, kw, word):
    """schedule=<the sampler's own diffusers scheduler> with a setting fastdiff's sampler does
    not implement (Karras sigmas, a third-order solver, ...) was silently dropped: the samples
    then differed from the diffusers loop by 1-38% with no warning. Now a ValueError names it,
    before the model is called."""
    calls = []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    sched = cls(**kw)
    with pytest.raises(ValueError, match=word):
        fastdiff.sample(model, steps=4, sampler=sampler, schedule=sched, shape=(3, 4, 4))
    with pytest.raises(ValueError, match=word):  # the config dict of a saved scheduler too
        cfg = {**sched.config, "_class_name": cls.__name__}
        fastdiff.sample(model, steps=4, sampler=sampler, schedule=cfg, shape=(3, 4, 4))
    assert calls == []


SUPPORTED = [
    ("ddim", DDIMScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("ddim", DDIMScheduler, dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
    ("dpm++", DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min")),
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_order=2, lower_order_final=False)),
    (
        "dpm++",
        DPMSolverMultistepScheduler,
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    ),  # fmt: skip
    ("euler", EulerDiscreteScheduler, dict(timestep_spacing="trailing")),
    ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=False, interpolation_type="linear")),
]


@pytest.mark.parametrize("sampler,cls,kw", SUPPORTED, ids=lambda v: str(v)[:24])
def test_scheduler_settings_the_sampler_honours_match_diffusers(sampler, cls, kw):
    """Settings spelled out at their neutral values, and those the sampler takes, still run and
    match diffusers' own scheduler loop on the same x_T."""
    unet = _unet()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(unet, cls(**kw), 6, noise)
    got = fastdiff.sample(unet, steps=6, sampler=sampler, schedule=cls(**kw), noise=noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_other_schedulers_settings_do_not_bind_a_different_sampler():
    """A DPM-Solver scheduler with Karras sigmas used only for its betas by the DDIM sampler is
    fine (the settings belong to a different method)."""
    model = _unet()
    noise = torch.randn(1, 3, 8, 8)
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3)
    got = fastdiff.sample(model, steps=3, sampler="ddim", schedule=sched, noise=noise)
    want = fastdiff.sample(model, steps=3, sampler="ddim", noise=noise)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------- guidance_scale checked first
@pytest.mark.parametrize("w,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                   ("2", TypeError), (True, TypeError),
                                   (torch.ones(2), TypeError)])  # fmt: skip
def test_bad_guidance_scale_raises_before_the_model_runs(w, exc):
    """guidance_scale=nan ran one model call and failed inside the sampler op; '2' was parsed
    as 2.0 and a 2-element tensor gave float()'s unnamed error. Now each is named up front."""
    calls = []

    def model(x, t, class_labels):
        calls.append(t)
        return torch.zeros_like(x)

    with pytest.raises(exc, match="guidance_scale"):
        fastdiff.sample(model, steps=2, shape=(3, 4, 4), cond=torch.tensor([1]),
                        uncond=torch.tensor([0]), guidance_scale=w)  # fmt: skip
    assert calls == []
    got = fastdiff.sample(model, steps=2, shape=(3, 4, 4), cond=torch.tensor([1]),
                          uncond=torch.tensor([0]), guidance_scale=torch.tensor(2.0))  # fmt: skip
    assert got.shape == (1, 3, 4, 4)
