"""Step-by-step parity of fastdiff samplers with the diffusers schedulers (test-only dependency).

Each test runs a full sampling loop: at every step both sides get the same x_t (diffusers'
previous output), the same model output and the same noise, and the results must agree to a
relative error <= 1e-5 in fp32 (max |ours - theirs| / max |theirs|).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE

from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler, DPMSolverPPSampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL, SCHEDULES = PARITY_SHAPE, PARITY_RTOL, DIFFUSERS_BETAS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _model_output(x: torch.Tensor, g: torch.Generator, channels: int | None = None) -> torch.Tensor:
    """A stand-in network output: x-dependent, plus fresh randomness (same for both sides)."""
    r = torch.randn(x.shape, generator=g)
    out = 0.6 * r + 0.4 * x.clamp(-3, 3)
    if channels is not None:  # learned-range variance values in [-1, 1]
        v = torch.rand((x.shape[0], channels, *x.shape[2:]), generator=g) * 2 - 1
        out = torch.cat([out, v], dim=1)
    return out


def _loop(ours, theirs, their_step, steps, *, channels=None, noise_fn=None, seed=0, step64=None):
    """Run both samplers over all steps with shared inputs; assert parity at each step.

    ``step64``, when given, is the same diffusers scheduler with float64 constants and inputs.
    diffusers' DDPM evaluates beta'_t = 1 - ab_t / ab_prev in fp32, a cancellation that costs
    up to ~1e-4 relative in that coefficient at small t; there the bound is 1e-5 against the
    float64 run, and 1e-5 plus diffusers' own fp32 error against the fp32 run.
    """
    assert torch.equal(ours.timesteps, theirs.timesteps.to(torch.int64)), (
        ours.timesteps,
        theirs.timesteps,
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        mo = _model_output(x, g, channels)
        noise = noise_fn(i, int(t)) if noise_fn is not None else None
        ref = their_step(mo, t, x, noise)
        got = ours.step(mo, i, x, noise=noise)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert torch.isfinite(got).all()
        err, bound = _rel(got, ref), RTOL
        if step64 is not None:
            ref64 = step64(mo.double(), t, x.double(), noise)
            err64 = _rel(got, ref64)
            assert err64 <= RTOL, f"step {i} (t={int(t)}): rel err vs float64 {err64:.2e}"
            bound = RTOL + _rel(ref, ref64)
        worst = max(worst, err)
        assert err <= bound, f"step {i} (t={int(t)}): rel err {err:.2e} > {bound:.2e}"
        x = ref
    return worst


def _ddpm_pair(sch: NoiseSchedule, monkeypatch, **cfg):
    """diffusers DDPMScheduler in fp32, and a twin holding float64 constants; both draw fp32
    noise from their generator (so equal seeds give equal noise)."""
    from diffusers.schedulers import scheduling_ddpm

    def randn32(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn32)
    theirs = diffusers.DDPMScheduler(**cfg)
    twin = diffusers.DDPMScheduler(**cfg)
    twin.alphas_cumprod = sch.alphas_cumprod.clone()
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    return theirs, twin


def _schedule(name: str, zero_snr: bool = False) -> tuple[NoiseSchedule, dict]:
    cfg = dict(SCHEDULES[name], rescale_betas_zero_snr=zero_snr)
    return NoiseSchedule.from_diffusers(cfg), cfg


# ---------------------------------------------------------------------------------------- DDIM
DDIM_CASES = [
    *itertools.product(
        ["linear", "scaled_linear", "cosine"],
        ["leading", "trailing"],
        [0.0, 1.0],
        ["epsilon", "v_prediction"],
        [True, False],
    )
]


@pytest.mark.parametrize("sched,spacing,eta,pred,clip", DDIM_CASES)
def test_ddim_parity(sched, spacing, eta, pred, clip):
    steps = 50
    sch, cfg = _schedule(sched)
    offset = 1 if spacing == "leading" else 0
    theirs = diffusers.DDIMScheduler(
        **cfg, prediction_type=pred, timestep_spacing=spacing, clip_sample=clip,
        steps_offset=offset,
    )  # fmt: skip
    theirs.set_timesteps(steps)
    ours = DDIMSampler(
        sch, steps, eta=eta, prediction_type=pred, timestep_spacing=spacing, clip_sample=clip,
        steps_offset=offset,
    )  # fmt: skip
    gn = torch.Generator().manual_seed(7)

    def step(mo, t, x, z):
        return theirs.step(mo, t, x, eta=eta, variance_noise=z).prev_sample

    _loop(ours, theirs, step, steps, noise_fn=lambda i, t: torch.randn(SHAPE, generator=gn))


@pytest.mark.parametrize(
    "opts",
    [
        dict(thresholding=True, sample_max_value=2.0),
        dict(thresholding=True, sample_max_value=1.5, use_clipped_model_output=True),
        dict(clip_sample=True, clip_sample_range=0.5, use_clipped_model_output=True),
        dict(set_alpha_to_one=False),
        dict(prediction_type="sample"),
        dict(timestep_spacing="linspace"),
        dict(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        ),  # fmt: skip
    ],
    ids=[
        "thresh",
        "thresh-clipped-eps",
        "clip0.5-clipped-eps",
        "alpha_final",
        "sample",
        "linspace",
        "zero-snr-v",
    ],  # fmt: skip
)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_parity_options(opts, eta):
    opts = dict(opts)
    steps = 50
    use_clipped = opts.pop("use_clipped_model_output", False)
    zero = opts.pop("rescale_betas_zero_snr", False)
    sch, cfg = _schedule("scaled_linear", zero)
    theirs = diffusers.DDIMScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    ours = DDIMSampler(sch, steps, eta=eta, use_clipped_model_output=use_clipped, **opts)
    gn = torch.Generator().manual_seed(3)

    def step(mo, t, x, z):
        return theirs.step(
            mo, t, x, eta=eta, variance_noise=z, use_clipped_model_output=use_clipped
        ).prev_sample

    _loop(ours, theirs, step, steps, noise_fn=lambda i, t: torch.randn(SHAPE, generator=gn))


def test_ddim_prev_timestep_rule():
    """Default: diffusers' prev_t = t - T//n; "list": the next timestep actually visited."""
    sch = NoiseSchedule("linear")
    ab = sch.alphas_cumprod
    kw = dict(timestep_spacing="trailing", clip_sample=False)
    bug = DDIMSampler(sch, 30, **kw)
    fix = DDIMSampler(sch, 30, prev_timestep="list", **kw)
    ts = fix.timesteps.tolist()
    assert ts[:3] == [999, 966, 932] and bug.prev_timesteps()[:3].tolist() == [966, 933, 899]
    for i in range(29):
        assert fix.coef64[i, 2] == pytest.approx(ab[ts[i + 1]].sqrt().item(), rel=1e-12)
    assert bug.coef64[1, 2] == pytest.approx(ab[933].sqrt().item(), rel=1e-12)
    assert fix.coef64[-1, 2] == 1.0 and bug.coef64[-1, 2] == 1.0  # set_alpha_to_one at the end
    # the list rule matches diffusers' DDIM when fed the list's prev timestep (leading: identical)
    lead_a = DDIMSampler(sch, 50, steps_offset=1)
    lead_b = DDIMSampler(sch, 50, steps_offset=1, prev_timestep="list")
    assert (lead_a.coef64 == lead_b.coef64).all()
    # diffusers' own rule is what the default reproduces under trailing spacing
    theirs = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    theirs.set_timesteps(30)
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = theirs.step(mo, theirs.timesteps[1], x).prev_sample
    assert _rel(bug.step(mo, 1, x), ref) <= RTOL
    assert _rel(fix.step(mo, 1, x), ref) > 1e-3


# ---------------------------------------------------------------------------------------- DDPM
DDPM_CASES = [
    *itertools.product(
        ["linear", "cosine"], ["leading", "trailing"], ["epsilon", "v_prediction"], [True, False]
    ),
    ("scaled_linear", "leading", "epsilon", True),
    ("scaled_linear", "linspace", "sample", False),
]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("sched,spacing,pred,clip", DDPM_CASES)
def test_ddpm_parity(sched, spacing, pred, clip, variance_type, monkeypatch):
    steps = 50
    sch, cfg = _schedule(sched)
    kw = dict(prediction_type=pred, timestep_spacing=spacing, clip_sample=clip)
    theirs, twin = _ddpm_pair(sch, monkeypatch, **cfg, variance_type=variance_type, **kw)
    theirs.set_timesteps(steps)
    twin.set_timesteps(steps)
    ours = DDPMSampler(sch, steps, variance_type=variance_type, **kw)
    gens = [torch.Generator().manual_seed(11) for _ in range(3)]
    ch = SHAPE[1] if variance_type == "learned_range" else None

    def noise(i, t):  # diffusers draws noise only for t > 0, with the same generator
        return torch.randn(SHAPE, generator=gens[2]) if t > 0 else None

    _loop(
        ours,
        theirs,
        lambda mo, t, x, z: theirs.step(mo, t, x, generator=gens[0]).prev_sample,
        steps,
        channels=ch,
        noise_fn=noise,
        step64=lambda mo, t, x, z: twin.step(mo, t, x, generator=gens[1]).prev_sample,
    )


def test_ddpm_full_chain_and_threshold(monkeypatch):
    sch, cfg = _schedule("linear")
    theirs, twin = _ddpm_pair(sch, monkeypatch, **cfg, thresholding=True, sample_max_value=1.5)
    theirs.set_timesteps(1000)
    twin.set_timesteps(1000)
    ours = DDPMSampler(sch, thresholding=True, sample_max_value=1.5)
    assert ours.steps == 1000
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    _loop(
        ours,
        theirs,
        lambda mo, t, x, z: theirs.step(mo, t, x, generator=gens[0]).prev_sample,
        1000,
        noise_fn=lambda i, t: torch.randn(SHAPE, generator=gens[2]) if t > 0 else None,
        step64=lambda mo, t, x, z: twin.step(mo, t, x, generator=gens[1]).prev_sample,
    )


# ----------------------------------------------------------------------------------- DPM-Solver++
DPM_CASES = [
    *itertools.product(
        ["linear", "scaled_linear", "cosine"],
        ["linspace", "leading", "trailing"],
        ["epsilon", "v_prediction"],
    )
]


@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("sched,spacing,pred", DPM_CASES)
def test_dpm_solver_parity(sched, spacing, pred, steps):
    sch, cfg = _schedule(sched)
    kw = dict(prediction_type=pred, timestep_spacing=spacing)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **kw)
    theirs.set_timesteps(steps)
    ours = DPMSolverPPSampler(sch, steps, **kw)
    _loop(ours, theirs, lambda mo, t, x, z: theirs.step(mo, t, x).prev_sample, steps)


@pytest.mark.parametrize(
    "opts",
    [
        dict(lower_order_final=False),
        dict(final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min", lower_order_final=False),
        dict(thresholding=True, sample_max_value=1.5),
        dict(prediction_type="sample"),
        dict(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        ),  # fmt: skip
    ],
    ids=["no-lof", "sigma_min", "sigma_min-no-lof", "thresh", "sample", "zero-snr-v"],
)
@pytest.mark.parametrize("steps", [20, 8])
def test_dpm_solver_parity_options(opts, steps):
    opts = dict(opts)
    zero = opts.pop("rescale_betas_zero_snr", False)
    sch, cfg = _schedule("scaled_linear", zero)
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    ours = DPMSolverPPSampler(sch, steps, **opts)
    _loop(ours, theirs, lambda mo, t, x, z: theirs.step(mo, t, x).prev_sample, steps)


def test_dpm_solver_history_resets_at_step_zero():
    """Running the loop twice on one sampler gives the same result (history reset at i = 0)."""
    ours = DPMSolverPPSampler(NoiseSchedule("linear"), 6)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g)
    mos = [torch.randn(SHAPE, generator=g) for _ in range(6)]
    runs = []
    for _ in range(2):
        x = x0
        for i in range(6):
            x = ours.step(mos[i], i, x)
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpm_solver_with_repeated_timesteps_is_a_clear_error(spacing):
    # 1000 steps over 1000 training timesteps: linspace/leading repeat timesteps (h = 0; diffusers
    # returns NaN there); trailing does not
    with pytest.raises(ValueError, match="repeat timesteps.*trailing"):
        DPMSolverPPSampler(NoiseSchedule("linear"), 1000, timestep_spacing=spacing)
    assert len(set(DPMSolverPPSampler(NoiseSchedule("linear"), 999, timestep_spacing=spacing)
                   .timesteps.tolist())) == 999  # fmt: skip
    DPMSolverPPSampler(NoiseSchedule("linear"), 1000, timestep_spacing="trailing")


@pytest.mark.parametrize("begin", [3, 7])
def test_dpm_solver_run_starting_mid_schedule_matches_diffusers_begin_index(begin):
    """img2img-style: a fresh sampler stepped from i = begin (diffusers: set_begin_index) takes
    a first-order first step, and a sampler reused after a full run (other batch size too)
    gives the same as a fresh one: no stale history."""
    sch, cfg = _schedule("scaled_linear")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg)
    theirs.set_timesteps(10)
    theirs.set_begin_index(begin)
    ours = DPMSolverPPSampler(sch, 10)
    g = torch.Generator().manual_seed(1)
    x_start = torch.randn(SHAPE, generator=g)
    mos = [_model_output(x_start, g, None) for _ in range(10)]
    x_ref, x = x_start, x_start
    for i in range(begin, 10):
        x_ref = theirs.step(mos[i], theirs.timesteps[i], x_ref).prev_sample
        x = ours.step(mos[i], i, x)
        assert _rel(x, x_ref) <= RTOL, (i, _rel(x, x_ref))
    reused = DPMSolverPPSampler(sch, 10)
    y = torch.randn(3, *SHAPE[1:], generator=g)
    for i in range(10):  # a full run at another batch size first
        y = reused.step(torch.randn(y.shape, generator=g), i, y)
    x = x_start
    for i in range(begin, 10):
        x = reused.step(mos[i], i, x)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
