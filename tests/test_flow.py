"""Flow-matching Euler sampler ('flow_euler') against diffusers' FlowMatchEulerDiscreteScheduler
(the Heun sampler: tests/test_flow_heun.py).

The sigma grid and model timesteps of set_timesteps (shift, dynamic shifting with mu, linear time
shift, shift_terminal, Karras / exponential / beta grids, custom sigmas), per-call parity and the
FlashAttention error rule against a float64 restatement (sigma = 1 and the last step), whole runs
through sample(schedule=...) with CFG, stochastic sampling, img2img strength, every backend of
the fused op, the CUDA-graph loop (faked on CPU), schedule inference and the errors.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_host_sync, backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, FlowMatchEulerSampler, make_sampler
from fastdiff.samplers.flow import calculate_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

RTOL = 1e-5
SHAPE = (2, 4, 5, 7)

# (scheduler settings, set_timesteps mu)
CONFIGS = [
    ({}, None),
    ({"shift": 3.0}, None),
    ({"use_dynamic_shifting": True}, 0.8),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.7),
    ({"shift": 3.0, "shift_terminal": 0.05}, None),
    ({"shift": 3.0, "use_karras_sigmas": True}, None),
    ({"use_exponential_sigmas": True}, None),
    ({"shift": 2.0, "use_beta_sigmas": True}, None),
]
STEPS = [1, 2, 4, 28, 50]


def _cid(c):
    kw, mu = c
    return "-".join([*(f"{k}={v}" for k, v in kw.items()), f"mu={mu}"]) or "default"


def _pair(kw, mu, steps, **extra):
    theirs = FlowMatchEulerDiscreteScheduler(**kw)
    theirs.set_timesteps(steps, mu=mu)
    opts = {**kw, **({"mu": mu} if mu is not None else {}), **extra}
    return theirs, FlowMatchEulerSampler(None, steps, **opts)


def _skip_nan_grid(cfg, steps):
    if steps == 1 and "shift_terminal" in cfg[0]:
        pytest.skip("diffusers' grid is NaN (0 / 0); fastdiff refuses it: test_bad_options")


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _velocity(x, t):
    """A smooth toy velocity field that depends on the timestep (float, as diffusers passes)."""
    s = (t.float() / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x) * (0.5 + s) + 0.3 * torch.sin(3.0 * x + s)


def _their_loop(theirs, x, model, gs=None, gen=None, t_start=0):
    for t in theirs.timesteps[t_start:]:
        if gs is None:
            v = model(x, t.expand(x.shape[0]))
        else:
            u, c = model(torch.cat([x, x]), t.expand(2 * x.shape[0])).chunk(2)
            v = u + gs * (c - u)
        x = theirs.step(v, t, x, generator=gen).prev_sample
    return x


# ----------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cid)
@pytest.mark.parametrize("steps", STEPS)
def test_grid_is_diffusers_set_timesteps(cfg, steps):
    _skip_nan_grid(cfg, steps)
    theirs, smp = _pair(*cfg, steps)
    assert smp.steps == steps and len(smp.sigmas) == steps + 1
    torch.testing.assert_close(torch.from_numpy(smp.sigmas).float(), theirs.sigmas, rtol=0, atol=0)
    assert smp.timesteps.dtype == torch.float32
    torch.testing.assert_close(smp.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert smp.sigmas[-1] == 0.0 and smp.init_sigma == theirs.sigmas[0].item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_custom_sigmas_as_flux_passes_them(shift):
    """Flux's pipeline: set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(...))."""
    import numpy as np

    n, seq = 6, 1024
    sig = np.linspace(1.0, 1 / n, n)
    mu = calculate_shift(seq)
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=shift)
    theirs.set_timesteps(sigmas=sig, mu=mu)
    smp = FlowMatchEulerSampler(None, n, use_dynamic_shifting=True, shift=shift, sigmas=sig,
                                image_seq_len=seq)  # fmt: skip
    assert smp.mu == pytest.approx(mu, rel=1e-15)
    torch.testing.assert_close(torch.from_numpy(smp.sigmas).float(), theirs.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(smp.timesteps, theirs.timesteps, rtol=0, atol=0)


def test_calculate_shift_is_the_pipelines():
    """Flux / SD3 pipelines' mu: linear in the sequence length, base_shift at base_seq_len and
    max_shift at max_seq_len (their defaults: 0.5 at 256, 1.15 at 4096)."""
    assert calculate_shift(256) == pytest.approx(0.5, rel=1e-14)
    assert calculate_shift(4096) == pytest.approx(1.15, rel=1e-14)
    assert calculate_shift(2176) == pytest.approx(0.825, rel=1e-14)
    assert calculate_shift(9000, 256, 4096, 0.5, 1.16) == pytest.approx(
        0.5 + 0.66 * (9000 - 256) / 3840, rel=1e-14
    )
    smp = FlowMatchEulerSampler(None, 4, use_dynamic_shifting=True, image_seq_len=1024,
                                base_shift=0.3, max_shift=1.3, max_image_seq_len=2304)  # fmt: skip
    assert smp.mu == pytest.approx(0.3 + (1024 - 256) / 2048, rel=1e-14)


# ---------------------------------------------------------------------- per call, errors
@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=_cid)
@pytest.mark.parametrize("steps", STEPS)
def test_per_call_parity(cfg, steps):
    """Each step on fresh random x, v equals diffusers' step (<= 1e-5 relative)."""
    _skip_nan_grid(cfg, steps)
    theirs, smp = _pair(*cfg, steps)
    g = torch.Generator().manual_seed(steps)
    for i, t in enumerate(theirs.timesteps):
        x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        ref = theirs.step(v, t, x).prev_sample
        out, x0 = smp.step(v, i, x, return_x0=True)
        assert _rel(out, ref) <= RTOL, (i, _rel(out, ref))
        s = smp.sigmas[i]
        torch.testing.assert_close(x0.double(), x.double() - s * v.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 12.0])
def test_flash_attention_rule_at_sigma_one_and_the_last_step(which, shift):
    """Against a float64 restatement x + (sigma_next - sigma) v (sigma = 1 at the first step; at
    the last, sigma_next = 0: x0 = x - sigma v), the fused step's error is at most 2x eager fp32
    PyTorch's (+ 1 ulp floor), over large magnitudes and a few seeds; NaN / inf propagate."""
    smp = FlowMatchEulerSampler(None, 4, shift=shift)
    i = 0 if which == "first" else smp.steps - 1
    s, s_next = smp.sigmas[i], smp.sigmas[i + 1]
    assert (s == 1.0) if which == "first" else (s_next == 0.0)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(SHAPE, generator=g) * 30
        v = torch.randn(SHAPE, generator=g) * 30
        ref = x.double() + (s_next - s) * v.double()
        eager = x + torch.tensor(s_next - s, dtype=torch.float32) * v
        out = smp.step(v, i, x)
        err, err_eager = (out.double() - ref).abs().max(), (eager.double() - ref).abs().max()
        ulp = torch.finfo(torch.float32).eps * ref.abs().max()
        assert err <= 2 * err_eager + ulp, (seed, err.item(), err_eager.item())
    x[0, 0, 0, 0], v[0, 0, 0, 1] = float("nan"), float("inf")
    out = smp.step(v, i, x)
    assert out[0, 0, 0, 0].isnan() and not out[0, 0, 0, 1].isfinite()
    assert out[1].isfinite().all()


# ------------------------------------------------------------------------------ whole runs
@torch.no_grad()
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cid)
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("gs", [None, 3.5])
def test_sample_with_the_scheduler_is_diffusers_loop(cfg, steps, gs):
    _skip_nan_grid(cfg, steps)
    kw, mu = cfg
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    cond, uncond = torch.zeros(2, 1), torch.ones(2, 1)

    def model(x, t, class_labels=None):
        return _velocity(x, t) + 0.1 * class_labels.reshape(-1, 1, 1, 1)

    def their_model(x, t):
        lab = torch.cat([uncond, cond]) if gs is not None else cond
        return model(x, t, class_labels=lab)

    theirs = FlowMatchEulerDiscreteScheduler(**kw)
    extra = {"mu": mu} if mu is not None else {}
    if gs is not None:
        extra["uncond"] = uncond
    out, traj = fastdiff.sample(model, steps, schedule=theirs, noise=z, cond=cond,
                                guidance_scale=gs, return_trajectory=True, **extra)  # fmt: skip
    theirs.set_timesteps(steps, mu=mu)
    ref = _their_loop(theirs, z, their_model, gs)
    assert _rel(out, ref) <= RTOL
    assert traj["x"].shape == (steps + 1, *SHAPE) and traj["x0"].shape == (steps, *SHAPE)
    torch.testing.assert_close(traj["x0"][-1], out, rtol=1e-6, atol=1e-6)  # the last: x0
    torch.testing.assert_close(traj["timesteps"], theirs.timesteps, rtol=0, atol=0)


@torch.no_grad()
def test_default_flow_grid_and_name():
    """sampler='flow_euler' without a schedule: diffusers' defaults (shift 1, T = 1000)."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = fastdiff.sample(_velocity, 8, sampler="flow_euler", noise=z)
    theirs = FlowMatchEulerDiscreteScheduler()
    theirs.set_timesteps(8)
    assert _rel(out, _their_loop(theirs, z, _velocity)) <= RTOL
    out3 = fastdiff.sample(_velocity, 8, sampler="flow_euler", noise=z, shift=3.0)
    assert _rel(out3, out) > 1e-3  # the option reaches the grid


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_stochastic_sampling(steps):
    """x0 re-noised to the next sigma with the same generator draws as diffusers'."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    theirs = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0)
    out = fastdiff.sample(_velocity, steps, schedule=theirs, noise=z,
                          generator=torch.Generator().manual_seed(7))  # fmt: skip
    theirs.set_timesteps(steps)
    ref = _their_loop(theirs, z, _velocity, gen=torch.Generator().manual_seed(7))
    assert _rel(out, ref) <= RTOL
    smp = FlowMatchEulerSampler(None, steps, stochastic_sampling=True)
    assert [smp.needs_noise(i) for i in range(steps)] == [True] * (steps - 1) + [False]
    # without a generator: in-kernel Philox noise, reproducible with torch.manual_seed
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(fastdiff.sample(_velocity, steps, schedule=theirs, noise=z))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("steps", [4, 28])
def test_img2img_strength_is_the_pipelines(strength, steps):
    """SD3 img2img: timesteps[t_start:], scale_noise at the first of them, then the loop."""
    g = torch.Generator().manual_seed(2)
    image, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(steps)
    # StableDiffusion3Img2ImgPipeline.get_timesteps (its module needs transformers)
    t_start = int(max(steps - min(steps * strength, steps), 0))
    ts, n_run = theirs.timesteps[t_start:], steps - t_start
    theirs.set_begin_index(t_start)
    start = theirs.scale_noise(image, ts[:1], noise)
    ref = _their_loop(theirs, start, _velocity, t_start=t_start)
    smp = FlowMatchEulerSampler(None, steps, shift=3.0, strength=strength)
    assert smp.steps == n_run
    torch.testing.assert_close(smp.timesteps, ts, rtol=0, atol=0)
    torch.testing.assert_close(smp.scale_noise(image, noise), start, rtol=0, atol=0)
    out = fastdiff.sample(_velocity, sampler=smp, noise=smp.scale_noise(image, noise))
    assert _rel(out, ref) <= RTOL


# ------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_every_backend_matches_diffusers(case, stochastic):
    """A guided run at an odd size on each backend of the fused op (cpu: the C++ kernel, triton
    under TRITON_INTERPRET=1) equals diffusers' loop on the combined velocity, same noise."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 7, generator=g)
    gs = 2.5
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    theirs.set_timesteps(4)
    ref = _their_loop(theirs, z, _velocity, gs, gen=torch.Generator().manual_seed(9))
    smp = FlowMatchEulerSampler(None, 4, shift=3.0, stochastic_sampling=stochastic)
    gen = torch.Generator().manual_seed(9)
    x = z.to(dev)
    with fastdiff.use_backend(backend, op="sampler_step"):
        for i, t in enumerate(smp.timesteps):
            out = _velocity(torch.cat([x, x]).cpu(), t.expand(4)).to(dev)
            n = torch.randn(z.shape, generator=gen).to(dev) if smp.needs_noise(i) else None
            x = smp.step(out, i, x, noise=n, guidance_scale=gs)
    assert x.device.type == dev
    err = _rel(x.cpu(), ref)
    assert 0.0 <= err <= RTOL, f"{backend}: rel err {err:.2e}"


@pytest.mark.usefixtures("emu")
@pytest.mark.parametrize("stochastic", [False, True])
def test_emulated_cuda_kernel_matches_diffusers(stochastic):
    """csrc/cuda's sampler_step kernel through its real entry point, on tests/cuda_emu."""
    test_every_backend_matches_diffusers(("cpu", "cuda"), stochastic)


@torch.no_grad()
@pytest.mark.parametrize("opts", [{}, {"stochastic_sampling": True}])
def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch, opts):
    """sample(cuda_graph=True)'s loop on CPU with a fake graph: float timesteps and the row in
    static buffers; the eager loop's samples and trajectory."""
    from fastdiff import api

    eager_loop = api._sample_eager
    seen = []

    def model(x, t, class_labels=None):
        seen.append(t.dtype)
        return _velocity(x, t) + 0.1 * class_labels.reshape(-1, 1, 1, 1)

    def run(graphed, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        return fastdiff.sample(model, 5, sampler="flow_euler", noise=z, cond=torch.zeros(2),
                               uncond=torch.ones(2), guidance_scale=2.0, shift=3.0,
                               generator=torch.Generator().manual_seed(seed),
                               return_trajectory=True, **opts)  # fmt: skip

    for seed in (1, 2):
        eager, etraj = run(False, seed)
        out, traj = run(True, seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1 and set(seen) == {torch.float32}


@torch.no_grad()
def test_no_host_sync_inside_the_sampling_loop():
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=4, sampler="flow_euler", shape=SHAPE[1:], batch_size=2,
                                  stochastic_sampling=True),
        _velocity,
    )  # fmt: skip


# ---------------------------------------------------------------------- setup and errors
def test_registry_inference_and_rows():
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert SAMPLERS["flow_euler"] is FlowMatchEulerSampler
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert infer_sampler(sch) == "flow_euler"
    saved = {**sch.config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    assert infer_sampler(saved) == "flow_euler"  # a saved config
    smp = resolve_sampler(_velocity, None, 4, saved, None, None, {})
    assert isinstance(smp, FlowMatchEulerSampler) and smp.shift == 3.0
    smp = make_sampler("flow_euler", None, 3)
    s = smp.sigmas
    for i in range(3):
        assert list(smp.coef64[i]) == [1.0, s[i], 0.0, s[i + 1] - s[i], 1.0, 0.0, 0.0, 0.0]
    assert not any(smp.needs_noise(i) for i in range(3))


@pytest.mark.parametrize(
    "opts,err,match",
    [
        ({"invert_sigmas": True}, ValueError, "invert_sigmas"),
        ({"use_dynamic_shifting": True}, ValueError, "mu"),
        ({"mu": 1.0, "image_seq_len": 256}, ValueError, "mu, image_seq_len"),
        ({"shift": 0.0}, ValueError, "shift"),
        ({"shift": float("nan")}, ValueError, "shift"),
        ({"time_shift_type": "cosine"}, ValueError, "time_shift_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, ValueError, "sigmas"),
        ({"strength": 0.0}, ValueError, "strength"),
        ({"strength": 1.5}, ValueError, "strength"),
        ({"shift_terminal": 1.5}, ValueError, "shift_terminal"),
        ({"shift_terminal": 0.1, "steps": 1}, ValueError, "shift_terminal: the grid"),
        ({"sigmas": [1.0, 0.5]}, ValueError, "sigmas"),
        ({"sigmas": [1.0, 0.5, 0.0, 0.2]}, ValueError, "sigmas"),
        ({"image_seq_len": 0, "use_dynamic_shifting": True}, ValueError, "image_seq_len"),
        ({"stochastic_sampling": 1}, TypeError, "stochastic_sampling"),
    ],
)
def test_bad_options(opts, err, match):
    opts = {"steps": 4, **opts}
    with pytest.raises(err, match=match):
        FlowMatchEulerSampler(None, **opts)


def test_bad_settings_through_sample():
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="mu"):  # diffusers' own error, before any model call
        dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        fastdiff.sample(_velocity, 4, noise=z, schedule=dyn)
    with pytest.raises(ValueError, match="invert_sigmas"):
        fastdiff.sample(_velocity, 4, noise=z,
                        schedule=FlowMatchEulerDiscreteScheduler(invert_sigmas=True))  # fmt: skip
    with pytest.raises(ValueError, match="flow model has no VP"):
        fastdiff.sample(_velocity, 4, noise=z, sampler="flow_euler", schedule="linear")
    with pytest.raises(ValueError, match="flow_euler"):
        fastdiff.sample(_velocity, 4, noise=z, sampler="ddim",
                        schedule=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(_velocity, 4, noise=z, sampler="flow_euler", eta=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(_velocity, 4, noise=z, sampler="flow_euler", prediction_type="epsilon")
    with pytest.raises(TypeError, match="schedule"):
        FlowMatchEulerSampler(NoiseSchedule("linear"), 4)
    with pytest.raises(ValueError, match="steps"):
        FlowMatchEulerSampler(None, 0)
    with pytest.raises(ValueError, match="model_output"):
        FlowMatchEulerSampler(None, 4).step(torch.zeros(4, 4), 0, torch.zeros(2, 4))


def test_other_flow_scheduler_is_a_clear_error():
    """A FlowMatch class without a fastdiff sampler has no betas: no DDIM fallback (which warned,
    then failed converting it); an explicit flow sampler takes its settings."""
    cfg = {"_class_name": "FlowMatchLCMScheduler", "shift": 3.0}
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="no sampler for FlowMatchLCMScheduler"):
        fastdiff.sample(_velocity, 4, noise=z, schedule=cfg)
    out = fastdiff.sample(_velocity, 4, noise=z, schedule=cfg, sampler="flow_euler")
    ref = fastdiff.sample(_velocity, 4, noise=z, sampler="flow_euler", shift=3.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_step_is_diffusers(dtype):
    """diffusers upcasts the sample to fp32 and casts the result to the output's dtype; the
    fused op computes in fp32 and writes x's dtype: the same values (<= 1 half ulp apart)."""
    theirs, smp = _pair({"shift": 3.0}, None, 4)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(theirs.timesteps):
        x, v = (torch.randn(SHAPE, generator=g).to(dtype) for _ in range(2))
        ref = theirs.step(v, t, x).prev_sample
        out = smp.step(v, i, x)
        assert out.dtype == ref.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps)


@torch.no_grad()
def test_flux_style_packed_latents_and_image_seq_len():
    """Flux's pipeline: packed latents [N x seq x C], custom sigmas linspace(1, 1/N, N) and mu
    from the sequence length; sample() runs the 3-D state as diffusers' loop does."""
    import numpy as np

    n, seq = 5, 64
    z = torch.randn(2, seq, 8, generator=torch.Generator().manual_seed(0))
    sig = np.linspace(1.0, 1 / n, n)
    out = fastdiff.sample(_velocity, n, sampler="flow_euler", noise=z, sigmas=sig,
                          use_dynamic_shifting=True, image_seq_len=seq)  # fmt: skip
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    theirs.set_timesteps(sigmas=sig, mu=calculate_shift(seq))
    assert out.shape == z.shape and _rel(out, _their_loop(theirs, z, _velocity)) <= RTOL
