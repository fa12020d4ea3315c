"""Adversarial review (session 10) of the Heun and DPM++ 2M SDE samplers: cases the samplers' own
tests (test_heun.py, test_dpm_sde.py) do not pin, each against diffusers 0.42 or the torch
reference backend."""

from __future__ import annotations

import pytest
import torch
from _sampler_cases import rel as _rel
from helpers import backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA backend)
from test_dpm_sde import ROW, _coef, _schedule

import fastdiff
from fastdiff.ops._philox import philox_randn
from fastdiff.ops.sampler_step import dpm_solver_2m_step
from fastdiff.samplers import DPMSolverPPSampler

diffusers = pytest.importorskip("diffusers")

SDE = "sde-dpmsolver++"
CASES = backend_cases("dpm_solver_2m_step")
# 75 elements: not a multiple of 16, where torch's CPU randn in fp16/bf16 takes another path than
# in fp32 (other values, and the generator advances differently)
ODD = (1, 3, 5, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sde_step_generator_draws_float32_noise_like_diffusers(dtype):
    """diffusers' SDE step draws its noise in float32 whatever the sample's dtype
    (randn_tensor(..., dtype=torch.float32)); a half-precision run seeded with a generator must
    draw the same z and advance the generator alike."""
    sch, cfg = _schedule("scaled_linear")
    theirs = diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type=SDE)
    theirs.set_timesteps(6)
    ours = DPMSolverPPSampler(sch, 6, algorithm_type=SDE)
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(ODD, generator=torch.Generator().manual_seed(0)).to(dtype)
    for i, t in enumerate(theirs.timesteps):
        mo = (0.7 * torch.tanh(x.float()) + 0.1).to(dtype)
        ref = theirs.step(mo, t, x, generator=g_theirs).prev_sample
        got = ours.step(mo, i, x, generator=g_ours)
        assert got.dtype == ref.dtype == dtype
        tol = 4 * torch.finfo(dtype).eps
        assert _rel(got, ref) <= tol, (i, _rel(got, ref))
        x = ref
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def _net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = torch.as_tensor(t).float().reshape(-1, *[1] * (x.ndim - 1))
    return (0.6 * torch.tanh(0.8 * x.float() + 0.1) + 0.5 * torch.sin(tt / 150.0)).to(x.dtype)


def test_sde_sample_fp16_with_a_generator_is_diffusers_fp16_loop():
    """sample(dtype=float16, generator=g) of DPM++ 2M SDE is diffusers' own fp16 loop with the
    same seed (a latent size that is not a multiple of 16)."""
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type=SDE)
    sched.set_timesteps(6)
    x_T = torch.randn(ODD, generator=torch.Generator().manual_seed(1)).half()
    x, g = x_T, torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(_net(x, t.reshape(1)), t, x, generator=g).prev_sample
    g = torch.Generator().manual_seed(5)
    got = fastdiff.sample(
        _net, steps=6, sampler="dpm++", schedule=sched, noise=x_T, dtype=torch.float16, generator=g
    )
    assert got.dtype == torch.float16
    assert _rel(got, x) <= 8 * torch.finfo(torch.float16).eps


# (seed, offset) pairs whose counters cross 2^32 (carry into the high counter word) and 2^63 /
# 2^64 (int64 wrap: the offset is a uint64 counter), and seeds with the sign bit set
EDGE_STATES = [
    (1, 2**32 - 10),
    (2**32 - 1, 5),
    (-1, 3),
    (2**63 - 1, 2**63 - 20),
    (5, 2**63 - 1),
    (5, -30),
    (-(2**63), -(2**62) - 3),
]


def _edge_outputs(backends):
    coef = _coef("cpu", ROW)  # the 2M SDE row of test_dpm_sde
    shape = (1, 3, 5, 7)  # 105 values: a scalar tail of the 4-lane Philox output
    g = torch.Generator().manual_seed(2)
    x, mo, prev = (torch.randn(shape, generator=g) for _ in range(3))
    xs = {"nchw": x, "channels_last": x.to(memory_format=torch.channels_last)}
    for seed, off in EDGE_STATES:
        gs = torch.tensor([seed, off], dtype=torch.int64)
        with fastdiff.use_backend("torch"):
            ref, _ = dpm_solver_2m_step(x, mo, coef, prev, noise=philox_randn(gs, shape))
        for backend in backends:
            for name, xl in xs.items():
                with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
                    out, _ = dpm_solver_2m_step(xl, mo, coef, prev, generator_state=gs)
                assert gs.tolist() == [seed, off]  # the op does not advance it
                yield (backend, name, seed, off), out, ref


def test_philox_stream_at_counter_edges_is_the_same_on_every_backend():
    """The in-kernel SDE noise at offsets near 2^32 / 2^63 / 2^64 and negative int64 seeds is
    the torch reference's philox_randn on torch, cpu and triton (interpreter: int overflow
    raises there), NCHW and channels_last x."""
    backends = sorted({b for d, b in CASES if d == "cpu"})
    for key, out, ref in _edge_outputs(backends):
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6, msg=str(key))


@pytest.mark.usefixtures("emu")
def test_philox_stream_at_counter_edges_on_emulated_cuda():
    """As above, the csrc CUDA kernel under the emulator (UBSan: no signed overflow)."""
    for key, out, ref in _edge_outputs(["cuda"]):
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6, msg=str(key))


@pytest.mark.parametrize("algo", ["dpmsolver++", SDE])
@torch.no_grad()
def test_cuda_graph_is_not_replayed_with_another_thresholding_setting(
    algo, fake_cuda_graphs, monkeypatch
):
    """Dynamic thresholding's ratio and max value are Python floats baked into a captured step
    (a real CUDA graph replays its kernels' arguments; the fake graph re-runs the Python body,
    so the graph cache itself is what the test checks): a cuda_graph run with other values
    must capture its own graph, not replay the first run's."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def run(graphed, smv, ratio):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        z = torch.randn(ODD, generator=torch.Generator().manual_seed(4)) * 3
        return fastdiff.sample(_net, steps=5, sampler="dpm++", algorithm_type=algo, noise=z,
                               thresholding=True, sample_max_value=smv,
                               dynamic_thresholding_ratio=ratio,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip

    for smv, ratio in [(1.5, 0.995), (3.0, 0.995), (3.0, 0.6)]:
        eager, graphed = run(False, smv, ratio), run(True, smv, ratio)
        torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6, msg=f"{smv}, {ratio}")
    assert len(fake_cuda_graphs) == 3  # one capture per thresholding setting
    assert run(True, 1.5, 0.995) is not None and len(fake_cuda_graphs) == 3  # a cache hit


def _noise_layout_outputs(backend):
    """(name, out, ref): the SDE step with noise that aliases x or x0_prev, is a broadcast
    (stride-0) or transposed view, or is float32 under a half-precision x; ref is the torch
    backend on contiguous copies."""
    coef = _coef("cpu", ROW)  # the 2M SDE row of test_dpm_sde
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(shape, generator=g)

    shape = (2, 3, 5, 7)
    x, mo, prev = rnd(*shape), rnd(*shape), rnd(*shape)
    cases = {
        "noise_is_x": (x, x, prev),
        "noise_is_x0_prev": (x, prev, prev),
        "broadcast_batch": (x, rnd(1, 3, 5, 7).expand(shape), prev),
        "broadcast_scalar": (x, torch.tensor(0.7).expand(shape), prev),
        "transposed": (x, rnd(2, 3, 7, 5).transpose(2, 3), prev),
        "x_channels_last": (x.to(memory_format=torch.channels_last), rnd(*shape), prev),
        "fp16_x_fp32_noise": (x.half(), rnd(*shape), prev.half()),
    }
    for name, (xx, z, pp) in cases.items():
        m = mo.to(xx.dtype)
        with fastdiff.use_backend("torch"):
            ref, _ = dpm_solver_2m_step(
                xx.contiguous(), m, coef, pp.contiguous(), noise=z.contiguous().clone()
            )
        with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
            out, _ = dpm_solver_2m_step(xx, m, coef, pp, noise=z)
        yield name, out, ref


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "cpu"], ids=case_id)
def test_sde_noise_views_and_aliases(case):
    for name, out, ref in _noise_layout_outputs(case[1]):
        tol = 2e-6 if out.dtype == torch.float32 else 4e-3
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol, msg=name)


@pytest.mark.usefixtures("emu")
def test_sde_noise_views_and_aliases_on_emulated_cuda():
    for name, out, ref in _noise_layout_outputs("cuda"):
        tol = 2e-6 if out.dtype == torch.float32 else 4e-3
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("algo", ["dpmsolver++", SDE])
def test_dpm_step_with_explicit_no_history_is_the_first_order_step(algo):
    """step(..., x0_prev=None) says "no previous x0": the step is first order, as a sampler
    without history takes it (diffusers' set_begin_index start), not the 2M row with its c_prev
    term dropped (which is neither method)."""
    sch, _ = _schedule("scaled_linear")
    g = torch.Generator().manual_seed(2)
    x, mo, z = (torch.randn(ODD, generator=g) for _ in range(3))
    for i in (2, 4):
        want = DPMSolverPPSampler(sch, 8, algorithm_type=algo).step(mo, i, x, noise=z)
        got = DPMSolverPPSampler(sch, 8, algorithm_type=algo).step(mo, i, x, noise=z, x0_prev=None)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_heun_correction_with_explicit_no_history_is_refused():
    """A Heun correction (odd call) needs the Euler stage's x0: x0_prev=None (and no coef) is a
    ValueError naming x0_prev, not the correction row with its c_prev term silently dropped."""
    from fastdiff.samplers import HeunSampler

    smp = HeunSampler(_schedule("scaled_linear")[0], 5)
    x, mo = torch.randn(ODD), torch.randn(ODD)
    smp.step(mo, 0, x)
    with pytest.raises(ValueError, match="x0_prev"):
        smp.step(mo, 1, x, x0_prev=None)
    assert smp.step(mo, 2, x, x0_prev=None).isfinite().all()  # an Euler stage needs none


def test_sde_step_with_bad_noise_raises_and_keeps_the_history():
    """A rejected noise tensor (shape, dtype, device) writes nothing: x and the sampler's x0
    history are unchanged, and the next step is still the 2M step of the kept history."""
    sch, _ = _schedule("scaled_linear")
    ref, smp = (DPMSolverPPSampler(sch, 6, algorithm_type=SDE) for _ in range(2))
    g = torch.Generator().manual_seed(9)
    x, mo, mo1, z = (torch.randn(ODD, generator=g) for _ in range(4))
    x1 = ref.step(mo, 0, x, noise=z)
    assert torch.equal(smp.step(mo, 0, x, noise=z), x1)
    snap = x1.clone()
    for bad, exc in [(z[:, :2], ValueError), (z.double(), TypeError), (z.to("meta"), ValueError)]:
        with pytest.raises(exc, match="noise"):
            smp.step(mo1, 1, x1, noise=bad)
    assert torch.equal(x1, snap)
    torch.testing.assert_close(smp.step(mo1, 1, x1, noise=z), ref.step(mo1, 1, x1, noise=z),
                               rtol=0, atol=0)  # fmt: skip
    assert smp.coef64[1, 4] != 0  # step 1 is a 2M step: it read the kept history
