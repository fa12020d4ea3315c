"""fastdiff.repaint (RePaint, Lugmayr et al. 2022) vs diffusers' RePaintScheduler /
RePaintPipeline loop: the time list, whole runs with the same generator (fp32, rel <= 1e-5),
the kept region, every sampler_step backend, a Gaussian check of what resampling buys, errors.

fastdiff's mask is 1 = repaint, 0 = keep; diffusers' RePaint gets ``1 - mask``.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from helpers import PARITY_RTOL, assert_no_host_sync, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers.repaint import RePaintSampler, repaint_timesteps

diffusers = pytest.importorskip("diffusers")
from diffusers import RePaintScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SHAPE = (2, 3, 8, 8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in eps model: x-dependent, t-dependent, per sample; computed in
    fp32 (fp64 for an fp64 x) and returned in x's dtype, as a half-precision network's output."""
    xf = x if x.dtype == torch.float64 else x.float()
    tt = t.to(xf.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (0.5 * torch.tanh(xf) + 0.3 * torch.sin(3.0 * xf + tt / 97.0)).to(x.dtype)


def _inputs(seed: int, mask_kind: str = "binary"):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(SHAPE, generator=g) * 2 - 1
    if mask_kind == "binary":
        mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()
    elif mask_kind == "soft":
        mask = torch.rand(SHAPE, generator=g)
    else:  # one mask for the batch, broadcast over N and C
        mask = (torch.rand(1, 1, *SHAPE[2:], generator=g) > 0.3).float()
    return image, mask


def their_repaint(model, image, mask, steps, jl, jn, eta, seed, scheduler=None, f64=False):
    """diffusers' RePaintPipeline.__call__ loop (without its PIL pre/post-processing), with
    diffusers' mask convention (1 = keep): it gets 1 - mask.

    ``f64``: the same loop in float64 (the scheduler's constants, the inputs, the model),
    the noise drawn in float32 as before and converted, so it is the same noise."""
    sch = scheduler if scheduler is not None else RePaintScheduler()
    gen = torch.Generator().manual_seed(seed)
    x = randn_tensor(image.shape, generator=gen, dtype=image.dtype)
    sch.set_timesteps(steps, jl, jn)
    sch.eta = eta
    keep = 1.0 - mask
    mp = pytest.MonkeyPatch()
    if f64:
        x, image, keep = x.double(), image.double(), keep.double()
        sch.betas, sch.alphas = sch.betas.double(), sch.alphas.double()
        sch.alphas_cumprod = torch.cumprod(sch.alphas, 0)
        mod = sys.modules[type(sch).__module__]
        draw = mod.randn_tensor
        mp.setattr(mod, "randn_tensor", lambda *a, dtype=None, **k: draw(*a, **k).double())
    t_last = sch.timesteps[0] + 1
    with mp.context():
        for t in sch.timesteps:
            if t < t_last:
                out = model(x, t.reshape(1).expand(x.shape[0]))
                x = sch.step(out, t, x, image, keep, gen).prev_sample
            else:
                x = sch.undo_step(x, t_last, gen)
            t_last = t
    mp.undo()
    return x


def assert_parity(got, model, image, mask, steps, jl, jn, eta, seed, scheduler=None):
    """The FA-style whole-run bound: ours within 1e-5 of diffusers' loop in float64 (same
    noise), and within 1e-5 + diffusers' own fp32 error of its fp32 loop."""
    ref32 = their_repaint(model, image, mask, steps, jl, jn, eta, seed, scheduler)
    sch64 = None if scheduler is None else type(scheduler).from_config(scheduler.config)
    ref64 = their_repaint(model, image, mask, steps, jl, jn, eta, seed, sch64, f64=True)
    own = _rel(ref32, ref64)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, ref64) <= PARITY_RTOL, (_rel(got, ref64), own)
    assert _rel(got, ref32) <= PARITY_RTOL + own, (_rel(got, ref32), own)
    return ref32


# ------------------------------------------------------------------------------- time list
@pytest.mark.parametrize(
    "steps,jl,jn,T",
    [
        (250, 10, 10, 1000),
        (37, 7, 3, 1000),  # neither divides
        (10, 3, 2, 1000),
        (23, 4, 1, 1000),  # jump_n_sample 1: no jumps
        (5, 10, 10, 1000),  # jump_length >= steps: no jumps
        (1, 1, 1, 1000),
        (12, 1, 3, 1000),  # jump_length 1
        (30, 5, 4, 100),
        (100, 10, 2, 100),
    ],
)
def test_time_list_equals_diffusers(steps, jl, jn, T):
    sch = RePaintScheduler(num_train_timesteps=T)
    sch.set_timesteps(steps, jl, jn)
    ours = repaint_timesteps(steps, jl, jn, T)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, sch.timesteps.numpy())
    smp = RePaintSampler(NoiseSchedule("linear", num_train_timesteps=T), steps,
                         jump_length=jl, jump_n_sample=jn)  # fmt: skip
    assert torch.equal(smp.timesteps, torch.from_numpy(ours))
    ts = ours.tolist()
    reverse = [t < last for last, t in zip([ts[0] + 1, *ts[:-1]], ts, strict=True)]
    assert smp.model_calls == sum(reverse)
    # the reverse steps are `steps` levels plus (jn - 1) * jl more per jump point
    n_jumps = len(range(0, steps - jl, jl))
    assert smp.model_calls == steps + n_jumps * (jn - 1) * jl
    assert [r for r, _ in smp.plan()] == reverse


def test_model_calls_follow_the_time_list():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return toy(x, t)

    image, mask = _inputs(0)
    smp = RePaintSampler(NoiseSchedule("linear"), 20, jump_length=3, jump_n_sample=3)
    fastdiff.repaint(model, image, mask, 20, jump_length=3, jump_n_sample=3)
    ts = smp.timesteps.tolist()
    want = [t for last, t in zip([ts[0] + 1, *ts[:-1]], ts, strict=True) if t < last]
    assert [int(t[0]) for t in seen] == want
    assert all(t.dtype == torch.int64 and t.shape == (SHAPE[0],) for t in seen)


# ------------------------------------------------------------------------- whole runs, parity
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mask_kind", ["binary", "soft", "shared"])
def test_whole_run_equals_diffusers(eta, mask_kind):
    image, mask = _inputs(1, mask_kind)
    got = fastdiff.repaint(toy, image, mask, 20, jump_length=3, jump_n_sample=2, eta=eta,
                           generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert got.shape == SHAPE
    assert_parity(got, toy, image, mask, 20, 3, 2, eta, seed=5)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500),
        dict(beta_schedule="linear", num_train_timesteps=1000, clip_sample=True),
    ],
    ids=["scaled_linear-noclip", "cosine-T500", "linear"],
)
def test_schedule_from_a_repaint_scheduler(cfg):
    """schedule= a RePaintScheduler: its betas and its clip_sample (steps that do not divide T)."""
    image, mask = _inputs(2)
    sch = RePaintScheduler(**cfg)
    got = fastdiff.repaint(toy, image, mask, 33, jump_length=4, jump_n_sample=3, eta=1.0,
                           schedule=sch, generator=torch.Generator().manual_seed(9))  # fmt: skip
    ref = assert_parity(got, toy, image, mask, 33, 4, 3, 1.0, seed=9, scheduler=sch)
    # the config's clip_sample is what is used: the other setting differs
    other = fastdiff.repaint(toy, image, mask, 33, jump_length=4, jump_n_sample=3, eta=1.0,
                             schedule=sch, clip_sample=not sch.config.clip_sample,
                             generator=torch.Generator().manual_seed(9))  # fmt: skip
    assert _rel(other, ref) > 1e-3


def test_known_region_is_the_image_exactly():
    """The last step has alpha_bar_prev = 1: the known part is the clean image and the blend
    puts it where mask is 0 bit for bit (diffusers' too); where mask is 1 it is generated."""
    image, mask = _inputs(3)
    m = mask.expand_as(image)
    for eta in (0.0, 1.0):
        got = fastdiff.repaint(toy, image, mask, 15, jump_length=4, jump_n_sample=2, eta=eta)
        assert torch.equal(got[m == 0], image[m == 0])
        assert (got[m == 1] - image[m == 1]).abs().max() > 0.1
        ref = their_repaint(toy, image, mask, 15, 4, 2, eta, seed=0)
        assert torch.equal(ref[m == 0], image[m == 0])


def test_noise_generator_and_generator_lists():
    image, mask = _inputs(4)
    kw = dict(jump_length=3, jump_n_sample=2, eta=1.0)
    a = fastdiff.repaint(toy, image, mask, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = fastdiff.repaint(toy, image, mask, 12, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    # noise= is x_T, the first draw; the generator then goes on as without it
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(SHAPE, generator=g)
    assert torch.equal(fastdiff.repaint(toy, image, mask, 12, noise=x_t, generator=g, **kw), a)
    c = fastdiff.repaint(toy, image, mask, 12, generator=torch.Generator().manual_seed(8), **kw)
    assert (c - a).abs().max() > 1e-2
    # one generator per sample: each sample's run does not depend on its batch-mates
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    both = fastdiff.repaint(toy, image, mask, 12, generator=gens, **kw)
    one = fastdiff.repaint(toy, image[1:], mask[1:], 12,
                           generator=[torch.Generator().manual_seed(12)], **kw)  # fmt: skip
    torch.testing.assert_close(both[1:], one, rtol=0, atol=0)


def test_guidance_equals_manual_cfg():
    image, mask = _inputs(5)
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    w = 3.0

    def model(x, t, encoder_hidden_states):
        return toy(x, t) + 0.1 * encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)

    def manual(x, t):
        u, c = model(x, t, uncond), model(x, t, cond)
        return u + w * (c - u)

    kw = dict(jump_length=3, jump_n_sample=2, eta=1.0)
    got = fastdiff.repaint(model, image, mask, 10, cond=cond, uncond=uncond, guidance_scale=w,
                           generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    ref = fastdiff.repaint(manual, image, mask, 10, generator=torch.Generator().manual_seed(1),
                           **kw)  # fmt: skip
    assert _rel(got, ref) <= PARITY_RTOL
    plain = fastdiff.repaint(model, image, mask, 10, cond=cond,
                             generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    assert _rel(plain, ref) > 1e-3


def test_callback_and_no_host_sync_in_the_loop():
    calls = []
    image, mask = _inputs(6)
    assert_no_host_sync(
        lambda m: fastdiff.repaint(m, image, mask, 10, jump_length=3, jump_n_sample=2, eta=1.0,
                                   callback=lambda i, t, x: calls.append((i, t, x.shape))),
        toy,
    )  # fmt: skip
    ts = repaint_timesteps(10, 3, 2).tolist()
    assert calls == [(i, t, SHAPE) for i, t in enumerate(ts)]


# --------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("case", backend_cases("sampler_step"), ids=case_id)
def test_every_sampler_step_backend(case):
    """The whole run on each sampler_step backend (cpu = the C++ twin of the CUDA kernel,
    triton under TRITON_INTERPRET=1) equals diffusers' loop; also from a channels_last image."""
    dev, backend = case
    image, mask = _inputs(7, "soft")
    for img in (image, image.contiguous(memory_format=torch.channels_last)):
        with fastdiff.use_backend(backend, op="sampler_step"):
            got = fastdiff.repaint(toy, img.to(dev), mask.to(dev), 12, jump_length=3,
                                   jump_n_sample=2, eta=1.0,
                                   generator=torch.Generator().manual_seed(3))  # fmt: skip
        assert got.device.type == dev
        assert_parity(got.cpu(), toy, image, mask, 12, 3, 2, 1.0, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mask_kind", ["binary", "soft"])
def test_half_precision_fa_rule(dtype, eta, mask_kind):
    """In fp16 / bf16 (image, mask, model output in that dtype): the error vs diffusers'
    float64 loop is at most 2x diffusers' own in that dtype (measured ratio <= 0.51: the fused
    step rounds once per step); the kept region is the (rounded) image exactly."""
    image, mask = _inputs(8, mask_kind)
    ref64 = their_repaint(toy, image, mask, 20, 3, 2, eta, seed=2, f64=True)
    theirs = their_repaint(toy, image.to(dtype), mask.to(dtype), 20, 3, 2, eta, seed=2)
    got = fastdiff.repaint(toy, image.to(dtype), mask.to(dtype), 20, jump_length=3,
                           jump_n_sample=2, eta=eta,
                           generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert _rel(got, ref64) <= 2.0 * _rel(theirs, ref64), (_rel(got, ref64), _rel(theirs, ref64))
    if mask_kind == "binary":
        m = mask.expand_as(image)
        assert torch.equal(got[m == 0], image.to(dtype)[m == 0])
    # dtype= converts image and mask: the same run
    same = fastdiff.repaint(toy, image, mask, 20, jump_length=3, jump_n_sample=2, eta=eta,
                            dtype=dtype, generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(same, got)


# ------------------------------------------------------------------------- Gaussian sanity
def test_resampling_harmonises_a_correlated_gaussian():
    """Data (x1, x2) ~ N(0, [[1, rho], [rho, 1]]) with the exact eps model; keep x1, repaint
    x2. The true conditional is x2 | x1 ~ N(rho x1, 1 - rho^2). Plain replacement (one pass,
    jump_n_sample = 1) ignores much of the correlation (100 steps, rho = 0.9: measured slope
    0.63, residual variance 0.38 vs 0.19); RePaint's resampling harmonises the two (5 passes
    over jumps of 5: slope 0.83, residual variance 0.198)."""
    rho, n = 0.9, 2000
    sched = NoiseSchedule("linear")
    ab = sched.alphas_cumprod

    def model(x, t):
        a2 = ab[t].reshape(-1, 1)
        s2 = 1.0 - a2
        # eps = s (a^2 S + s^2 I)^-1 x, the inverse in closed form for S = [[1, rho], [rho, 1]]
        d, o = a2 + s2, a2 * rho
        x64 = x.double()
        inv = torch.cat([d * x64[:, :1] - o * x64[:, 1:], d * x64[:, 1:] - o * x64[:, :1]], 1)
        return (s2.sqrt() * inv / (d * d - o * o)).float()

    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(n, generator=g)
    image = torch.stack([x1, torch.zeros(n)], 1)
    mask = torch.tensor([[0.0, 1.0]])
    stats = {}
    for jn in (1, 5):
        out = fastdiff.repaint(model, image, mask, 100, jump_length=5, jump_n_sample=jn, eta=1.0,
                               clip_sample=False, schedule=sched,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert torch.equal(out[:, 0], x1)
        x2, x1d = out[:, 1].double(), x1.double()
        slope = float((x2 * x1d).mean() / (x1d**2).mean())
        resid = x2 - rho * x1d
        assert abs(float(resid.mean())) < 0.05
        stats[jn] = (slope, float(resid.var()))
    assert stats[1][0] < 0.7 and stats[1][1] > 0.3, stats
    assert stats[5][0] > 0.78 and abs(stats[5][1] - (1 - rho**2)) < 0.03, stats


# ------------------------------------------------------------------------------------ errors
def _bad(image, mask):
    return [
        (dict(image=image.long()), TypeError, "image"),
        (dict(image=[1.0]), TypeError, "image"),
        (dict(mask=mask.long()), TypeError, "mask"),
        (dict(mask=mask * 2), ValueError, r"mask: expected values in \[0, 1\]"),
        (dict(mask=mask - 0.5), ValueError, "mask"),
        (dict(mask=mask * math.nan), ValueError, "NaN"),
        (dict(mask=torch.ones(2, 2, 8, 8)), ValueError, "broadcastable"),
        (dict(mask=torch.ones(3, 1, 8, 8)), ValueError, "broadcastable"),
        (dict(mask=None), TypeError, "mask"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=1001), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(jump_length=0), ValueError, "jump_length"),
        (dict(jump_length=2.0), TypeError, "jump_length"),
        (dict(jump_length=True), TypeError, "jump_length"),
        (dict(jump_n_sample=0), ValueError, "jump_n_sample"),
        (dict(jump_n_sample="3"), TypeError, "jump_n_sample"),
        (dict(eta=math.nan), ValueError, "eta"),
        (dict(eta=math.inf), ValueError, "eta"),
        (dict(eta=-0.1), ValueError, "eta"),
        (dict(eta=1.5), ValueError, "eta"),
        (dict(eta="1"), TypeError, "eta"),
        (dict(prediction_type="x0"), ValueError, "prediction_type"),
        (dict(noise=torch.randn(2, 3, 8, 9)), ValueError, "noise"),
        (dict(noise=torch.zeros(SHAPE, dtype=torch.long)), TypeError, "noise"),
        (dict(dtype=torch.float64), TypeError, "dtype"),
        (dict(generator=[torch.Generator()]), ValueError, "generator"),
        (dict(generator="g"), TypeError, "generator"),
        (dict(guidance_scale=math.nan, cond=torch.randn(2, 4)), ValueError, "guidance_scale"),
        (dict(guidance_scale=2.0), ValueError, "cond"),
        (dict(schedule=3), TypeError, "schedule"),
        (dict(device="nope"), ValueError, "device"),
    ]


@pytest.mark.parametrize("i", range(len(_bad(*_inputs(0)))))
def test_bad_input_is_refused_before_anything_runs(i):
    image, mask = _inputs(0)
    over, exc, match = _bad(image, mask)[i]
    calls = []

    def model(x, t, **kw):
        calls.append(t)
        return toy(x, t)

    args = dict(image=image, mask=mask, steps=10)
    args.update(over)
    with pytest.raises(exc, match=match):
        fastdiff.repaint(model, args.pop("image"), args.pop("mask"), args.pop("steps"), **args)
    assert calls == []


def test_mask_on_another_device_is_refused():
    image, mask = _inputs(0)
    with pytest.raises(ValueError, match="mask: expected image's device"):
        fastdiff.repaint(toy, image, mask.to("meta"), 10)


def test_importing_the_module_keeps_fastdiff_repaint_callable():
    """``import fastdiff.repaint`` / ``from fastdiff.repaint import repaint`` bind the package
    attribute to the module (Python's import system), shadowing the lazy function: calling it
    must still run RePaint (it raised "'module' object is not callable")."""
    import subprocess

    code = (
        "from fastdiff.repaint import repaint\n"
        "import torch, fastdiff\n"
        "args = (lambda x, t: 0.1 * x, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 3)\n"
        "a = fastdiff.repaint(*args, generator=torch.Generator().manual_seed(0))\n"
        "b = repaint(*args, generator=torch.Generator().manual_seed(0))\n"
        "assert torch.equal(a, b), (a, b)\n"
        "import inspect\n"
        "assert inspect.signature(fastdiff.repaint) == inspect.signature(repaint)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
