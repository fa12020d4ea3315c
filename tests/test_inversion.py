"""DDIM inversion: ``DDIMInverseSampler`` ("ddim_inverse") and ``fastdiff.invert``.

* parity with diffusers' ``DDIMInverseScheduler`` loop (timesteps, whole runs over prediction
  types x spacings x steps 1 / 2 / 10 / 50 x set_alpha_to_one x guidance): relative error
  (max |ours - theirs| / max |theirs|) <= 1e-5 against a float64 restatement of diffusers' step,
  and against the stock fp32 scheduler <= 1e-5 + its own fp32 error (prediction "sample" with
  set_alpha_to_one=False: diffusers' fp32 1 - alpha_bar[0] costs it 8e-5, ours is ~1e-7);
* exactness on a data model whose eps is known in closed form (a Gaussian; a Gaussian mixture):
  the inversion converges to the probability-flow ODE's x_T, and invert -> DDIM (eta 0, same
  grid) gives the image back, both with errors falling as 1 / steps;
* every CPU backend of the fused sampler_step op (torch, cpu, triton interpreted, emulated
  CUDA), fp16 / bf16 under the FlashAttention rule, layouts, determinism, the CUDA-graph loop
  (faked on CPU; a real one on a GPU), errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _sampler_cases import rel as _rel
from helpers import assert_fa_rule, backend_cases, case_id, stable_seed
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff._sampler_setup import infer_sampler
from fastdiff.samplers import SAMPLERS, DDIMInverseSampler, DDIMSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 5, 7)  # odd sizes
RTOL = 1e-5


def _model(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
    """A smooth, t- and label-dependent stand-in for a network (no weights)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    scale = 1.0 if class_labels is None else 1.0 + 0.5 * class_labels.to(x.dtype).view(view)
    return torch.tanh(x * scale) * (0.5 + t.to(x.dtype).view(view) / 2000.0) + 0.1 * x


def _image(seed: int = 0, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    """Values beyond [-1, 1] too, so that clip_sample acts."""
    return (1.3 * torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1.3).to(
        dtype
    )


def _guided(x, t, gs, labels):
    if gs is None:
        return _model(x, t.expand(x.shape[0]))
    u, c = _model(torch.cat([x, x]), t.expand(2 * x.shape[0]), labels).chunk(2)
    return u + gs * (c - u)


def _their_loop(sched, steps, x, gs=None, labels=None):
    """diffusers' inversion loop (DiffEdit's ``invert``): model at t, then ``step``."""
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(_guided(x, t, gs, labels), t, x).prev_sample
    return x


def _ref_loop(sched, steps, x, gs=None, labels=None):
    """diffusers' step restated in float64 on the float64 schedule of the same betas."""
    cfg = sched.config
    ab = NoiseSchedule.from_diffusers(sched).alphas_cumprod.tolist()
    T = cfg.num_train_timesteps
    start = 1.0 if cfg.set_alpha_to_one else ab[0]
    sched.set_timesteps(steps)
    x = x.double()
    for t in sched.timesteps.tolist():
        s = min(t - T // steps, T - 1)
        ab_s, ab_t = (ab[s] if s >= 0 else start), ab[t]
        m = _guided(x, torch.tensor(t), gs, labels)
        a, sd = math.sqrt(ab_s), math.sqrt(1 - ab_s)
        if cfg.prediction_type == "epsilon":
            x0, eps = (x - sd * m) / a, m
        elif cfg.prediction_type == "v_prediction":
            x0, eps = a * x - sd * m, a * m + sd * x
        else:
            x0, eps = m, (x - a * m) / sd
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        x = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
    return x


LABELS = torch.tensor([0.0, 0.0, 1.0, -1.0])  # [uncond, cond] for a batch of 2


def _ours(sched, steps, x, gs=None, **kw):
    if gs is None:
        return fastdiff.invert(_model, x, steps, schedule=sched, **kw)
    return fastdiff.invert(_model, x, steps, schedule=sched, cond=LABELS[2:],
                           uncond=LABELS[:2], guidance_scale=gs, **kw)  # fmt: skip


# ------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 30, 50, 999, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_are_diffusers(spacing, steps, offset):
    sched = diffusers.DDIMInverseScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    kw = dict(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and steps * (1000 // steps) - (1000 // steps) + offset > 999:
        with pytest.raises(ValueError, match="steps_offset"):
            DDIMInverseSampler(NoiseSchedule("linear"), steps, **kw)
        return
    smp = DDIMInverseSampler(NoiseSchedule("linear"), steps, **kw)
    assert smp.timesteps.tolist() == sched.timesteps.tolist()
    assert len(smp) == steps and smp.timesteps.dtype == torch.int64
    assert steps == 1 or (smp.timesteps.diff() > 0).all()  # ascending: x_0 -> x_T


def test_rows_are_ddim_with_the_levels_swapped():
    """Row i: [sqrt(ab_s), sqrt(1 - ab_s), sqrt(ab_t), sqrt(1 - ab_t), 0...]; ab_s = 1 first."""
    sch = NoiseSchedule("scaled_linear")
    ab = sch.alphas_cumprod.double()
    smp = DDIMInverseSampler(sch, 10, steps_offset=1, set_alpha_to_one=True)
    rows = torch.from_numpy(smp.coef64)
    assert smp.timesteps.tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    src = [None, 1, 101, 201, 301, 401, 501, 601, 701, 801]
    for i, (t, s) in enumerate(zip(smp.timesteps.tolist(), src, strict=True)):
        ab_s = 1.0 if s is None else ab[s].item()
        want = [ab_s**0.5, (1 - ab_s) ** 0.5, ab[t].item() ** 0.5, (1 - ab[t].item()) ** 0.5]
        torch.testing.assert_close(rows[i], torch.tensor(want + [0.0] * 4, dtype=torch.float64))
        assert not smp.needs_noise(i)
    low = DDIMInverseSampler(sch, 10, steps_offset=1, set_alpha_to_one=False)
    assert low.coef64[0, 0] == ab[0].item() ** 0.5
    # the inverse of DDIM's row: DDIM (eta 0) from t back to s has the columns swapped
    fwd = DDIMSampler(sch, 10, steps_offset=1).coef64[::-1]
    torch.testing.assert_close(rows[:, [2, 3, 0, 1]], torch.from_numpy(fwd[:, :4].copy()))


# ------------------------------------------------------------------------ parity
PARITY = [
    (pred, spacing, steps, one, gs)
    for pred in ("epsilon", "v_prediction", "sample")
    for spacing in ("leading", "trailing")
    for steps in (1, 2, 10, 50)
    for one in (True, False)
    for gs in (None, 3.0)
    if not (pred == "sample" and one)  # 0/0 there: refused, see the next test
]


@pytest.mark.parametrize("pred,spacing,steps,one,gs", PARITY, ids=str)
@torch.no_grad()
def test_whole_run_matches_diffusers(pred, spacing, steps, one, gs):
    cfg = dict(prediction_type=pred, timestep_spacing=spacing, set_alpha_to_one=one)
    if steps == 10:
        cfg["steps_offset"] = 1  # Stable Diffusion's
    sched = diffusers.DDIMInverseScheduler(**cfg)
    labels = LABELS if gs is not None else None
    x = _image(steps)
    theirs = _their_loop(sched, steps, x, gs, labels)
    exact = _ref_loop(sched, steps, x, gs, labels)
    ours = _ours(sched, steps, x, gs)  # the options come from the scheduler object
    assert _rel(ours, exact) <= RTOL
    assert _rel(ours, theirs) <= RTOL + _rel(theirs, exact)
    assert torch.equal(ours, _ours(None, steps, x, gs, **cfg))  # the same, spelled out


@pytest.mark.parametrize("clip", [True, False])
@torch.no_grad()
def test_clip_sample_and_zero_snr_match_diffusers(clip):
    """clip_sample acts here (the check can fail); zero terminal SNR with trailing spacing ends
    at alpha_bar = 0 (x_T = eps)."""
    sched = diffusers.DDIMInverseScheduler(
        clip_sample=clip, clip_sample_range=0.8, rescale_betas_zero_snr=True,
        timestep_spacing="trailing", prediction_type="v_prediction", beta_schedule="scaled_linear",
    )  # fmt: skip
    x = _image(5)
    theirs, exact = _their_loop(sched, 10, x), _ref_loop(sched, 10, x)
    ours = _ours(sched, 10, x)
    assert _rel(ours, exact) <= RTOL and _rel(ours, theirs) <= RTOL + _rel(theirs, exact)
    other = _ours(sched, 10, x, clip_sample=not clip)
    assert _rel(other, ours) > 1e-3  # clipping changed the result


def test_sample_prediction_from_alpha_bar_one_is_refused():
    sched = diffusers.DDIMInverseScheduler(prediction_type="sample")
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    x = _image()
    assert not torch.isfinite(sched.step(_model(x, t.expand(2)), t, x).prev_sample).all()
    with pytest.raises(ValueError, match=r"prediction_type: 'sample'.*set_alpha_to_one=False"):
        DDIMInverseSampler(NoiseSchedule("linear"), 10, prediction_type="sample")
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        fastdiff.invert(_model, x, 10, schedule=sched)


@torch.no_grad()
def test_list_rule_starts_from_the_previous_listed_timestep():
    """prev_timestep="list": under trailing spacing with T % steps != 0 diffusers' rule starts
    step i from t_i - T // steps, not from t_{i-1}; "list" starts from t_{i-1}."""
    sch = NoiseSchedule("linear")
    d = DDIMInverseSampler(sch, 30, timestep_spacing="trailing")
    lst = DDIMInverseSampler(sch, 30, timestep_spacing="trailing", prev_timestep="list")
    ts = d.timesteps.tolist()
    assert d.source_timesteps().tolist() == [t - 33 for t in ts]
    assert lst.source_timesteps().tolist() == [-1] + ts[:-1]
    assert (d.source_timesteps() != lst.source_timesteps()).any()
    ab = sch.alphas_cumprod
    torch.testing.assert_close(
        torch.from_numpy(lst.coef64[1:, 0]), ab[torch.tensor(ts[:-1])].sqrt(), rtol=0, atol=0
    )
    # identical under leading spacing
    a = DDIMInverseSampler(sch, 30)
    b = DDIMInverseSampler(sch, 30, prev_timestep="list")
    assert (a.coef64 == b.coef64).all()


# ------------------------------------------------------------------------ exactness
def _gaussian_eps(sch: NoiseSchedule, mu: torch.Tensor, tau: float):
    ab_all = sch.alphas_cumprod

    def eps(x, t):
        ab = ab_all[t].view(-1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return (s * (x.double() - a * mu) / (a * a * tau * tau + s * s)).to(x.dtype)

    return eps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@torch.no_grad()
def test_converges_to_the_probability_flow_ode_of_a_gaussian(schedule):
    """Data N(mu, tau^2 I): eps*(x, t) = s (x - a mu) / (a^2 tau^2 + s^2) is exact, and the
    probability-flow ODE (DDIM eq. 14) keeps the standardised z = (x - a mu) / sqrt(a^2 tau^2 +
    s^2) constant, so x_T = a_T mu + sqrt(a_T^2 tau^2 + s_T^2) (x_0 - mu) / tau in closed form.
    DDIM inversion is first order: max errors measured at 10, 20, 50, 100, 200 steps: linear
    2.3e-1, 1.1e-1, 5.7e-2, 3.1e-2, 1.6e-2; cosine 2.4e-1, 1.4e-1, 6.8e-2, 3.8e-2, 2.1e-2."""
    sch = NoiseSchedule(schedule)
    mu, tau = torch.tensor([0.3, -0.4], dtype=torch.float64), 0.5
    x0 = (mu + tau * torch.randn(500, 2, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)).float()  # fmt: skip
    model = _gaussian_eps(sch, mu, tau)
    errs = []
    for steps in (10, 20, 50, 100, 200):
        xT = fastdiff.invert(model, x0, steps, schedule=sch, timestep_spacing="trailing",
                             clip_sample=False)  # fmt: skip
        ab = sch.alphas_cumprod[999]
        exact = ab.sqrt() * mu + (ab * tau**2 + 1 - ab).sqrt() * (x0.double() - mu) / tau
        errs.append((xT.double() - exact).abs().max().item())
    print("gaussian inversion max errors", schedule, [f"{e:.2e}" for e in errs])
    assert all(b < 0.7 * a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] / errs[-1] > 10  # first order: 20x the steps, ~17x smaller
    assert errs[-1] < 0.03


MIX_W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MIX_MU = torch.tensor([[-0.6, -0.2], [0.5, 0.5], [0.2, -0.7]], dtype=torch.float64)
MIX_TAU = 0.2


def _mixture_eps(sch: NoiseSchedule):
    """Exact eps of sum_k w_k N(mu_k, tau^2 I) (as tests/test_gmm_exact.py derives it)."""
    ab_all = sch.alphas_cumprod

    def eps(x, t):
        ab = ab_all[t].view(-1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        var = a * a * MIX_TAU**2 + s * s
        diff = x.double().unsqueeze(1) - a.unsqueeze(1) * MIX_MU  # [N x K x 2]
        logp = MIX_W.log() - 0.5 * (diff**2).sum(-1) / var - torch.log(var)
        r = torch.softmax(logp, dim=1)
        return (s * (r.unsqueeze(-1) * diff).sum(1) / var).to(x.dtype)

    return eps


@pytest.mark.parametrize("model_kind", ["gaussian", "mixture"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@torch.no_grad()
def test_round_trip_reconstructs_the_image(model_kind, spacing):
    """invert -> sample(sampler="ddim", eta=0) on the same grid gives x_0 back, with an error
    falling as 1 / steps. Measured RMS errors at 10, 20, 50, 100, 200 steps (linear): Gaussian
    1.5e-1, 8.0e-2, 3.3e-2, 1.7e-2, 8.5e-3 (both spacings); mixture (tau 0.2) 1.2e-1, 7.2e-2,
    3.2e-2, 1.7e-2, 8.6e-3 (trailing: 1.2e-1 .. 8.7e-3). A mixture's max error falls slower
    (1.6e-1 at 50 steps, 7.7e-2 at 200): points between components sit near the flow's
    separatrices."""
    sch = NoiseSchedule("linear")
    g = torch.Generator().manual_seed(0)
    if model_kind == "gaussian":
        mu = torch.tensor([0.3, -0.4], dtype=torch.float64)
        model = _gaussian_eps(sch, mu, 0.5)
        x0 = (mu + 0.5 * torch.randn(400, 2, generator=g, dtype=torch.float64)).float()
    else:
        model = _mixture_eps(sch)
        k = torch.multinomial(MIX_W, 400, True, generator=g)
        x0 = (MIX_MU[k] + MIX_TAU * torch.randn(400, 2, generator=g, dtype=torch.float64)).float()
    opts = dict(schedule=sch, timestep_spacing=spacing, clip_sample=False)
    rms = []
    for steps in (10, 20, 50, 100, 200):
        xT = fastdiff.invert(model, x0, steps, **opts)
        assert 0.5 < xT.std().item() < 1.2  # noise-like, not the image
        back = fastdiff.sample(model, steps, sampler="ddim", eta=0.0, noise=xT, **opts)
        rms.append((back - x0).pow(2).mean().sqrt().item())
    print("round-trip RMS", model_kind, spacing, [f"{e:.2e}" for e in rms])
    assert all(b < 0.75 * a for a, b in zip(rms, rms[1:], strict=False)), rms
    assert rms[0] / rms[-1] > 10 and rms[-1] < 0.012


# ------------------------------------------------------------------------ backends, dtypes
def _step_ref(smp: DDIMInverseSampler, i: int, x, m):
    a, s, c0, ce = (float(v) for v in smp.coef64[i, :4])
    x, m = x.double(), m.double()
    if smp.prediction_type == "epsilon":
        x0, eps = (x - s * m) / a, m
    elif smp.prediction_type == "v_prediction":
        x0, eps = a * x - s * m, a * m + s * x
    else:
        x0, eps = m, (x - a * m) / s
    if smp.clip_sample:
        x0 = x0.clamp(-smp.clip_sample_range, smp.clip_sample_range)
    return c0 * x0 + ce * eps, x0


def _step_eager(smp: DDIMInverseSampler, i: int, x, m):
    """diffusers' step in x's dtype (the eager baseline of the FlashAttention rule)."""
    a, s, c0, ce = (float(v) for v in smp.coef64[i, :4])
    x0 = (x - s * m) / a if smp.prediction_type == "epsilon" else a * x - s * m
    eps = m if smp.prediction_type == "epsilon" else a * m + s * x
    if smp.clip_sample:
        x0 = x0.clamp(-smp.clip_sample_range, smp.clip_sample_range)
    return c0 * x0 + ce * eps, x0


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@torch.no_grad()
def test_every_backend_step_fa_rule(case, dtype, layout):
    """Per step (first: from alpha_bar 1, middle, last) with fresh random inputs: each backend
    against the float64 step, within 2x the eager same-dtype error; NaN / inf masks equal."""
    dev, backend = case
    g = torch.Generator().manual_seed(stable_seed(backend, str(dtype), layout))
    for pred in ("epsilon", "v_prediction"):
        smp = DDIMInverseSampler(NoiseSchedule("scaled_linear"), 20, prediction_type=pred,
                                 timestep_spacing="trailing")  # fmt: skip
        for i in (0, 9, 19):
            x = (torch.randn(2, 3, 9, 7, generator=g) * 1.2).to(dev, dtype)
            m = torch.randn(2, 3, 9, 7, generator=g).to(dev, dtype)
            x[0, 0, 0, 0] = float("nan")
            if layout == "channels_last":
                x, m = (v.contiguous(memory_format=torch.channels_last) for v in (x, m))
            elif layout == "strided":
                x = torch.randn(2, 3, 9, 14, generator=g).to(dev, dtype)[..., ::2]
                x[0, 0, 0, 0] = float("nan")
            with fastdiff.use_backend(backend, op="sampler_step"):
                out, x0 = smp.step(m, i, x, return_x0=True)
            ref, ref_x0 = _step_ref(smp, i, x, m)
            assert out.dtype == dtype and out.shape == x.shape and out.device.type == dev
            if layout == "channels_last":
                assert out.is_contiguous(memory_format=torch.channels_last)
            eager, eager_x0 = _step_eager(smp, i, x, m)
            atol = 1e-6 if dtype == torch.float32 else 0.0
            assert_fa_rule(out.cpu(), ref.cpu(), eager.cpu(), atol=atol, name=f"{backend} {i}")
            assert_fa_rule(x0.cpu(), ref_x0.cpu(), eager_x0.cpu(), atol=atol, name=f"x0 {i}")


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@torch.no_grad()
def test_every_backend_gives_the_same_inversion(case):
    """A guided run through fastdiff.invert on each backend: fp32 within 1e-5 of the torch
    backend, fp16 / bf16 within 2x diffusers' own half-precision loop's error (vs float64)."""
    dev, backend = case
    sched = diffusers.DDIMInverseScheduler(timestep_spacing="trailing", clip_sample=False)
    x = _image(3)
    exact = _ref_loop(sched, 6, x, 2.0, LABELS)

    def run(b, dtype, channels_last=False):
        xi = x.to(dev, dtype)
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with fastdiff.use_backend(b, op="sampler_step"):
            return fastdiff.invert(_model, xi, 6, schedule=sched, cond=LABELS[2:].to(dev),
                                   uncond=LABELS[:2].to(dev), guidance_scale=2.0)  # fmt: skip

    ref = run("torch", torch.float32)
    assert _rel(ref.cpu(), exact) <= RTOL
    for cl in (False, True):
        got = run(backend, torch.float32, cl)
        assert got.shape == SHAPE and torch.isfinite(got).all()
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)  # the image's layout
        assert _rel(got, ref) <= RTOL, (backend, cl)
    for dtype in (torch.float16, torch.bfloat16):
        half = run(backend, dtype)
        assert half.dtype == dtype
        theirs = _their_loop(sched, 6, x.to(dtype), 2.0, LABELS)
        assert theirs.dtype == dtype
        assert_fa_rule(half.cpu(), exact, theirs, k=2.0, name=f"{backend} {dtype}")


@pytest.mark.usefixtures("emu")
@torch.no_grad()
def test_emulated_cuda_kernel_matches_diffusers():
    """csrc/cuda's sampler_step kernel through its real entry point, on tests/cuda_emu."""
    sched = diffusers.DDIMInverseScheduler(prediction_type="v_prediction")
    x = _image(4)
    exact = _ref_loop(sched, 5, x, 2.0, LABELS)
    with fastdiff.use_backend("cuda", op="sampler_step"):
        got = _ours(sched, 5, x, 2.0)
    assert _rel(got, exact) <= RTOL


# ------------------------------------------------------------------------ the sample() loop
@torch.no_grad()
def test_deterministic_without_a_generator_and_image_untouched():
    x = _image(6)
    before = x.clone()
    rng = torch.get_rng_state()
    a = fastdiff.invert(_model, x, 8)
    b = fastdiff.invert(_model, x, 8)
    assert torch.equal(a, b) and torch.equal(x, before)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from torch's generator
    assert not torch.equal(a, x)


@torch.no_grad()
def test_trajectory_and_callback_run_upwards():
    x = _image(7)
    seen = []

    def callback(i, t, xi):
        seen.append((i, t, xi.clone()))

    out, traj = fastdiff.invert(_model, x, 5, return_trajectory=True, callback=callback)
    ts = DDIMInverseSampler(NoiseSchedule("linear"), 5).timesteps
    assert torch.equal(traj["timesteps"], ts) and ts.tolist() == [0, 200, 400, 600, 800]
    assert traj["x"].shape == (6, *SHAPE) and traj["x0"].shape == (5, *SHAPE)
    assert torch.equal(traj["x"][0], x) and torch.equal(traj["x"][-1], out)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ts.tolist()))
    for i, _, xi in seen:
        assert torch.equal(xi, traj["x"][i + 1])
    # the first step starts from alpha_bar = 1: its x0 is the (clipped) image itself
    torch.testing.assert_close(traj["x0"][0], x.clamp(-1, 1), rtol=0, atol=1e-6)


@torch.no_grad()
def test_sampler_object_and_name():
    sch = NoiseSchedule("cosine")
    x = _image(8)
    smp = DDIMInverseSampler(sch, 7, timestep_spacing="trailing", prediction_type="v_prediction")
    a = fastdiff.invert(_model, x, sampler=smp)
    b = fastdiff.invert(_model, x, 7, schedule=sch, timestep_spacing="trailing",
                        prediction_type="v_prediction")  # fmt: skip
    c = fastdiff.sample(_model, 7, sampler="ddim_inverse", noise=x, schedule=sch,
                        timestep_spacing="trailing", prediction_type="v_prediction")  # fmt: skip
    assert torch.equal(a, b) and torch.equal(a, c)
    assert SAMPLERS["ddim_inverse"] is DDIMInverseSampler
    assert isinstance(make_sampler("ddim_inverse", sch, 3), DDIMInverseSampler)
    with pytest.raises(ValueError, match="steps: got 5 but the sampler object was built for 7"):
        fastdiff.invert(_model, x, 5, sampler=smp)
    with pytest.raises(ValueError, match="cannot be applied to a sampler object"):
        fastdiff.invert(_model, x, sampler=smp, clip_sample=False)


@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
@torch.no_grad()
def test_scheduler_class_infers_the_inverse_sampler(as_config):
    """schedule=DDIMInverseScheduler(...) without sampler= runs "ddim_inverse" with its
    settings (sample() too); the pipeline's own DDIMScheduler passes its settings to invert."""
    settings = dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # fmt: skip
    sched = diffusers.DDIMInverseScheduler(**settings)
    arg = json.loads(sched.to_json_string()) if as_config else sched
    assert infer_sampler(arg) == "ddim_inverse"
    x = _image(9)
    want = fastdiff.invert(_model, x, 10, schedule=NoiseSchedule.from_diffusers(sched),
                           steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # fmt: skip
    assert torch.equal(fastdiff.invert(_model, x, 10, schedule=arg), want)
    assert torch.equal(fastdiff.sample(_model, 10, noise=x, schedule=arg), want)
    fwd = diffusers.DDIMScheduler(**settings)  # DDIMInverseScheduler.from_config(pipe.scheduler)
    assert torch.equal(fastdiff.invert(_model, x, 10, schedule=fwd), want)
    assert _rel(fastdiff.invert(_model, x, 10, schedule="scaled_linear"), want) > 1e-3


@torch.no_grad()
def test_diffusers_unet_prediction_type_and_channels():
    """A diffusers UNet2DModel: its config's prediction_type is used, the image's channels are
    checked, and the result equals the explicit run."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()  # fmt: skip
    unet.register_to_config(prediction_type="v_prediction")
    x = _image(10, (2, 3, 8, 8))
    got = fastdiff.invert(unet, x, 4)
    want = fastdiff.invert(unet, x, 4, prediction_type="v_prediction")
    assert torch.equal(got, want) and got.is_contiguous()
    assert _rel(fastdiff.invert(unet, x, 4, prediction_type="epsilon"), got) > 1e-3
    with pytest.raises(ValueError, match=r"image: .*C = 3 \(the model's in_channels\).*\(2, 4, 8"):
        fastdiff.invert(unet, torch.zeros(2, 4, 8, 8), 4)
    with pytest.raises(ValueError, match=r"image: .*\(3, 8, 8\).*image\[None\]"):
        fastdiff.invert(unet, torch.zeros(3, 8, 8), 4)


# ------------------------------------------------------------------------ CUDA graphs
@torch.no_grad()
def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop on CPU with a fake graph: the row and the state in static
    buffers; the eager loop's result and trajectory."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def run(graphed, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return _ours(None, 5, _image(seed), 2.0, return_trajectory=True)

    for seed in (1, 2):
        eager, etraj = run(False, seed)
        out, traj = run(True, seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        for k in ("x", "x0"):
            torch.testing.assert_close(traj[k], etraj[k], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_on_a_gpu_equals_eager():
    x = _image(11).cuda()
    kw = dict(cond=LABELS[2:].cuda(), uncond=LABELS[:2].cuda(), guidance_scale=2.0)
    eager = fastdiff.invert(_model, x, 8, **kw)
    graphed = fastdiff.invert(_model, x, 8, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    exact = _ref_loop(diffusers.DDIMInverseScheduler(), 8, x.cpu(), 2.0, LABELS)
    assert _rel(graphed.cpu(), exact) <= RTOL


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(image=[[0.0]]), TypeError, "image: expected a torch.Tensor, got list"),
        (dict(image=torch.zeros(2, 3, dtype=torch.uint8)), TypeError, "image: .*torch.uint8"),
        (dict(image=torch.zeros(3)), ValueError, r"image: expected a non-empty batch"),
        (dict(image=torch.zeros(0, 3)), ValueError, r"image: expected a non-empty batch"),
        (dict(steps=0), ValueError, r"steps: expected 1 <= steps <= num_train_timesteps"),
        (dict(steps=1001), ValueError, r"steps: expected 1 <= steps"),
        (dict(steps=2.5), TypeError, "steps: expected an int"),
        (dict(steps=True), TypeError, "steps: expected an int"),
        (dict(eta=0.5), TypeError, r"invert: unknown option\(s\) \['eta'\]"),
        (dict(noise=torch.zeros(SHAPE)), TypeError, r"unknown option\(s\) \['noise'\]"),
        (dict(thresholding=True), TypeError, r"unknown option\(s\) \['thresholding'\]"),
        (dict(timestep_spacing="linspace"), ValueError, "timestep_spacing: expected one of"),
        (dict(prev_timestep="next"), ValueError, "prev_timestep: expected one of"),
        (dict(prediction_type="x0"), ValueError, "prediction_type: expected one of"),
        (dict(clip_sample_range=0.0), ValueError, "clip_sample_range: expected > 0"),
        (dict(steps=10, steps_offset=100), ValueError, "steps_offset: timesteps"),
        (
            dict(sampler="ddim"),
            ValueError,
            r"sampler: expected one of \['ddim_inverse', 'dpm\+\+_inverse', 'flow_euler_inverse'\]",
        ),
        (dict(sampler=DDIMSampler(NoiseSchedule("linear"), 4)), TypeError, "sampler: expected"),
        (dict(guidance_scale=2.0), ValueError, "cond"),
        (dict(schedule="quadratic"), ValueError, "schedule"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_arguments_name_themselves(kwargs, exc, match):
    kwargs = dict(kwargs)
    image = kwargs.pop("image", _image())
    before = image.clone() if isinstance(image, torch.Tensor) else None
    steps = kwargs.pop("steps", 4)
    with pytest.raises(exc, match=match):
        fastdiff.invert(_model, image, steps, **kwargs)
    if before is not None:
        assert torch.equal(image, before)  # nothing written


def test_sampler_step_arguments_are_checked():
    smp = DDIMInverseSampler(NoiseSchedule("linear"), 4)
    x = _image()
    with pytest.raises(ValueError, match=r"i: expected a step index in \[0, 4\)"):
        smp.step(x, 4, x)
    with pytest.raises(ValueError, match="model_output: expected shape"):
        smp.step(x[:1], 0, x)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        smp.step(x, 0, x.numpy())


def test_registered_and_options_checked():
    sch = NoiseSchedule("linear")
    assert SAMPLERS["ddim_inverse"] is DDIMInverseSampler
    assert isinstance(make_sampler("ddim_inverse", sch, 3), DDIMInverseSampler)
    bad = [
        (dict(timestep_spacing="linspace"), "timestep_spacing: expected one of"),
        (dict(prev_timestep="next"), "prev_timestep: expected one of"),
        (dict(prediction_type="x0"), "prediction_type: expected one of"),
        (dict(clip_sample_range=0.0), "clip_sample_range: expected > 0"),
        (dict(steps_offset=100), "steps_offset: timesteps"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            DDIMInverseSampler(sch, 10, **kw)
    x = _image()
    with pytest.raises(ValueError, match="eta: only the 'ddim' and 'tcd' samplers take eta"):
        fastdiff.sample(_model, 4, sampler="ddim_inverse", noise=x, eta=0.5)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['thresholding'\]"):
        fastdiff.sample(_model, 4, sampler="ddim_inverse", noise=x, thresholding=True)


@pytest.mark.parametrize("how", ["name", "scheduler"])
def test_sample_with_an_inverse_sampler_and_no_noise_is_refused(how):
    """sample() with an inverse sampler (by name, or inferred from a DDIMInverseScheduler as
    schedule) and no noise= would invert a random draw: a ValueError naming noise, before any
    model call."""
    calls = []

    def model(x, t):
        calls.append(t)
        return x

    kw = (
        {"sampler": "ddim_inverse", "schedule": NoiseSchedule("linear")}
        if how == "name"
        else {"schedule": diffusers.DDIMInverseScheduler()}
    )
    with pytest.raises(ValueError, match=r"^noise: DDIMInverseSampler runs the ODE upwards"):
        fastdiff.sample(model, 4, shape=(3, 8, 8), **kw)
    assert calls == []
