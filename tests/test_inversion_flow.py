"""Flow-matching inversion: ``FlowMatchEulerInverseSampler`` ("flow_euler_inverse") and
``fastdiff.invert(..., sampler="flow_euler_inverse")``.

* the grid is ``"flow_euler"``'s reversed (shift, dynamic shifting with mu, custom sigmas),
  the model called at the lower sigma of each step (the first call at t = 0);
* exactness on Gaussian data N(mu, tau^2 I) under x_s = (1 - s) x0 + s z, whose velocity
  E[z - x0 | x_s] and ODE flow map are closed-form (the standardised value (x - m_s) / sd_s is
  constant along the flow, so x_1 = (x0 - mu) / tau): the inversion converges to x_1 at first
  order (the error halves when the steps double), and invert -> sample("flow_euler") gives the
  image back with an error falling with the steps;
* every sampler_step backend (torch, cpu, triton interpreted) per step under the FlashAttention
  rule (fp32 / fp16 / bf16, NaN masks, channels_last) and whole runs equal to the torch one;
* errors: options the inverse does not take, a VP schedule, img2img refusal.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_fa_rule, backend_cases, case_id, stable_seed

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, FlowMatchEulerInverseSampler, make_sampler

SHAPE = (2, 3, 5, 7)  # odd sizes
T = 1000
MU, TAU = 0.3, 0.5


def _gauss_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact velocity of N(MU, TAU^2 I) data: v = E[z - x0 | x_s], s = t / T."""
    s = (t.double() / T).view((-1,) + (1,) * (x.ndim - 1))
    m = (1 - s) * MU
    var = (1 - s) ** 2 * TAU**2 + s**2
    return ((s - (1 - s) * TAU**2) / var * (x.double() - m) - MU).to(x.dtype)


def _image(seed: int = 0, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU + TAU * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _exact_top(x0: torch.Tensor, top: float = 1.0) -> torch.Tensor:
    """The ODE flow map from sigma 0 to ``top``: the standardised value is kept."""
    x0 = x0.double()
    sd = math.sqrt((1 - top) ** 2 * TAU**2 + top**2)
    return (1 - top) * MU + sd * (x0 - MU) / TAU


GRIDS = {
    "default": {},
    "shift3": {"shift": 3.0},
    "dynamic": {"use_dynamic_shifting": True, "mu": 0.8},
}


# ------------------------------------------------------------------------ the grid
@pytest.mark.parametrize(
    "opts",
    [*GRIDS.values(), {"sigmas": [1.0, 0.7, 0.5, 0.2, 0.1, 0.05]}, {"use_karras_sigmas": True}],
    ids=str,
)
def test_grid_is_flow_euler_reversed(opts):
    fwd = make_sampler("flow_euler", None, 6, **opts)
    inv = make_sampler("flow_euler_inverse", None, 6, **opts)
    assert isinstance(inv, FlowMatchEulerInverseSampler) and inv.inverts and len(inv) == 6
    assert inv.sigmas.tolist() == fwd.sigmas[::-1].tolist()
    assert inv.sigmas[0] == 0.0 and inv.top_sigma == fwd.init_sigma
    # the model is called at the lower sigma of each step: 0 first, ascending
    assert inv.timesteps.dtype == torch.float32 and inv.timesteps[0] == 0.0
    assert torch.all(inv.timesteps[1:] > inv.timesteps[:-1])
    assert torch.equal(inv.timesteps, (torch.tensor(inv.sigmas[:-1]).float() * T))
    for i, row in enumerate(inv.coef64):  # flow_euler's row on the reversed grid
        lo, hi = inv.sigmas[i], inv.sigmas[i + 1]
        assert row.tolist() == [1.0, lo, 0.0, hi - lo, 1.0, 0.0, 0.0, 0.0]


def test_a_flow_scheduler_gives_its_grid():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = _image(1)
    a = fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse", schedule=sched)
    b = fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse", shift=3.0)
    assert torch.equal(a, b)
    c = fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse")
    assert not torch.allclose(a, c)  # the shift matters
    bad = diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse", schedule=bad)


# ------------------------------------------------------------------------ exact data model
def _calls_recorder():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return _gauss_v(x, t)

    return model, seen


@pytest.mark.parametrize("grid", list(GRIDS), ids=str)
@torch.no_grad()
def test_converges_first_order_to_the_exact_flow_map(grid):
    x0 = _image(2)
    exact = _exact_top(x0)
    errs = []
    for n in (10, 20, 40, 80):
        model, seen = _calls_recorder()
        x1 = fastdiff.invert(model, x0, n, sampler="flow_euler_inverse", **GRIDS[grid])
        assert x1.dtype == torch.float32 and x1.shape == SHAPE
        assert len(seen) == n and seen[0].abs().max() == 0.0  # first call at t = 0
        errs.append((x1.double() - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert all(1.8 <= r <= 2.2 for r in ratios), (errs, ratios)  # measured 1.99 .. 2.03
    assert errs[-1] < 0.15, errs  # measured 0.06 - 0.12 at 80 steps (max |x_1| = 3.2)


@pytest.mark.parametrize("grid", list(GRIDS), ids=str)
@torch.no_grad()
def test_round_trip_through_flow_euler(grid):
    x0 = _image(3)
    errs = []
    for n in (10, 20, 40, 80):
        x1 = fastdiff.invert(_gauss_v, x0, n, sampler="flow_euler_inverse", **GRIDS[grid])
        back = fastdiff.sample(_gauss_v, n, sampler="flow_euler", noise=x1, **GRIDS[grid])
        errs.append((back.double() - x0.double()).abs().max().item())
    assert all(a > 1.8 * b for a, b in zip(errs, errs[1:], strict=False)), errs  # ~ 1.9 - 2
    assert errs[-1] < 0.15, errs  # measured 0.06 - 0.11 at 80 steps


@torch.no_grad()
def test_custom_sigmas_end_at_the_grids_top():
    """A custom grid below 1 inverts to its top sigma (where flow_euler would start)."""
    x0 = _image(4)
    sig = [0.8 - 0.7 * k / 39 for k in range(40)]
    smp = make_sampler("flow_euler_inverse", None, 40, sigmas=sig)
    top = smp.top_sigma
    assert abs(top - 0.8) < 1e-6
    x = fastdiff.invert(_gauss_v, x0, 40, sampler="flow_euler_inverse", sigmas=sig)
    err = (x.double() - _exact_top(x0, top)).abs().max().item()
    # measured 0.10 (the first step, 0 -> 0.1, is long); against the map to sigma 1: 0.69
    assert err < 0.2 and (x.double() - _exact_top(x0)).abs().max().item() > 0.5


# ------------------------------------------------------------------------ backends
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@torch.no_grad()
def test_every_backend_step_fa_rule(case, dtype, layout):
    """Per step (first, middle, last) with fresh random inputs: x + (u' - u) v against float64,
    within 2x the eager same-dtype error; NaN masks equal; x0 = x - u v too."""
    dev, backend = case
    g = torch.Generator().manual_seed(stable_seed("flowinv", backend, str(dtype), layout))
    smp = FlowMatchEulerInverseSampler(None, 20, shift=3.0)
    for i in (0, 9, 19):
        x = (torch.randn(2, 3, 9, 7, generator=g) * 1.2).to(dev, dtype)
        v = torch.randn(2, 3, 9, 7, generator=g).to(dev, dtype)
        x[0, 0, 0, 0] = float("nan")
        if layout == "channels_last":
            x, v = (t.contiguous(memory_format=torch.channels_last) for t in (x, v))
        with fastdiff.use_backend(backend, op="sampler_step"):
            out, x0 = smp.step(v, i, x, return_x0=True)
        lo, hi = (float(s) for s in smp.sigmas[i : i + 2])
        ref = x.double() + (hi - lo) * v.double()
        ref_x0 = x.double() - lo * v.double()
        assert out.dtype == dtype and out.shape == x.shape and out.device.type == dev
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        dt = torch.tensor(hi - lo, dtype=torch.float32).to(dtype)
        eager = x + dt * v  # diffusers' step in the sample's dtype
        eager_x0 = x - torch.tensor(lo, dtype=torch.float32).to(dtype) * v
        atol = 1e-6 if dtype == torch.float32 else 0.0
        assert_fa_rule(out.cpu(), ref.cpu(), eager.cpu(), atol=atol, name=f"{backend} {i}")
        assert_fa_rule(x0.cpu(), ref_x0.cpu(), eager_x0.cpu(), atol=atol, name=f"x0 {i}")


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@torch.no_grad()
def test_every_backend_gives_the_same_inversion(case):
    dev, backend = case
    x = _image(5)

    def run(b, channels_last=False):
        xi = x.to(dev)
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with fastdiff.use_backend(b, op="sampler_step"):
            return fastdiff.invert(_gauss_v, xi, 12, sampler="flow_euler_inverse", shift=3.0)

    ref = run("torch")
    for cl in (False, True):
        got = run(backend, cl)
        assert got.is_contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format
        )
        err = (got.cpu().double() - ref.cpu().double()).abs().max() / ref.abs().max()
        assert err <= 1e-5, (backend, cl, err.item())


# ------------------------------------------------------------------------ CUDA graphs
@torch.no_grad()
def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch):
    """invert(cuda_graph=True)'s loop on CPU with a fake graph: result and trajectory (the
    image first, x0 = x - u v) equal the eager loop's."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def run(graphed, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.invert(_gauss_v, _image(seed), 5, sampler="flow_euler_inverse",
                               shift=3.0, return_trajectory=True)  # fmt: skip

    for seed in (1, 2):
        eager, etraj = run(False, seed)
        out, traj = run(True, seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        for k in ("x", "x0"):
            torch.testing.assert_close(traj[k], etraj[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"][0], _image(seed))
    assert len(fake_cuda_graphs) == 1


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_on_a_gpu_equals_eager():
    x = _image(11).cuda()
    eager = fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse", shift=3.0)
    graphed = fastdiff.invert(_gauss_v, x, 8, sampler="flow_euler_inverse", shift=3.0,
                              cuda_graph=True)  # fmt: skip
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    cpu = fastdiff.invert(_gauss_v, x.cpu(), 8, sampler="flow_euler_inverse", shift=3.0)
    torch.testing.assert_close(graphed.cpu(), cpu, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("opts", "exc", "match"),
    [
        ({"stochastic_sampling": True}, TypeError, "stochastic_sampling"),
        ({"strength": 0.5}, TypeError, "strength"),
        ({"eta": 0.0}, TypeError, "eta"),
        ({"prediction_type": "epsilon"}, TypeError, "prediction_type"),
        ({"invert_sigmas": True}, ValueError, "invert_sigmas"),
        ({"use_dynamic_shifting": True}, ValueError, "mu"),
        ({"sigmas": [1.0, 0.5]}, ValueError, "sigmas"),
        ({"schedule": NoiseSchedule("linear")}, ValueError, "schedule"),
    ],
    ids=str,
)
def test_bad_arguments_are_clear_errors(opts, exc, match):
    x = _image(6)
    calls = []

    def model(x, t):
        calls.append(t)
        return _gauss_v(x, t)

    with pytest.raises(exc, match=match):
        fastdiff.invert(model, x, 3, sampler="flow_euler_inverse", **opts)
    assert not calls  # refused before any model call


def test_unknown_sampler_names_the_flow_inverse():
    with pytest.raises(ValueError, match="flow_euler_inverse"):
        fastdiff.invert(_gauss_v, _image(), 3, sampler="flow_euler")
    with pytest.raises(TypeError, match="FlowMatchEulerInverseSampler"):
        fastdiff.invert(_gauss_v, _image(), 3, sampler=make_sampler("flow_euler", None, 3))


@torch.no_grad()
def test_a_sampler_object_and_sample_with_the_name():
    x = _image(7)
    ref = fastdiff.invert(_gauss_v, x, 6, sampler="flow_euler_inverse", shift=2.0)
    obj = FlowMatchEulerInverseSampler(None, 6, shift=2.0)
    assert torch.equal(fastdiff.invert(_gauss_v, x, sampler=obj), ref)
    assert torch.equal(fastdiff.sample(_gauss_v, 6, sampler="flow_euler_inverse", noise=x,
                                       shift=2.0), ref)  # fmt: skip
    assert SAMPLERS["flow_euler_inverse"] is FlowMatchEulerInverseSampler


@pytest.mark.parametrize("steps", [1, 5])
def test_img2img_refuses_the_inversion(steps):
    with pytest.raises(ValueError, match="x_0 -> x_T"):
        fastdiff.sample(
            _gauss_v, steps, sampler="flow_euler_inverse", image=_image(), noise=_image(1)
        )
