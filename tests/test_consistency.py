"""Consistency models (Song et al. 2023, arXiv:2303.01469): sampler "cm" vs diffusers'
CMStochasticIterativeScheduler as ConsistencyModelPipeline runs it, step for step and whole runs
(the checkpoints' num_train_timesteps 40 / 151 / 201 and explicit timesteps [22, 0] / [17, 0]),
every sampler_step backend under the FlashAttention rule, exact Gaussian data, img2img, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _sampler_cases import assert_step_parity, cond_toy, rel, toy
from helpers import PARITY_RTOL, assert_fa_rule, backend_cases, case_id, stable_seed

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, ConsistencyModelSampler, make_sampler

diffusers = pytest.importorskip("diffusers")
from diffusers import CMStochasticIterativeScheduler  # noqa: E402

SHAPE = (2, 3, 5, 7)

# (num_train_timesteps, steps, timesteps, clip_denoised): the ImageNet-64 / LSUN distillation
# (40) and consistency-training (151 LSUN, 201 ImageNet-64) configs; [22, 0] / [17, 0] are the
# two-step timesteps of their model cards
RUNS = [
    (40, 1, None, True),
    (40, 2, None, True),
    (40, 4, None, False),
    (40, 40, None, True),
    (40, None, [22, 0], True),
    (151, None, [17, 0], True),
    (151, None, [17, 0], False),
    (201, 7, None, False),
]


def run_id(r) -> str:
    T, steps, ts, clip = r
    return f"T{T}-" + (f"ts{ts[0]}" if ts else f"n{steps}") + ("-clip" if clip else "")


def _diffusers_scheduler(T: int, clip: bool, steps, timesteps) -> CMStochasticIterativeScheduler:
    sch = CMStochasticIterativeScheduler(num_train_timesteps=T, clip_denoised=clip)
    if timesteps is not None:
        sch.set_timesteps(timesteps=timesteps)
    else:
        sch.set_timesteps(steps)
    return sch


def pipeline_loop(sch, z: torch.Tensor, generator, model=toy) -> torch.Tensor:
    """ConsistencyModelPipeline's loop on a set scheduler: x = z sigma_max, scale_model_input,
    the model at scheduler.timesteps, step(generator=)."""
    x = z * sch.init_noise_sigma
    for t in sch.timesteps:
        out = model(sch.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sch.step(out, t, x, generator=generator).prev_sample
    return x


def _f64_step(smp: ConsistencyModelSampler, X: torch.Tensor, m: torch.Tensor, i: int, z):
    """Algorithm 1's step in float64, in diffusers' units: clip(c_skip X + c_out F) + std z."""
    s, s_min, sd = float(smp.sigmas[i]), smp.sigma_min, smp.sigma_data
    c_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
    c_out = (s - s_min) * sd / math.sqrt(s**2 + sd**2)
    d = c_out * m.double() + c_skip * X.double()
    if smp.clip_denoised:
        d = d.clamp(-1, 1)
    if i == smp.steps - 1:
        return d
    s_next = float(smp.sigmas[i + 1])
    return d + smp.s_noise * math.sqrt(s_next**2 - s_min**2) * z.double()


# ------------------------------------------------------------------------ grid and parity
@pytest.mark.parametrize("T,steps,ts,clip", RUNS, ids=[run_id(r) for r in RUNS])
def test_grid_and_every_step_match_diffusers(T, steps, ts, clip, monkeypatch):
    """The float32 sigmas (with diffusers' final sigma_min) and the model timesteps are
    diffusers'; each step from diffusers' sample (same model output, same z) equals diffusers'
    step and a float64 restatement of Algorithm 1 within 1e-5."""
    import diffusers.schedulers.scheduling_consistency_models as mod

    sch = _diffusers_scheduler(T, clip, steps, ts)
    smp = ConsistencyModelSampler(None, steps, num_train_timesteps=T, timesteps=ts,
                                  clip_denoised=clip)  # fmt: skip
    n = len(sch.timesteps)
    assert smp.steps == n and len(smp) == n
    assert torch.equal(torch.from_numpy(smp.sigmas).float(), sch.sigmas)
    assert torch.allclose(smp.timesteps.double(), sch.timesteps, rtol=1e-7, atol=0)
    assert smp.timesteps.dtype == torch.float32
    g = torch.Generator().manual_seed(stable_seed("cm-step", T, steps, ts, clip))
    X = torch.randn(SHAPE, generator=g) * sch.init_noise_sigma
    draws = []
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: draws[-1].clone())
    for i, t in enumerate(sch.timesteps):
        draws.append(torch.randn(SHAPE, generator=g))
        z = draws[-1]
        u = (X * smp.c_in(float(smp.sigmas[i]))).float()
        m = toy(u, smp.timesteps[i].expand(SHAPE[0]))
        got = smp.to_diffusers(smp.step(m, i, u, noise=z), i + 1)
        sch.scale_model_input(X, t)  # as the pipeline does before each step
        ref = sch.step(m, t, X).prev_sample
        assert_step_parity(got, ref, _f64_step(smp, X, m, i, z), f"step {i}")
        X = ref
    assert torch.isfinite(X).all()


# ------------------------------------------------------------------------ whole runs
@pytest.mark.parametrize("T,steps,ts,clip", RUNS, ids=[run_id(r) for r in RUNS])
@torch.no_grad()
def test_sample_matches_the_pipeline(T, steps, ts, clip):
    """fastdiff.sample(sampler="cm") with the pipeline's noise and generator: diffusers'
    samples (the model called at its timesteps, on its scaled input)."""
    seed = stable_seed("cm-run", T, steps, ts, clip)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    sch = _diffusers_scheduler(T, clip, steps, ts)
    calls = []

    def model(x, t):  # outputs up to ~4: the denoised sample leaves [-1, 1] without clipping
        calls.append(float(t[0]))
        return 3.0 * toy(x, t)

    ref = pipeline_loop(sch, z, torch.Generator().manual_seed(seed + 1), model)
    calls.clear()

    opts = {"timesteps": ts} if ts is not None else {}
    got = fastdiff.sample(model, steps=steps, sampler="cm", noise=z, num_train_timesteps=T,
                          clip_denoised=clip, generator=torch.Generator().manual_seed(seed + 1),
                          **opts)  # fmt: skip
    assert calls == pytest.approx(sch.timesteps.tolist(), rel=1e-7)
    assert 0.0 < rel(got, ref) <= PARITY_RTOL
    if clip:
        assert got.abs().max() <= 1.0
    else:
        assert got.abs().max() > 1.1


@torch.no_grad()
def test_schedule_infers_cm_with_its_settings():
    """schedule=<a CMStochasticIterativeScheduler or its saved config> infers "cm" with the
    scheduler's settings (num_train_timesteps 151, clip off, s_noise); "consistency" is an
    alias; the default is the pipeline's one step."""
    cfg = dict(num_train_timesteps=151, clip_denoised=False, s_noise=1.007)
    sch = CMStochasticIterativeScheduler(**cfg)
    saved = dict(sch.config, _class_name="CMStochasticIterativeScheduler")
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    ref_sch = CMStochasticIterativeScheduler(**cfg)
    ref_sch.set_timesteps(timesteps=[17, 0])
    ref = pipeline_loop(ref_sch, z, torch.Generator().manual_seed(5))
    for schedule in (sch, saved, dict(saved)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = fastdiff.sample(toy, schedule=schedule, noise=z, timesteps=[17, 0],
                                  generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert 0.0 < rel(got, ref) <= PARITY_RTOL
    gen = torch.Generator().manual_seed(5)
    alias = fastdiff.sample(toy, sampler="consistency", schedule=saved, noise=z,
                            timesteps=[17, 0], generator=gen)  # fmt: skip
    torch.testing.assert_close(alias, got, rtol=0, atol=0)
    one_ref = pipeline_loop(_diffusers_scheduler(151, False, 1, None), z, None)
    one = fastdiff.sample(toy, schedule=saved, noise=z)  # default: 1 step
    assert 0.0 < rel(one, one_ref) <= PARITY_RTOL
    assert SAMPLERS["cm"] is SAMPLERS["consistency"] is ConsistencyModelSampler


@torch.no_grad()
def test_guidance_equals_manual_cfg():
    """guidance_scale combines [uncond, cond] in the op: the same as stepping with the combined
    output (and not the unguided samples)."""
    cond, uncond = torch.randn(SHAPE[0], 4), torch.randn(SHAPE[0], 4)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kw = {"sampler": "cm", "timesteps": [22, 0], "noise": z}
    got = fastdiff.sample(cond_toy, cond=cond, uncond=uncond, guidance_scale=3.0, **kw,
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    smp = ConsistencyModelSampler(None, timesteps=[22, 0])
    gen = torch.Generator().manual_seed(4)
    x = z * smp.init_noise_scale
    for i, t in enumerate(smp.timesteps):
        tt = t.expand(SHAPE[0])
        u = cond_toy(x, tt, encoder_hidden_states=uncond)
        c = cond_toy(x, tt, encoder_hidden_states=cond)
        x = smp.step(u + 3.0 * (c - u), i, x, generator=gen)
    assert rel(got, x) <= 1e-6
    plain = fastdiff.sample(cond_toy, cond=cond, **kw, generator=torch.Generator().manual_seed(4))
    assert rel(got, plain) > 1e-3


# ------------------------------------------------------------------------ backends
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@torch.no_grad()
def test_every_backend_step_fa_rule(case, dtype, clip):
    """Per step (first, middle, last of 4) with fresh inputs at an odd size, channels_last on
    the middle one: within 2x the eager same-dtype step's error vs float64; NaN mask kept; the
    denoised sample (return_x0) too."""
    dev, backend = case
    g = torch.Generator().manual_seed(stable_seed("cm-fa", backend, str(dtype), clip))
    smp = ConsistencyModelSampler(None, 4, clip_denoised=clip)
    for i in (0, 1, 3):
        u = torch.randn(2, 3, 9, 7, generator=g).to(dev, dtype)
        m = (torch.randn(2, 3, 9, 7, generator=g) * 1.5).to(dev, dtype)
        z = torch.randn(2, 3, 9, 7, generator=g).to(dev, dtype)
        u[0, 0, 0, 0] = float("nan")
        if i == 1:
            u, m, z = (t.contiguous(memory_format=torch.channels_last) for t in (u, m, z))
        with fastdiff.use_backend(backend, op="sampler_step"):
            out, d = smp.step(m, i, u, noise=z, return_x0=True)
        assert out.dtype == dtype and out.device.type == dev
        if i == 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
        s = float(smp.sigmas[i])
        c_in, k = smp.c_in(s), smp._out_scale(i)
        std = smp.noise_std(i)
        d64 = smp.c_skip(s) * u.double() / c_in + smp.c_out(s) * m.double()
        d64 = d64.clamp(-1, 1) if clip else d64
        ref = k * d64 + k * std * z.double()

        def h(v):
            return torch.tensor(v, dtype=torch.float32).to(dev, dtype)

        d_e = h(smp.c_skip(s)) * (u / h(c_in)) + h(smp.c_out(s)) * m  # diffusers' step, in dtype
        d_e = d_e.clamp(-1, 1) if clip else d_e
        eager = h(k) * d_e + h(k * std) * z
        atol = 1e-6 if dtype == torch.float32 else 0.0
        assert_fa_rule(out.cpu(), ref.cpu(), eager.cpu(), atol=atol, name=f"{backend} {i}")
        assert_fa_rule(d.cpu(), d64.cpu(), d_e.cpu(), atol=atol, name=f"denoised {i}")


@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
@torch.no_grad()
def test_every_backend_gives_the_pipeline_samples(case):
    """A whole 4-step run (Philox-free: the pipeline's generator) on each backend equals
    diffusers' loop."""
    dev, backend = case
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21))
    ref = pipeline_loop(_diffusers_scheduler(40, True, 4, None), z,
                        torch.Generator().manual_seed(22))  # fmt: skip
    with fastdiff.use_backend(backend, op="sampler_step"):
        got = fastdiff.sample(toy, steps=4, sampler="cm", noise=z.to(dev),
                              generator=torch.Generator().manual_seed(22))  # fmt: skip
    assert got.device.type == dev
    assert 0.0 < rel(got.cpu(), ref) <= 2 * PARITY_RTOL


# ------------------------------------------------------------------------ exact Gaussian data
MU, TAU = 0.3, 0.2  # data N(MU, TAU^2), elementwise


def _gauss_cm(smp: ConsistencyModelSampler):
    """The model F whose consistency function is exact for N(MU, TAU^2) data: the
    probability-flow ODE's map from sigma down to sigma_min, f(X, sigma) = MU + (X - MU)
    sqrt(TAU^2 + sigma_min^2) / sqrt(TAU^2 + sigma^2), solved for F in f = c_skip X + c_out F
    (the model sees u = c_in X at t = 250 log sigma)."""

    def model(u, t):
        sigma = torch.exp(t.double() / 250.0).reshape(-1, 1, 1, 1)
        X = u.double() * torch.sqrt(sigma**2 + smp.sigma_data**2)
        r = math.sqrt(TAU**2 + smp.sigma_min**2) / torch.sqrt(TAU**2 + sigma**2)
        f = MU + (X - MU) * r
        sd, s_min = smp.sigma_data, smp.sigma_min
        c_skip = sd**2 / ((sigma - s_min) ** 2 + sd**2)
        c_out = (sigma - s_min) * sd / torch.sqrt(sigma**2 + sd**2)
        return ((f - c_skip * X) / c_out).to(u.dtype)

    return model


@pytest.mark.parametrize("timesteps", [None, [22, 0]], ids=["one-step", "22-0"])
@torch.no_grad()
def test_exact_gaussian_consistency_function(timesteps):
    """With the exact consistency function of N(MU, TAU^2) data, one step from x_T = sigma_max
    z has mean MU (1 - r) and std sigma_max r, r = sqrt(TAU^2 + sigma_min^2) / sqrt(TAU^2 +
    sigma_max^2) (the start ignores MU: a bias of MU TAU / sigma_max); a second step at sigma_1
    (noise sqrt(sigma_1^2 - sigma_min^2) z) keeps the closed-form mean and std. Both within
    4 standard errors of 200k samples, and within 1% of the data's MU / TAU."""
    steps = None if timesteps else 1
    smp = ConsistencyModelSampler(None, steps, timesteps=timesteps, clip_denoised=False)
    n = 200_000
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    x = fastdiff.sample(_gauss_cm(smp), sampler=smp, noise=z.float(),
                        generator=torch.Generator().manual_seed(32)).double()  # fmt: skip
    s_min, s_max = smp.sigma_min, smp.sigma_max

    def ratio(s):
        return math.sqrt(TAU**2 + s_min**2) / math.sqrt(TAU**2 + s**2)

    mean, std = MU * (1 - ratio(s_max)), s_max * ratio(s_max)
    if timesteps:
        s1 = float(smp.sigmas[1])
        var = std**2 + s1**2 - s_min**2
        mean, std = MU + (mean - MU) * ratio(s1), math.sqrt(var) * ratio(s1)

    def within(v):
        return (abs(v.mean().item() - mean) <= 4 * std / math.sqrt(n)
                and abs(v.std().item() - std) <= 4 * std / math.sqrt(2 * n))  # fmt: skip

    assert within(x)
    assert abs(mean - MU) <= 0.01 * MU and abs(std - TAU) <= 0.01 * TAU
    # the check can fail: a model 5% off in its output misses it
    off = fastdiff.sample(lambda u, t: 1.05 * _gauss_cm(smp)(u, t), sampler=smp,
                          noise=z.float(), generator=torch.Generator().manual_seed(32))  # fmt: skip
    assert not within(off.double())


# ------------------------------------------------------------------------ img2img
@pytest.mark.parametrize("strength", [0.5, 0.8])
@torch.no_grad()
def test_img2img_start_matches_diffusers(strength):
    """sample(image=, strength=): diffusers' add_noise (image + sigma_s noise at the begin
    index s = N - int(N strength), set_begin_index(s)) then its steps from s, with the same noise
    and generator."""
    g = torch.Generator().manual_seed(41)
    image = torch.rand(SHAPE, generator=g) * 2 - 1
    z = torch.randn(SHAPE, generator=g)
    sch = _diffusers_scheduler(40, True, 8, None)
    start = 8 - int(8 * strength)
    sch.set_begin_index(start)
    x = sch.add_noise(image, z, sch.timesteps[start : start + 1])
    gen = torch.Generator().manual_seed(42)
    for t in sch.timesteps[start:]:
        out = toy(sch.scale_model_input(x, t), t.expand(SHAPE[0]))
        x = sch.step(out, t, x, generator=gen).prev_sample
    got = fastdiff.sample(toy, steps=8, sampler="cm", image=image, strength=strength, noise=z,
                          generator=torch.Generator().manual_seed(42))  # fmt: skip
    assert 0.0 < rel(got, x) <= PARITY_RTOL
    smp = ConsistencyModelSampler(None, 8)
    assert smp.img2img_start(strength) == start
    s = float(smp.sigmas[start])
    torch.testing.assert_close(smp.add_noise(image, z, start),
                               (image + s * z) * smp.c_in(s), rtol=1e-6, atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"sigma_min": 80.0, "sigma_max": 80.0}, ValueError, "sigma_min, sigma_max"),
        ({"sigma_min": 1.0, "sigma_max": 0.5}, ValueError, "sigma_min, sigma_max"),
        ({"sigma_min": 0.0}, ValueError, "sigma_min"),
        ({"sigma_data": 0.0}, ValueError, "sigma_data"),
        ({"sigma_data": -0.5}, ValueError, "sigma_data"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"s_noise": -1.0}, ValueError, "s_noise"),
        ({"clip_denoised": 1}, TypeError, "clip_denoised"),
        ({"timesteps": [0, 22]}, ValueError, "timesteps.*descending"),
        ({"timesteps": [22, 22]}, ValueError, "timesteps.*descending"),
        ({"timesteps": [40, 0]}, ValueError, r"timesteps.*\[0, 39\]"),
        ({"timesteps": [5, -1]}, ValueError, "timesteps"),
        ({"timesteps": "22"}, TypeError, "timesteps"),
        ({"timesteps": []}, ValueError, "timesteps"),
        ({"steps": 3, "timesteps": [22, 0]}, ValueError, "steps: got 3 but 2 timesteps"),
        ({"steps": 41}, ValueError, "steps.*num_train_timesteps = 40"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2.0}, TypeError, "steps"),
        ({"num_train_timesteps": 1}, ValueError, "num_train_timesteps"),
        ({"num_train_timesteps": 40.0, "timesteps": [3, 0]}, TypeError, "num_train_timesteps"),
    ],
)
def test_bad_options_are_named(kwargs, exc, match):
    kwargs = dict(kwargs)
    steps = kwargs.pop("steps", None)
    with pytest.raises(exc, match=match):
        ConsistencyModelSampler(None, steps, **kwargs)


def test_bad_schedules_and_step_arguments():
    with pytest.raises(TypeError, match="schedule"):
        ConsistencyModelSampler(NoiseSchedule("linear"), 2)
    with pytest.raises(TypeError, match="schedule"):
        make_sampler("cm", NoiseSchedule("linear"), 2)
    z = torch.randn(SHAPE)
    cm = CMStochasticIterativeScheduler()
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler has no VP"):
        fastdiff.sample(toy, sampler="ddim", schedule=cm, noise=z, steps=2)
    with pytest.raises(ValueError, match="schedule: sampler 'cm' needs None or diffusers' CM"):
        fastdiff.sample(toy, sampler="cm", schedule=diffusers.DDIMScheduler(), noise=z)
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(toy, sampler="cm", noise=z, eta=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(toy, sampler="cm", noise=z, clip_sample=True)
    smp = ConsistencyModelSampler(None, 2)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="i: expected a step index in \\[0, 2\\)"):
        smp.step(x, 2, x)
    with pytest.raises(ValueError, match="model_output"):
        smp.step(x[:1], 0, x)
    with pytest.raises(ValueError, match="noise"):
        smp.step(x, 0, x, noise=x[:1])


@torch.no_grad()
def test_consistency_model_pipeline_end_to_end():
    """diffusers' ConsistencyModelPipeline on a small class-conditional UNet2DModel (as the
    cd_imagenet64 checkpoints) with timesteps=[22, 0] = sample(pipe.unet,
    schedule=pipe.scheduler, cond=class_labels) mapped to [0, 1] as its postprocessing."""
    from diffusers import ConsistencyModelPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=10).eval()  # fmt: skip
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([3, 7])
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    ref = pipe(batch_size=2, num_inference_steps=None, timesteps=[22, 0], class_labels=labels,
               latents=z, generator=gen, output_type="pt").images  # fmt: skip
    x = fastdiff.sample(unet, schedule=pipe.scheduler, timesteps=[22, 0], cond=labels, noise=z,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    got = (x / 2 + 0.5).clamp(0, 1)
    assert got.shape == ref.shape and 0.0 < (got - ref).abs().max() <= 1e-5
