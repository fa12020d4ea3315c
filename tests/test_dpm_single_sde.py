"""Singlestep SDE-DPM-Solver++ (``dpm++_single`` with ``algorithm_type="sde-dpmsolver++"``,
orders 1-3) against diffusers 0.42's ``DPMSolverSinglestepScheduler``.

diffusers draws z with the step's ``generator`` at every call (the last included) and adds
sigma_t sqrt(1 - e^{-2h}) z, h from the group's first sample. Checked: whole runs with the same
seeded generator (rel <= 1e-5 in fp32, timesteps equal, and the run differs from the ODE
solver's), every step with diffusers' own samples and its noise fed to both, sample() through
the scheduler object / by name, img2img starts, every dpm_solver_2m_step backend (fp32 runs,
fp16 per-step FlashAttention rule, the Philox stream), the fake CUDA-graph loop, no host sync,
x0 rows. Order 3 (the anchor, two model outputs and z: the op's x0_prev3 operand) as well.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _sampler_cases import GraphCase, check_graph_loop, rel, toy
from helpers import DIFFUSERS_BETAS, assert_no_host_sync, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops._philox import philox_randn
from fastdiff.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")
_single = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_singlestep")

SDE = "sde-dpmsolver++"
RTOL = 1e-5
SHAPE = (2, 3, 5, 7)
STEPS = [1, 2, 5, 12, 25]
FLOW = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
CASES = [
    ("scaled_linear", {}),
    ("scaled_linear", {"solver_order": 1}),
    ("scaled_linear", {"solver_type": "heun"}),
    ("linear", {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}),
    ("linear", {"prediction_type": "sample", "lower_order_final": False,
                "final_sigmas_type": "sigma_min"}),
    ("scaled_linear", {"use_karras_sigmas": True, "solver_type": "heun"}),
    ("cosine", {"lambda_min_clipped": -5.1}),
    ("linear", {"thresholding": True, "sample_max_value": 1.5}),
    ("scaled_linear", {"solver_order": 3}),
    ("scaled_linear", {"solver_order": 3, "solver_type": "heun", "use_karras_sigmas": True}),
    ("linear", {"solver_order": 3, "solver_type": "heun", "prediction_type": "v_prediction",
                "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("linear", {**FLOW, "solver_order": 3}),
    ("linear", FLOW),
]  # fmt: skip
ORDER3 = [c for c in CASES if c[1].get("solver_order") == 3]


def _cid(case) -> str:
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


def _theirs(sched: str, kw: dict, steps: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower_order_final forced on
        sch = diffusers.DPMSolverSinglestepScheduler(**DIFFUSERS_BETAS[sched],
                                                     algorithm_type=SDE, **kw)  # fmt: skip
        sch.set_timesteps(steps)
    return sch


def _ours(sched: str, kw: dict, steps: int, algorithm_type: str = SDE):
    schedule = NoiseSchedule.from_diffusers(_theirs(sched, kw, steps))
    return make_sampler("dpm++_single", schedule, steps, algorithm_type=algorithm_type, **kw)


def _their_run(sch, z, seed, start=0):
    """diffusers' loop from call ``start`` (``set_begin_index``), z drawn from a generator."""
    g, x = torch.Generator().manual_seed(seed), z.clone()
    sch.set_begin_index(start)
    for t in sch.timesteps[start:]:
        x = sch.step(toy(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    return x


def _our_run(smp, z, seed, start=0):
    g, x = torch.Generator().manual_seed(seed), z.clone()
    for i in range(start, smp.steps):
        x = smp.step(toy(x, smp.timesteps[i].expand(x.shape[0])), i, x, generator=g)
    return x


def _z(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_whole_run_matches_diffusers(case, steps):
    """Same seeded generator: timesteps equal, fp32 run within 1e-5 of diffusers' fp32 loop;
    the noise matters (the ODE solver's run and another seed's are far off)."""
    sched, kw = case
    sch, smp = _theirs(sched, kw, steps), _ours(sched, kw, steps)
    assert smp.timesteps.tolist() == sch.timesteps.tolist()
    assert all(smp.needs_noise(i) for i in range(steps))  # as diffusers: a draw at every call
    z = _z()
    ref = _their_run(sch, z, 3)
    got = _our_run(smp, z, 3)
    assert torch.isfinite(got).all() and rel(got, ref) <= RTOL
    if steps > 1:  # one step to sigma 0 is x0 itself: no noise term
        assert rel(_our_run(smp, z, 4), ref) > 1e-3
        ode = _our_run(_ours(sched, kw, steps, "dpmsolver++"), z, 3)
        assert rel(ode, ref) > 1e-3


@pytest.mark.parametrize("case", CASES[:4] + ORDER3 + CASES[-1:], ids=_cid)
def test_every_step_with_fed_noise(case, monkeypatch):
    """Each call from diffusers' own sample with diffusers' own z fed to ours (``noise=``):
    rel <= 1e-5 per step (the anchor and the group's x0 carried by the sampler)."""
    sched, kw = case
    sch, smp = _theirs(sched, kw, 9), _ours(sched, kw, 9)
    drawn = []

    def randn(shape, generator=None, device=None, dtype=None):
        drawn.append(torch.randn(shape, generator=generator, dtype=dtype))
        return drawn[-1]

    monkeypatch.setattr(_single, "randn_tensor", randn)
    g, x = torch.Generator().manual_seed(5), _z(1)
    for i, t in enumerate(sch.timesteps):
        out = toy(x, t.expand(SHAPE[0]))
        ref = sch.step(out, t, x, generator=g).prev_sample
        got = smp.step(out, i, x, noise=drawn[-1])
        assert rel(got, ref) <= RTOL, i
        x = ref
    assert len(drawn) == 9


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("begin", [1, 4, 5])
def test_img2img_start_matches_diffusers(begin, order):
    """A run from call ``begin`` (warming up again) equals diffusers' loop after
    set_begin_index; sample(image=, strength=) starts there with the generator's draws."""
    sched, kw = "scaled_linear", {"solver_type": "heun", "solver_order": order}
    sch, smp = _theirs(sched, kw, 10), _ours(sched, kw, 10)
    z = _z(2)
    assert rel(_our_run(smp, z, 7, start=begin), _their_run(sch, z, 7, start=begin)) <= RTOL


def test_sample_through_the_scheduler_and_by_name():
    """fastdiff.sample(schedule=<scheduler object / saved config>, noise=, generator=) equals
    diffusers' loop with that generator; by name with the options too."""
    sch = _theirs("scaled_linear", {}, 8)
    z = _z(3)
    ref = _their_run(sch, z, 11)
    saved = dict(sch.config, _class_name="DPMSolverSinglestepScheduler")
    for schedule in (sch, saved):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fastdiff.sample(toy, steps=8, schedule=schedule, noise=z,
                                  generator=torch.Generator().manual_seed(11))  # fmt: skip
        assert rel(got, ref) <= RTOL
    got = fastdiff.sample(toy, steps=8, sampler="dpm++_single", algorithm_type=SDE,
                          schedule=NoiseSchedule.from_diffusers(sch), noise=z,
                          generator=torch.Generator().manual_seed(11))  # fmt: skip
    assert rel(got, ref) <= RTOL


def test_x0_rows_are_the_data_prediction():
    """return_x0 (and the trajectory's x0 rows) are each call's x0 = (x - sigma eps) / alpha."""
    smp = _ours("linear", {}, 6)
    x, g = _z(4), torch.Generator().manual_seed(0)
    for i, t in enumerate(smp.timesteps):
        eps = toy(x, t.expand(SHAPE[0]))
        a, s = smp._alpha_sigma_at(i)
        x_next, x0 = smp.step(eps, i, x, generator=g, return_x0=True)
        assert rel(x0, (x - s * eps) / a) <= 1e-6
        x = x_next


def test_fp16_noise_is_drawn_in_fp16_as_diffusers():
    """Under fp16 x the generator's z is torch's fp16 draw (diffusers: randn_tensor in the
    model output's dtype), not a rounded fp32 draw; the fp16 calls stay near diffusers' fp16
    steps."""
    sch, smp = _theirs("scaled_linear", {}, 4), _ours("scaled_linear", {}, 4)
    fed = _ours("scaled_linear", {}, 4)
    z16 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float16)
    z32 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).half()
    assert not torch.equal(z16, z32)
    x, g, g2, g3 = _z(8).half(), *(torch.Generator().manual_seed(2) for _ in range(3))
    for i, t in enumerate(sch.timesteps):
        out = toy(x.float(), t.expand(SHAPE[0])).half()
        got = smp.step(out, i, x, generator=g)
        noise = torch.randn(SHAPE, generator=g2, dtype=torch.float16)  # the first one is z16
        assert torch.equal(got, fed.step(out, i, x, noise=noise))
        ref = sch.step(out, t, x, generator=g3).prev_sample
        assert got.dtype == torch.float16 and rel(got, ref) <= 3e-3
        x = got


# ---------------------------------------------------------------------------- backends, Philox
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_fp32_whole_run_every_backend(case, order):
    """A whole fp32 run (v-prediction, heun, orders 1 to ``order``) on each backend equals
    diffusers'."""
    dev, backend = case
    kw = {"prediction_type": "v_prediction", "solver_type": "heun", "solver_order": order}
    sch, smp = _theirs("linear", kw, 9), _ours("linear", kw, 9)
    z = _z(5)
    ref = _their_run(sch, z, 1)
    g, x = torch.Generator().manual_seed(1), z.to(dev)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, t in enumerate(smp.timesteps):
            noise = torch.randn(SHAPE, generator=g).to(dev)
            x = smp.step(toy(x.cpu(), t.expand(2)).to(dev), i, x, noise=noise)
    assert rel(x.cpu(), ref) <= RTOL


def _ref_step(smp, i, x, v, x_a, m_a, z, dtype):
    """The call's update in ``dtype`` from the float64 row (epsilon model)."""
    r = [torch.tensor(float(c), dtype=dtype) for c in smp.coef64[i]]
    x, v, z = x.to(dtype), v.to(dtype), z.to(dtype)
    m = (x - r[1] * v) / r[0]
    out = r[2] * x + r[3] * m + r[5] * z
    if m_a is not None:
        out = out + r[4] * m_a.to(dtype) + r[6] * x_a.to(dtype)
    return out


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_backends_fp16_flashattention_rule(case):
    """Each backend per step in fp16 (inputs from a real fp32 run, fresh non-smooth outputs):
    error vs the float64 restatement <= 2x the eager fp16 restatement's + one fp16 ulp."""
    dev, backend = case
    smp = _ours("scaled_linear", {}, 8)
    x, x_a, m_a = _z(6), None, None
    for i, t in enumerate(smp.timesteps):
        v = toy(x, t.expand(2)) + 0.01 * torch.randn(SHAPE)
        z = torch.randn(SHAPE)
        order2 = smp.coef64[i, 6] != 0.0
        prev = (m_a, x_a) if order2 else (None, None)
        ref = _ref_step(smp, i, x.double(), v.double(), prev[1], prev[0], z, torch.float64)
        eager = _ref_step(smp, i, x.half(), v.half(), prev[1], prev[0], z, torch.float16)
        h = [p.half().to(dev) if p is not None else None for p in prev]
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            _, _, got = smp.step_with_history(v.half().to(dev), i, x.half().to(dev),
                                              smp.coef_table(dev)[i], h[1], h[0], None,
                                              noise=z.half().to(dev))  # fmt: skip
        assert got.dtype == torch.float16
        err, base = rel(got.cpu(), ref), rel(eager, ref)
        assert err <= 2 * base + 2**-11, f"step {i}: {err:.2e} vs eager {base:.2e}"
        a, s = smp._alpha_sigma_at(i)
        x_a, m_a = x, (x - s * v) / a
        x = ref.float()


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_philox_generator_state(case):
    """generator_state: each call's z is philox_randn of the state it is given (the op advances
    the offset); the same run with those z fed as ``noise`` is the same run."""
    dev, backend = case
    a, b = _ours("scaled_linear", {}, 6), _ours("scaled_linear", {}, 6)
    gs = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
    x = y = _z(7).to(dev)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, t in enumerate(a.timesteps):
            state = gs.clone()
            x = a.step(toy(x.cpu(), t.expand(2)).to(dev), i, x, generator_state=gs)
            y = b.step(toy(y.cpu(), t.expand(2)).to(dev), i, y,
                       noise=philox_randn(state, SHAPE))  # fmt: skip
            assert int(gs[1]) > int(state[1])
            torch.testing.assert_close(x, y, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------- loop
@torch.no_grad()
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("gen", [True, False], ids=["generator", "philox"])
def test_cuda_graph_loop_equals_eager(gen, order, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop with the fake graph (tests/conftest.py): the eager loop's
    samples and x0 rows, noise from a generator / in-kernel Philox, one capture for two runs
    (order-2 / 3 calls read the anchor and the group's m from the static buffers; order 3: the
    anchor carried over an order-2 call by the row's select)."""
    opts = {"algorithm_type": SDE, "prediction_type": "v_prediction", "solver_order": order}
    case = GraphCase("dpm++_single", opts, runs=((1, 7, gen), (2, 8, gen)), hist=order + 1,
                     noisy=True)  # fmt: skip
    check_graph_loop(case, fake_cuda_graphs, monkeypatch)


def test_no_host_sync_in_the_loop():
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=6, sampler="dpm++_single", shape=SHAPE[1:],
                                  batch_size=2, algorithm_type=SDE),
        toy,
    )  # fmt: skip


# ---------------------------------------------------------------------------- order 3
def test_order_3_through_the_scheduler_and_its_rows():
    """solver_order=3 (formerly refused): a scheduler with it runs diffusers' loop; the rows
    put the anchor's factor in c_prev2 (x0_prev2 = x_a) and m_a's weight in coef[8] (x0_prev3)
    at the order-3 calls only."""
    sch = _theirs("linear", {"solver_order": 3}, 9)
    z = _z(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastdiff.sample(toy, steps=9, schedule=sch, noise=z,
                              generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert rel(got, _their_run(_theirs("linear", {"solver_order": 3}, 9), z, 4)) <= RTOL
    smp = _ours("linear", {"solver_order": 3}, 9)
    assert smp.step_orders == (1, 2, 3, 1, 2, 3, 1, 2, 1) and smp.coef_width == 9
    rows = smp.coef64
    for i, o in enumerate(smp.step_orders[:-1]):  # the last call, to sigma 0: x0 alone
        assert (rows[i, 2] != 0) == (o == 1) and (rows[i, 6] != 0) == (o > 1)
        assert (rows[i, 8] != 0) == (o == 3) and rows[i, 7] == 0


@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_order3_backends_fp16_flashattention_rule(case):
    """Order-3 calls per step in fp16 on each backend (inputs from an fp32 run, fresh outputs):
    error vs the float64 restatement of the row <= 2x the eager fp16 one's + one fp16 ulp."""
    dev, backend = case
    smp = _ours("scaled_linear", {"solver_order": 3, "solver_type": "heun"}, 9)
    x, ms = _z(9), []
    for i, t in enumerate(smp.timesteps):
        v = toy(x, t.expand(2)) + 0.01 * torch.randn(SHAPE)
        z = torch.randn(SHAPE)
        if smp.step_orders[i] == 1:
            x_a, ms = x, []
        # operands: x0_prev = the newest earlier m, x0_prev2 = x_a, x0_prev3 = m_a (order 3)
        ops = [ms[-1] if ms else None, x_a if ms else None, ms[0] if len(ms) == 2 else None]

        def restated(dt, x=x, v=v, z=z, ops=ops, i=i):
            r = [torch.tensor(float(c), dtype=dt) for c in smp.coef64[i]]
            m = (x.to(dt) - r[1] * v.to(dt)) / r[0]
            out = r[2] * x.to(dt) + r[3] * m + r[5] * z.to(dt)
            for k, p in zip((4, 6, 8), ops, strict=True):
                out = out + (r[k] * p.to(dt) if p is not None else 0)
            return out

        h = [p.half().to(dev) if p is not None else None for p in ops]
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            _, _, got = smp.step_with_history(v.half().to(dev), i, x.half().to(dev),
                                              smp.coef_table(dev)[i], h[1], h[0], h[2],
                                              noise=z.half().to(dev))  # fmt: skip
        ref, eager = restated(torch.float64), restated(torch.float16)
        err, base = rel(got.cpu(), ref), rel(eager, ref)
        assert err <= 2 * base + 2**-11, f"step {i}: {err:.2e} vs eager {base:.2e}"
        a, s = smp._alpha_sigma_at(i)
        ms.append((x - s * v) / a)
        x = ref.float()


# ---------------------------------------------------------------------------- refusals
def test_unknown_algorithm_type_is_refused_by_name():
    with pytest.raises(ValueError, match="algorithm_type.*'sde-dpmsolver\\+\\+'.*got 'sde'"):
        make_sampler("dpm++_single", NoiseSchedule("linear"), 6, algorithm_type="sde")
