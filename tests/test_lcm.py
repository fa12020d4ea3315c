"""LCMSampler ("lcm") and TCDSampler ("tcd") vs diffusers' LCMScheduler / TCDScheduler: the
timesteps of set_timesteps, every step (same sample, model output and noise on both sides), whole
runs through fastdiff.sample (the same generator on both sides), img2img, every sampler_step
backend, schedule inference and the errors (the CUDA-graph loop, no host sync:
tests/test_sampler_contract.py).

Per step, ours must agree with diffusers to a relative error <= 1e-5 (max |ours - theirs| /
max |theirs|) against diffusers' step run in float64 on our float64 alpha_bar, and to 1e-5 plus
diffusers' own fp32 error against the stock scheduler.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from unittest import mock

import pytest
import torch
from _sampler_cases import assert_step_parity
from _sampler_cases import rel as _rel
from _sampler_cases import toy as _toy
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE, backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, LCMSampler, TCDSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL
KINDS = {"lcm": (LCMSampler, "LCMScheduler"), "tcd": (TCDSampler, "TCDScheduler")}


def _scheduler(kind: str, sched: str = "scaled_linear", **opts):
    return getattr(diffusers, KINDS[kind][1])(**DIFFUSERS_BETAS[sched], **opts)


def _pair(kind, steps, sched="scaled_linear", set_kw=None, **opts):
    """(stock diffusers, diffusers in float64 on our alpha_bar), both set to ``steps``."""
    theirs, twin = _scheduler(kind, sched, **opts), _scheduler(kind, sched, **opts)
    for s in (theirs, twin):
        s.set_timesteps(steps, **(set_kw or {}))
    twin.alphas_cumprod = NoiseSchedule.from_diffusers(theirs).alphas_cumprod.clone()
    return theirs, twin


def _per_step(ours, theirs, twin, *, begin=0, seed=0, eta=None) -> float:
    """Steps ``begin ..`` on each side with shared samples, model outputs and noise (diffusers'
    draw replaced by ours); the worst error vs the float64 twin."""
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    for s in (theirs, twin):
        s.set_begin_index(begin)
    kw = {} if eta is None else {"eta": eta}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst = 0.0
    for i in range(begin, len(ours)):
        t = theirs.timesteps[i]
        mo = 0.6 * torch.randn(SHAPE, generator=g) + 0.4 * x.clamp(-3, 3)
        z = torch.randn(SHAPE, generator=g)
        with _their_noise(z):
            ref64 = twin.step(mo.double(), t, x.double(), **kw).prev_sample
            ref = theirs.step(mo, t, x, **kw).prev_sample
        got = ours.step(mo, i, x, noise=z if ours.needs_noise(i) else None)
        err64, _ = assert_step_parity(got, ref, ref64, f"step {i} (t={int(t)}) vs the twin")
        worst = max(worst, err64)
        x = ref64.float()
    return worst


@contextlib.contextmanager
def _their_noise(z: torch.Tensor):
    """diffusers' LCM / TCD steps draw z = ``z`` (in the dtype they ask for)."""
    from diffusers.schedulers import scheduling_lcm, scheduling_tcd

    def draw(shape, generator=None, device=None, dtype=None):
        assert tuple(shape) == tuple(z.shape)
        return z.to(dtype)

    with mock.patch.object(scheduling_lcm, "randn_tensor", draw), \
            mock.patch.object(scheduling_tcd, "randn_tensor", draw):  # fmt: skip
        yield


# ------------------------------------------------------------------------------ timesteps
TS_CASES = list(itertools.product(["lcm", "tcd"], [1, 2, 3, 4, 8, 50], [50, 8, 25, 1000],
                                  [1.0, 0.5, 0.3]))  # fmt: skip


@pytest.mark.parametrize("kind,steps,orig,strength", TS_CASES)
def test_timesteps_are_diffusers_set_timesteps(kind, steps, orig, strength):
    ours = grid_matches_diffusers(kind, _scheduler(kind, original_inference_steps=orig), steps,
                                  orig, strength)  # fmt: skip
    if ours is not None:
        assert ours.timesteps.dtype == torch.int64 and len(ours) == steps


def grid_matches_diffusers(kind: str, theirs, steps: int, orig: int, strength: float):
    """diffusers' ``theirs.set_timesteps(steps, strength=)`` and our ``kind`` sampler on its
    schedule (``original_inference_steps=orig``): the same timesteps, or a ValueError naming
    steps where diffusers raises. Returns our sampler (None where refused)."""
    sch = NoiseSchedule.from_diffusers(theirs)
    try:
        theirs.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(ValueError, match="steps"):
            KINDS[kind][0](sch, steps, original_inference_steps=orig, strength=strength)
        return None
    ours = KINDS[kind][0](sch, steps, original_inference_steps=orig, strength=strength)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    return ours


@pytest.mark.parametrize("steps,orig,strength", [(4, 50, 1.0), (3, 8, 0.6), (7, 1000, 0.5)])
def test_tcd_explicit_original_steps_grid(steps, orig, strength):
    """TCD's set_timesteps(original_inference_steps=n) draws from every training timestep."""
    theirs = _scheduler("tcd")
    theirs.set_timesteps(steps, original_inference_steps=orig, strength=strength)
    ours = TCDSampler(NoiseSchedule.from_diffusers(theirs), steps, original_inference_steps=orig,
                      strength=strength, origin_grid="all")  # fmt: skip
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.timesteps.tolist() != TCDSampler(ours.schedule, steps).timesteps.tolist()


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
def test_custom_timesteps(kind):
    theirs = _scheduler(kind)
    ts = [999, 639, 399, 159]
    theirs.set_timesteps(timesteps=ts)
    ours = KINDS[kind][0](NoiseSchedule.from_diffusers(theirs), timesteps=ts)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == ts and len(ours) == 4
    twin = _scheduler(kind)
    twin.set_timesteps(timesteps=ts)
    twin.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    assert _per_step(ours, theirs, twin, seed=3) > 0.0


# ------------------------------------------------------------------------ per-step parity
LCM_CASES = list(itertools.product([1, 2, 4, 8], ["epsilon", "v_prediction", "sample"],
                                   [50, 20], ["scaled_linear", "linear", "cosine"]))  # fmt: skip


@pytest.mark.parametrize("steps,pred,orig,sched", LCM_CASES)
def test_lcm_per_step_parity(steps, pred, orig, sched):
    opts = dict(prediction_type=pred, original_inference_steps=orig)
    theirs, twin = _pair("lcm", steps, sched, **opts)
    ours = LCMSampler(NoiseSchedule.from_diffusers(theirs), steps, **opts)
    assert [ours.needs_noise(i) for i in range(steps)] == [True] * (steps - 1) + [False]
    assert _per_step(ours, theirs, twin, seed=steps) > 0.0


@pytest.mark.parametrize("steps,pred,eta,sched", list(itertools.product(
    [1, 2, 4, 8], ["epsilon", "v_prediction", "sample"], [0.0, 0.3, 1.0],
    ["scaled_linear", "cosine"])))  # fmt: skip
def test_tcd_per_step_parity(steps, pred, eta, sched):
    theirs, twin = _pair("tcd", steps, sched, prediction_type=pred)
    ours = TCDSampler(NoiseSchedule.from_diffusers(theirs), steps, eta=eta, prediction_type=pred)
    noisy = [eta > 0 and i < steps - 1 for i in range(steps)]
    assert [ours.needs_noise(i) for i in range(steps)] == noisy
    assert _per_step(ours, theirs, twin, seed=steps, eta=eta) > 0.0


@pytest.mark.parametrize("opts", [
    dict(timestep_scaling=1.0), dict(timestep_scaling=0.05),
    dict(clip_sample=True, clip_sample_range=0.5), dict(thresholding=True, sample_max_value=1.5),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
])  # fmt: skip
def test_lcm_settings(opts):
    """timestep_scaling (c_skip visible at small tau), clipping, thresholding, zero SNR."""
    theirs, twin = _pair("lcm", 4, original_inference_steps=50, **opts)
    kw = {k: v for k, v in opts.items() if k != "rescale_betas_zero_snr"}
    ours = LCMSampler(NoiseSchedule.from_diffusers(theirs), 4, **kw)
    assert _per_step(ours, theirs, twin, seed=7) > 0.0


def test_tcd_s_is_diffusers_float32_floor():
    """s = floor((1 - gamma) t') in float32 as diffusers: (1 - 0.3) * 90 is 63 there (float64:
    62.99999999999999 -> 62)."""
    sch = NoiseSchedule.from_diffusers(DIFFUSERS_BETAS["scaled_linear"])
    ours = TCDSampler(sch, timesteps=[999, 90], eta=0.3)
    assert ours.s_timesteps().tolist() == [63, 0]
    theirs, twin = _scheduler("tcd"), _scheduler("tcd")
    for s in (theirs, twin):
        s.set_timesteps(timesteps=[999, 90])
    twin.alphas_cumprod = sch.alphas_cumprod.clone()
    assert _per_step(ours, theirs, twin, eta=0.3) > 0.0


# ------------------------------------------------------------------------------ img2img
@pytest.mark.parametrize("kind,strength,pred", [("lcm", 0.6, "epsilon"), ("lcm", 0.35, "sample"),
                                                ("tcd", 0.5, "v_prediction")])  # fmt: skip
def test_img2img_strength(kind, strength, pred):
    """LCM's img2img pipeline passes strength to set_timesteps (a shorter grid)."""
    theirs, twin = _pair(kind, 4, set_kw={"strength": strength}, prediction_type=pred)
    ours = KINDS[kind][0](NoiseSchedule.from_diffusers(theirs), 4, strength=strength,
                          prediction_type=pred)  # fmt: skip
    assert ours.timesteps[0] < 999
    assert _per_step(ours, theirs, twin, eta=0.3 if kind == "tcd" else None) > 0.0


@pytest.mark.parametrize("kind,begin", [("lcm", 1), ("lcm", 3), ("tcd", 2)])
def test_img2img_start_index(kind, begin):
    """Stable Diffusion's img2img pipelines: timesteps[begin:] after set_begin_index(begin)."""
    theirs, twin = _pair(kind, 4, prediction_type="v_prediction")
    ours = KINDS[kind][0](NoiseSchedule.from_diffusers(theirs), 4, prediction_type="v_prediction")
    assert _per_step(ours, theirs, twin, begin=begin, eta=0.3 if kind == "tcd" else None) > 0.0


# ---------------------------------------------------------------------------- whole runs
def _diffusers_loop(sch, steps, model, shape, gen, eta=None, **set_kw):
    sch.set_timesteps(steps, **set_kw)
    x = torch.randn(shape, generator=gen)
    kw = {} if eta is None else {"eta": eta}
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(shape[0])), t, x, generator=gen, **kw).prev_sample
    return x


@pytest.mark.parametrize("kind,steps,pred,eta", [
    ("lcm", 1, "epsilon", None), ("lcm", 2, "v_prediction", None), ("lcm", 4, "epsilon", None),
    ("lcm", 8, "sample", None), ("tcd", 4, "epsilon", 0.3), ("tcd", 2, "v_prediction", 1.0),
    ("tcd", 8, "epsilon", 0.0),
])  # fmt: skip
def test_sample_with_the_scheduler_is_diffusers_loop(kind, steps, pred, eta):
    """sample(schedule=LCMScheduler(...)) infers the sampler and its settings, and equals
    diffusers' loop with the same generator (x_T, then the noise of every step but the last)."""
    opts = dict(prediction_type=pred, original_inference_steps=25, timestep_scaling=5.0)
    if kind == "tcd":
        del opts["timestep_scaling"]
    sch = _scheduler(kind, **opts)
    ref = _diffusers_loop(_scheduler(kind, **opts), steps, _toy, SHAPE,
                          torch.Generator().manual_seed(5), eta=eta)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no sampler for LCMScheduler" fallback warning
        got = fastdiff.sample(_toy, steps, schedule=sch, shape=SHAPE[1:], batch_size=SHAPE[0],
                              generator=torch.Generator().manual_seed(5), eta=eta)  # fmt: skip
    err = _rel(got, ref)
    assert err <= RTOL, f"rel err {err:.2e}"
    smp = fastdiff._sampler_setup.resolve_sampler(_toy, None, steps, sch, eta, None, {})
    assert isinstance(smp, KINDS[kind][0]) and smp.prediction_type == pred
    assert smp.original_inference_steps == 25
    if kind == "lcm":
        assert smp.timestep_scaling == 5.0
    else:
        assert smp.eta == (0.3 if eta is None else eta)


def test_generator_list_and_philox():
    """A generator list makes sample k the single-sample run k; without a generator the noise
    is drawn in the kernel and torch.manual_seed reproduces the run."""
    z = torch.randn(SHAPE)
    gens = [torch.Generator().manual_seed(s) for s in range(SHAPE[0])]
    both = fastdiff.sample(_toy, 4, sampler="lcm", noise=z, generator=gens)
    one = fastdiff.sample(
        _toy, 4, sampler="lcm", noise=z[1:], generator=[torch.Generator().manual_seed(1)]
    )
    torch.testing.assert_close(both[1:], one, rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    a = fastdiff.sample(_toy, 4, sampler="tcd", noise=z, eta=0.5)
    torch.manual_seed(0)
    b = fastdiff.sample(_toy, 4, sampler="tcd", noise=z, eta=0.5)
    c = fastdiff.sample(_toy, 4, sampler="tcd", noise=z, eta=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    # gamma = 0: deterministic, no draw
    assert torch.equal(fastdiff.sample(_toy, 4, sampler="tcd", noise=z, eta=0.0),
                       fastdiff.sample(_toy, 4, sampler="tcd", noise=z, eta=0.0))  # fmt: skip


# ------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("kind", ["lcm", "tcd"])
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_every_backend_matches_diffusers(case, kind):
    """A guided run at an odd size on each backend of the fused op (cpu: the C++ kernel, triton
    under TRITON_INTERPRET=1) equals diffusers' loop on the combined output, same noise."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 7, generator=g)
    w = torch.randn(4, 3, 5, 7, generator=g)
    gs = 2.5

    def raw(x, t):
        return torch.tanh(0.4 * torch.cat([x, x])) + 0.2 * w + torch.sin(t[:1].float() / 300.0)

    theirs = _scheduler(kind, prediction_type="v_prediction")
    theirs.set_timesteps(4)
    x = z
    kw = {"eta": 0.3} if kind == "tcd" else {}
    for i, t in enumerate(theirs.timesteps):
        u, c = raw(x, t.expand(4)).chunk(2)
        gen = torch.Generator().manual_seed(100 + i)
        x = theirs.step(u + gs * (c - u), t, x, generator=gen, **kw).prev_sample
    ref = x
    smp = KINDS[kind][0](NoiseSchedule.from_diffusers(theirs), 4, prediction_type="v_prediction")
    x = z.to(dev)
    with fastdiff.use_backend(backend, op="sampler_step"):
        for i, t in enumerate(smp.timesteps):
            n = torch.randn(z.shape, generator=torch.Generator().manual_seed(100 + i))
            n = n.to(dev) if smp.needs_noise(i) else None
            x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, noise=n, guidance_scale=gs)
    assert x.device.type == dev
    err = _rel(x.cpu(), ref)
    assert 0.0 < err <= RTOL, f"{backend}: rel err {err:.2e}"


@pytest.mark.usefixtures("emu")
@pytest.mark.parametrize("kind", ["lcm", "tcd"])
def test_emulated_cuda_kernel_matches_diffusers(kind):
    """csrc/cuda's sampler_step kernel through its real entry point, on tests/cuda_emu."""
    test_every_backend_matches_diffusers(("cpu", "cuda"), kind)


# --------------------------------------------------------------------------------- setup
def test_registry_and_rows():
    assert SAMPLERS["lcm"] is LCMSampler and SAMPLERS["tcd"] is TCDSampler
    sch = NoiseSchedule("scaled_linear")
    smp = make_sampler("lcm", sch, 4)
    assert smp.timesteps.tolist() == [999, 759, 499, 259]
    ab = sch.alphas_cumprod.double()
    c_skip, c_out = smp.boundary_scalings(999)
    row = smp.coef64[0]
    assert row[2] == pytest.approx(ab[759].sqrt().item() * c_out, rel=1e-12)
    assert row[4] == pytest.approx(ab[759].sqrt().item() * c_skip, rel=1e-12) and c_skip > 0
    assert row[5] == pytest.approx((1 - ab[759]).sqrt().item(), rel=1e-12)
    assert smp.coef64[-1, 5] == 0.0 and smp.coef64[-1, 2] == pytest.approx(smp.boundary_scalings(
        259)[1])  # fmt: skip
    tcd = make_sampler("tcd", sch, 4, eta=1.0)
    assert tcd.s_timesteps().tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("kind,opts,match", [
    ("lcm", dict(steps=51), "original_inference_steps"),
    ("lcm", dict(steps=4, original_inference_steps=1001), "original_inference_steps"),
    ("lcm", dict(steps=4, strength=0.0), "strength"),
    ("lcm", dict(steps=4, strength=1.5), "strength"),
    ("lcm", dict(steps=10, strength=0.1), "fewer than"),
    ("lcm", dict(steps=4, timestep_scaling=-1.0), "timestep_scaling"),
    ("lcm", dict(steps=4, clip_sample=True, clip_sample_range=0.0), "clip_sample_range"),
    ("lcm", dict(steps=4, thresholding=True, dynamic_thresholding_ratio=1.5),
     "dynamic_thresholding_ratio"),
    ("lcm", dict(timesteps=[999, 999, 10]), "descending"),
    ("lcm", dict(timesteps=[1000, 10]), r"\[0, 999\]"),
    ("lcm", dict(timesteps=[10, -1]), r"\[0, 999\]"),
    ("lcm", dict(steps=3, timesteps=[999, 10]), "custom timesteps"),
    ("lcm", dict(timesteps=[999, 10], strength=0.5), "strength"),
    ("tcd", dict(steps=4, eta=1.5), "eta"),
    ("tcd", dict(steps=4, eta=-0.1), "eta"),
    ("tcd", dict(steps=4, origin_grid="dense"), "origin_grid"),
    ("tcd", dict(steps=4, prediction_type="x0"), "prediction_type"),
])  # fmt: skip
def test_bad_options(kind, opts, match):
    with pytest.raises(ValueError, match=match):
        KINDS[kind][0](NoiseSchedule("scaled_linear"), **opts)


def test_bad_types():
    with pytest.raises(TypeError, match="schedule"):
        LCMSampler("scaled_linear", timesteps=[999, 10])
    with pytest.raises(TypeError, match="timesteps"):
        TCDSampler(NoiseSchedule("linear"), timesteps=["a", "b"])
    with pytest.raises(TypeError, match="eta"):
        TCDSampler(NoiseSchedule("linear"), 4, eta="0.3")
    with pytest.raises(TypeError, match="steps"):
        LCMSampler(NoiseSchedule("linear"))


def test_zero_terminal_snr_epsilon_is_a_clear_error():
    sch = NoiseSchedule("scaled_linear", rescale_betas_zero_snr=True)
    for cls in (LCMSampler, TCDSampler):
        with pytest.raises(ValueError, match="alpha_bar = 0"):
            cls(sch, 4)
        cls(sch, 4, prediction_type="v_prediction")  # fine


def test_eta_and_unknown_options_through_sample():
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(_toy, 4, sampler="lcm", shape=SHAPE[1:], eta=0.3)
    with pytest.raises(TypeError, match="timestep_spacing"):
        fastdiff.sample(_toy, 4, sampler="lcm", shape=SHAPE[1:], timestep_spacing="trailing")
    with pytest.raises(ValueError, match="steps"):
        fastdiff.sample(_toy, 60, schedule=_scheduler("lcm"), shape=SHAPE[1:])


def test_timestep_cond_reaches_the_unet():
    """LCM's guidance embedding (the UNet's timestep_cond, the LCM pipeline's w_embedding) goes
    in through model_kwargs: sample() equals diffusers' LCM loop on a UNet2DConditionModel with
    time_cond_proj_dim, and the embedding changes the samples."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2, time_cond_proj_dim=6,
    ).eval()  # fmt: skip
    ehs = torch.randn(2, 3, 8)
    outs = []
    for w in (0.0, 3.0):
        w_emb = torch.full((2, 6), w)
        got = fastdiff.sample(unet, 3, schedule=diffusers.LCMScheduler(), shape=(4, 8, 8),
                              batch_size=2, cond=ehs, generator=torch.Generator().manual_seed(1),
                              model_kwargs={"timestep_cond": w_emb})  # fmt: skip
        sch = diffusers.LCMScheduler()
        sch.set_timesteps(3)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        with torch.no_grad():
            for t in sch.timesteps:
                mo = unet(x, t, encoder_hidden_states=ehs, timestep_cond=w_emb).sample
                x = sch.step(mo, t, x, generator=gen).prev_sample
        assert _rel(got, x) <= RTOL
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.parametrize("args", [["--sampler", "lcm"], ["--sampler", "tcd", "--eta", "0.5"]])
def test_cli_sampler(tmp_path, args):
    from fastdiff.cli import main

    out = tmp_path / "s.png"
    argv = ["sample", "--steps", "4", "--n", "2", "--quiet", "--out", str(out), *args]
    assert main(argv) == 0 and out.is_file()


def test_saved_config_infers_the_sampler():
    """A saved scheduler config (pipe.scheduler.config as JSON) picks the sampler by its
    _class_name, with the class's betas and its settings; timestep_spacing / steps_offset, which
    LCMScheduler ignores, change nothing."""
    from fastdiff._sampler_setup import resolve_sampler

    cfg = {
        "_class_name": "LCMScheduler",
        "prediction_type": "v_prediction",
        "original_inference_steps": 20,
        "timestep_spacing": "trailing",
        "steps_offset": 1,
    }
    smp = resolve_sampler(_toy, None, 4, cfg, None, None, {})
    theirs = diffusers.LCMScheduler.from_config(cfg)
    theirs.set_timesteps(4)
    assert isinstance(smp, LCMSampler) and smp.prediction_type == "v_prediction"
    assert smp.timesteps.tolist() == theirs.timesteps.tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(smp.schedule.betas.float(), theirs.betas)
    tcd = resolve_sampler(_toy, None, 4, {**cfg, "_class_name": "TCDScheduler"}, 1.0, None, {})
    assert isinstance(tcd, TCDSampler) and tcd.eta == 1.0


@pytest.mark.parametrize("how", ["name", "scheduler"])
def test_sample_without_steps_runs_the_lcm_pipeline_default_of_4(how):
    """``fastdiff.sample`` without ``steps`` ran 50 LCM steps (12x the model calls of diffusers'
    LatentConsistencyModelPipeline, whose default is 4); TCD keeps the common default 50."""
    ts: list[int] = []

    def model(x, t):
        ts.append(int(t[0]))
        return _toy(x, t)

    kw = {"sampler": "lcm"} if how == "name" else {"schedule": _scheduler("lcm")}
    fastdiff.sample(model, shape=(3, 4, 4), noise=torch.randn(1, 3, 4, 4), **kw)
    sch = _scheduler("lcm")
    sch.set_timesteps(4)
    assert ts == sch.timesteps.tolist()
    ts.clear()
    fastdiff.sample(model, sampler="tcd", noise=torch.randn(1, 3, 4, 4))
    assert len(ts) == 50
