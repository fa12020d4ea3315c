"""HeunSampler ("heun") vs diffusers' HeunDiscreteScheduler, and through sample() / CLI (the
CUDA-graph loop, guidance, no host sync: tests/test_sampler_contract.py).

diffusers runs N Heun steps as 2N - 1 model calls over the timesteps [t0, t1, t1, ..., tN-1,
tN-1]: an Euler stage to the next sigma, then (except on the last step, to sigma = 0) the
correction at that sigma from its stored sample and derivative. fastdiff keeps the VP sample
x = a x_sigma (a = 1 / sqrt(1 + sigma^2)) and does the correction as x' + h / (2 sigma') (m_1 - m_2)
from the stage-1 x0 prediction m_1 (algebraically the same update). Per model call, both sides get
the same state and model output; ours, mapped back to sigma space, must agree to a relative error
<= 1e-5 (max |ours - theirs| / max |theirs|) with a float64 run of diffusers' step on our float64
sigmas, and to 1e-5 plus diffusers' own fp32-sigma error with the stock scheduler.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _sampler_cases import assert_step_parity
from _sampler_cases import rel as _rel
from helpers import PARITY_RTOL, PARITY_SHAPE, record_sample_calls
from test_gmm_exact import TAU, GMMEps, _assert_mixture, _run

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.cli import main
from fastdiff.samplers import SAMPLERS, EulerSampler, HeunSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL
# diffusers' Heun defaults to beta_start=0.00085, beta_end=0.012: give both ends explicitly
SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
FLAGS = {g: f"use_{g}_sigmas" for g in ("karras", "exponential", "beta")}


def _toy(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic stand-in network at the rounded timestep (what fastdiff's model gets)."""
    tt = torch.as_tensor(t, dtype=torch.float64).round().to(torch.float32)
    tt = tt.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * x


def _interleave(sig: np.ndarray) -> torch.Tensor:
    """diffusers' Heun sigma list [s0, s1, s1, ..., sN-1, sN-1, 0] from the N + 1 step sigmas."""
    s = torch.from_numpy(np.asarray(sig))
    return torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])


def _pair(sched: str, steps: int, **opts):
    cfg = SCHEDULES[sched]
    ours = HeunSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    theirs, twin = (diffusers.HeunDiscreteScheduler(**cfg, **opts) for _ in range(2))
    for s in (theirs, twin):
        s.set_timesteps(steps)
        s.set_begin_index(0)
    twin.sigmas = _interleave(ours.sigmas())  # our float64 sigmas (twin runs in float64)
    torch.testing.assert_close(twin.sigmas, theirs.sigmas.double(), rtol=2e-4, atol=0)
    return ours, theirs, twin


def _per_call_parity(ours, theirs, twin, seed=0):
    """Every model call with shared state and model output; returns the worst error vs the
    float64 twin."""
    sig = twin.sigmas.double()
    g = torch.Generator().manual_seed(seed)
    x_sig = torch.randn(SHAPE, generator=g, dtype=torch.float64) * math.sqrt(1 + sig[0] ** 2)
    worst = 0.0
    assert len(theirs.timesteps) == len(ours) == 2 * ours.num_inference_steps - 1
    for i, t in enumerate(theirs.timesteps):
        theirs.scale_model_input(x_sig.float(), t)
        x = twin.scale_model_input(x_sig, t).float()  # VP sample a x_sigma = what the model sees
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        ref64 = twin.step(mo.double(), t, x_sig).prev_sample
        ref = theirs.step(mo, t, x_sig.float()).prev_sample
        got = ours.step(mo, i, x)
        got_sig = got.double() * math.sqrt(1.0 + sig[i + 1] ** 2)  # back to sigma space
        err64, _ = assert_step_parity(got, ref, ref64, f"call {i} (t={float(t)}) vs the twin",
                                      cmp=got_sig)  # fmt: skip
        worst = max(worst, err64)
        x_sig = ref64
    return worst


CASES = [
    *itertools.product(
        ["linear", "scaled_linear"],
        ["epsilon", "v_prediction"],
        ["linspace", "leading", "trailing"],
        [10],
    ),  # fmt: skip
    ("linear", "epsilon", "linspace", 20),
    ("scaled_linear", "v_prediction", "leading", 20),
    ("scaled_linear", "sample", "linspace", 10),
]


@pytest.mark.parametrize("sched,pred,spacing,steps", CASES)
def test_per_call_parity_with_diffusers(sched, pred, spacing, steps):
    offset = 1 if spacing == "leading" else 0
    ours, theirs, twin = _pair(
        sched, steps, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset
    )
    assert torch.equal(ours.timesteps, theirs.timesteps.round().to(torch.int64))
    assert _per_call_parity(ours, theirs, twin) > 0.0  # a real comparison ran


@pytest.mark.parametrize("grid", sorted(FLAGS))
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_per_call_parity_on_sigma_grids(grid, pred):
    ours, theirs, twin = _pair("scaled_linear", 12, prediction_type=pred, **{FLAGS[grid]: True})
    assert ours.sigma_grid == grid
    assert torch.equal(ours.timesteps, theirs.timesteps.round().to(torch.int64))
    assert _per_call_parity(ours, theirs, twin, seed=1) > 0.0


def test_per_call_parity_with_clip_sample():
    """clip_sample clips x0 in both stages (diffusers' derivative uses the clipped x0): with a
    range this tight most elements are clipped, so a sampler ignoring it fails."""
    ours, theirs, twin = _pair("linear", 10, clip_sample=True, clip_sample_range=0.3)
    assert ours.config()["clip"] and ours.config()["clip_range"] == 0.3
    assert _per_call_parity(ours, theirs, twin, seed=2) > 0.0


def _diffusers_run(sch, steps: int, z: torch.Tensor, model=_toy) -> torch.Tensor:
    """diffusers' own sampling loop (the pipelines' loop body)."""
    sch.set_timesteps(steps)
    x = z * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x


RUNS = [
    ("linear", "epsilon", "linspace", {}, 10),
    ("linear", "v_prediction", "leading", {"steps_offset": 1}, 20),
    ("scaled_linear", "epsilon", "trailing", {}, 20),
    ("scaled_linear", "v_prediction", "linspace", {"use_karras_sigmas": True}, 10),
    ("scaled_linear", "epsilon", "leading", {"use_karras_sigmas": True}, 20),
]


@pytest.mark.parametrize("sched,pred,spacing,extra,steps", RUNS)
def test_whole_run_equals_diffusers_loop(sched, pred, spacing, extra, steps):
    """sample(sampler="heun", schedule=<HeunDiscreteScheduler>) takes the scheduler's settings
    and lands where diffusers' own loop does from the same x_T (diffusers' x_sigma, scaled to
    VP space by its scale_model_input)."""
    sch = diffusers.HeunDiscreteScheduler(
        **SCHEDULES[sched], prediction_type=pred, timestep_spacing=spacing, **extra
    )
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = _diffusers_run(sch, steps, z)
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return _toy(x, t)

    # sample() starts from diffusers' init_noise_sigma z (in VP units: z init_noise_scale)
    got = fastdiff.sample(model, steps=steps, sampler="heun", schedule=sch, noise=z)
    assert calls == sch.timesteps.round().tolist()  # 2N - 1 calls at diffusers' timesteps
    err = _rel(got, ref)
    assert 0.0 < err <= RTOL, f"whole-run rel err {err:.2e}"


def test_timesteps_sigmas_and_rows():
    sch = NoiseSchedule("linear")
    s = HeunSampler(sch, 4)
    assert (len(s), s.num_inference_steps, s.steps) == (7, 4, 7)
    assert s.timesteps.tolist() == [999, 666, 666, 333, 333, 0, 0]
    eu = EulerSampler(sch, 4)
    np.testing.assert_array_equal(s.sigmas(), eu.sigmas())  # Euler's N + 1 sigmas
    coef = s.coef64
    assert coef.shape == (7, 8) and (coef[:, 5:7] == 0).all()
    # Euler stages: c_prev = 0, no eps term; the last one lands on sigma = 0 and returns x0
    assert (coef[0::2, 4] == 0).all() and (coef[0::2, 7] == 0).all()
    assert tuple(coef[-1, 2:5]) == (0.0, 1.0, 0.0)
    # corrections: at the next sigma (a, s of the Euler stage's target), reading the Euler
    # stage's input x_i, in eps form: x_next = a' ((x_i / a_i + x / a') / 2 + (h / 2) eps)
    np.testing.assert_allclose(coef[1::2, :2], coef[2::2, :2], rtol=1e-15)
    sig = s.sigmas()
    a = 1.0 / np.sqrt(1.0 + sig**2)
    np.testing.assert_allclose(coef[1::2, 4], a[1:4] / (2.0 * a[:3]), rtol=1e-15)
    assert (coef[1::2, 2] == 0.5).all() and (coef[1::2, 3] == 0).all()  # no x0 term
    np.testing.assert_allclose(coef[1::2, 7], a[1:4] * (sig[1:4] - sig[:3]) / 2, rtol=1e-15)
    # the ODE's solution through a constant x0 prediction D, x_sigma = D + sigma eps with a
    # constant eps, is a fixed point (Heun is exact on it): in x = a (D + sigma eps) terms,
    # D: c_x a' + c_prev a_i = a'; eps: c_x a' sigma' + c_prev a_i sigma_i + c_eps = a' sigma'
    fixed_d = coef[1::2, 2] * a[1:4] + coef[1::2, 4] * a[:3]
    fixed_e = coef[1::2, 2] * a[1:4] * sig[1:4] + coef[1::2, 4] * a[:3] * sig[:3] + coef[1::2, 7]
    np.testing.assert_allclose(fixed_d, a[1:4], rtol=1e-12)
    np.testing.assert_allclose(fixed_e, a[1:4] * sig[1:4], rtol=1e-12)
    one = HeunSampler(sch, 1, timestep_spacing="trailing")  # one Euler call to sigma = 0
    assert len(one) == 1 and one.timesteps.tolist() == [999]
    assert tuple(one.coef64[0, 2:5]) == (0.0, 1.0, 0.0)
    assert "steps=4 (7 model calls)" in repr(s)
    assert not any(s.needs_noise(i) for i in range(len(s)))


def test_heun_is_second_order_on_the_exact_ode():
    """Gaussian data N(0, tau^2): the denoiser is exact (D(x_sigma) = tau^2 x_sigma / (tau^2 +
    sigma^2)) and the ODE's flow map is known, x_sigma' = x_sigma sqrt((tau^2 + sigma'^2) /
    (tau^2 + sigma^2)). On log-uniform grids from sigma 10 to 0.5 with 7 and 14 intervals, at
    sigma_min Heun's error falls ~4x when h halves (2nd order, Karras et al. 2022 sec. 3), Euler's
    ~2x, and Heun is more accurate than Euler with the same number of model calls."""
    sch, tau = NoiseSchedule("linear"), 0.5

    def error(cls, n):
        smp = cls(sch, n, prediction_type="sample", use_exponential_sigmas=True, sigma_min=0.5,
                  sigma_max=10.0)  # fmt: skip
        sig = smp.sigmas()
        x = torch.linspace(-2.0, 2.0, 16) / math.sqrt(1 + sig[0] ** 2)  # VP, at sigma_0
        exact = (
            x.double()
            * math.sqrt(1 + sig[0] ** 2)
            * math.sqrt((tau**2 + sig[-2] ** 2) / (tau**2 + sig[0] ** 2))
        )  # x_sigma at sigma_min = sig[-2]
        heun = cls is HeunSampler
        for i in range(len(smp) - 1):  # stop at sigma_min (the last call goes to 0)
            s = sig[(i + 1) // 2] if heun else sig[i]  # the noise level of the sample x
            x_sig = x.double() * math.sqrt(1 + s * s)
            x = smp.step((tau**2 * x_sig / (tau**2 + s * s)).float(), i, x)
        return (x.double() * math.sqrt(1 + sig[-2] ** 2) - exact).abs().max().item()

    e_h = [error(HeunSampler, n) for n in (8, 15)]
    e_e = [error(EulerSampler, n) for n in (8, 15)]
    assert e_h[0] / e_h[1] > 3.5 and 1.6 < e_e[0] / e_e[1] < 2.5, (e_h, e_e)
    assert e_h[0] < e_e[1] and e_h[1] < e_e[1] / 5  # (8 Heun steps: 14 calls to sigma_min)


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_recovers_gaussian_mixture(seed):
    """Weights and means of the mixture; the spread of each component is that of the denoiser
    at the last sigma > 0 (the final step is Euler to sigma 0, so at 15 steps, sigma_1 = 0.23 >>
    TAU, each component comes back about 4x narrower than TAU: seeds 3 and 5 failed a TAU +- 50 %
    std check that seed 0 passed only through its between-component outliers)."""
    sched = NoiseSchedule("linear")
    smp = HeunSampler(sched, 15, timestep_spacing="trailing")
    model = GMMEps(sched)
    sigma_1 = float(smp.sigmas()[-2])
    _assert_mixture(_run(smp, model, seed), spread=TAU**2 / math.sqrt(TAU**2 + sigma_1**2))
    assert model.calls == 29


def test_wrong_schedule_fails_mixture_check():
    x = _run(HeunSampler(NoiseSchedule("cosine"), 15), GMMEps(NoiseSchedule("linear")))
    with pytest.raises(AssertionError):
        _assert_mixture(x)


# ------------------------------------------------------------------------ history, options
def test_correction_needs_the_euler_stage_of_this_sampler():
    s = HeunSampler(NoiseSchedule("linear"), 5)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model call 1 is the Heun correction of call 0"):
        s.step(mo, 1, x)
    x1, m1 = s.step(mo, 0, x, return_x0=True)
    with pytest.raises(ValueError, match="call 3"):  # call 2 did not run
        s.step(mo, 3, x1)
    with pytest.raises(ValueError, match="for this x"):  # another shape
        s.step(mo[:1], 1, x1[:1])
    ref = s.step(mo, 1, x1)
    # an explicit history gives the same result; a second sampler needs no state
    t = HeunSampler(NoiseSchedule("linear"), 5)
    # the history is the Euler stage's input x, not its x0 prediction m1
    torch.testing.assert_close(t.step(mo, 1, x1, x0_prev=x), ref, rtol=0, atol=0)
    assert (t.step(mo, 1, x1, x0_prev=m1) - ref).abs().max() > 1e-3
    x_in = x.clone()  # the kept input modified in place before the correction: refused
    s.step(mo, 0, x_in)
    x_in.add_(1.0)
    with pytest.raises(ValueError, match="input sample of call 0, .* modified in place"):
        s.step(mo, 1, x1)
    s.step(mo, 0, x)
    s.reset()  # forgets the history: a new run
    with pytest.raises(ValueError, match="correction"):
        s.step(mo, 1, x1)
    # an explicit row (CUDA graphs) decides the stage by its values: it needs the history too
    with pytest.raises(ValueError, match="needs x0_prev"):
        s.step(mo, 0, x, coef=s.coef_table("cpu")[1])


def test_sampler_reused_for_two_runs_gives_the_same_samples():
    smp = HeunSampler(NoiseSchedule("linear"), 6)
    z = torch.randn(SHAPE)
    a = fastdiff.sample(_toy, sampler=smp, noise=z)
    b = fastdiff.sample(_toy, sampler=smp, noise=z, steps=6)  # steps = N, not the 11 calls
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="built for 6"):
        fastdiff.sample(_toy, sampler=smp, noise=z, steps=11)


@pytest.mark.parametrize(
    "opts,err,match",
    [
        (dict(clip_sample=True, clip_sample_range=0.0), ValueError, "clip_sample_range"),
        (dict(clip_sample=True, clip_sample_range=float("nan")), ValueError, "clip_sample_range"),
        (dict(clip_sample=True, clip_sample_range=float("inf")), ValueError, "clip_sample_range"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, "at most one"),
        (dict(prediction_type="x0"), ValueError, "prediction_type"),
        (dict(timestep_spacing="even"), ValueError, "timestep_spacing"),
        (dict(sigma_min=-1.0), ValueError, "sigma_min"),
        (dict(eta=0.5), TypeError, "eta"),
    ],
)
def test_bad_options(opts, err, match):
    with pytest.raises(err, match=match):
        HeunSampler(NoiseSchedule("linear"), 10, **opts)


@pytest.mark.parametrize("steps", [0, 1001, 2.0])
def test_bad_steps(steps):
    with pytest.raises((ValueError, TypeError), match="steps"):
        HeunSampler(NoiseSchedule("linear"), steps)


def test_max_steps_is_num_train_timesteps():
    s = HeunSampler(NoiseSchedule("linear"), 1000, timestep_spacing="trailing")
    assert len(s) == 1999 and s.timesteps[:3].tolist() == [999, 998, 998]


def test_registry_and_make_sampler():
    assert SAMPLERS["heun"] is HeunSampler
    assert isinstance(make_sampler("Heun", NoiseSchedule("linear"), 10), HeunSampler)
    with pytest.raises(ValueError, match="heun"):
        make_sampler("heun2", NoiseSchedule("linear"), 10)


# ------------------------------------------------------------------------ sample() integration
def test_sample_options_and_trajectory():
    sched = NoiseSchedule("scaled_linear")
    z = torch.randn(SHAPE)
    seen = []
    out, traj = fastdiff.sample(
        lambda x, t: seen.append(t[0].item()) or _toy(x, t), steps=4, sampler="heun",
        schedule=sched, noise=z, prediction_type="v_prediction", use_karras_sigmas=True,
        return_trajectory=True,
    )  # fmt: skip
    smp = HeunSampler(sched, 4, prediction_type="v_prediction", use_karras_sigmas=True)
    assert seen == smp.timesteps.tolist() and len(seen) == 7
    assert traj["x"].shape == (8, *SHAPE) and traj["x0"].shape == (7, *SHAPE)
    torch.testing.assert_close(traj["x"][-1], out, rtol=0, atol=0)
    torch.testing.assert_close(traj["x0"][-1], out, rtol=1e-6, atol=1e-6)  # last: x = x0


def test_scheduler_settings_become_defaults_and_unsupported_ones_raise():
    cfg = dict(SCHEDULES["linear"], _class_name="HeunDiscreteScheduler",
               prediction_type="v_prediction", use_karras_sigmas=True,
               clip_sample=True, clip_sample_range=2.0)  # fmt: skip
    from fastdiff._sampler_setup import resolve_sampler

    smp = resolve_sampler(None, "heun", 8, cfg, None, None, {})
    assert isinstance(smp, HeunSampler) and smp.num_inference_steps == 8
    assert (smp.prediction_type, smp.sigma_grid, smp.clip_sample, smp.clip_sample_range) == (
        "v_prediction", "karras", True, 2.0)  # fmt: skip
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'.*'heun'"):
        resolve_sampler(None, "heun", 8, {**cfg, "final_sigmas_type": "sigma_min"}, None, None, {})
    # the stock diffusers scheduler object (all of its settings are supported)
    sch = diffusers.HeunDiscreteScheduler(use_exponential_sigmas=True)
    assert resolve_sampler(None, "heun", 8, sch, None, None, {}).sigma_grid == "exponential"
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(_toy, steps=3, sampler="heun", shape=SHAPE[1:], eta=None, s_churn=1.0)


# ------------------------------------------------------------------------ CLI
def test_cli_sampler_heun_and_karras(tmp_path, monkeypatch):
    seen = record_sample_calls(monkeypatch)
    out = tmp_path / "h.png"
    args = ["sample", "--steps", "3", "--n", "2", "--sampler", "heun", "--quiet", "--out", str(out)]
    assert main([*args, "--karras"]) == 0 and out.is_file()
    assert seen[-1]["sampler"] == "heun" and seen[-1]["use_karras_sigmas"] is True
    assert main(args) == 0 and "use_karras_sigmas" not in seen[-1]
