"""Sampler paths the parity and sampling tests did not pin down (found by mutation testing).

Each test compares two routes that must give the same step: a caller-supplied ``coef`` row
against the sampler's own table, and a thresholding pass that changes nothing against no
thresholding. A wrong coefficient or a wrong half of the model output in only one route fails.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler

SHAPE = (2, 3, 5, 7)  # odd spatial sizes


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_thresholding_with_external_coef_matches_own_table(use_clipped, eta):
    """CUDA graphs pass ``coef`` from a static buffer: with dynamic thresholding the DDIM step
    then builds its (a = 0, s = 1) row from that buffer; it must equal the cached table's."""
    smp = DDIMSampler(
        NoiseSchedule("linear"),
        10,
        eta=eta,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
        use_clipped_model_output=use_clipped,
    )
    table = smp.coef_table("cpu")
    for i in (0, 4, 9):
        x = torch.randn(SHAPE) * 2.0
        mo = torch.randn(SHAPE) * 1.5  # x0 = (x - s eps) / a exceeds 1: thresholding is active
        z = torch.randn(SHAPE)
        own = smp.step(mo, i, x, noise=z)
        ext = smp.step(mo, i, x, noise=z, coef=table[i].clone())
        torch.testing.assert_close(ext, own, rtol=1e-6, atol=1e-6, msg=f"step {i}")
        assert not torch.equal(own, x)


def test_ddpm_noop_thresholding_with_learned_variance_and_guidance_uses_cond_variance():
    """With every |x0| <= 1, dynamic thresholding changes nothing (s = 1), so the thresholding
    route must give the plain route's step; that includes sigma from the learned-range variance
    values of the *conditional* half of ``[uncond, cond]`` (the op's convention)."""
    n, c = SHAPE[0], SHAPE[1]
    smp_plain = DDPMSampler(
        NoiseSchedule("linear"),
        10,
        variance_type="learned_range",
        prediction_type="sample",
        clip_sample=False,
    )
    smp_thr = DDPMSampler(
        NoiseSchedule("linear"),
        10,
        variance_type="learned_range",
        prediction_type="sample",
        clip_sample=False,
        thresholding=True,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=2.0,
    )
    g = 1.5
    for i in (0, 5, 8):  # steps with noise (the last step, t = 0, adds none)
        x = torch.randn(SHAPE)
        unc = torch.rand(SHAPE) * 0.6 - 0.3  # x0 = u + g (c - u) stays within [-0.75, 0.75]
        cond = torch.rand(SHAPE) * 0.6 - 0.3
        v_unc = torch.rand(SHAPE) * 2 - 1
        v_cond = torch.rand(SHAPE) * 2 - 1
        mo = torch.cat([torch.cat([unc, v_unc], 1), torch.cat([cond, v_cond], 1)])
        assert mo.shape == (2 * n, 2 * c, *SHAPE[2:])
        z = torch.randn(SHAPE) * 3.0  # large noise: a wrong sigma shows
        plain = smp_plain.step(mo, i, x, noise=z, guidance_scale=g)
        thr = smp_thr.step(mo, i, x, noise=z, guidance_scale=g)
        torch.testing.assert_close(thr, plain, rtol=1e-5, atol=1e-5, msg=f"step {i}")


@pytest.mark.parametrize("steps", [12, 14, 15])
def test_dpm_solver_lower_order_final_threshold_matches_diffusers(steps):
    """With ``final_sigmas_type="sigma_min"`` the last step is first order only for fewer than
    15 steps (diffusers' ``lower_order_final``); the parity tests ran 8 and 20 steps, so any
    threshold in 9..20 passed them. 14 and 15 sit on both sides of the boundary."""
    pytest.importorskip("diffusers")
    import diffusers
    import test_samplers_parity as par

    from fastdiff.samplers import DPMSolverPPSampler

    sch, cfg = par._schedule("scaled_linear")
    opts = dict(final_sigmas_type="sigma_min")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    ours = DPMSolverPPSampler(sch, steps, **opts)
    par._loop(ours, theirs, lambda mo, t, x, z: theirs.step(mo, t, x).prev_sample, steps)


def test_dpm_solver_reused_sampler_mid_schedule_start_ignores_stale_history():
    """A sampler that just finished a run and then starts another at step i > 0 (img2img)
    holds the history of its last step, not of step i - 1: the new run's first step must be
    first order, exactly as on a fresh sampler."""
    from fastdiff.samplers import DPMSolverPPSampler

    sch = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    reused = DPMSolverPPSampler(sch, 10)
    x = torch.randn(SHAPE)
    for i in range(10):  # a full run: the history is now step 9's x0
        x = reused.step(torch.randn(SHAPE), i, x)
    fresh = DPMSolverPPSampler(sch, 10)
    x_a = x_b = torch.randn(SHAPE)
    for i in range(3, 10):
        mo = torch.randn(SHAPE)
        x_a = reused.step(mo, i, x_a)
        x_b = fresh.step(mo, i, x_b)
        torch.testing.assert_close(x_a, x_b, rtol=0, atol=0, msg=f"step {i}")
