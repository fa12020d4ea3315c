"""Mutation testing, round 4 (session 10): tests that kill the mutants of today's new code (Heun,
the DPM++ 2M SDE path, its noise operand) that the existing suite let live. Each test names the
behaviour it pins; /work/notes/s8/mutation_log.md ("Round 4") lists the mutants."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.ops import sampler_step as smod
from fastdiff.samplers import DPMSolverPPSampler, HeunSampler

SDE = "sde-dpmsolver++"
ODD = (2, 3, 5, 3)  # odd sizes


def _randn(n: int, seed: int, shape=ODD) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    "make",
    [lambda s: HeunSampler(s, 5), lambda s: DPMSolverPPSampler(s, 6, algorithm_type=SDE)],
    ids=["heun", "dpm-sde"],
)
def test_a_step_with_explicit_history_leaves_the_kept_history_alone(make):
    """A step given ``x0_prev`` (CUDA-graph capture passes its static buffers) is managed by
    the caller: the sampler's own history, kept from its last sampler-managed call, must stay
    that call's x0 prediction (the next managed step reads it)."""
    sch = NoiseSchedule("linear")
    ref, smp = make(sch), make(sch)
    x, mo, mo1, y, buf, z = _randn(6, 3)
    x1 = ref.step(mo, 0, x, noise=z)
    assert torch.equal(smp.step(mo, 0, x, noise=z), x1)
    smp.step(mo1, 0, y, noise=z, x0_prev=buf)  # an externally managed call in between
    want = ref.step(mo1, 1, x1, noise=z)
    torch.testing.assert_close(smp.step(mo1, 1, x1, noise=z), want, rtol=0, atol=0)


def test_compiled_sde_step_adds_the_noise_term():
    """Under torch.compile the dpm step goes through the custom op with the 'auto' backend: the
    noise operand must reach it (x_next = ... + c_noise z), as in eager."""
    ab, ab_prev = 0.5, 0.7
    c_noise = math.sqrt(1 - ab_prev) * 0.6
    vals = [math.sqrt(ab), math.sqrt(1 - ab), 0.8, 0.3, -0.1, c_noise, 0.0, 0.0]
    coef = torch.tensor(vals, dtype=torch.float64).float()

    def fn(x, mo, prev, z):
        return smod.dpm_solver_2m_step(x, mo, coef, prev, noise=z, clip_range=1.0)[0]

    x, mo, prev, z = _randn(4, 5)
    want = fn(x, mo, prev, z)
    no_noise = smod.dpm_solver_2m_step(x, mo, coef, prev, clip_range=1.0)[0]
    assert (want - no_noise).abs().max() > 0.1  # the noise term is visible
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, mo, prev, z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ["HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_config_values_win_over_the_scheduler_class_defaults(cls):
    """from_diffusers fills only the keys a config omits with its class's defaults: the values a
    config (or a scheduler instance's config) does give are kept."""
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, num_train_timesteps=500)
    theirs = getattr(diffusers, cls)(**cfg)
    want = theirs.betas.double()
    for src in ({"_class_name": cls, **cfg}, theirs.config, theirs):
        got = NoiseSchedule.from_diffusers(src)
        assert got.num_train_timesteps == 500
        torch.testing.assert_close(got.betas.double(), want, rtol=1e-6, atol=1e-9)


def test_dpm_history_of_another_x_shape_is_not_used():
    """A reused DPM-Solver++ sampler whose last step ran on another batch (x shape) takes a
    first-order step (as a fresh sampler), not the 2M step with a history it cannot apply."""
    sch = NoiseSchedule("linear")
    for algo in ("dpmsolver++", SDE):
        smp = DPMSolverPPSampler(sch, 6, algorithm_type=algo)
        x, mo, mo1, z = _randn(4, 7)
        smp.step(mo, 0, x, noise=z)
        x1, m1, z1 = x[:1] + 0.1, mo1[:1], z[:1]  # the next step on one sample only
        assert smp.coef64[1, 4] != 0  # step 1 is a 2M step when it has the history
        want = DPMSolverPPSampler(sch, 6, algorithm_type=algo).step(m1, 1, x1, noise=z1)
        torch.testing.assert_close(smp.step(m1, 1, x1, noise=z1), want, rtol=0, atol=0)


def test_heun_sigmas_is_a_copy():
    """sigmas() hands out a copy: writing to it changes neither the sampler's sigmas nor its
    coefficient rows."""
    smp = HeunSampler(NoiseSchedule("linear"), 4)
    sig, rows = smp.sigmas(), smp.coefficients()
    smp.sigmas()[:] = 1.0
    assert (smp.sigmas() == sig).all()
    assert (smp.coefficients() == rows).all()


def _net16(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = torch.as_tensor(t).float().reshape(-1, *[1] * (x.ndim - 1))
    return (0.6 * torch.tanh(0.8 * x.float() + 0.1) + 0.5 * torch.sin(tt / 150.0)).to(x.dtype)


class _Net16(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _net16(x, t)


def _manual_sde_fp16(x_t: torch.Tensor, seed: int) -> torch.Tensor:
    """The SDE loop by hand: z drawn in float32 (as diffusers) and handed to the step as is."""
    smp = DPMSolverPPSampler(NoiseSchedule("linear"), 6, algorithm_type=SDE)
    x, g = x_t, torch.Generator().manual_seed(seed)
    for i, t in enumerate(smp.timesteps):
        mo = _net16(x, torch.full((x.shape[0],), int(t)))
        z = torch.randn(x.shape, generator=g, dtype=torch.float32)
        x = smp.step(mo, i, x, noise=z)
    return x


@torch.no_grad()
@pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])
def test_fp16_sde_sample_steps_with_the_float32_noise(backend, fake_cuda_graphs, monkeypatch):
    """sample() of DPM++ 2M SDE in fp16 with a generator hands each step the float32 z it drew
    (not z rounded to fp16): it equals the hand-written loop exactly, eager and through the
    CUDA-graph loop (whose static noise buffer is float32). The torch backend reads z in
    float32, so there z rounded to fp16 by the loop would show."""
    import contextlib

    import fastdiff
    from fastdiff import api

    ctx = contextlib.nullcontext if backend is None else lambda: fastdiff.use_backend(backend)
    x_t = torch.randn(ODD, generator=torch.Generator().manual_seed(1)).half()
    with ctx():
        want = _manual_sde_fp16(x_t, 5)
    eager_loop = api._sample_eager
    for graphed in (False, True):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        with ctx():
            got = api.sample(_Net16(), steps=6, sampler="dpm++", algorithm_type=SDE,
                             schedule=NoiseSchedule("linear"), noise=x_t, dtype=torch.float16,
                             generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(fake_cuda_graphs) == 1 and fake_cuda_graphs[0].noise.dtype == torch.float32


@pytest.mark.parametrize("name", ["heun", "dpm++"])
def test_sample_builds_the_coefficient_table_before_the_first_model_call(name, monkeypatch):
    """The eager loop makes the coefficient rows' one host -> device copy before the loop (on
    CUDA a lazy copy at step 0 is a host sync between the model and the step)."""
    from fastdiff import api
    from fastdiff.samplers import make_sampler

    smp = make_sampler(name, NoiseSchedule("linear"), 4)
    events: list[str] = []
    table = smp.coef_table
    monkeypatch.setattr(smp, "coef_table", lambda dev: events.append("coef") or table(dev))

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        events.append("model")
        return _net16(x, t)

    api.sample(net, sampler=smp, noise=torch.randn(ODD))
    assert events[0] == "coef" and events.count("model") == smp.steps


@pytest.mark.parametrize("name", ["dpm++", "heun"])
@torch.no_grad()
def test_cuda_graph_is_not_replayed_with_another_clip_range(name, fake_cuda_graphs, monkeypatch):
    """clip_sample_range is a Python float baked into a captured step: a cuda_graph run with
    another range must capture its own graph (sampler config()), not replay the first one's."""
    from fastdiff import api

    eager_loop, net = api._sample_eager, _Net16()  # one model: one graph cache

    def run(graphed, r):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        z = torch.randn(ODD, generator=torch.Generator().manual_seed(4)) * 3
        return api.sample(net, steps=5, sampler=name, noise=z, clip_sample=True,
                          clip_sample_range=r, schedule=NoiseSchedule("linear"))  # fmt: skip

    outs = []
    for r in (0.5, 2.0):
        eager, graphed = run(False, r), run(True, r)
        torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6, msg=f"{r}")
        outs.append(eager)
    assert not torch.allclose(outs[0], outs[1])  # the range matters here
    assert len(fake_cuda_graphs) == 2  # one capture per range
