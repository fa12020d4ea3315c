"""SASolverSampler ("sa_solver") vs diffusers' SASolverScheduler, and through sample() (no host
sync, guidance, history, the fake CUDA-graph loop and the unknown-option refusal are in the
shared contract: tests/_sampler_cases.py; img2img in tests/test_img2img.py).

SA-Solver's corrector redoes x_i from x_{i-1} with the noise z_{i-1} of the last predictor;
fastdiff folds it and the predictor into one fused step from the predicted x_i. Both sides get
the same noise (diffusers draws z_i from the generator on every step; here the same generator,
or the recorded draws); ours must agree with diffusers' loop run in float64 (its sigmas cast,
its draws kept at float32 values) to a relative error <= 1e-5, and with its stock fp32 loop to
1e-5 plus diffusers' own fp32 error.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _sampler_cases import assert_step_parity, rel
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, assert_fa_rule, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, SASolverSampler
from fastdiff.samplers.sa_solver import default_tau

diffusers = pytest.importorskip("diffusers")
M = pytest.importorskip("diffusers.schedulers.scheduling_sasolver")

SHAPE, RTOL = (2, 3, 6, 5), PARITY_RTOL
SL = DIFFUSERS_BETAS["scaled_linear"]
STEPS = [1, 2, 5, 12, 25]
CONFIGS = {
    "default": {},
    "p1c1": {"predictor_order": 1, "corrector_order": 1},
    "c3": {"corrector_order": 3},
    "v": {"prediction_type": "v_prediction"},
    "sample-nolof": {"prediction_type": "sample", "lower_order_final": False},
    "noise": {"algorithm_type": "noise_prediction"},
    "noise-v": {"algorithm_type": "noise_prediction", "prediction_type": "v_prediction"},
    "noise-sample": {"algorithm_type": "noise_prediction", "prediction_type": "sample"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True, "corrector_order": 3},
    "trailing": {"timestep_spacing": "trailing"},
    "clipped": {"lambda_min_clipped": -2.0, "timestep_spacing": "leading"},
    "thresholding": {"thresholding": True, "prediction_type": "sample"},
    # orders 3-4 (history_depth 3 / 4: the op's x0_prev3 / x0_prev4)
    "p3": {"predictor_order": 3},
    "p3c3": {"predictor_order": 3, "corrector_order": 3},
    "c4": {"corrector_order": 4},
    "p4c4": {"predictor_order": 4, "corrector_order": 4},
    "p4c1-nolof": {"predictor_order": 4, "corrector_order": 1, "lower_order_final": False},
    "noise-p3c4": {
        "algorithm_type": "noise_prediction",
        "predictor_order": 3,
        "corrector_order": 4,
    },
    "noise-v-p4": {
        "algorithm_type": "noise_prediction",
        "prediction_type": "v_prediction",
        "predictor_order": 4,
    },
    "karras-p4c4": {"use_karras_sigmas": True, "predictor_order": 4, "corrector_order": 4},
    "thresholding-p4": {"thresholding": True, "prediction_type": "sample", "predictor_order": 4},
}


def toy(x, t):
    """A deterministic stand-in model of x and t."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return (0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * x).to(x.dtype)


def _sched(opts, n=None):
    sch = diffusers.SASolverScheduler(**SL, **opts)
    if n is not None:
        sch.set_timesteps(n)
    return sch


def _diffusers_loop(opts, n, z, seed, model=toy, f64=False, monkeypatch=None):
    """diffusers' loop with step(generator=torch.Generator().manual_seed(seed)); ``f64``: in
    float64, its per-step draws the float32 ones (cast)."""
    sch = _sched(opts, n)
    g = torch.Generator().manual_seed(seed)
    if f64:
        sch.sigmas = sch.sigmas.double()
        orig = M.randn_tensor

        def draw(shape, generator=None, device=None, dtype=None):
            return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

        monkeypatch.setattr(M, "randn_tensor", draw)
    x = z.double() if f64 else z
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    if f64:
        monkeypatch.undo()
    return x


SCHED = NoiseSchedule.from_diffusers(SL)


def _smp(opts, n):
    return SASolverSampler(SCHED, n, **opts)


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", [*STEPS, 50])
def test_grid_and_timesteps_are_diffusers(cfg, n):
    sch, smp = _sched(CONFIGS[cfg], n), _smp(CONFIGS[cfg], n)
    assert torch.equal(smp.timesteps, sch.timesteps)
    assert torch.equal(torch.tensor(smp._ratios()).float(), sch.sigmas)  # ends at sigma(t=0)
    assert len(smp) == n and all(smp.needs_noise(i) for i in range(n))  # z every step


def test_step_orders_are_diffusers():
    """Predictor / corrector orders of a run: warm-up, lower_order_final on the last steps."""
    smp = _smp({"corrector_order": 3}, 6)
    assert smp.step_orders == ((1, 0), (2, 2), (2, 3), (2, 3), (2, 3), (1, 3))
    assert _smp({"lower_order_final": False}, 4).step_orders == ((1, 0), (2, 2), (2, 2), (2, 2))
    smp = _smp({"predictor_order": 4, "corrector_order": 4}, 8)
    assert smp.step_orders == ((1, 0), (2, 2), (3, 3), (4, 4), (4, 4), (3, 4), (2, 4), (1, 3))
    assert smp.history_depth == 4 and smp.coef_table("cpu").shape == (8, 10)
    assert _smp({"corrector_order": 4}, 5).history_depth == 3
    assert _smp({}, 5).coef_table("cpu").shape == (5, 8)  # depth 2: the 3M row as before


@pytest.mark.parametrize("opts", [{"predictor_order": 4, "corrector_order": 4},
                                  {"predictor_order": 3, "corrector_order": 4}])  # fmt: skip
def test_step_orders_follow_diffusers_this_orders(opts):
    """(predictor, corrector) order of every step of a run is diffusers'
    this_predictor_order / this_corrector_order (the corrector's as set by the step before)."""
    n = 9
    sch, smp = _sched(opts, n), _smp(opts, n)
    got, x = [], torch.zeros(SHAPE)
    c_prev = 0
    for t in sch.timesteps:
        x = sch.step(torch.zeros(SHAPE), t, x, generator=torch.Generator()).prev_sample
        got.append((sch.this_predictor_order, c_prev))
        c_prev = sch.this_corrector_order
    assert smp.step_orders == tuple(got)


# ------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("n", STEPS)
def test_run_matches_diffusers(cfg, n, monkeypatch):
    """A whole run with the same generator: ours vs diffusers' float64 and fp32 loops."""
    opts = CONFIGS[cfg]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
    want = _diffusers_loop(opts, n, z, 7)
    want64 = _diffusers_loop(opts, n, z, 7, f64=True, monkeypatch=monkeypatch)
    smp, g, x = _smp(opts, n), torch.Generator().manual_seed(7), z
    for i, t in enumerate(smp.timesteps):
        x = smp.step(toy(x, t.expand(2)), i, x, generator=g)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    if want64.abs().max() > 0:
        assert rel(x, want64) <= RTOL, f"{cfg} {n}: {rel(x, want64):.2e}"
        assert rel(x, want) <= RTOL + rel(want, want64)


@pytest.mark.parametrize("cfg", ["default", "c3", "noise-v", "karras", "p4c4", "noise-p3c4"])
def test_every_step_from_diffusers_own_sample(cfg, monkeypatch):
    """Each step from diffusers' own (predicted) sample, model output and recorded noise: the
    folded corrector + predictor lands on diffusers' next sample (float64 and fp32)."""
    opts, n = CONFIGS[cfg], 9
    orig = M.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None):  # float32 values, then cast
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(M, "randn_tensor", draw)
    sch, sch64 = _sched(opts, n), _sched(opts, n)
    sch64.sigmas = sch64.sigmas.double()
    smp = _smp(opts, n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x64 = x.double()
    for i, t in enumerate(sch.timesteps):
        out = toy(x, t.expand(2))
        want = sch.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        g64 = torch.Generator().manual_seed(i)
        want64 = sch64.step(out.double(), t, x64, generator=g64).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        got = smp.step(out, i, x, noise=z)
        assert_step_parity(got, want, want64, f"{cfg} step {i}")
        x, x64 = want, want.double()  # both continue from diffusers' fp32 sample


@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
def test_sample_with_the_scheduler_is_diffusers_loop(as_config, monkeypatch):
    """sample(schedule=SASolverScheduler(...)) infers "sa_solver" with its settings; with a
    generator its per-step draws are diffusers' (x_T given as noise)."""
    opts, n = {"corrector_order": 3, "prediction_type": "v_prediction"}, 10
    sch = _sched(opts)
    arg = json.loads(sch.to_json_string()) if as_config else sch
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    got = fastdiff.sample(toy, steps=n, schedule=arg, noise=z,
                          generator=torch.Generator().manual_seed(9))  # fmt: skip
    want64 = _diffusers_loop(opts, n, z, 9, f64=True, monkeypatch=monkeypatch)
    assert rel(got, want64) <= RTOL


def test_tau_func():
    """tau_func (an option, or a scheduler's): tau = 0 everywhere is the ODE (the noise has
    weight 0: other generators give the same samples); tau = 1 everywhere is stochastic."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    runs = {}
    for name, f in (("zero", lambda t: 0.0), ("one", lambda t: 1.0)):
        for seed in (1, 2):
            runs[name, seed] = fastdiff.sample(
                toy, steps=8, sampler="sa_solver", noise=z, tau_func=f, schedule=SCHED,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
        sch = _sched({"tau_func": f})
        via = fastdiff.sample(toy, steps=8, schedule=sch, noise=z,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
        torch.testing.assert_close(via, runs[name, 1], rtol=0, atol=0)
    torch.testing.assert_close(runs["zero", 1], runs["zero", 2], rtol=0, atol=0)
    assert rel(runs["one", 1], runs["one", 2]) > 1e-2
    own = _sched({}).tau_func  # diffusers' default, also at the window's ends
    assert [default_tau(t) for t in range(1000)] == [float(own(t)) for t in range(1000)]
    smp = _smp({"tau_func": lambda t: 0.25 if t > 500 else 0.0}, 6)
    assert smp.taus() == [0.25 if int(t) > 500 else 0.0 for t in smp.timesteps]


@pytest.mark.parametrize("algo", ["data_prediction", "noise_prediction"])
def test_trajectory_x0_is_the_data_prediction(algo):
    """return_trajectory's x0 rows are the model's x0 at each step's input (also with
    noise_prediction, whose op works on eps)."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    out, traj = fastdiff.sample(toy, steps=6, sampler="sa_solver", noise=z, schedule=SCHED,
                                algorithm_type=algo, return_trajectory=True,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    smp = _smp({}, 6)
    for i, t in enumerate(smp.timesteps):
        r = smp._ratios()[i]
        a = 1 / math.sqrt(1 + r * r)
        x = traj["x"][i]
        want = (x - a * r * toy(x, t.expand(2))) / a
        torch.testing.assert_close(traj["x0"][i], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj["x"][-1], out, rtol=0, atol=0)


# ------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("orders", [(2, 3), (4, 4)], ids=["p2c3", "p4c4"])
@pytest.mark.parametrize("case", backend_cases("dpm_solver_2m_step"), ids=case_id)
def test_every_backend_matches_diffusers(case, orders, monkeypatch):
    """A guided run at an odd size on each backend of the fused op (generator noise) equals
    diffusers' loop on the combined output (contiguous and channels_last); fp16: the
    FlashAttention rule against float64, diffusers' own fp16 loop as eager."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 5, 7)
    z = torch.randn(shape, generator=g)
    w = torch.randn(4, *shape[1:], generator=g)
    gs, n = 2.5, 8
    opts = {"predictor_order": orders[0], "corrector_order": orders[1],
            "prediction_type": "v_prediction"}  # fmt: skip

    def raw(x, t):
        xx = torch.cat([x, x]).float()
        return (torch.tanh(0.4 * xx) + 0.2 * w + torch.sin(t[:1].float() / 300.0)).to(x.dtype)

    def combined(x, t):
        u, c = raw(x, t.expand(x.shape[0])).chunk(2)
        return u + gs * (c - u)

    ref = _diffusers_loop(opts, n, z, 11, combined)
    ref64 = _diffusers_loop(opts, n, z, 11, combined, f64=True, monkeypatch=monkeypatch)
    smp = _smp(opts, n)
    for layout in (torch.contiguous_format, torch.channels_last):
        x, gen = z.to(dev).contiguous(memory_format=layout), torch.Generator().manual_seed(11)
        with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
            for i, t in enumerate(smp.timesteps):
                noise = torch.randn(shape, generator=gen).to(dev)
                x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, noise=noise,
                             guidance_scale=gs)  # fmt: skip
        assert x.device.type == dev and x.is_contiguous(memory_format=layout)
        err = rel(x.cpu(), ref)
        assert 0.0 < err <= 2 * RTOL, f"{backend}: rel err {err:.2e}"
    half = _diffusers_loop(opts, n, z.half(), 11, combined)
    x, gen = z.half().to(dev), torch.Generator().manual_seed(11)
    with fastdiff.use_backend(backend, op="dpm_solver_2m_step"):
        for i, t in enumerate(smp.timesteps):
            noise = torch.randn(shape, generator=gen).half().to(dev)
            x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, noise=noise, guidance_scale=gs)
    assert x.dtype == torch.float16
    assert_fa_rule(x.cpu(), ref64, half, atol=1e-3, name=f"{backend} fp16")


@pytest.mark.parametrize("cfg", ["p4c4", "noise-p3c4"])
def test_img2img_at_orders_3_4_matches_diffusers_pipeline(cfg):
    """sample(image=, strength=) at predictor / corrector orders 3-4: the img2img pipeline's
    loop (set_begin_index, add_noise, the same generator), warming up again from the start."""
    from test_img2img import RTOL as IMG_RTOL
    from test_img2img import _rel, _run_pair

    for strength in (0.8, 0.37):
        ours, theirs, _ = _run_pair("sa_solver", strength, CONFIGS[cfg])
        assert _rel(ours, theirs) <= IMG_RTOL, f"{cfg} strength {strength}"


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("opts,rate", [({}, 4.5), ({"corrector_order": 3}, 7.0)])
def test_gaussian_data_ode_converges(opts, rate):
    """tau = 0 (the ODE) on the Karras grid: with Gaussian data N(mu, s^2) and the exact eps
    model at each step's noise level, the flow map keeps (x - alpha mu) / sqrt(alpha^2 s^2 +
    sigma^2) fixed; the end point approaches it at the solver's order as the steps double
    (measured: 8.1 / 6.7 / 5.3x per doubling at orders 2 / 2, 9.0 / 9.7 / 8.8x with corrector
    order 3; DPM-Solver++ 2M: 3.3 / 4.3 / 4.2x). (On the default linspace grid the last step,
    from t ~ T/N to t = 0, shrinks only like log N in lambda: every solver converges slowly.)"""
    mu, sd = 0.5, 0.4
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errs = []
    for n in (10, 20, 40, 80):
        smp = _smp({"use_karras_sigmas": True, "tau_func": lambda t: 0.0, **opts}, n)
        ratios = smp._ratios()
        a = [1 / math.sqrt(1 + r * r) for r in ratios]
        s = [r * ai for r, ai in zip(ratios, a, strict=True)]

        u = (z - a[0] * mu) / math.sqrt(a[0] ** 2 * sd**2 + s[0] ** 2)
        target = a[-1] * mu + math.sqrt(a[-1] ** 2 * sd**2 + s[-1] ** 2) * u
        x = z.float()
        for i in range(n):  # the exact eps model at step i's own noise level
            x0 = mu + a[i] * sd**2 / (a[i] ** 2 * sd**2 + s[i] ** 2) * (x.double() - a[i] * mu)
            eps = ((x.double() - a[i] * x0) / s[i]).float()
            x = smp.step(eps, i, x, noise=torch.zeros_like(x))
        errs.append((x.double() - target).abs().max().item())
    ratios = [errs[k] / errs[k + 1] for k in range(3)]
    assert errs[-1] < 1e-3 and all(r >= rate for r in ratios), (errs, ratios)


# ------------------------------------------------------------------------------ refusals
def test_refusals_name_the_argument():
    sched = NoiseSchedule.from_diffusers(SL)
    z = torch.randn(SHAPE)
    for kw, msg in (
        ({"predictor_order": 5}, r"predictor_order: expected an int in 1\.\.4 .* got 5"),
        ({"corrector_order": 0}, r"corrector_order: expected an int in 1\.\.4 .* got 0"),
        ({"corrector_order": 4.0}, r"corrector_order: expected an int in 1\.\.4 .* got 4\.0"),
        ({"predictor_order": True}, r"predictor_order: expected an int"),
        ({"algorithm_type": "sde"}, r"algorithm_type: expected one of"),
        ({"prediction_type": "flow_prediction"}, r"prediction_type: expected 'epsilon'"),
        ({"thresholding": True, "algorithm_type": "noise_prediction"}, r"thresholding: only"),
    ):
        with pytest.raises(ValueError, match=msg):
            SASolverSampler(sched, 5, **kw)
    with pytest.raises(TypeError, match=r"tau_func: expected a callable"):
        SASolverSampler(sched, 5, tau_func=0.5)
    for cfg in ({"use_flow_sigmas": True}, {"variance_type": "learned_range"}):
        with pytest.raises(ValueError, match=rf"{next(iter(cfg))}[=:]"):
            fastdiff.sample(toy, steps=5, noise=z, schedule=_sched(cfg))
    with pytest.raises(ValueError, match=r"mask: SASolverSampler does not inpaint"):
        fastdiff.sample(toy, steps=5, sampler="sa_solver", image=z, mask=torch.ones(SHAPE))
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(toy, steps=5, sampler="sa_solver", noise=z, eta=0.5)
    assert SAMPLERS["sa_solver"] is SASolverSampler
