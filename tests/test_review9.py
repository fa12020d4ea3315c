"""Regression guards from the session-9 review (review9) of the validated-call cache of the cpu
sampler step, Euler ancestral and the sigma grids of Euler / DPM-Solver++.

Each case was checked by hand against the torch backend or diffusers 0.42.1 and is not covered
elsewhere: cache hits for aliased / overlapping / offset / expanded / inference-mode operands,
the cache under concurrent threads and its 256-entry clear, the planned binding's argument
errors, edge step counts (1, 2, T, an odd T, a run starting mid-schedule) against diffusers, the
CUDA-graph loop on sigma grids (fake graphs on CPU) and one sampler object reused across runs.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from _sampler_cases import toy as _fake_model
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, backend_cases

import fastdiff
from fastdiff import NoiseSchedule, api
from fastdiff.ops import _sampler_step_kernels as kernels
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step
from fastdiff.samplers import (
    DPMSolverPPSampler,
    EulerAncestralSampler,
    EulerSampler,
    make_sampler,
)

HAS_CPU = ("cpu", "cpu") in backend_cases("sampler_step")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="needs the cpu backend (fastdiff._C)")
SHAPE = (2, 3, 5, 7)  # odd sizes


def _coef() -> torch.Tensor:
    # [a, s, c_x0, c_eps, c_x, c_noise, log_var_max, log_var_min]
    return torch.tensor([0.8, 0.6, 0.9, 0.1, 0.05, 0.3, -1.0, -3.0])


def _torch_ref(*args, **kw):
    with fastdiff.use_backend("torch"):
        return sampler_step(*args, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- validated-call cache (cpu)
def _odd_operands():
    """(name, x, model_output, noise, kwargs): operands the cache must handle as the op does."""
    g = torch.Generator().manual_seed(9)
    buf = torch.randn(4, *SHAPE[1:], generator=g)
    x = torch.randn(SHAPE, generator=g)
    one = torch.randn(1, *SHAPE[1:], generator=g)
    with torch.inference_mode():
        xi, mi = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    cfg = torch.randn(2 * SHAPE[0], *SHAPE[1:], generator=g)
    return [
        ("x is model_output is noise", x, x, x, {}),
        ("overlapping views with storage offsets", buf[1:3], buf[0:2], buf[2:4], {}),
        ("expanded batch (stride 0)", one.expand(SHAPE), buf[:2], one.expand(SHAPE), {}),
        ("inference-mode tensors", xi, mi, None, dict(return_x0=True)),
        ("cfg halves overlapping x", cfg[1:3], cfg[:4], None, dict(guidance_scale=2.0)),
        ("noise aliases x, clipped v", x, buf[:2], x, dict(prediction_type="v_prediction",
                                                             clip_range=0.5, recompute_eps=True)),
    ]  # fmt: skip


@needs_cpu
@pytest.mark.parametrize("case", range(6))
def test_cache_hits_on_aliased_and_offset_operands_equal_the_torch_backend(case, monkeypatch):
    monkeypatch.setattr(kernels, "_VALIDATED", {})
    name, x, mo, z, kw = _odd_operands()[case]
    before = [t.clone() for t in (x, mo) + ((z,) if z is not None else ())]
    coef = _coef()
    want = _torch_ref(x, mo, coef, noise=z, **kw)
    first = sampler_step(x, mo, coef, noise=z, **kw)
    assert len(kernels._VALIDATED) == 1, name  # this combination is cached ...
    for _ in range(2):  # ... and the hits give the first call's result exactly
        got = sampler_step(x, mo, coef, noise=z, **kw)
        for a, b, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, first, want)),
                           strict=True):  # fmt: skip
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)
    after = [x, mo] + ([z] if z is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), name


@needs_cpu
def test_cache_hit_reads_the_new_storage_behind_the_same_metadata(monkeypatch):
    # same shape / stride / dtype, other memory (a view at another storage offset): other values
    monkeypatch.setattr(kernels, "_VALIDATED", {})
    buf = torch.randn(6, *SHAPE[1:])
    coef, mo = _coef(), torch.randn(SHAPE)
    outs = [sampler_step(buf[k : k + 2], mo, coef) for k in range(5)]
    assert len(kernels._VALIDATED) == 1
    for k, out in enumerate(outs):
        torch.testing.assert_close(out, _torch_ref(buf[k : k + 2], mo, coef), rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0], outs[1])


@needs_cpu
def test_cache_under_concurrent_threads_and_its_clear(monkeypatch):
    # 3 threads, ~300 distinct combinations (the cache clears at 256 entries): every result
    # equals the op's cpu result exactly
    monkeypatch.setattr(kernels, "_VALIDATED", {})
    op = torch.ops.fastdiff.sampler_step.default
    coef = _coef()
    errors: list = []

    def work(tid: int) -> None:
        g = torch.Generator().manual_seed(tid)
        for i in range(100):
            n, w = 1 + (i * 7 + tid) % 25, 1 + (i + tid) % 4
            x = torch.randn(n, 2, w, 3, generator=g)
            mo = torch.randn(2 * n, 2, w, 3, generator=g)
            clip = 1.0 if i % 2 else None
            for _ in range(2):  # validate, then hit (unless another thread cleared it)
                got = sampler_step(x, mo, coef, guidance_scale=1.5, clip_range=clip)
                ref = op(x, mo, coef, None, None, "cpu", 0, clip, False, 1.5, False, False)[0]
                if not torch.equal(got, ref):
                    errors.append((tid, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 0 < len(kernels._VALIDATED) <= 256


@needs_cpu
def test_dpm_step_cache_hits_on_aliased_history(monkeypatch):
    monkeypatch.setattr(kernels, "_VALIDATED", {})
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE)
    coef = torch.tensor([0.8, 0.6, 0.7, 0.2, -0.1, 0.0, 0.0, 0.0])
    with fastdiff.use_backend("torch"):
        want = dpm_solver_2m_step(x, mo, coef, x)
    for _ in range(3):  # x0_prev is x itself
        got = dpm_solver_2m_step(x, mo, coef, x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(kernels._VALIDATED) == 1


@needs_cpu
def test_planned_binding_rejects_bad_capsules_and_addresses():
    from fastdiff import _ext

    c = _ext.native()
    plan = c.sampler_step_cpu_plan(0, 2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, False, False,
                                   False, False)  # fmt: skip
    x, out, coef = torch.randn(6), torch.empty(6), _coef()
    ok = [x.data_ptr(), x.data_ptr(), 0, 0, coef.data_ptr(), out.data_ptr(), 0]
    with pytest.raises(ValueError, match="invalid PyCapsule"):
        c.sampler_step_cpu_run(None, *ok, 0.0, 0.0)
    with pytest.raises(OverflowError):
        c.sampler_step_cpu_run(plan, -1, *ok[1:], 0.0, 0.0)
    with pytest.raises(OverflowError):
        c.sampler_step_cpu_run(plan, 2**70, *ok[1:], 0.0, 0.0)
    with pytest.raises(ValueError, match="null operand"):
        c.sampler_step_cpu_run(plan, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0)
    with pytest.raises(TypeError, match="keyword"):
        c.sampler_step_cpu_run(plan, *ok, 0.0, g=0.0)
    with pytest.raises(ValueError, match="negative size"):
        neg = c.sampler_step_cpu_plan(0, -2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, False,
                                      False, False, False)  # fmt: skip
        c.sampler_step_cpu_run(neg, *ok, 0.0, 0.0)
    c.sampler_step_cpu_run(plan, *ok, 0.0, 0.0)  # still usable after the errors
    want = _torch_ref(x.view(2, 3), x.view(2, 3), coef)
    torch.testing.assert_close(out.view(2, 3), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ samplers vs diffusers
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod  # noqa: E402

PAR_SHAPE = (2, 3, 4, 4)


EULER_EDGE = [  # (ancestral, schedule, steps, T, begin, options)
    (True, "linear", 1, 1000, 0, dict(timestep_spacing="trailing")),
    (True, "linear", 2, 1000, 0, dict(timestep_spacing="leading")),
    (True, "linear", 1000, 1000, 0, dict(timestep_spacing="trailing")),
    (True, "scaled_linear", 7, 999, 0, dict(timestep_spacing="leading", steps_offset=1)),
    (True, "scaled_linear", 10, 1000, 4, dict(timestep_spacing="trailing")),
    (True, "cosine", 6, 1000, 0, {}),  # v at sigma 2e4 is fp32-conditioned (4e-4 both sides)
    (False, "linear", 1, 1000, 0, {}),
    (False, "scaled_linear", 2, 999, 0, dict(use_karras_sigmas=True)),
    (False, "scaled_linear", 9, 1000, 3, dict(use_exponential_sigmas=True)),
    (
        False,
        "scaled_linear",
        9,
        1000,
        0,
        dict(use_karras_sigmas=True, sigma_min=1e-3, sigma_max=1e3),
    ),  # fmt: skip
    (False, "scaled_linear", 10, 1000, 0, dict(prediction_type="sample")),
]


@pytest.mark.parametrize("ancestral,sched,steps,T,begin,opts", EULER_EDGE)
def test_euler_edge_cases_per_step_parity_with_diffusers(
    ancestral, sched, steps, T, begin, opts, monkeypatch
):
    """Every step from diffusers' state, with the same model output and (replayed) noise:
    relative error <= 1e-5 in sigma space; model timesteps = diffusers' rounded."""
    if opts.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    box: dict = {}
    monkeypatch.setattr(ea_mod, "randn_tensor", lambda *a, **k: box["z"].clone())
    cfg = dict(DIFFUSERS_BETAS[sched], num_train_timesteps=T)
    ours = (EulerAncestralSampler if ancestral else EulerSampler)(
        NoiseSchedule.from_diffusers(cfg), steps, **opts
    )
    name = "EulerAncestralDiscreteScheduler" if ancestral else "EulerDiscreteScheduler"
    theirs = getattr(diffusers, name)(**cfg, **opts)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(begin)  # a repeated first timestep (grid past sigma_max) or img2img
    assert torch.equal(ours.timesteps, theirs.timesteps.double().round().to(torch.int64))
    sig = ours.sigmas()
    np.testing.assert_allclose(sig, theirs.sigmas.double().numpy(), rtol=5e-4)  # fp32 betas
    g = torch.Generator().manual_seed(steps)
    x_sig = torch.randn(PAR_SHAPE, generator=g) * math.sqrt(1.0 + sig[begin] ** 2)
    for i in range(begin, steps):
        t = theirs.timesteps[i]
        x = theirs.scale_model_input(x_sig, t)
        mo = _fake_model(x, ours.timesteps[i])
        box["z"] = z = torch.randn(PAR_SHAPE, generator=g)
        ref = theirs.step(mo, t, x_sig).prev_sample
        got = ours.step(mo, i, x, noise=z).double() * math.sqrt(1.0 + sig[i + 1] ** 2)
        assert _rel(got, ref) <= PARITY_RTOL, (i, _rel(got, ref))
        x_sig = ref


@pytest.mark.parametrize(
    "steps,opts",
    [
        (1, dict(use_karras_sigmas=True)),
        (2, dict(use_exponential_sigmas=True)),
        (3, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False)),
    ],
)
def test_dpm_solver_grid_few_steps_parity_with_diffusers(steps, opts):
    cfg = DIFFUSERS_BETAS["scaled_linear"]
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(0)
    ours = DPMSolverPPSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(PAR_SHAPE, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(ours.timesteps):
        mo = _fake_model(x, t)
        ref = theirs.step(mo, t, x).prev_sample
        assert _rel(ours.step(mo, i, x), ref) <= PARITY_RTOL, i
        x = ref


# ------------------------------------------------------- sample(): graphs and sampler reuse
class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(4, 3)
        self.null_class = 0

    def forward(self, x, t, class_labels=None):
        h = self.conv(x) + 0.1 * torch.sin(t.float() / 100.0)[:, None, None, None]
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return h


GRID_GRAPH_CASES = [  # (sampler, options, philox noise)
    ("euler_a", dict(use_karras_sigmas=True), True),
    ("euler_a", dict(use_exponential_sigmas=True, prediction_type="sample"), False),
    ("euler", dict(use_karras_sigmas=True), False),
    ("dpm++", dict(use_karras_sigmas=True), False),
    ("dpm++", dict(use_exponential_sigmas=True, thresholding=True, prediction_type="sample"),
     False),
]  # fmt: skip


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("name,opts,philox", GRID_GRAPH_CASES)
@torch.no_grad()
def test_graphed_loop_on_sigma_grids_equals_eager(name, opts, philox, steps, fake_cuda_graphs,
                                                  monkeypatch):  # fmt: skip
    net = _Net().eval()
    eager_loop = api._sample_eager

    def run(graphed: bool, call: int):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        torch.manual_seed(call)
        gens = None if philox else [torch.Generator().manual_seed(call + k) for k in (0, 7)]
        return fastdiff.sample(net, steps=steps, sampler=name, shape=(3, 5, 7), batch_size=2,
                               generator=gens, cond=torch.tensor([call, 1]), guidance_scale=2.0,
                               return_trajectory=True, **opts)  # fmt: skip

    for call in (1, 2):
        eager, etraj = run(False, call)
        out, traj = run(True, call)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        for k in etraj:
            torch.testing.assert_close(traj[k], etraj[k], rtol=1e-5, atol=1e-5)
    assert len(fake_cuda_graphs) == 1  # captured once, replayed for the second call


@pytest.mark.parametrize(
    "name,opts", [("dpm++", dict(use_karras_sigmas=True)), ("euler_a", dict(use_beta_sigmas=True))]
)
@torch.no_grad()
def test_one_sampler_object_reused_across_runs(name, opts):
    if opts.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    net = _Net().eval()
    smp = make_sampler(name, NoiseSchedule("linear"), 6, **opts)
    noise = torch.randn(2, 3, 5, 7)

    def run(sampler, x, **kw):
        return fastdiff.sample(net, sampler=sampler, noise=x,
                               generator=torch.Generator().manual_seed(3), **kw)  # fmt: skip

    a = run(smp, noise)
    assert torch.equal(run(smp, noise), a)
    run(smp, noise[:1])  # another batch size in between leaves no stale history
    assert torch.equal(run(smp, noise), a)
    torch.testing.assert_close(run(name, noise, steps=6, **opts), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("dpm++", dict(use_karras_sigmas=True, thresholding=True, sample_max_value=1.5)),
        ("dpm++", dict(use_exponential_sigmas=True, prediction_type="v_prediction")),
        ("euler_a", dict(timestep_spacing="trailing")),
        ("euler", dict(use_karras_sigmas=True)),
    ],
)
def test_guidance_in_the_step_equals_diffusers_on_the_combined_output(name, opts, monkeypatch):
    """step([uncond, cond], guidance_scale=g) = diffusers' step on uncond + g (cond - uncond)
    (the pipeline's combination), on sigma grids and with thresholding."""
    box: dict = {}
    monkeypatch.setattr(ea_mod, "randn_tensor", lambda *a, **k: box["z"].clone())
    cfg, steps, g = DIFFUSERS_BETAS["scaled_linear"], 7, 3.0
    cls = {"dpm++": "DPMSolverMultistepScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
           "euler": "EulerDiscreteScheduler"}[name]  # fmt: skip
    theirs = getattr(diffusers, cls)(**cfg, **opts)
    theirs.set_timesteps(steps)
    theirs.set_begin_index(0)
    ours = make_sampler(name, NoiseSchedule.from_diffusers(cfg), steps, **opts)
    sig = ours.sigmas() if name != "dpm++" else None
    gen = torch.Generator().manual_seed(4)
    x_d = torch.randn(PAR_SHAPE, generator=gen)  # diffusers' state
    if sig is not None:
        x_d = x_d * math.sqrt(1.0 + sig[0] ** 2)
    for i in range(steps):
        t = theirs.timesteps[i]
        x = theirs.scale_model_input(x_d, t) if sig is not None else x_d
        mu = _fake_model(x, ours.timesteps[i])
        mc = _fake_model(1.1 * x + 0.2, ours.timesteps[i])
        box["z"] = z = torch.randn(PAR_SHAPE, generator=gen)
        ref = theirs.step(mu + g * (mc - mu), t, x_d).prev_sample
        got = ours.step(torch.cat([mu, mc]), i, x, noise=z, guidance_scale=g).double()
        if sig is not None:
            got = got * math.sqrt(1.0 + sig[i + 1] ** 2)
        assert _rel(got, ref) <= PARITY_RTOL, (i, _rel(got, ref))
        x_d = ref


@pytest.mark.parametrize(
    "opts,begin",
    [
        (dict(use_karras_sigmas=True), 0),
        (dict(use_karras_sigmas=True), 3),  # img2img: a run starting mid-grid
        (dict(use_beta_sigmas=True, prediction_type="v_prediction"), 2),
        (dict(use_exponential_sigmas=True, timestep_spacing="trailing"), 0),
    ],
)
def test_euler_a_on_sigma_grids_is_diffusers_ancestral_step_on_the_grid(opts, begin, monkeypatch):
    """diffusers' ancestral scheduler has no grids: its step, given our grid (float64 sigmas and
    timesteps), is the reference; the grid and model timesteps are Euler's."""
    if opts.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    box: dict = {}
    monkeypatch.setattr(ea_mod, "randn_tensor", lambda *a, **k: box["z"].clone())
    cfg, steps = DIFFUSERS_BETAS["scaled_linear"], 8
    ours = EulerAncestralSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    euler = EulerSampler(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    assert np.array_equal(ours.sigmas(), euler.sigmas())
    assert torch.equal(ours.timesteps, euler.timesteps)
    twin = diffusers.EulerAncestralDiscreteScheduler(
        **cfg, **{k: v for k, v in opts.items() if "sigmas" not in k}
    )
    twin.set_timesteps(steps)
    twin.sigmas, twin.timesteps = torch.from_numpy(ours.sigmas()), ours.timesteps.double()
    twin.set_begin_index(begin)
    sig = ours.sigmas()
    gen = torch.Generator().manual_seed(begin)
    x_sig = torch.randn(PAR_SHAPE, generator=gen).double() * math.sqrt(1.0 + sig[begin] ** 2)
    for i in range(begin, steps):
        x = twin.scale_model_input(x_sig, twin.timesteps[i]).float()
        mo = _fake_model(x, ours.timesteps[i])
        box["z"] = z = torch.randn(PAR_SHAPE, generator=gen)
        ref = twin.step(mo.double(), twin.timesteps[i], x_sig).prev_sample
        got = ours.step(mo, i, x, noise=z).double() * math.sqrt(1.0 + sig[i + 1] ** 2)
        assert _rel(got, ref) <= PARITY_RTOL, (i, _rel(got, ref))
        x_sig = ref
