"""PNDMSampler ("pndm"; "plms" = skip_prk_steps=True) vs diffusers' PNDMScheduler, and through
sample() / the CLI (the CUDA-graph loop, guidance, every unipc_step backend:
tests/test_sampler_contract.py).

With skip_prk_steps=True diffusers runs N PLMS steps as N + 1 model calls over [t0, t1, t1, t2,
..., tN-1]: a first step, its pseudo improved-Euler correction from the same sample (the two
outputs averaged), then the Adams-Bashforth combinations of PLMS (Liu et al. 2022). With
skip_prk_steps=False (its default) three pseudo Runge-Kutta steps of 4 calls each come first
(N + 9 calls), and PLMS reads their first outputs. Per model call both sides get the
same sample and model output; ours must agree to a relative error <= 1e-5 (max |ours - theirs| /
max |theirs|) with diffusers' step run in float64 on our float64 alpha_bar, and to 1e-5 plus
diffusers' own fp32 error with the stock scheduler (whose fp32 coefficients are up to ~5e-3 off
at t = 999 of the cosine schedule).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _sampler_cases import assert_step_parity, sample_through_scheduler
from _sampler_cases import rel as _rel
from _sampler_cases import toy as _toy
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE, record_sample_calls
from test_gmm_exact import GMMEps, _assert_mixture, _run

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.cli import main
from fastdiff.samplers import SAMPLERS, PNDMSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL


def _scheduler(sched: str = "scaled_linear", prk: bool = False, **opts):
    """diffusers' PNDMScheduler; PLMS only (skip_prk_steps=True) unless ``prk``."""
    return diffusers.PNDMScheduler(**DIFFUSERS_BETAS[sched], skip_prk_steps=not prk, **opts)


def _pair(steps: int, sched: str = "scaled_linear", prk: bool = False, **opts):
    """(ours, stock diffusers, diffusers in float64 on our alpha_bar), all set to ``steps``."""
    schedule = NoiseSchedule.from_diffusers(DIFFUSERS_BETAS[sched])
    ours = PNDMSampler(schedule, steps, skip_prk_steps=not prk, **opts)
    theirs, twin = _scheduler(sched, prk, **opts), _scheduler(sched, prk, **opts)
    for s in (theirs, twin):
        s.set_timesteps(steps)
    twin.alphas_cumprod = schedule.alphas_cumprod.clone()
    one = torch.tensor(1.0, dtype=torch.float64)
    twin.final_alpha_cumprod = one if opts.get("set_alpha_to_one") else twin.alphas_cumprod[0]
    return ours, theirs, twin


def _per_call(ours, theirs, twin, *, begin: int = 0, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Calls ``begin ..`` of a run on each side with shared samples and model outputs (diffusers'
    img2img loop: a fresh scheduler over ``timesteps[begin:]``); returns the worst error vs the
    float64 twin and the last sample."""
    assert torch.equal(ours.timesteps, theirs.timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst = 0.0
    for i in range(begin, len(ours)):
        t = theirs.timesteps[i]
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        ref64 = twin.step(mo.double(), t, x.double()).prev_sample
        ref = theirs.step(mo, t, x).prev_sample
        got = ours.step(mo, i, x)
        err64, _ = assert_step_parity(got, ref, ref64, f"call {i} (t={int(t)}) vs the twin")
        worst = max(worst, err64)
        x = ref64.float()
    return worst, x


CASES = [
    *itertools.product(
        [False],
        ["leading", "linspace", "trailing"],
        ["epsilon", "v_prediction"],
        [False, True],
        [1, 2, 3, 4, 5, 10, 50],
    ),
    *itertools.product(
        [True],
        ["leading", "linspace", "trailing"],
        ["epsilon", "v_prediction"],
        [False, True],
        [4, 5, 7, 10, 50],
    ),
]


@pytest.mark.parametrize("prk,spacing,pred,to_one,steps", CASES)
def test_per_call_parity_with_diffusers(prk, spacing, pred, to_one, steps):
    sched = ("linear", "scaled_linear", "cosine")[steps % 3]
    offset = 1 if spacing == "leading" else 0
    ours, theirs, twin = _pair(steps, sched, prk, prediction_type=pred, timestep_spacing=spacing,
                               steps_offset=offset, set_alpha_to_one=to_one)  # fmt: skip
    calls = steps + 9 if prk else steps + 1 if steps > 1 else 1
    assert len(ours) == len(theirs.timesteps) == calls
    worst, _ = _per_call(ours, theirs, twin, seed=steps)
    # a real comparison ran (one linspace step goes from t = 0 to alpha_bar_0 = alpha_bar_0
    # when set_alpha_to_one is False: x unchanged on both sides)
    assert worst > 0.0 or (steps, spacing, to_one) == (1, "linspace", False)


@pytest.mark.parametrize("begin", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("prk", [False, True], ids=["plms", "prk"])
def test_img2img_start_matches_a_fresh_diffusers_scheduler(begin, pred, prk):
    """diffusers' img2img pipelines run ``timesteps[t_start:]`` on a freshly set scheduler, whose
    counter restarts: the first call at t_start is a first step, the second its improved-Euler
    correction (from t + T // N, diffusers' rule, also where t_start = 1 lands on the repeated
    timestep); with the Runge-Kutta warm-up its steps start from the counter's timesteps. A
    sampler reused after a full run at another batch size gives the same."""
    ours, theirs, twin = _pair(10, "scaled_linear", prk, prediction_type=pred, steps_offset=1)
    _, ref = _per_call(ours, theirs, twin, begin=begin, seed=3)
    reused, theirs2, twin2 = _pair(10, "scaled_linear", prk, prediction_type=pred, steps_offset=1)
    y = torch.randn(3, *SHAPE[1:])
    for i in range(len(reused)):
        y = reused.step(torch.randn(y.shape), i, y)
    _, got = _per_call(reused, theirs2, twin2, begin=begin, seed=3)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _diffusers_loop(sch, steps: int, z: torch.Tensor, model=_toy, begin: int = 0) -> torch.Tensor:
    sch.set_timesteps(steps)
    x = z
    for t in sch.timesteps[begin:]:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


RUNS = [
    ("scaled_linear", "epsilon", "leading", {"steps_offset": 1}, 20),  # Stable Diffusion 1.x
    ("scaled_linear", "v_prediction", "leading", {"steps_offset": 1}, 12),  # SD 2.x 768
    ("linear", "epsilon", "linspace", {"set_alpha_to_one": True}, 7),
    ("linear", "v_prediction", "trailing", {}, 5),
    ("linear", "epsilon", "leading", {"prk": True}, 10),  # diffusers' default PNDMScheduler()
    ("scaled_linear", "v_prediction", "trailing", {"prk": True, "set_alpha_to_one": True}, 6),
]


@pytest.mark.parametrize("sched,pred,spacing,extra,steps", RUNS)
def test_sample_with_a_pndm_scheduler_is_diffusers_loop(sched, pred, spacing, extra, steps):
    """sample(schedule=PNDMScheduler(...)) picks "pndm" without a warning, takes the scheduler's
    settings (skip_prk_steps too), calls the model at diffusers' timesteps and lands where
    diffusers' own loop does."""
    sch = _scheduler(sched, prediction_type=pred, timestep_spacing=spacing, **extra)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = _diffusers_loop(sch, steps, z)
    got = sample_through_scheduler(sch, steps, z)
    err = _rel(got, ref)
    assert 0.0 < err <= RTOL, f"whole-run rel err {err:.2e}"
    # and not DDIM's samples on the same schedule (the check can fail)
    ddim = fastdiff.sample(_toy, steps=steps, sampler="ddim", schedule=sch, noise=z)
    assert _rel(ddim, ref) > 1e-3


def test_timesteps_rows_and_registry():
    s = PNDMSampler(NoiseSchedule("linear"), 4, set_alpha_to_one=True, skip_prk_steps=True)
    assert (len(s), s.num_inference_steps) == (5, 4)
    assert s.timesteps.tolist() == [750, 500, 500, 250, 0]
    one = PNDMSampler(NoiseSchedule("linear"), 1, skip_prk_steps=True)
    assert len(one) == 1 and one.timesteps.tolist() == [0]
    prk = PNDMSampler(NoiseSchedule("linear"), 5)  # diffusers' default: 3 RK steps, h = 100
    assert prk.timesteps.tolist() == [800, 700, 700, 600, 600, 500, 500, 400, 400, 300, 300,
                                      200, 200, 0]  # fmt: skip
    assert (prk.coef64[3::4, 3] > 0).all() and (prk.coef64[3::4, 10] < 0).all()  # RK 4th calls
    assert "steps=4 (5 model calls)" in repr(s)
    c = s.coef64
    assert c.shape == (5, 12) and not any(s.needs_noise(i) for i in range(5))
    # call 0: x_c = x (kept for call 1), x_next from the predictor half
    assert tuple(c[0, 2:7]) == (1.0, 0.0, 0.0, 0.0, 0.0) and c[0, 8] < 0.0
    # call 1: from call 0's x (last), the two outputs averaged; x_next = x_c
    assert c[1, 2] == 0.0 and c[1, 3] > 0.0 and c[1, 4] == c[1, 5] and c[1, 7] == 1.0
    # calls 2, 3, 4: orders 2, 3, 4 with Adams-Bashforth weights (the weights sum to 1)
    for i, w in ((2, [3, -1]), (3, [23, -16, 5]), (4, [55, -59, 37, -9])):
        got = c[i, [4, 5, 6, 10]][: len(w)]
        np.testing.assert_allclose(got / got.sum(), np.array(w) / sum(w), rtol=1e-12)
        assert (c[i, [4, 5, 6, 10]][len(w) :] == 0).all() and (c[i, [8, 9, 11]] == 0).all()
    assert SAMPLERS["pndm"] is SAMPLERS["plms"] is PNDMSampler
    assert make_sampler("PLMS", NoiseSchedule("linear"), 10).skip_prk_steps is True
    assert make_sampler("pndm", NoiseSchedule("linear"), 10).skip_prk_steps is False
    assert make_sampler("plms", NoiseSchedule("linear"), 10, skip_prk_steps=False).steps == 19


@pytest.mark.parametrize(
    "opts,match",
    [
        (dict(prediction_type="sample"), "prediction_type"),
        (dict(timestep_spacing="even"), "timestep_spacing"),
        (dict(steps_offset=-1), "steps_offset"),
        (dict(steps_offset=40), "steps_offset"),  # pushes the first timestep past 999
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        PNDMSampler(NoiseSchedule("linear"), 25, **opts)


def test_zero_terminal_snr_is_a_clear_error():
    """alpha_bar_999 = 0: phi's sqrt(alpha_bar_prev / alpha_bar_t) is infinite."""
    zero = NoiseSchedule.from_diffusers(dict(DIFFUSERS_BETAS["scaled_linear"],
                                             rescale_betas_zero_snr=True))  # fmt: skip
    with pytest.raises(ValueError, match="zero terminal SNR"):
        PNDMSampler(zero, 10, timestep_spacing="trailing", skip_prk_steps=True)
    assert len(PNDMSampler(zero, 10, skip_prk_steps=True)) == 11  # leading: t <= 900


@pytest.mark.parametrize("steps", [0, 1001, 2.0])
def test_bad_steps(steps):
    with pytest.raises((ValueError, TypeError), match="steps"):
        PNDMSampler(NoiseSchedule("linear"), steps)


def test_bad_settings_are_clear_errors():
    """The Runge-Kutta warm-up spans 3 steps (diffusers' set_timesteps fails below 4 steps): a
    ValueError naming steps and skip_prk_steps. (eta and unknown options:
    tests/test_sampler_contract.py.)"""
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="skip_prk_steps=False needs >= 4 steps.*got 3"):
        fastdiff.sample(_toy, steps=3, schedule=diffusers.PNDMScheduler(), noise=z)
    saved = dict(DIFFUSERS_BETAS["scaled_linear"], _class_name="PNDMScheduler",
                 skip_prk_steps=False, steps_offset=1)  # a scheduler_config.json  # fmt: skip
    with pytest.raises(ValueError, match="skip_prk_steps=False needs >= 4 steps"):
        fastdiff.sample(_toy, steps=2, sampler="plms", noise=z, schedule=saved)
    saved["skip_prk_steps"] = True  # Stable Diffusion's
    assert torch.isfinite(fastdiff.sample(_toy, steps=2, noise=z, schedule=saved)).all()


def test_scheduler_settings_become_defaults():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    sch = _scheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                     set_alpha_to_one=True)  # fmt: skip
    assert infer_sampler(sch) == "pndm"
    smp = resolve_sampler(None, None, 8, sch, None, None, {})
    assert isinstance(smp, PNDMSampler) and smp.num_inference_steps == 8
    assert (smp.prediction_type, smp.timestep_spacing, smp.set_alpha_to_one) == (
        "v_prediction", "trailing", True)  # fmt: skip


def test_history_reset_and_reuse():
    """The history belongs to one run: a call that does not follow the previous one starts a
    new run (call 0's row), reset() forgets it, and a reused sampler gives the same samples."""
    s = PNDMSampler(NoiseSchedule("linear"), 6, skip_prk_steps=True)
    g = torch.Generator().manual_seed(1)
    x, mo = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    first = s.step(mo, 3, x)  # a run starting at call 3: its first-step row
    fresh = PNDMSampler(NoiseSchedule("linear"), 6, skip_prk_steps=True)
    for i in range(3):  # other outputs before (the weights sum to 1: equal ones would cancel)
        fresh.step(torch.randn(SHAPE, generator=g), i, x)
    assert not torch.allclose(fresh.step(mo, 3, x), first, atol=1e-3)  # call 3 of a run
    s.reset()
    torch.testing.assert_close(s.step(mo, 3, x), first, rtol=0, atol=0)
    smp = PNDMSampler(NoiseSchedule("linear"), 6)
    z = torch.randn(SHAPE, generator=g)
    a = fastdiff.sample(_toy, sampler=smp, noise=z)
    b = fastdiff.sample(_toy, sampler=smp, noise=z, steps=6)  # steps = N, not the 7 calls
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="built for 6"):
        fastdiff.sample(_toy, sampler=smp, noise=z, steps=7)


def test_trajectory_and_callback():
    z = torch.randn(SHAPE)
    seen = []
    out, traj = fastdiff.sample(_toy, steps=4, sampler="plms", noise=z, return_trajectory=True,
                                callback=lambda i, t, x: seen.append((i, t)))  # fmt: skip
    smp = PNDMSampler(NoiseSchedule("linear"), 4, skip_prk_steps=True)
    assert seen == list(enumerate(smp.timesteps.tolist()))
    assert traj["x"].shape == (6, *SHAPE) and traj["x0"].shape == (5, *SHAPE)
    torch.testing.assert_close(traj["x"][-1], out, rtol=0, atol=0)
    # x0 of call 0: the model's x0 prediction at x_T (not its raw noise estimate)
    ab = float(NoiseSchedule("linear").alphas_cumprod[750])
    x0 = (z - (1 - ab) ** 0.5 * _toy(z, torch.tensor([750]))) / ab**0.5
    torch.testing.assert_close(traj["x0"][0], x0, rtol=1e-5, atol=1e-5)


def test_beats_ddim_on_the_exact_ode():
    """Gaussian data N(0, tau^2): the exact eps is s x / (ab tau^2 + s^2) and the probability-flow
    ODE keeps x / sqrt(ab tau^2 + 1 - ab). From the same start, PNDM's multistep noise estimate
    lands 20x+ closer to the exact end point than DDIM's (whose transfer holds eps constant over
    a step) with the same steps, and closer with more steps (measured: PLMS 4.7e-3 / 1.6e-3 at 20
    / 40 steps, DDIM 0.13 / 0.068)."""
    from fastdiff.samplers import DDIMSampler

    sch, tau = NoiseSchedule("linear"), 0.5
    ab = sch.alphas_cumprod.double()

    def error(smp) -> float:
        a0 = float(ab[int(smp.timesteps[0])])
        x0 = torch.linspace(-2.0, 2.0, 16, dtype=torch.float64) * math.sqrt(a0 * tau**2 + 1 - a0)
        x = x0.float()
        for i, t in enumerate(smp.timesteps.tolist()):
            a = float(ab[t])
            x = smp.step((math.sqrt(1 - a) * x.double() / (a * tau**2 + 1 - a)).float(), i, x)
        exact = x0 * tau / math.sqrt(a0 * tau**2 + 1 - a0)  # at ab = 1 (set_alpha_to_one)
        return (x.double() - exact).abs().max().item()

    errs = {}
    for n in (20, 40):
        ddim = error(DDIMSampler(sch, n, clip_sample=False))
        for prk in (False, True):
            errs[prk, n] = error(PNDMSampler(sch, n, set_alpha_to_one=True, skip_prk_steps=not prk))
            assert errs[prk, n] < ddim / 20, (n, prk, errs[prk, n], ddim)
    assert errs[False, 40] < errs[False, 20] / 2 and errs[True, 40] < errs[True, 20] / 2


@pytest.mark.parametrize("prk", [False, True], ids=["plms", "prk"])
def test_recovers_gaussian_mixture(prk):
    """The exact eps of a 2-D mixture with sharp components (tau = 0.06): 30 PNDM steps recover
    it. (20 PLMS steps do not, component std ~0.10, as diffusers' own loop: 3e-5 apart from ours
    over the run; the multistep extrapolation overshoots where eps changes fast. DDIM passes at
    20.)"""
    sched = NoiseSchedule("linear")
    model = GMMEps(sched)
    _assert_mixture(_run(PNDMSampler(sched, 30, skip_prk_steps=not prk), model))
    assert model.calls == (39 if prk else 31)


def test_wrong_schedule_fails_mixture_check():
    x = _run(PNDMSampler(NoiseSchedule("cosine"), 30, skip_prk_steps=True),
             GMMEps(NoiseSchedule("linear")))  # fmt: skip
    with pytest.raises(AssertionError):
        _assert_mixture(x)


def test_cli_sampler_pndm(tmp_path, monkeypatch):
    seen = record_sample_calls(monkeypatch)
    for name in ("pndm", "plms"):
        out = tmp_path / f"{name}.png"
        args = ["sample", "--steps", "3", "--n", "2", "--sampler", name, "--quiet"]
        assert main([*args, "--out", str(out)]) == 0 and out.is_file()
        assert seen[-1]["sampler"] == name


@pytest.mark.parametrize("kind", ["plms", "pndm"])
def test_digits_model_samples_are_recognised(kind):
    """End to end on the shipped class-conditional digits model, judged by the separate
    classifier of tests/test_digits_quality.py: 10 steps (plms: 11 model calls, pndm: 19),
    guidance 2."""
    pytest.importorskip("sklearn")
    from test_digits_quality import HAS_WEIGHTS, _accuracy, digits_classifier

    if not HAS_WEIGHTS:
        pytest.skip("digits weights not shipped")
    from fastdiff.models import load_pretrained

    acc = _accuracy(load_pretrained("digits"), digits_classifier.fit(), kind, 10, 40, 2.0)
    assert acc >= 0.95, acc
