"""Euler ancestral ("euler_a") and the Karras / exponential / beta sigma grids of both Euler
samplers, against diffusers' EulerAncestralDiscreteScheduler / EulerDiscreteScheduler.

diffusers keeps the sample in sigma space (x_sigma = x0 + sigma eps), fastdiff in VP space
(x = a x_sigma, a = 1 / sqrt(1 + sigma^2)). At every step both get the same state (diffusers'
previous output; ours is a_i x_sigma = diffusers' scale_model_input), the same model output and
the same noise z; ours, mapped back by x_sigma_next = x_next / a_{i+1}, must agree to a relative
error <= 1e-5 (max |ours - theirs| / max |theirs|) in fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DIFFUSERS_BETAS,
    PARITY_RTOL,
    PARITY_SHAPE,
    assert_no_host_sync,
    record_sample_calls,
)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import resolve_sampler
from fastdiff.samplers import SAMPLERS, EulerAncestralSampler, EulerSampler, make_sampler
from fastdiff.samplers import sigmas as sig_mod
from fastdiff.samplers.euler_ancestral import ancestral_step

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod  # noqa: E402

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL
SCHEDULES = {k: DIFFUSERS_BETAS[k] for k in ("linear", "scaled_linear")}
FLAGS = {g: f"use_{g}_sigmas" for g in ("karras", "exponential", "beta")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic stand-in network: elementwise in x, with a timestep-dependent bias."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * x


def _replay_noise(monkeypatch, box: dict) -> None:
    """diffusers' ancestral step draws its z with randn_tensor: hand it ``box["z"]`` instead."""
    monkeypatch.setattr(ea_mod, "randn_tensor", lambda *a, **k: box["z"].clone())


def _ancestral_loop(ours, theirs, twin, monkeypatch, seed=0, begin=0):
    """All steps with shared state, model output and z: per-step parity (returns the worst
    error against the twin with our float64 sigmas)."""
    box: dict = {}
    _replay_noise(monkeypatch, box)
    sig = ours.sigmas()
    g = torch.Generator().manual_seed(seed)
    x_sig = torch.randn(SHAPE, generator=g) * math.sqrt(1.0 + sig[begin] ** 2)
    worst = 0.0
    for i in range(begin, ours.steps):
        t = theirs.timesteps[i]
        theirs.scale_model_input(x_sig, t)
        x = twin.scale_model_input(x_sig, t)  # = a_i x_sigma, what the model sees
        mo = _fake_model(x, ours.timesteps[i])
        box["z"] = z = torch.randn(SHAPE, generator=g)
        ref64 = twin.step(mo, t, x_sig).prev_sample
        ref = theirs.step(mo, t, x_sig).prev_sample
        got = ours.step(mo, i, x, noise=z)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        got_sig = got.double() * math.sqrt(1.0 + sig[i + 1] ** 2)  # back to sigma space
        err64, err = _rel(got_sig, ref64), _rel(got_sig, ref)
        assert err64 <= RTOL, f"step {i} (t={float(t)}): rel err vs float64 twin {err64:.2e}"
        bound = RTOL + _rel(ref, ref64)  # plus diffusers' own fp32-sigma error
        assert err <= bound, f"step {i} (t={float(t)}): rel err {err:.2e} > {bound:.2e}"
        worst = max(worst, err64)
        x_sig = ref64
    return worst


def _ea_pair(sched: str, steps: int, **opts):
    cfg = SCHEDULES[sched]
    ours = EulerAncestralSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    theirs = diffusers.EulerAncestralDiscreteScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    twin = diffusers.EulerAncestralDiscreteScheduler(**cfg, **opts)  # our float64 sigmas
    twin.set_timesteps(steps)
    twin.sigmas = torch.from_numpy(ours.sigmas())
    np.testing.assert_allclose(ours.sigmas(), theirs.sigmas.double().numpy(), rtol=2e-4)
    assert torch.equal(ours.timesteps, theirs.timesteps.round().to(torch.int64))
    return ours, theirs, twin


# ------------------------------------------------------------------ Euler a: per-step parity
EA_CASES = [
    ("linear", "epsilon", "linspace", 25),
    ("linear", "v_prediction", "leading", 20),
    ("scaled_linear", "epsilon", "trailing", 30),
    ("scaled_linear", "v_prediction", "linspace", 15),
]


@pytest.mark.parametrize("sched,pred,spacing,steps", EA_CASES)
def test_euler_a_per_step_parity_with_diffusers(sched, pred, spacing, steps, monkeypatch):
    offset = 1 if spacing == "leading" else 0
    ours, theirs, twin = _ea_pair(
        sched, steps, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset
    )
    assert _ancestral_loop(ours, theirs, twin, monkeypatch) > 0.0  # a real comparison ran


def test_euler_a_coefficients_are_the_ancestral_step():
    """Row = [a_i, s_i, 0, a' (sigma_down - sigma_i), a'/a_i, a' sigma_up, 0, 0] with
    sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step, eta = 1)."""
    smp = EulerAncestralSampler(NoiseSchedule("linear"), 12)
    sig, coef = smp.sigmas(), smp.coef64
    for i in range(12):
        s, sn = sig[i], sig[i + 1]
        down, up = ancestral_step(s, sn)
        assert down**2 + up**2 == pytest.approx(sn**2, rel=1e-12)
        assert down == pytest.approx(sn**2 / s, rel=1e-12)
        a, an = 1 / math.sqrt(1 + s * s), 1 / math.sqrt(1 + sn * sn)
        want = [a, s * a, 0.0, an * (down - s), an / a, an * up, 0.0, 0.0]
        np.testing.assert_allclose(coef[i], want, rtol=1e-12, atol=1e-15)
    assert coef[-1, 5] == 0.0 and coef[-1, 4] == pytest.approx(1 / coef[-1, 0])  # ends at x0
    assert all(smp.needs_noise(i) for i in range(12))  # diffusers draws on the last step too


def test_euler_a_sample_prediction_is_x0_and_not_euler():
    """prediction_type='sample' (diffusers raises for it): eps = (x - a x0) / s in the step."""
    sch = NoiseSchedule("linear")
    smp = EulerAncestralSampler(sch, 10, prediction_type="sample")
    g = torch.Generator().manual_seed(2)
    x, x0, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    a, s, _, c_eps, c_x, c_n, _, _ = smp.coef64[3]
    want = c_x * x.double() + c_eps * (x.double() - a * x0.double()) / s + c_n * z.double()
    got = smp.step(x0, 3, x, noise=z)
    assert _rel(got, want) <= RTOL
    ode = EulerSampler(sch, 10, prediction_type="sample").step(x0, 3, x)
    assert _rel(got, ode) > 1e-2  # the ancestral step is not Euler's


# -------------------------------------------------------------------------- Euler a: noise
def test_generator_draws_what_diffusers_draws():
    """A generator given to our step and the same seed given to diffusers' step: same z, so
    the same result (no replayed noise)."""
    ours, theirs, _ = _ea_pair("linear", 10, timestep_spacing="trailing")
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_sig = torch.randn(SHAPE) * math.sqrt(1.0 + ours.sigmas()[0] ** 2)
    for i, t in enumerate(theirs.timesteps[:4]):
        x = theirs.scale_model_input(x_sig, t)
        mo = _fake_model(x, ours.timesteps[i])
        ref = theirs.step(mo, t, x_sig, generator=g_theirs).prev_sample
        got = ours.step(mo, i, x, generator=g_ours) * math.sqrt(1 + ours.sigmas()[i + 1] ** 2)
        assert _rel(got, ref) <= 5 * RTOL, i
        x_sig = ref
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def test_generator_list_draws_per_sample_and_noise_argument_wins():
    smp = EulerAncestralSampler(NoiseSchedule("linear"), 10)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    batch = smp.step(mo, 2, x, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for k, s in enumerate((1, 2)):
        one = smp.step(mo[k : k + 1], 2, x[k : k + 1], generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(batch[k : k + 1], one, rtol=0, atol=0)
    z = torch.randn(SHAPE)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(smp.step(mo, 2, x, noise=z, generator=g), smp.step(mo, 2, x, noise=z))
    assert not torch.allclose(smp.step(mo, 2, x, noise=z), smp.step(mo, 2, x, noise=-z))
    with pytest.raises(ValueError, match="generator"):
        smp.step(mo, 2, x, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="noise"):
        smp.step(mo, 2, x, noise=torch.randn(1, 3, 8, 8))


def test_generator_state_is_in_kernel_philox_and_advances():
    from fastdiff.ops.sampler_step import philox_randn

    smp = EulerAncestralSampler(NoiseSchedule("linear"), 10)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    state = torch.tensor([42, 96], dtype=torch.int64)
    z = philox_randn(state.clone(), tuple(x.shape))
    got = smp.step(mo, 3, x, generator_state=state)
    assert state.tolist() == [42, 96 + x.numel()]
    assert _rel(got, smp.step(mo, 3, x, noise=z)) <= RTOL
    again = smp.step(mo, 3, x, generator_state=state)  # the next draw is fresh noise
    assert not torch.allclose(got, again)
    smp.step(mo, 9, x, generator_state=state)  # the last step draws too (as diffusers)
    assert state.tolist() == [42, 96 + 3 * x.numel()]


# ------------------------------------------------------------------------ sample() integration
class _Net(torch.nn.Module):
    def __init__(self, num_classes: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(max(num_classes, 1), 3)
        self.null_class = 0  # the unconditional label for guidance

    def forward(self, x, t, class_labels=None):
        h = self.conv(x) + 0.1 * torch.sin(t.float() / 100.0)[:, None, None, None]
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return h


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _graphed_equals_eager(run) -> torch.Tensor:
    """For calls 1 and 2: ``run(False, call)`` (sample() with return_trajectory through api's
    eager loop) and ``run(True, call)`` (through its CUDA-graph loop) give the same samples and
    x0 rows. Returns the last graphed sample (api's loop is left on the graphed one)."""
    for call in (1, 2):
        eager, etraj = run(False, call)
        out, traj = run(True, call)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
    return out


@torch.no_grad()
def test_sample_matches_the_diffusers_loop_with_a_generator():
    """fastdiff.sample(sampler='euler_a', schedule=<diffusers scheduler>) against diffusers'
    own loop with the same generator (integer timesteps: trailing spacing; the same start:
    x_sigma = init_noise_sigma z, sample() scales noise= z so)."""
    net = _Net().eval()
    sched = diffusers.EulerAncestralDiscreteScheduler(
        timestep_spacing="trailing", prediction_type="v_prediction"
    )
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(8)
    x = noise * sched.init_noise_sigma
    g = torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t.reshape(1)), t, x, generator=g)
        x = x.prev_sample
    got = fastdiff.sample(net, steps=8, sampler="euler_a", schedule=sched, noise=noise,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert _rel(got, x) <= 1e-4
    smp = resolve_sampler(net, "euler_a", 8, sched, None, None, {})
    assert isinstance(smp, EulerAncestralSampler) and smp.prediction_type == "v_prediction"


@torch.no_grad()
def test_batch_equals_singles_with_generator_list_and_guidance():
    net = _Net(num_classes=4).eval()
    labels = torch.tensor([1, 3, 0])
    kw = dict(steps=8, sampler="euler_a", shape=(3, 8, 8), guidance_scale=2.5)
    batch = fastdiff.sample(net, generator=_gens([1, 2, 3]), cond=labels, **kw)
    for k, seed in enumerate([1, 2, 3]):
        one = fastdiff.sample(net, generator=_gens([seed]), cond=labels[k : k + 1], **kw)
        assert (batch[k] - one[0]).abs().max().item() <= 1e-5, k
    other = fastdiff.sample(net, generator=_gens([9, 2, 3]), cond=labels, **kw)
    assert not torch.allclose(other[0], batch[0]) and torch.allclose(other[1], batch[1], atol=1e-5)
    kw["guidance_scale"] = None
    plain = fastdiff.sample(net, generator=_gens([1, 2, 3]), cond=labels, **kw)
    assert not torch.allclose(plain, batch)  # guidance changed the samples


@torch.no_grad()
def test_philox_noise_is_reproducible_with_manual_seed():
    net = _Net().eval()
    kw = dict(steps=6, sampler="euler_a", shape=(3, 8, 8), batch_size=2)
    torch.manual_seed(123)
    a = fastdiff.sample(net, **kw)
    torch.manual_seed(123)
    b = fastdiff.sample(net, **kw)
    torch.manual_seed(124)
    c = fastdiff.sample(net, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(123)
    x_T = torch.randn(2, 3, 8, 8)
    d = fastdiff.sample(net, noise=x_T, **{**kw, "sampler": "euler"})
    e = fastdiff.sample(net, noise=x_T, **kw)
    assert not torch.allclose(d, e)  # euler_a adds noise where euler does not


@pytest.mark.parametrize("generator", [None, 3], ids=["philox", "generator"])
@torch.no_grad()
def test_no_host_sync_inside_the_sampling_loop(generator):
    """No tensor value is read on the host during the loop (.item(), nonzero, ...)."""
    gen = None if generator is None else torch.Generator().manual_seed(generator)
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=4, sampler="euler_a", shape=(3, 8, 8), batch_size=2,
                                  generator=gen),
        _Net().eval(),
    )  # fmt: skip


@pytest.mark.parametrize("philox", [False, True], ids=["generator", "philox"])
@torch.no_grad()
def test_cuda_graph_loop_equals_eager(philox, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop (static coef / noise / Philox state buffers, one capture,
    replayed with new inputs) on CPU with a fake graph: same samples as the eager loop."""
    from fastdiff import api

    net = _Net(num_classes=4).eval()
    eager_loop = api._sample_eager

    def run(graphed, call):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        torch.manual_seed(call)
        gens = None if philox else _gens([call, call + 1])
        return fastdiff.sample(net, steps=6, sampler="euler_a", shape=(3, 8, 8), batch_size=2,
                               generator=gens,
                               cond=torch.tensor([call, 1]), guidance_scale=2.0,
                               return_trajectory=True)  # fmt: skip

    out = _graphed_equals_eager(run)
    assert len(fake_cuda_graphs) == 1  # captured once, replayed for the second call
    assert fake_cuda_graphs[0].noise is None if philox else fake_cuda_graphs[0].noise is not None
    assert not torch.allclose(out, run(False, 1)[0])


# --------------------------------------------------------------- Euler on sigma grids: parity
def _euler_grid_pair(sched: str, steps: int, **opts):
    cfg = SCHEDULES[sched]
    ours = EulerSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    theirs = diffusers.EulerDiscreteScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    return ours, theirs


@pytest.mark.parametrize(
    "sched,grid,steps,opts",
    [
        ("linear", "karras", 10, dict(prediction_type="v_prediction")),
        ("scaled_linear", "karras", 25, {}),
        ("scaled_linear", "exponential", 12, dict(timestep_spacing="trailing")),
        ("linear", "beta", 9, dict(timestep_spacing="leading", steps_offset=1)),
        ("scaled_linear", "karras", 8, dict(sigma_min=0.1, sigma_max=10.0)),
    ],
)
def test_euler_grid_per_step_parity_with_diffusers(sched, grid, steps, opts):
    """The float32 grid equals diffusers' bitwise, the model timesteps are diffusers'
    fractional ones rounded, and each step agrees to 1e-5."""
    if grid == "beta":
        pytest.importorskip("scipy")
    ours, theirs = _euler_grid_pair(sched, steps, **{FLAGS[grid]: True}, **opts)
    assert np.array_equal(ours.sigmas(), theirs.sigmas.double().numpy())
    frac = theirs.timesteps.double()
    assert (frac != frac.round()).any()  # diffusers' model t really is fractional here
    assert torch.equal(ours.timesteps, frac.round().to(torch.int64))
    plain = EulerSampler(
        ours.schedule, steps, **{k: v for k, v in opts.items() if "sigma" not in k}
    )
    assert not np.allclose(plain.sigmas(), ours.sigmas())  # the grid, not the spacing
    sig = ours.sigmas()
    x_sig = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * theirs.init_noise_sigma
    for i, t in enumerate(theirs.timesteps):
        x = theirs.scale_model_input(x_sig, t)
        mo = _fake_model(x, ours.timesteps[i])
        ref = theirs.step(mo, t, x_sig).prev_sample
        got = ours.step(mo, i, x).double() * math.sqrt(1.0 + sig[i + 1] ** 2)
        assert _rel(got, ref) <= RTOL, (i, _rel(got, ref))
        x_sig = ref


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_beta_sigmas"])
@torch.no_grad()
def test_euler_grid_sample_matches_diffusers_loop_at_rounded_t(flag):
    """fastdiff.sample(sampler='euler', schedule=EulerDiscreteScheduler(<grid>)) against the
    diffusers loop whose model gets t rounded as fastdiff's does for a plain callable (diffusers
    itself calls it at the fractional t, as fastdiff calls a diffusers model: that alone moves
    this loop by ~4e-4, tests/test_fractional_timesteps.py)."""
    if flag == "use_beta_sigmas":
        pytest.importorskip("scipy")
    net = _Net().eval()
    sched = diffusers.EulerDiscreteScheduler(**{flag: True})
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sched.set_timesteps(7)
    x = noise * sched.init_noise_sigma  # the pipelines' start, as sample()'s
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t.round().reshape(1)), t, x).prev_sample
    got = fastdiff.sample(net, steps=7, sampler="euler", schedule=sched, noise=noise)
    assert _rel(got, x) <= 1e-5
    unrounded = diffusers.EulerDiscreteScheduler()
    assert _rel(fastdiff.sample(net, steps=7, sampler="euler", schedule=unrounded, noise=noise),
                got) > 1e-3  # fmt: skip


@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_euler_a_on_a_grid_is_diffusers_ancestral_step_on_that_grid(grid, monkeypatch):
    """'Euler a Karras' (a fastdiff extension; k-diffusion's sample_euler_ancestral on
    get_sigmas_karras): diffusers' ancestral step given our grid's sigmas agrees per step."""
    cfg = SCHEDULES["scaled_linear"]
    ours = EulerAncestralSampler(NoiseSchedule.from_diffusers(cfg), 12, **{FLAGS[grid]: True})
    ode = EulerSampler(NoiseSchedule.from_diffusers(cfg), 12, **{FLAGS[grid]: True})
    np.testing.assert_array_equal(ours.sigmas(), ode.sigmas())
    assert torch.equal(ours.timesteps, ode.timesteps)
    theirs, twin = (diffusers.EulerAncestralDiscreteScheduler(**cfg) for _ in range(2))
    for s in (theirs, twin):
        s.set_timesteps(12)
        s.set_begin_index(0)
        s.sigmas = torch.from_numpy(ours.sigmas()).to(s.sigmas.dtype)
    twin.sigmas = torch.from_numpy(ours.sigmas())
    assert _ancestral_loop(ours, theirs, twin, monkeypatch, seed=4) > 0.0


# ----------------------------------------------------------------------------- options, CLI
def test_sigma_grid_helpers_are_shared_and_checked():
    from fastdiff.samplers import dpm_solver

    assert dpm_solver.karras_sigmas is sig_mod.karras_sigmas
    assert dpm_solver.sigma_to_t is sig_mod.sigma_to_t
    sch = NoiseSchedule("linear")
    for cls in (EulerSampler, EulerAncestralSampler):
        with pytest.raises(ValueError, match="at most one"):
            cls(sch, 10, use_karras_sigmas=True, use_beta_sigmas=True)
        for bad in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="sigma_min"):
                cls(sch, 10, use_karras_sigmas=True, sigma_min=bad)
        for bad, got in (("1", "str"), (True, "bool")):  # a wrong type
            with pytest.raises(TypeError, match=f"^sigma_min: expected None or .*, got {got}$"):
                cls(sch, 10, use_karras_sigmas=True, sigma_min=bad)
        with pytest.raises(ValueError, match="sigma_min < sigma_max"):
            cls(sch, 10, use_karras_sigmas=True, sigma_min=5.0, sigma_max=2.0)
        with pytest.raises(ValueError, match="sigma_min < sigma_max"):
            cls(sch, 10, use_exponential_sigmas=True, sigma_min=200.0)  # above the top sigma
        with pytest.raises(ValueError, match="steps_offset"):
            cls(sch, 10, timestep_spacing="leading", steps_offset=200, use_karras_sigmas=True)
        smp = cls(sch, 10, sigma_min=5.0, sigma_max=2.0)  # no grid: unread, as diffusers
        assert smp.sigma_grid is None
        with pytest.raises(ValueError, match="prediction_type"):
            cls(sch, 10, prediction_type="x0")


def test_registry_scheduler_mapping_and_errors():
    assert SAMPLERS["euler_a"] is EulerAncestralSampler
    assert isinstance(make_sampler("Euler_A", NoiseSchedule("linear"), 10), EulerAncestralSampler)
    with pytest.raises(ValueError, match="euler_a"):
        make_sampler("euler-a", NoiseSchedule("linear"), 10)
    with pytest.raises(ValueError, match="'euler_a'"):
        fastdiff.sample(lambda x, t: x, sampler="dpm_fast", shape=(2,))
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(lambda x, t: x, sampler="euler_a", eta=0.5, shape=(2,))
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(lambda x, t: x, sampler="euler_a", clip_sample=True, shape=(2,))
    # a diffusers EulerDiscreteScheduler's grid setting reaches the sampler (no longer refused)
    sched = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True, sigma_max=80.0)
    smp = resolve_sampler(None, "euler", 10, sched, None, None, {})
    assert smp.sigma_grid == "karras" and smp.sigma_max == 80.0
    assert smp.sigmas()[0] == np.float32(80.0)
    # Euler's settings that are still not implemented raise for both Euler samplers' configs
    cfg = dict(diffusers.EulerAncestralDiscreteScheduler().config)
    cfg.update(_class_name="EulerAncestralDiscreteScheduler", timestep_type="continuous")
    with pytest.raises(ValueError, match="timestep_type"):
        fastdiff.sample(lambda x, t: x, sampler="euler_a", schedule=cfg, shape=(2,))
    fastdiff.sample(lambda x, t: x, sampler="euler", schedule=cfg, shape=(2,))  # not its own


HAS_WEIGHTS = (Path(fastdiff.__file__).parent / "weights" / "digits.safetensors").is_file()


@pytest.mark.skipif(not HAS_WEIGHTS, reason="digits weights not shipped")
def test_cli_euler_a_and_karras_for_the_euler_samplers(tmp_path, monkeypatch, capsys):
    from fastdiff.cli import main

    seen = record_sample_calls(monkeypatch, run=True)
    for k, (sampler, extra) in enumerate(
        [("euler_a", []), ("euler_a", ["--karras"]), ("euler", ["--karras"])]
    ):
        out = tmp_path / f"{k}.png"
        assert main(["sample", "--steps", "2", "--n", "2", "--sampler", sampler, "--quiet",
                     "--out", str(out), *extra]) == 0  # fmt: skip
        assert out.is_file()
    assert [s["sampler"] for s in seen] == ["euler_a", "euler_a", "euler"]
    assert [s.get("use_karras_sigmas") for s in seen] == [None, True, True]
    assert main(["sample", "--steps", "2", "--n", "2", "--sampler", "ddpm", "--karras",
                 "--quiet", "--out", str(tmp_path / "x.png")]) != 0  # fmt: skip
    assert "--karras" in capsys.readouterr().err
