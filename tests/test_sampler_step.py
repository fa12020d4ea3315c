"""fastdiff.ops.sampler_step: every backend vs a float64 reference (FlashAttention rule)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _dpm_step_ref import PREDS, SHAPE, dtypes
from helpers import assert_fa_rule, backend_cases, case_id, poison_
from scipy import stats

import fastdiff
from fastdiff.ops.sampler_step import dpm_solver_2m_step, philox_randn, sampler_step

CASES = backend_cases("sampler_step")
DPM_CASES = backend_cases("dpm_solver_2m_step")


def make_coef(device: str, ab: float = 0.5, ab_prev: float = 0.7) -> torch.Tensor:
    """DDIM eta=1 style coefficients (float64 on the host), plus a c_x term and log variances."""
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    beta = 1 - ab / ab_prev
    vals = [
        math.sqrt(ab),
        math.sqrt(1 - ab),
        math.sqrt(ab_prev),
        math.sqrt(1 - ab_prev - var),
        0.1,
        math.sqrt(var),
        math.log(beta),
        math.log(var),
    ]
    return torch.tensor(vals, dtype=torch.float64).float().to(device)


def reference(x, mo, coef, *, pred="epsilon", clip=None, recompute=False, g=None, lv=False,
              z=None, dtype=torch.float64):  # fmt: skip
    """The step in plain torch in ``dtype`` (float64: the reference; x's dtype: eager)."""
    c = [float(v) for v in coef.double().tolist()]
    a, s, c_x0, c_eps, c_x, c_noise, lmax, lmin = c
    n, ch = x.shape[0], x.shape[1]
    x = x.to(dtype)
    mo = mo.to(dtype)
    cond = mo[n:] if g is not None else mo
    unc = mo[:n] if g is not None else None
    var = None
    if lv:
        var, cond = cond[:, ch:], cond[:, :ch]
        unc = unc[:, :ch] if unc is not None else None
    m = cond if unc is None else unc + g * (cond - unc)
    if pred == "epsilon":
        eps, x0 = m, (x - s * m) / a
    elif pred == "v_prediction":
        x0, eps = a * x - s * m, a * m + s * x
    else:
        x0, eps = m, (x - a * m) / s
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        if recompute:
            eps = (x - a * x0) / s
    out = c_x0 * x0 + c_eps * eps + c_x * x
    if z is not None:
        sigma = c_noise
        if lv:
            f = (var + 1) / 2
            sigma = c_noise * torch.exp(0.5 * (f * lmax + (1 - f) * lmin))
        out = out + sigma * z.to(dtype)
    return out, x0


def check(out, x0, x, mo, coef, dtype, atol=0.0, **kw):
    ref, ref_x0 = reference(x, mo, coef, **kw)
    eag, eag_x0 = reference(x, mo, coef, dtype=dtype, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    assert_fa_rule(out, ref, eag, atol=atol, name="x_prev")
    if x0 is not None:
        assert_fa_rule(x0, ref_x0, eag_x0, atol=atol, name="x0")


def run(case, *args, **kw):
    with fastdiff.use_backend(case[1]):
        return sampler_step(*args, **kw)


def _poison_allocator(like: torch.Tensor, count: int = 2) -> None:
    # best effort: freed NaN-filled blocks are what the op's outputs likely get
    bufs = [poison_(torch.empty_like(like)) for _ in range(count)]
    del bufs


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("clip", ["none", "clip", "clip+recompute"])
def test_prediction_types_and_clip(case, pred, clip):
    dev = case[0]
    coef = make_coef(dev)
    for dtype in dtypes(case):
        x = torch.randn(SHAPE, device=dev).to(dtype)
        mo = torch.randn(SHAPE, device=dev).to(dtype)
        kw = dict(pred=pred, clip=None if clip == "none" else 1.0, recompute=clip.endswith("e"))
        _poison_allocator(x)
        out, x0 = run(case, x, mo, coef, prediction_type=pred, clip_range=kw["clip"],
                      recompute_eps=kw["recompute"], return_x0=True)  # fmt: skip
        check(out, x0, x, mo, coef, dtype, atol=1e-6, **kw)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("combo", ["cfg", "lv", "cfg+lv", "noise", "cfg+lv+noise+clip"])
def test_guidance_variance_noise(case, combo):
    dev = case[0]
    coef = make_coef(dev)
    for dtype in dtypes(case):
        g = 5.5 if "cfg" in combo else None
        lv = "lv" in combo
        shp = list(SHAPE)
        shp[0] *= 2 if g is not None else 1
        shp[1] *= 2 if lv else 1
        x = torch.randn(SHAPE, device=dev).to(dtype)
        mo = torch.randn(shp, device=dev).to(dtype)
        if lv:  # variance values in [-1, 1]
            mo[..., SHAPE[1] :, :, :] = torch.rand_like(mo[..., SHAPE[1] :, :, :]) * 2 - 1
        z = torch.randn(SHAPE, device=dev).to(dtype) if ("noise" in combo or lv) else None
        clip = 1.0 if "clip" in combo else None
        out, x0 = run(case, x, mo, coef, guidance_scale=g, learned_variance=lv, noise=z,
                      clip_range=clip, return_x0=True)  # fmt: skip
        check(out, x0, x, mo, coef, dtype, atol=1e-6, g=g, lv=lv, z=z, clip=clip)
        only = run(case, x, mo, coef, guidance_scale=g, learned_variance=lv, noise=z,
                   clip_range=clip)  # fmt: skip
        assert torch.equal(only, out)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp16_large_values_stay_finite(case):
    dev = case[0]
    coef = make_coef(dev)
    x = (torch.randn(SHAPE, device=dev) * 1000).half()
    mo = (torch.randn(SHAPE, device=dev) * 1000).half()
    out, x0 = run(case, x, mo, coef, return_x0=True)
    assert torch.isfinite(out).all() and torch.isfinite(x0).all()
    check(out, x0, x, mo, coef, torch.float16)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layouts(case):
    dev = case[0]
    coef = make_coef(dev)
    gs = torch.tensor([123, 456], device=dev)
    x = torch.randn(SHAPE, device=dev)
    mo = torch.randn((2 * SHAPE[0],) + SHAPE[1:], device=dev)
    base = run(case, x, mo, coef, guidance_scale=3.0, generator_state=gs, clip_range=2.0)
    # channels_last in -> channels_last out, same values (Philox index is the logical NCHW one)
    xc, mc = x.to(memory_format=torch.channels_last), mo.to(memory_format=torch.channels_last)
    out = run(case, xc, mc, coef, guidance_scale=3.0, generator_state=gs, clip_range=2.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    # channels_last learned variance: the channel split is not dense per sample -> copied
    mlv = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:], device=dev).clamp(-1, 1)
    a = run(case, x, mlv, coef, learned_variance=True, generator_state=gs)
    b = run(case, xc, mlv.to(memory_format=torch.channels_last), coef, learned_variance=True,
            generator_state=gs)  # fmt: skip
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # non-contiguous slices (batch and channel strides)
    big = torch.randn(2 * SHAPE[0], 2 * SHAPE[1], *SHAPE[2:], device=dev)
    xs, ms = big[::2, ::2], big[1::2, 1::2]
    out, x0 = run(case, xs, ms, coef, return_x0=True, prediction_type="v_prediction")
    assert out.is_contiguous()
    check(out, x0, xs, ms, coef, torch.float32, atol=1e-6, pred="v_prediction")
    # batch-sliced x (per-sample dense, batch stride > inner): no copy needed
    xb = big[::2, : SHAPE[1]]
    mb = torch.randn(SHAPE, device=dev)
    check(run(case, xb, mb, coef), None, xb, mb, coef, torch.float32, atol=1e-6)
    # odd and degenerate shapes
    for shp in [(1, 1, 1, 1), (2, 5), (5, 3, 1, 9), (2, 2, 3, 3, 3), (0, 3, 4, 4)]:
        xo, mo2 = torch.randn(shp, device=dev), torch.randn(shp, device=dev)
        check(run(case, xo, mo2, coef), None, xo, mo2, coef, torch.float32, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_in_nan_out(case):
    dev = case[0]
    coef = make_coef(dev)
    x = torch.randn(SHAPE, device=dev)
    mo = torch.randn(SHAPE, device=dev)
    x.view(-1)[5] = float("nan")
    mo.view(-1)[17] = float("nan")
    for pred in PREDS:
        out, x0 = run(case, x, mo, coef, prediction_type=pred, clip_range=1.0, return_x0=True,
                      generator_state=torch.tensor([1, 2], device=dev))  # fmt: skip
        nan = torch.isnan(out.view(-1))
        assert nan[5] and nan[17] and int(nan.sum()) == 2, pred
        assert torch.isnan(x0.view(-1)[17])


def _randn(case, shape, seed, offset, channels_last=False):
    dev = case[0]
    gs = torch.tensor([seed, offset], device=dev, dtype=torch.int64)
    x = torch.zeros(shape, device=dev)
    mo = torch.zeros(shape, device=dev)
    if channels_last:
        x, mo = x.to(memory_format=torch.channels_last), mo.to(memory_format=torch.channels_last)
    coef = torch.tensor([1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.float32, device=dev)
    return run(case, x, mo, coef, generator_state=gs)  # x_prev = 1 * z


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_philox_noise(case):
    shape = (4, 3, 16, 16)
    z = _randn(case, shape, 42, 0)
    assert torch.equal(z, _randn(case, shape, 42, 0))  # deterministic
    assert not torch.equal(z, _randn(case, shape, 42, 1))  # offset moves the stream
    assert not torch.equal(z, _randn(case, shape, 43, 0))  # so does the seed
    # counter layout: element e is lane e % 4 of counter offset + e // 4
    n = z[0].numel()
    tail = _randn(case, (3, 3, 16, 16), 42, n // 4)
    torch.testing.assert_close(tail, z[1:], rtol=0, atol=1e-5)
    # all four lanes of a counter are distinct normals (none discarded or repeated)
    quads = z.flatten().reshape(-1, 4)
    assert (quads[:, :, None] != quads[:, None, :]).sum().item() == quads.shape[0] * 12
    # odd sizes: tiles and samples start mid-counter; the stream is still the flat one
    odd = (3, 3, 17, 19)
    flat = _randn(case, (math.prod(odd),), 42, 5).reshape(odd)
    torch.testing.assert_close(_randn(case, odd, 42, 5), flat, rtol=0, atol=1e-5)
    # channels_last with C > the CPU tile: scattered logical runs per channel
    wide = (2, 600, 3, 2)
    zc = _randn(case, wide, 7, 3, channels_last=True)
    torch.testing.assert_close(zc, _randn(case, wide, 7, 3), rtol=0, atol=1e-5)
    # same stream as the torch reference (which matches Triton's tl.randn), across 2^32
    ref = philox_randn(torch.tensor([2**40 + 3, 2**32 - 100]), shape)
    got = _randn(case, shape, 2**40 + 3, 2**32 - 100).cpu()
    assert (got - ref).abs().max().item() <= 1e-5
    # N(0, 1)
    assert stats.kstest(z.flatten().cpu().double().numpy(), "norm").pvalue > 1e-3


def test_philox_cpu_long_runs_and_wide_channels_last():
    """cpu noise vs the torch reference: runs longer than a CPU tile (2048 elements) that start
    at every counter lane and both sides of a 2^32 counter wrap (the AVX2 generator pipelines
    8-counter groups across each run), and channels_last with C > the tile."""
    case = ("cpu", "cpu")
    for seed, offset, shape in [
        (3, 2**32 - 300, (2, 1, 3001)),  # odd runs: samples start mid-counter
        (-11, 7, (3, 1, 2053)),
        (2**62 + 5, 2**40 - 1, (1, 4, 1031)),
    ]:
        got = _randn(case, shape, seed, offset)
        ref = philox_randn(torch.tensor([seed, offset]), shape)
        assert (got - ref).abs().max().item() <= 1e-5, (seed, offset, shape)
    wide = (2, 2100, 2, 3)  # channels_last with C > the CPU tile
    zc = _randn(case, wide, 9, 2**32 - 1000, channels_last=True)
    ref = philox_randn(torch.tensor([9, 2**32 - 1000]), wide)
    assert zc.is_contiguous(memory_format=torch.channels_last)
    assert (zc - ref).abs().max().item() <= 1e-5


@pytest.mark.skipif(
    not ({"cpu", "triton"} <= {b for d, b in CASES if d == "cpu"}),
    reason="needs the cpu backend and triton under TRITON_INTERPRET=1",
)
def test_philox_cpu_matches_triton():
    cases = [(0, 0), (-7, 12345), (2**63 - 1, 2**32 - 17)]
    for (seed, offset), shape in itertools.product(cases, [(2, 3, 9, 7), (2, 4, 8, 8)]):
        a = _randn(("cpu", "cpu"), shape, seed, offset)  # (2, 4, 8, 8): Triton's 4-lane path
        b = _randn(("cpu", "triton"), shape, seed, offset)
        assert (a - b).abs().max().item() <= 1e-5


def test_bad_inputs():
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE)
    coef = make_coef("cpu")
    before = (x.clone(), mo.clone(), coef.clone())
    with pytest.raises(TypeError, match="x must be"):
        sampler_step(x.int(), mo, coef)
    with pytest.raises(TypeError, match="model_output"):
        sampler_step(x, mo.long(), coef)
    with pytest.raises(TypeError, match="coef"):
        sampler_step(x, mo, coef.double())
    with pytest.raises(ValueError, match="coef must have >= 8"):
        sampler_step(x, mo, coef[:4])
    with pytest.raises(ValueError, match="model_output is on meta"):
        sampler_step(x, mo.to("meta"), coef)
    with pytest.raises(ValueError, match="coef is on meta"):
        sampler_step(x, mo, coef.to("meta"))
    with pytest.raises(ValueError, match="model_output must have shape"):
        sampler_step(x, mo[:, :2], coef)
    with pytest.raises(ValueError, match="valid: \\['epsilon', 'sample', 'v_prediction'\\]"):
        sampler_step(x, mo, coef, prediction_type="flow")
    with pytest.raises(ValueError, match="batch 2N"):
        sampler_step(x, mo, coef, guidance_scale=7.5)
    with pytest.raises(ValueError, match="model_output must have shape"):
        sampler_step(x, mo, coef, learned_variance=True)
    with pytest.raises(ValueError, match="at most one"):
        sampler_step(x, mo, coef, noise=mo, generator_state=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="generator_state"):
        sampler_step(x, mo, coef, generator_state=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="generator_state must have shape"):
        sampler_step(x, mo, coef, generator_state=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="generator_state is on meta"):
        sampler_step(x, mo, coef, generator_state=torch.tensor([1, 2], device="meta"))
    with pytest.raises(TypeError, match="noise"):
        sampler_step(x, mo, coef, noise=mo.int())
    with pytest.raises(ValueError, match="noise must have"):
        sampler_step(x, mo, coef, noise=mo[:1])
    with pytest.raises(ValueError, match="x0_prev must have"):
        dpm_solver_2m_step(x, mo, coef, x[:1])
    with pytest.raises(ValueError, match="valid"):
        dpm_solver_2m_step(x, mo, coef, prediction_type="eps")
    # the inputs were not touched by the failed calls
    assert all(torch.equal(a, b) for a, b in zip((x, mo, coef), before, strict=True))


DPM_COEF = [0.8, 0.6, 0.9, 0.35, -0.12]


def dpm_reference(x, mo, prev, pred, dt, with_prev):
    """DPM-Solver++ 2M update in plain torch in ``dt`` (CFG 2.0, clip 1.5)."""
    c = [float(torch.tensor(v, dtype=torch.float32)) for v in DPM_COEF]
    dcoef = torch.tensor([c[0], c[1], c[3], 0, 0, 0, 0, 0])
    _, x0r = reference(x, mo, dcoef, pred=pred, clip=1.5, g=2.0, dtype=dt)
    o = c[2] * x.to(dt) + c[3] * x0r
    return (o + c[4] * prev.to(dt) if with_prev else o), x0r


@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
@pytest.mark.parametrize("pred", PREDS)
def test_dpm_solver_2m(case, pred):
    dev = case[0]
    coef = torch.tensor(DPM_COEF + [0, 0, 0], device=dev)
    for dtype in dtypes(case):
        x = torch.randn(SHAPE, device=dev).to(dtype)
        mo = torch.randn((2 * SHAPE[0],) + SHAPE[1:], device=dev).to(dtype)
        prev = torch.randn(SHAPE, device=dev).to(dtype)
        with fastdiff.use_backend(case[1]):
            out, x0 = dpm_solver_2m_step(x, mo, coef, prev, prediction_type=pred,
                                         guidance_scale=2.0, clip_range=1.5)  # fmt: skip
            first, x0b = dpm_solver_2m_step(x, mo, coef, None, prediction_type=pred,
                                            guidance_scale=2.0, clip_range=1.5)  # fmt: skip

        r, rx0 = dpm_reference(x, mo, prev, pred, torch.float64, True)
        e, ex0 = dpm_reference(x, mo, prev, pred, dtype, True)
        assert_fa_rule(out, r, e, atol=1e-6, name="x_next")
        assert_fa_rule(x0, rx0, ex0, atol=1e-6, name="x0")
        r1, _ = dpm_reference(x, mo, prev, pred, torch.float64, False)
        e1, _ = dpm_reference(x, mo, prev, pred, dtype, False)
        assert_fa_rule(first, r1, e1, atol=1e-6, name="first order")
        assert torch.equal(x0, x0b)


GRAD_COMBOS = {  # name: (prediction, clip, recompute, guidance, learned variance, noise)
    "eps-clip-noise": ("epsilon", 1.0, False, None, False, "tensor"),
    "v-cfg": ("v_prediction", None, False, 3.0, False, None),
    "sample-lv-philox": ("sample", None, False, None, True, "philox"),
    "eps-clip-recompute-cfg": ("epsilon", 0.8, True, 2.0, False, None),
}


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("combo", sorted(GRAD_COMBOS))
def test_backward_matches_autograd_of_the_float64_reference(case, combo):
    """Gradients of x_prev and x0 w.r.t. x, the model output and the noise tensor (the op's
    backward recomputes through the torch reference) vs autograd of the plain float64 step; the
    Philox offset advanced in place after the forward (as the samplers do) changes nothing."""
    dev = case[0]
    pred, clip, recompute, g, lv, noise = GRAD_COMBOS[combo]
    coef = make_coef(dev)
    shp = [SHAPE[0] * (2 if g else 1), SHAPE[1] * (2 if lv else 1), *SHAPE[2:]]
    x = torch.randn(SHAPE, device=dev, requires_grad=True)
    mo = torch.randn(shp, device=dev)
    if lv:
        mo[:, SHAPE[1] :] = mo[:, SHAPE[1] :].tanh()  # variance values in [-1, 1]
    mo.requires_grad_(True)
    z = torch.randn(SHAPE, device=dev, requires_grad=True) if noise == "tensor" else None
    gs = torch.tensor([77, 5], device=dev) if noise == "philox" else None
    out, x0 = run(case, x, mo, coef, prediction_type=pred, clip_range=clip,
                  recompute_eps=recompute, guidance_scale=g, learned_variance=lv, noise=z,
                  generator_state=gs, return_x0=True)  # fmt: skip
    assert out.requires_grad and x0.requires_grad
    w1, w2 = torch.randn_like(out), torch.randn_like(x0)
    leaves = [x, mo] + ([z] if z is not None else [])
    if gs is not None:
        zr = philox_randn(gs, SHAPE).double()
        gs[1] += 10_000  # the sampler advances the offset before any backward
    else:
        zr = z
    loss = (out * w1).sum() + (x0 * w2).sum()
    got = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    zr = ref_leaves[2] if z is not None else zr
    ro, rx0 = reference(ref_leaves[0], ref_leaves[1], coef, pred=pred, clip=clip,
                        recompute=recompute, g=g, lv=lv, z=zr)  # fmt: skip
    rloss = (ro * w1.double()).sum() + (rx0 * w2.double()).sum()
    want = torch.autograd.grad(rloss, ref_leaves)
    for name, a, b in zip(("x", "model_output", "noise"), got, want, strict=False):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
def test_dpm_solver_2m_backward(case):
    dev = case[0]
    coef = torch.tensor(DPM_COEF + [0, 0, 0], device=dev)
    x, prev = (torch.randn(SHAPE, device=dev, requires_grad=True) for _ in range(2))
    mo = torch.randn((2 * SHAPE[0],) + SHAPE[1:], device=dev, requires_grad=True)
    with fastdiff.use_backend(case[1]):
        out, x0 = dpm_solver_2m_step(x, mo, coef, prev, prediction_type="v_prediction",
                                     guidance_scale=2.0, clip_range=1.5)  # fmt: skip
    w1, w2 = torch.randn_like(out), torch.randn_like(x0)
    got = torch.autograd.grad((out * w1).sum() + (x0 * w2).sum(), [x, mo, prev])
    leaves = [t.detach().double().requires_grad_(True) for t in (x, mo, prev)]
    r, rx0 = dpm_reference(*leaves, "v_prediction", torch.float64, True)
    want = torch.autograd.grad((r * w1.double()).sum() + (rx0 * w2.double()).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def _opcheck_args(dev):
    x = torch.randn(2, 3, 4, 5, device=dev)
    mo = torch.randn(4, 6, 4, 5, device=dev).clamp(-1, 1)
    coef = make_coef(dev)
    gs = torch.tensor([1, 2], device=dev)
    return x, mo, coef, gs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_opcheck_sampler_step(case):
    x, mo, coef, gs = _opcheck_args(case[0])
    op = torch.ops.fastdiff.sampler_step.default
    torch.library.opcheck(op, (x, mo, coef, None, gs, case[1], 1, 1.0, True, 2.0, True, True))
    xc = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(op, (xc, mo[:2, :3], coef, x, None, case[1], 0, None, False, None,
                               False, False))  # fmt: skip
    xg, mg = x.clone().requires_grad_(True), mo.clone().requires_grad_(True)  # + the autograd
    torch.library.opcheck(op, (xg, mg, coef, None, gs, case[1], 1, 1.0, True, 2.0, True, True))


@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
def test_opcheck_dpm_solver_2m_step(case):
    x, mo, coef, _ = _opcheck_args(case[0])
    op = torch.ops.fastdiff.dpm_solver_2m_step.default
    torch.library.opcheck(op, (x, mo[:, :3], coef, x * 2, None, None, case[1], 2, 1.0, 3.0))
    torch.library.opcheck(op, (x, mo[:2, :3], coef, None, None, None, case[1], 0, None, None))
    xg, mg = x.clone().requires_grad_(True), mo[:, :3].clone().requires_grad_(True)
    torch.library.opcheck(op, (xg, mg, coef, x * 2, None, None, case[1], 1, 1.0, 3.0))


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_cpu_eager_fast_path_matches_op():
    # the public functions skip the custom op (cached launch geometry); results, dtypes and
    # layouts must equal the op's, for dense, channels_last, sliced and cast operands alike
    coef = make_coef("cpu")
    gs = torch.tensor([5, 9])
    op = torch.ops.fastdiff.sampler_step.default
    big = torch.randn(4, 6, 5, 7)
    cases = [
        (torch.randn(2, 3, 5, 7), torch.randn(4, 6, 5, 7), 2.0, True),
        (big[::2, :3].to(memory_format=torch.channels_last), torch.randn(2, 3, 5, 7), None, False),
        (big[1::2, 3:], big[::2, :3].half(), None, False),
    ]
    for x, mo, g, lv in cases:
        for _ in range(2):  # second call: cached plan
            got, gx0 = sampler_step(x, mo, coef, guidance_scale=g, learned_variance=lv,
                                    generator_state=gs, clip_range=1.0, return_x0=True)  # fmt: skip
            ref, rx0 = op(x, mo, coef, None, gs, "cpu", 0, 1.0, False, g, lv, True)
            for a, b in ((got, ref), (gx0, rx0)):
                assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
        prev = torch.randn_like(x)
        got = dpm_solver_2m_step(x, mo[:, : x.shape[1]] if lv else mo, coef, prev, guidance_scale=g)
        ref = torch.ops.fastdiff.dpm_solver_2m_step.default(
            x, mo[:, : x.shape[1]] if lv else mo, coef, prev, None, None, "cpu", 0, None, g
        )
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


CUDA_BACKENDS = [b for d, b in CASES if d == "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["cuda"])
def test_cuda_graph_capture_and_coef_update(backend):
    dev = "cuda"
    x = torch.randn(4, 4, 16, 16, device=dev)
    mo = torch.randn(8, 4, 16, 16, device=dev)
    coef = make_coef(dev)
    gs = torch.tensor([7, 0], device=dev)
    with fastdiff.use_backend(backend):
        for _ in range(2):  # warm up (compilation, autotune) outside the capture
            sampler_step(x, mo, coef, guidance_scale=4.0, generator_state=gs, clip_range=1.0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sampler_step(x, mo, coef, guidance_scale=4.0, generator_state=gs,
                               clip_range=1.0)  # fmt: skip
        for ab, ab_prev, off in [(0.3, 0.5, 0), (0.6, 0.8, x.numel())]:
            coef.copy_(make_coef(dev, ab, ab_prev))
            gs[1] = off
            graph.replay()
            torch.cuda.synchronize()
            z = philox_randn(gs, tuple(x.shape))
            ref, _ = reference(x, mo, coef, g=4.0, clip=1.0, z=z)
            eag, _ = reference(x, mo, coef, g=4.0, clip=1.0, z=z, dtype=torch.float32)
            assert_fa_rule(out, ref, eag, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["cuda"])
def test_cuda_large_batch_grid_limit(backend):
    dev = "cuda"
    x = torch.randn(70000, 3, 8, 8, device=dev)
    mo = torch.randn_like(x)
    coef = make_coef(dev)
    gs = torch.tensor([3, 5], device=dev)
    with fastdiff.use_backend(backend):
        out = sampler_step(x, mo, coef, generator_state=gs)
    with fastdiff.use_backend("torch"):
        ref = sampler_step(x, mo, coef, generator_state=gs)
    assert (out - ref).abs().max().item() <= 1e-4


def test_common_case_checks_exact():
    """The cheaper checks of the common case (no CFG, no learned variance, float clip_range)
    give the same verdicts and messages as the general ones, and clip_range of every accepted
    form (float, int, float subclass, one-element tensor) gives the same step."""
    x = torch.randn(SHAPE)
    mo = torch.randn(SHAPE)
    coef = make_coef("cpu")
    out = poison_(torch.empty(SHAPE))
    want = (
        f"sampler_step: model_output must have shape {tuple(SHAPE)} for x of shape {tuple(SHAPE)} "
        f"(guidance_scale=None, learned_variance=False), got {tuple(mo[:, :2].shape)}"
    )
    with pytest.raises(ValueError) as e:
        sampler_step(x, mo[:, :2], coef, clip_range=1.0)
    assert str(e.value) == want
    with pytest.raises(ValueError, match=r"must have shape .* got \(3, 3, 5, 7\)"):
        sampler_step(x, mo.reshape(3, 3, 5, 7), coef)  # same numel, other shape
    with pytest.raises(ValueError, match=r"must have shape .* got \(3, 3, 7, 5, 1\)"):
        sampler_step(x, mo[..., None], coef)
    with pytest.raises(ValueError, match=r"generator_state must have shape \(2,\), got \(2, 1\)"):
        sampler_step(x, mo, coef, generator_state=torch.tensor([[1], [2]]))
    with pytest.raises(TypeError, match="clip_range must be a real number or None, got bool"):
        sampler_step(x, mo, coef, clip_range=True)
    with pytest.raises(ValueError, match="clip_range must be a float >= 0"):
        sampler_step(x, mo, coef, clip_range=-1.0)

    class F(float):
        pass

    ref = sampler_step(x, mo, coef, clip_range=1.0)
    for c in (F(1.0), 1, torch.tensor(1.0), torch.tensor([1.0], dtype=torch.float64)):
        out.copy_(sampler_step(x, mo, coef, clip_range=c))
        assert torch.equal(out, ref), c
    assert not torch.equal(sampler_step(x, mo, coef, clip_range=0.5), ref)


def _spy_checks(monkeypatch) -> list[int]:
    """Count the calls of the full validation (_check_common) of the public functions; start
    with an empty validated-call cache."""
    import fastdiff.ops._sampler_step_kernels as kernels
    import fastdiff.ops.sampler_step as mod

    monkeypatch.setattr(kernels, "_VALIDATED", {})

    calls = []
    real = mod._check_common

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(mod, "_check_common", spy)
    return calls


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_validated_cache_hits_equal_the_op(monkeypatch):
    # a repeat of a validated cpu call skips the checks (the spy sees one call per combination)
    # and gives exactly the op's result, for every operand kind the cache handles
    calls = _spy_checks(monkeypatch)
    coef = make_coef("cpu")
    gs = torch.tensor([11, 7])
    big = torch.randn(4, 6, 5, 7)
    op = torch.ops.fastdiff.sampler_step.default
    cases = [  # x, mo, noise, gen, g, lv, clip, recompute, return_x0, pred
        (torch.randn(3, 3, 7, 5), torch.randn(3, 3, 7, 5), None, gs, None, False, 1.0, False,
         False, "epsilon"),
        (torch.randn(2, 3, 5, 7), big, None, gs, 2.5, True, 0.8, True, True, "v_prediction"),
        (torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
         torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
         torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last), None, None, False, None,
         False, True, "sample"),
        (torch.randn(2, 3, 5, 7).half(), torch.randn(4, 3, 5, 7), None, None, 3.0, False, None,
         False, False, "epsilon"),
        (torch.randn(0, 3, 5, 7), torch.randn(0, 3, 5, 7), None, gs, None, False, None, False,
         True, "epsilon"),
    ]  # fmt: skip
    for x, mo, z, gen, g, lv, clip, rec, rx0, pred in cases:
        kw = dict(prediction_type=pred, clip_range=clip, recompute_eps=rec, guidance_scale=g,
                  learned_variance=lv, noise=z, generator_state=gen, return_x0=rx0)  # fmt: skip
        before = len(calls)
        ref = op(x, mo, coef, z, gen, "cpu", PRED_CODE[pred], clip, rec, g, lv, rx0)
        for _ in range(3):
            got = sampler_step(x, mo, coef, **kw)
            got = got if rx0 else (got, None)
            for a, b in zip(got, ref, strict=False):
                if a is not None:
                    assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
        assert len(calls) == before + 1  # only the first call was validated
    # dpm_solver_2m_step: with and without x0_prev, with CFG and clipping
    x, mo, prev = torch.randn(2, 3, 5, 7), torch.randn(4, 3, 5, 7), torch.randn(2, 3, 5, 7)
    for p in (prev, None):
        before = len(calls)
        ref = torch.ops.fastdiff.dpm_solver_2m_step.default(x, mo, coef, p, None, None, "cpu", 1,
                                                            1.5, 2.0)  # fmt: skip
        for _ in range(3):
            got = dpm_solver_2m_step(x, mo, coef, p, prediction_type="v_prediction",
                                     clip_range=1.5, guidance_scale=2.0)  # fmt: skip
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        assert len(calls) == before + 1


PRED_CODE = {"epsilon": 0, "v_prediction": 1, "sample": 2}


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_validated_cache_rechecks_every_change(monkeypatch):
    # after a cached call, any change of what the checks read is validated again: bad inputs
    # raise the general path's errors with nothing written, and other paths are taken anew
    calls = _spy_checks(monkeypatch)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    coef = make_coef("cpu")
    gs = torch.tensor([5, 3])
    before = (x.clone(), mo.clone(), coef.clone(), gs.clone())

    def step(*a, **kw):
        return sampler_step(*a, **{"clip_range": 1.0, "generator_state": gs, **kw})

    ref = step(x, mo, coef)
    assert torch.equal(step(x, mo, coef), ref) and len(calls) == 1  # cached
    bad = [  # (args, kwargs, error, match)
        ((x, mo, coef), dict(clip_range=True), TypeError, "clip_range must be a real number"),
        ((x, mo, coef), dict(clip_range=-1.0), ValueError, "clip_range must be a float >= 0"),
        ((x, mo, coef), dict(guidance_scale=math.nan), ValueError, "guidance_scale must be"),
        ((x, mo, coef), dict(prediction_type="flow"), ValueError, "unknown prediction_type"),
        ((x, mo, coef.double()), {}, TypeError, "coef must be a float32 tensor"),
        ((x, mo.to("meta"), coef), {}, ValueError, "model_output is on meta"),
        ((x, mo, coef.to("meta")), {}, ValueError, "coef is on meta"),
        ((x, mo.int(), coef), {}, TypeError, "model_output must be float32"),
        ((x, mo, coef), dict(generator_state=gs.int()), TypeError, "generator_state must be"),
        ((x, mo, coef), dict(generator_state=gs.to("meta")), ValueError, "generator_state is on"),
        ((x, mo, coef), dict(noise=mo), ValueError, "at most one"),
        ((x, mo, coef), dict(learned_variance=True), ValueError, "model_output must have shape"),
    ]  # fmt: skip
    for args, kw, err, match in bad:
        with pytest.raises(err, match=match):
            step(*args, **kw)
    # an int clip_range is cached under its type: True (== 1, same hash) is still refused
    for _ in range(2):
        assert torch.equal(step(x, mo, coef, clip_range=1), ref)
    n = len(calls)
    with pytest.raises(TypeError, match="clip_range must be a real number or None, got bool"):
        step(x, mo, coef, clip_range=True)
    assert len(calls) == n + 1
    # a tensor whose metadata changed in place is rechecked
    short = make_coef("cpu")
    assert torch.equal(step(x, mo, short), ref)
    short.resize_(4)
    with pytest.raises(ValueError, match="coef must have >= 8"):
        step(x, mo, short)
    # a tensor clip_range is never cached: its value can change in place
    c = torch.tensor(1.0)
    assert torch.equal(step(x, mo, coef, clip_range=c), ref)
    assert torch.equal(step(x, mo, coef, clip_range=c), ref)
    c.fill_(-1.0)
    with pytest.raises(ValueError, match="clip_range must be a float >= 0"):
        step(x, mo, coef, clip_range=c)
    assert all(torch.equal(a, b) for a, b in zip((x, mo, coef, gs), before, strict=True))
    # a strided generator state is copied, never read in place by a cached launch
    wide = torch.tensor([5, 0, 3, 0])[::2]
    for _ in range(2):
        assert torch.equal(step(x, mo, coef, generator_state=wide), ref)
    # autograd, a dispatch mode and another backend take their own paths after a cached call
    xg = x.clone().requires_grad_(True)
    out = step(xg, mo, coef)
    assert out.requires_grad and torch.equal(out.detach(), ref)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        assert torch.equal(step(x, mo, coef), ref)
    assert any("fastdiff.sampler_step" in o for o in mode.ops), mode.ops
    want = torch.ops.fastdiff.sampler_step.default(x, mo, coef, None, gs, "torch", 0, 1.0, False,
                                                   None, False, False)[0]  # fmt: skip
    assert not torch.equal(want, ref)  # the torch backend's noise differs in the last bits
    with fastdiff.use_backend("torch", "sampler_step"):
        assert torch.equal(step(x, mo, coef), want)
    assert torch.equal(step(x, mo, coef), ref)


@pytest.mark.skipif(("cpu", "cpu") not in CASES, reason="needs the cpu backend")
def test_planned_binding_errors():
    # the METH_FASTCALL entry point converts its arguments and the kernel's errors itself
    from fastdiff import _ext

    c = _ext.native()
    x, mo, out = torch.randn(2, 3), torch.randn(2, 3), poison_(torch.empty(2, 3))
    coef = make_coef("cpu")
    plan = c.sampler_step_cpu_plan(0, 2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, False, False,
                                   False, False)  # fmt: skip
    ptrs = [x.data_ptr(), mo.data_ptr(), 0, 0, coef.data_ptr(), out.data_ptr(), 0]
    with pytest.raises(TypeError, match="takes 10 to 14 arguments, got 9"):
        c.sampler_step_cpu_run(plan, *ptrs, 0.0)
    with pytest.raises(ValueError, match="PyCapsule"):
        c.sampler_step_cpu_run(object(), *ptrs, 0.0, 0.0)
    with pytest.raises(TypeError):
        c.sampler_step_cpu_run(plan, *ptrs[:-1], "0", 0.0, 0.0)
    with pytest.raises(TypeError):
        c.sampler_step_cpu_run(plan, *ptrs, "1.0", 0.0)
    bad = list(ptrs)
    bad[0] = 0
    with pytest.raises(ValueError, match="sampler_step: null operand"):
        c.sampler_step_cpu_run(plan, *bad, 0.0, 0.0)
    assert torch.isnan(out).all()  # nothing was written by the failed calls
    with pytest.raises(ValueError, match="prediction type code"):
        c.sampler_step_cpu_plan(0, 2, 3, 0, 3, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 7, False, False,
                                False, False)  # fmt: skip
    c.sampler_step_cpu_run(plan, *ptrs, 0.0, 0.0)
    ref = torch.ops.fastdiff.sampler_step.default(x, mo, coef, None, None, "cpu", 0, None, False,
                                                  None, False, False)[0]  # fmt: skip
    assert torch.equal(out, ref)


def test_fullgraph_compile_after_cached_calls():
    # torch.compile traces the custom op, never the validated-call cache (eager calls first, so
    # the cache holds this exact combination)
    x, mo, prev = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    coef = make_coef("cpu")
    gs = torch.tensor([3, 1])

    def fn(x, mo, prev):
        a = sampler_step(x, mo, coef, clip_range=1.0, generator_state=gs)
        return a, dpm_solver_2m_step(x, mo, coef, prev)[0]

    want = [fn(x, mo, prev) for _ in range(2)][1]
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, mo, prev)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
