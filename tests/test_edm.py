"""EDM samplers ('edm_euler', 'edm_dpm++') against diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler.

The sigma grid and model timesteps (c_noise) of set_timesteps, per-call parity and the
FlashAttention error rule against a float64 restatement of diffusers' steps (both sigma
schedules, both prediction types, steps 1 / 2 / 10 / 25, solver orders, SDE), whole runs through
sample(schedule=...) with CFG vs diffusers' pipeline loop (x_T = init_noise_sigma z), every
backend of the fused ops and the emulated CUDA kernels, the CUDA-graph loop (faked on CPU), no
host sync, scheduler inference and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_no_host_sync, backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff.samplers import SAMPLERS, EDMDPMSolverSampler, EDMEulerSampler, make_sampler

diffusers = pytest.importorskip("diffusers")
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler  # noqa: E402

RTOL = 1e-5
SHAPE = (2, 3, 5, 7)
KINDS = {
    "euler": (EDMEulerScheduler, EDMEulerSampler),
    "dpm": (EDMDPMSolverMultistepScheduler, EDMDPMSolverSampler),
}
GRIDS = [
    {},
    {"prediction_type": "v_prediction"},
    {"sigma_schedule": "exponential"},
    {"sigma_schedule": "exponential", "prediction_type": "v_prediction"},
    {"sigma_data": 1.0, "sigma_max": 120.0},  # CosXL-like
]
DPM_OPTS = [
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_type": "heun"},
    {"solver_order": 3, "solver_type": "heun", "lower_order_final": False},
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "euler_at_final": True, "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
]


def _model(x, t, class_labels=None):
    """A smooth nonlinear fake network F(x, c_noise) (any float dtype)."""
    tt = t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    out = torch.tanh(0.7 * x + 0.3 * tt) + 0.1 * x
    if class_labels is not None:
        out = out + 0.2 * class_labels.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return out


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _pair(kind, steps, **cfg):
    theirs = KINDS[kind][0](**cfg)
    theirs.set_timesteps(steps)
    return theirs, KINDS[kind][1](None, steps, **cfg)


class _Ref64:
    """diffusers' EDM steps restated in float64 (sample X, sigmas from the scheduler)."""

    def __init__(self, theirs):
        self.c = theirs.config
        self.sig = theirs.sigmas.double().tolist()
        self.n = len(self.sig) - 1
        self.ms, self.lower = [], 0

    def denoise(self, X, out, s):
        sd = self.c.sigma_data
        c_out = s * sd / math.sqrt(s * s + sd * sd)
        c_out = -c_out if self.c.prediction_type == "v_prediction" else c_out
        return sd * sd / (s * s + sd * sd) * X + c_out * out

    def step(self, X, out, i, z=None):
        s, t = self.sig[i], self.sig[i + 1]
        D = self.denoise(X, out, s)
        if "solver_order" not in self.c:  # Euler
            return X + (X - D) / s * (t - s)
        c = self.c
        self.ms = [*self.ms, D][-c.solver_order :]
        few = c.lower_order_final and self.n < 15
        last = i == self.n - 1 and (c.euler_at_final or few or c.final_sigmas_type == "zero")
        second = i == self.n - 2 and few
        if c.solver_order == 1 or self.lower < 1 or last:
            order = 1
        elif c.solver_order == 2 or self.lower < 2 or second:
            order = 2
        else:
            order = 3
        self.lower = min(self.lower + 1, c.solver_order)
        lam = [-math.log(v) if v > 0 else math.inf for v in self.sig]
        h = lam[i + 1] - lam[i]
        e = math.exp(-h)
        sde = c.algorithm_type == "sde-dpmsolver++"
        m0 = self.ms[-1]
        if order == 1:
            if sde:
                return t / s * e * X + (1 - e * e) * m0 + t * math.sqrt(1 - e * e) * z
            return t / s * X - (e - 1) * m0
        h0 = lam[i] - lam[i - 1]
        r0 = h0 / h
        D1 = (m0 - self.ms[-2]) / r0
        if order == 2:
            if sde:
                B = 0.5 * (1 - e * e) if c.solver_type == "midpoint" else (1 - e * e) / (-2 * h) + 1
                noise = t * math.sqrt(1 - e * e) * z
                return t / s * e * X + (1 - e * e) * m0 + B * D1 + noise
            B = -0.5 * (e - 1) if c.solver_type == "midpoint" else (e - 1) / h + 1
            return t / s * X - (e - 1) * m0 + B * D1
        r1 = (lam[i - 1] - lam[i - 2]) / h
        D1_0, D1_1 = D1, (self.ms[-2] - self.ms[-3]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        return t / s * X - (e - 1) * m0 + ((e - 1) / h + 1) * D1 - ((e - 1 + h) / h**2 - 0.5) * D2


# ------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cfg", GRIDS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_grid_and_timesteps_are_diffusers(kind, cfg, steps):
    for fin in ("zero", "sigma_min"):
        theirs, smp = _pair(kind, steps, final_sigmas_type=fin, **cfg)
        torch.testing.assert_close(smp.timesteps, theirs.timesteps, rtol=0, atol=0)
        assert smp.timesteps.dtype == torch.float32
        assert smp.sigmas.tolist() == theirs.sigmas.double().tolist()
        x_t = smp.init_noise_scale
        want = theirs.init_noise_sigma / math.sqrt(smp.sigmas[0] ** 2 + smp.sigma_data**2)
        assert x_t == pytest.approx(want, rel=1e-15)


# ------------------------------------------------------------------------ per-call parity
def _per_call(kind, steps, cfg, dtype=torch.float32):
    """Per model call: our step and diffusers' from the same X_i and model output, each vs the
    float64 restatement; the trajectory continues from the float64 one. Returns (worst
    conditioning error of the model input, ours, diffusers' worst per-step errors)."""
    theirs, smp = _pair(kind, steps, **cfg)
    ref = _Ref64(theirs)
    g = torch.Generator().manual_seed(steps + 7 * len(cfg))
    X = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    w_in = w_ours = w_theirs = 0.0
    for i, t in enumerate(theirs.timesteps):
        inp = theirs.scale_model_input(X, t)
        u = (X.double() / math.sqrt(smp.sigmas[i] ** 2 + smp.sigma_data**2)).float()
        w_in = max(w_in, _rel(u, inp))
        out = _model(inp, t.expand(SHAPE[0]))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        gen = torch.Generator().manual_seed(100 + i)
        mine = smp.step(out.to(dtype), i, u.to(dtype), noise=z.to(dtype) if smp.sde else None) \
            if kind == "dpm" else smp.step(out.to(dtype), i, u.to(dtype))  # fmt: skip
        theirs_next = theirs.step(out, t, X, generator=gen).prev_sample
        want = ref.step(X.double(), out.double(), i, z.double())
        w_ours = max(w_ours, _rel(smp.to_diffusers(mine.double(), i + 1), want))
        w_theirs = max(w_theirs, _rel(theirs_next, want))
        X = want.float()
    return w_in, w_ours, w_theirs


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cfg", GRIDS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_per_call_parity(kind, cfg, steps):
    w_in, ours, theirs = _per_call(kind, steps, cfg)
    assert w_in <= 1e-6  # the model sees diffusers' scale_model_input
    assert ours <= RTOL and ours <= 2 * theirs + 1e-7, (ours, theirs)


@pytest.mark.parametrize("opts", DPM_OPTS, ids=str)
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_per_call_parity_dpm_options(opts, steps):
    w_in, ours, theirs = _per_call("dpm", steps, opts)
    assert ours <= RTOL, ours
    if math.isfinite(theirs):  # diffusers: NaN on a zero-length heun / 3M last step (0/0)
        assert ours <= 2 * theirs + 1e-7, (ours, theirs)


def test_flash_attention_rule():
    """Over 25-step runs our worst per-step error vs the float64 restatement is at most 2x
    diffusers' own fp32 error (its Euler loses digits at sigma = 80: X - (X - D))."""
    for kind in KINDS:
        for cfg in GRIDS[:2]:
            _, ours, theirs = _per_call(kind, 25, cfg)
            assert 0.0 < ours <= 2.0 * theirs, (kind, cfg, ours, theirs)
    _, ours, theirs = _per_call("euler", 1, {})
    assert theirs > 5e-6 and ours < theirs / 10  # one step from sigma_max: the cancellation


# ------------------------------------------------------------------------------- whole runs
def _their_loop(theirs, z, gs=None, gen=None):
    """diffusers' pipeline loop: X_T = init_noise_sigma z, scale_model_input, model, step."""
    X = z * theirs.init_noise_sigma
    n = z.shape[0]
    for t in theirs.timesteps:
        inp = theirs.scale_model_input(X, t)
        if gs is None:
            out = _model(inp, t.expand(n))
        else:
            labels = torch.cat([torch.ones(n), torch.zeros(n)])
            u, c = _model(torch.cat([inp, inp]), t.expand(2 * n), labels).chunk(2)
            out = u + gs * (c - u)
        X = theirs.step(out, t, X, generator=gen).prev_sample
    return X


def _ref_loop(theirs, z, gs=None, zs=None):
    """The float64 restatement's whole run (model in float64)."""
    ref = _Ref64(theirs)
    X = z.double() * theirs.init_noise_sigma
    n = z.shape[0]
    for i, t in enumerate(theirs.timesteps.double()):
        inp = X / math.sqrt(ref.sig[i] ** 2 + ref.c.sigma_data**2)
        if gs is None:
            out = _model(inp, t.expand(n))
        else:
            labels = torch.cat([torch.ones(n), torch.zeros(n)])
            u, c = _model(torch.cat([inp, inp]), t.expand(2 * n), labels).chunk(2)
            out = u + gs * (c - u)
        X = ref.step(X, out, i, None if zs is None else zs[i].double())
    return X


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cfg", GRIDS[:4], ids=str)
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("gs", [None, 3.0])
def test_sample_with_the_scheduler_is_diffusers_loop(kind, cfg, steps, gs):
    theirs = KINDS[kind][0](**cfg)
    theirs.set_timesteps(steps)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ref = _their_loop(theirs, z, gs)
    exact = _ref_loop(theirs, z, gs)
    guide = {} if gs is None else dict(cond=torch.zeros(2), uncond=torch.ones(2), guidance_scale=gs)
    out = fastdiff.sample(_model, steps, schedule=KINDS[kind][0](**cfg), noise=z, **guide)
    assert _rel(out, exact) <= RTOL
    assert _rel(out, ref) <= RTOL + _rel(ref, exact)


def test_sde_run_with_the_same_noise_is_diffusers():
    """sde-dpmsolver++ (orders 1, 2): diffusers draws z with its generator each step; the same
    draws passed to our steps give its samples."""
    for order in (1, 2):
        cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=order)
        theirs, smp = _pair("dpm", 10, **cfg)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        ref = _their_loop(theirs, z, gen=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        x = z * smp.init_noise_scale
        for i, t in enumerate(smp.timesteps):
            x = smp.step(_model(x, t.expand(2)), i, x, noise=torch.randn(SHAPE, generator=gen))
        assert _rel(x, ref) <= RTOL


# ------------------------------------------------------------------------------- backends
def _backend_run(kind, case, cfg):
    dev, backend = case
    op = "sampler_step" if kind == "euler" else "dpm_solver_2m_step"
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    gs = 2.5
    theirs, smp = _pair(kind, 6, **cfg)
    ref = _their_loop(theirs, z, gs)
    exact = _ref_loop(theirs, z, gs)
    x = (z * smp.init_noise_scale).to(dev)
    labels = torch.cat([torch.ones(2), torch.zeros(2)])
    with fastdiff.use_backend(backend, op=op):
        for i, t in enumerate(smp.timesteps):
            out = _model(torch.cat([x, x]).cpu(), t.expand(4), labels).to(dev)
            x = smp.step(out, i, x, guidance_scale=gs)
    assert x.device.type == dev
    assert _rel(x.cpu(), exact) <= RTOL, backend
    assert _rel(x.cpu(), ref) <= RTOL + _rel(ref, exact), backend


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_every_backend_matches_diffusers(kind, case):
    """A guided run at an odd size on each backend of the fused op (cpu: the C++ kernel, triton
    under TRITON_INTERPRET=1) equals diffusers' loop."""
    cfg = {"prediction_type": "v_prediction"} if kind == "euler" else {"solver_order": 3}
    _backend_run(kind, case, cfg)


@pytest.mark.usefixtures("emu")
@pytest.mark.parametrize("kind", list(KINDS))
def test_emulated_cuda_kernel_matches_diffusers(kind):
    """csrc/cuda's kernels through their real entry points, on tests/cuda_emu."""
    _backend_run(kind, ("cpu", "cuda"), {"sigma_schedule": "exponential"})


# ------------------------------------------------------------------------ loops and syncs
@torch.no_grad()
@pytest.mark.parametrize("opts", [dict(sampler="edm_euler"), dict(sampler="edm_euler", s_churn=4.0),
                                  dict(sampler="edm_dpm++"),
                                  dict(sampler="edm_dpm++", solver_order=3),
                                  dict(sampler="edm_dpm++", algorithm_type="sde-dpmsolver++")],
                         ids=str)  # fmt: skip
def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch, opts):
    """sample(cuda_graph=True)'s loop on CPU with a fake graph: float timesteps, rows and history
    in static buffers; the eager loop's samples and trajectory."""
    from fastdiff import api

    eager_loop = api._sample_eager
    seen = []

    def model(x, t, class_labels=None):
        seen.append(t.dtype)
        return _model(x, t, class_labels)

    def run(graphed, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        return fastdiff.sample(model, 5, noise=z, cond=torch.zeros(2), uncond=torch.ones(2),
                               guidance_scale=2.0, generator=torch.Generator().manual_seed(seed),
                               return_trajectory=True, **opts)  # fmt: skip

    for seed in (1, 2):
        eager, etraj = run(False, seed)
        out, traj = run(True, seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1 and set(seen) == {torch.float32}


@torch.no_grad()
@pytest.mark.parametrize("name", ["edm_euler", "edm_dpm++"])
def test_no_host_sync_inside_the_sampling_loop(name):
    opts = {"algorithm_type": "sde-dpmsolver++"} if name == "edm_dpm++" else {}
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=4, sampler=name, shape=SHAPE[1:], batch_size=2, **opts),
        _model,
    )


# ---------------------------------------------------------------------- setup and errors
def test_registry_inference_and_defaults():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert SAMPLERS["edm_euler"] is EDMEulerSampler
    assert SAMPLERS["edm_dpm++"] is EDMDPMSolverSampler
    assert infer_sampler(EDMEulerScheduler()) == "edm_euler"
    saved = {**EDMDPMSolverMultistepScheduler().config}
    saved["_class_name"] = "EDMDPMSolverMultistepScheduler"
    assert infer_sampler(saved) == "edm_dpm++"  # a saved config (scheduler_config.json)
    smp = resolve_sampler(None, None, 8, EDMEulerScheduler(prediction_type="v_prediction",
                                                           sigma_schedule="exponential"),
                          None, None, {})  # fmt: skip
    assert isinstance(smp, EDMEulerSampler)
    assert (smp.model_prediction_type, smp.sigma_schedule) == ("v_prediction", "exponential")
    smp = resolve_sampler(None, None, 8, EDMDPMSolverMultistepScheduler(solver_order=3),
                          None, None, {"solver_type": "heun"})  # fmt: skip
    assert (smp.solver_order, smp.solver_type) == (3, "heun")
    # schedule=None: diffusers' default EDM grid, 50 steps
    smp = resolve_sampler(None, "edm_euler", None, None, None, None, {})
    theirs = EDMEulerScheduler()
    theirs.set_timesteps(50)
    torch.testing.assert_close(smp.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert make_sampler("edm_dpm++", None, 4).steps == 4


def test_default_sample_equals_the_scheduler_run():
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = fastdiff.sample(_model, 10, sampler="edm_euler", noise=z)
    b = fastdiff.sample(_model, 10, schedule=EDMEulerScheduler(), noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    theirs = EDMEulerScheduler()
    theirs.set_timesteps(10)
    assert _rel(a, _their_loop(theirs, z)) <= RTOL


@pytest.mark.parametrize(
    "name, opts, err, match",
    [
        ("edm_euler", {"s_churn": -1.0}, ValueError, "s_churn"),
        ("edm_euler", {"s_noise": float("nan")}, ValueError, "s_noise"),
        ("edm_euler", {"prediction_type": "sample"}, ValueError, "prediction_type"),
        ("edm_euler", {"sigma_schedule": "linear"}, ValueError, "sigma_schedule"),
        ("edm_euler", {"sigma_min": 90.0}, ValueError, "sigma_min < sigma_max"),
        ("edm_euler", {"sigma_data": 0.0}, ValueError, "sigma_data"),
        ("edm_euler", {"final_sigmas_type": "one"}, ValueError, "final_sigmas_type"),
        ("edm_dpm++", {"solver_order": 4}, ValueError, "solver_order"),
        ("edm_dpm++", {"algorithm_type": "dpmsolver"}, ValueError, "algorithm_type"),
        ("edm_dpm++", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, ValueError,
         "solver_order"),
        ("edm_dpm++", {"thresholding": True, "sample_max_value": -1.0}, ValueError,
         "sample_max_value"),
        ("edm_dpm++", {"lower_order_final": 1}, TypeError, "lower_order_final"),
        ("edm_dpm++", {"use_karras_sigmas": True}, TypeError, "unknown option"),
    ],
)  # fmt: skip
def test_bad_options(name, opts, err, match):
    with pytest.raises(err, match=match):
        fastdiff.sample(_model, 4, sampler=name, shape=SHAPE[1:], **opts)


def test_bad_settings_through_sample():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="EDM scheduler"):
        fastdiff.sample(_model, 4, sampler="edm_euler", schedule=DDIMScheduler(), shape=SHAPE[1:])
    with pytest.raises(ValueError, match="edm_euler"):
        fastdiff.sample(_model, 4, sampler="ddim", schedule=EDMEulerScheduler(), shape=SHAPE[1:])
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(_model, 4, sampler="edm_dpm++", eta=0.5, shape=SHAPE[1:])
    with pytest.raises(TypeError, match="schedule"):
        EDMEulerSampler(fastdiff.NoiseSchedule("linear"), 4)
    with pytest.raises(ValueError, match="steps"):
        EDMEulerSampler(None, 0)


def test_thresholding_is_diffusers():
    cfg = dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
    theirs, smp = _pair("dpm", 8, **cfg)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref = _their_loop(theirs, z)
    x = z * smp.init_noise_scale
    for i, t in enumerate(smp.timesteps):
        x = smp.step(_model(x, t.expand(2)), i, x)
    assert _rel(x, ref) <= RTOL
    assert x.abs().max() <= 1.5 + 1e-4  # the last step returns the thresholded D


# ------------------------------------------------------------------------------- churn
CHURN = [dict(s_churn=2.0), dict(s_churn=40.0, s_noise=1.003), dict(s_churn=3.0, s_tmin=0.05,
                                                                     s_tmax=10.0)]  # fmt: skip


@pytest.mark.parametrize("churn", CHURN, ids=str)
@pytest.mark.parametrize("cfg", GRIDS[:2], ids=str)
def test_churn_steps_are_diffusers(churn, cfg):
    """EDMEulerScheduler.step(s_churn, s_tmin, s_tmax, s_noise) with the same z: per step vs a
    float64 restatement of Karras et al. Alg. 2 as diffusers runs it, and vs diffusers."""
    steps = 10
    theirs, smp = _pair("euler", steps, **cfg)
    smp = EDMEulerSampler(None, steps, **cfg, **churn)
    assert any(smp.needs_noise(i) for i in range(steps))
    if "s_tmin" in churn:
        assert not all(smp.needs_noise(i) for i in range(steps))
    ref = _Ref64(theirs)
    X = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * theirs.init_noise_sigma
    for i, t in enumerate(theirs.timesteps):
        inp = theirs.scale_model_input(X, t)
        out = _model(inp, t.expand(2))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(50 + i))
        got = theirs.step(out, t, X, generator=torch.Generator().manual_seed(50 + i), **churn)
        s = ref.sig[i]
        gamma = min(churn["s_churn"] / steps, 2**0.5 - 1)
        gamma = gamma if churn.get("s_tmin", 0.0) <= s <= churn.get("s_tmax", math.inf) else 0.0
        s_hat = s * (1 + gamma)
        Xd = X.double()
        if gamma > 0:
            Xd = Xd + z.double() * churn.get("s_noise", 1.0) * math.sqrt(s_hat**2 - s**2)
        D = ref.denoise(Xd, out.double(), s_hat)
        want = Xd + (Xd - D) / s_hat * (ref.sig[i + 1] - s_hat)
        u = (X.double() / math.sqrt(s * s + smp.sigma_data**2)).float()
        mine = smp.to_diffusers(smp.step(out, i, u, noise=z).double(), i + 1)
        assert smp.needs_noise(i) == (gamma > 0)
        theirs_err = _rel(got.prev_sample, want)
        assert _rel(mine, want) <= max(RTOL, 2 * theirs_err), (i, _rel(mine, want), theirs_err)
        X = want.float()


def test_churn_run_through_sample_with_a_generator_is_diffusers():
    """sample(s_churn=..., generator=g): x_T and then each churn step's z from g, in diffusers'
    pipeline order; also on every sampler_step backend with in-kernel noise being finite."""
    churn = dict(s_churn=5.0, s_tmin=0.01)
    theirs = EDMEulerScheduler()
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(11)
    X = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        out = _model(theirs.scale_model_input(X, t), t.expand(2))
        X = theirs.step(out, t, X, generator=g, **churn).prev_sample
    out = fastdiff.sample(_model, 8, sampler="edm_euler", shape=SHAPE[1:], batch_size=2,
                          generator=torch.Generator().manual_seed(11), **churn)  # fmt: skip
    assert _rel(out, X) <= RTOL  # (measured 2.9e-7)
    for _dev, backend in backend_cases("sampler_step"):
        with fastdiff.use_backend(backend, op="sampler_step"):
            y = fastdiff.sample(_model, 8, sampler="edm_euler", shape=SHAPE[1:], **churn)
        assert torch.isfinite(y).all() and y.abs().max() < 10
