"""UniPC solver_order=3 (UniP-3 / UniC-3): the sampler vs diffusers' UniPCMultistepScheduler step
by step and over whole runs, the unipc_step op's order-3 operands (m_prev3, c_m3, p_m2) on every
backend vs a float64 reference (FlashAttention rule), validation, the cpu call cache, opcheck, the
CUDA-graph step body on CPU and the CLI. (A whole order-3 run on every backend: test_unipc's
test_unipc_sampler_on_every_backend_matches_the_reference[order3].)"""

from __future__ import annotations

import os

import pytest
import torch
from _unipc_ref import eager as _eager
from _unipc_ref import graph_body_runs, whole_runs
from _unipc_ref import inputs as _inputs
from _unipc_ref import ref64 as _ref64
from helpers import (
    DIFFUSERS_BETAS,
    PARITY_SHAPE,
    assert_fa_rule,
    backend_cases,
    case_id,
    poison_,
    stable_seed,
)
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops.unipc_step import COEF_LEN, unipc_step
from fastdiff.samplers import UniPCSampler

diffusers = pytest.importorskip("diffusers")

SHAPE = PARITY_SHAPE
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _pair(steps: int, sched: str = "scaled_linear", **opts):
    cfg = dict(DIFFUSERS_BETAS[sched])
    theirs = diffusers.UniPCMultistepScheduler(**cfg, solver_order=3, **opts)
    theirs.set_timesteps(steps)
    return UniPCSampler(NoiseSchedule.from_diffusers(cfg), steps, solver_order=3, **opts), theirs


def _twin(theirs):
    """diffusers' scheduler as ``theirs``, stepping in float64 on its own (float32-valued) noise
    levels: the reference for the arithmetic of both sides."""
    twin = diffusers.UniPCMultistepScheduler.from_config(theirs.config)
    twin.set_timesteps(theirs.num_inference_steps)
    twin.sigmas = twin.sigmas.double()
    return twin


def _loop(ours, theirs, *, begin: int = 0, seed: int = 0) -> float:
    """Both samplers over the run, each step fed diffusers' previous output; the worst per-step
    relative error. Each step also against diffusers' step in float64 (:func:`_twin`): ours may
    err at most 2x diffusers' own fp32 error plus 2^-23 (the FlashAttention rule)."""
    assert torch.equal(ours.timesteps, theirs.timesteps.to(torch.int64))
    twin = _twin(theirs)
    if begin:
        theirs.set_begin_index(begin)
        twin.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    worst = 0.0
    for i in range(begin, len(ours)):
        mo = 0.6 * torch.randn(x.shape, generator=g) + 0.4 * x.clamp(-3, 3)
        ref = theirs.step(mo, theirs.timesteps[i], x).prev_sample
        ref64 = twin.step(mo.double(), twin.timesteps[i], x.double()).prev_sample
        got = ours.step(mo, i, x)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        if not torch.isfinite(ref).all():
            assert i == len(ours) - 1
            if ours.final_sigmas_type == "zero":
                # bh1 to sigma 0: B(h) = -h = -inf times a zero residual; the limit is m_{n-1}
                assert ours.solver_type == "bh1"
                ref = theirs.model_outputs[-1]
                ref64 = twin.model_outputs[-1]
            else:
                # sigma_min to sigma_min (h = 0) at order 3: diffusers' 2 x 2 solve is 0 / 0;
                # the step is the identity (as diffusers' order 2 gives): x_n = x_c
                assert not ours.lower_order_final
                assert torch.equal(got, ours._last)
                x = ref
                continue
        worst = max(worst, _rel(got, ref))
        err64, own = _rel(got, ref64), _rel(ref, ref64)
        assert err64 <= 2 * own + 2**-23, f"step {i}: vs float64 {err64:.2e}, diffusers' {own:.2e}"
        x = ref
    assert worst <= RTOL, f"rel err {worst:.2e}"
    return worst


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("lof", [True, False], ids=["lof", "no-lof"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_unipc3_parity(steps, solver_type, lof, pred):
    """Per step vs diffusers' fp32 step <= RTOL (1e-5), and vs its float64 step <= 2x its own
    fp32 error (:func:`_loop`). Our steps run between diffusers' float32 noise levels, as
    diffusers' do. With float64 levels at the steps and diffusers' float32 sigma_min as the end
    (9c122ed) the two schedules met at the last step (sigma at t = 50 is 2.7e-6 off):
    v_prediction-no-lof-20 sat at 0.92 (seed 0) to 1.01 x RTOL, and vs diffusers' float64 step
    ours erred 9.6e-6..1.05e-5 where diffusers' own fp32 erred <= 4.6e-6 (10.7x the rule; sample
    10.6x, epsilon 1.9x). With float32 levels, over 20 seeds x bh1/bh2 x 3 predictions (20
    steps, no-lof): <= 4.6e-6 vs diffusers, <= 4.1e-6 vs float64 (<= 0.79 of the rule)."""
    opts = dict(solver_type=solver_type, lower_order_final=lof, prediction_type=pred)
    if not lof:  # lower_order_final=False to sigma 0 is refused (diffusers: inf / NaN)
        opts["final_sigmas_type"] = "sigma_min"
    _loop(*_pair(steps, **opts))


@pytest.mark.parametrize(
    "opts",
    [
        dict(use_karras_sigmas=True),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
        dict(disable_corrector=[0, 3]),
        dict(disable_corrector=[1, 2, 5], solver_type="bh1"),
        dict(timestep_spacing="trailing", prediction_type="v_prediction"),
        dict(thresholding=True, sample_max_value=1.5),
        dict(use_exponential_sigmas=True),
    ],
    ids=["karras", "karras-min-no-lof", "no-corr", "no-corr-bh1", "trailing-v", "thresh", "exp"],
)
@pytest.mark.parametrize("steps", [6, 20])
def test_unipc3_parity_options(opts, steps):
    _loop(*_pair(steps, "linear", **opts))


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_unipc3_parity_few_steps(steps):
    _loop(*_pair(steps))


@pytest.mark.parametrize("begin", [1, 2, 3, 7])
def test_unipc3_img2img_start_matches_diffusers_begin_index(begin):
    """A run started at i = begin warms up as diffusers' lower_order_nums (no corrector, then
    UniC-1, then UniC-2 before UniC-3); a sampler reused after a full run at another batch size
    gives the same (no stale m_{i-3})."""
    ours, theirs = _pair(12)
    _loop(ours, theirs, begin=begin, seed=3)
    reused, theirs2 = _pair(12)
    y = torch.randn(3, *SHAPE[1:])
    for i in range(12):
        y = reused.step(torch.randn(y.shape), i, y)
    _loop(reused, theirs2, begin=begin, seed=3)


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_unipc3_whole_run_parity(steps, solver_type, pred):
    """A whole run on each side (each fed its own outputs), a model of x and t."""
    # bh1 to sigma 0 is NaN in diffusers (see _loop): bh1 runs end at sigma_min
    final = "sigma_min" if solver_type == "bh1" else "zero"
    ours, theirs = _pair(steps, "linear", solver_type=solver_type, prediction_type=pred,
                         final_sigmas_type=final)  # fmt: skip
    x, y = whole_runs(ours, theirs)
    assert _rel(x, y) <= RTOL


def test_unipc3_differs_from_order_2_and_reads_m_prev3():
    """Order 3 is not order 2 under another name: the rows carry c_m3 / p_m2 from the steps
    that have the history, and the samples differ."""
    o3 = UniPCSampler(NoiseSchedule("linear"), 8, solver_order=3)
    o2 = UniPCSampler(NoiseSchedule("linear"), 8)
    t3 = o3.coef_table("cpu")
    assert t3.shape == (8, COEF_LEN) and o3.coef_width == COEF_LEN == 12
    assert (t3[:3, 10] == 0).all() and (t3[3:7, 10] != 0).all()  # UniC-3 from step 3
    assert t3[:2, 11].eq(0).all() and t3[2:6, 11].ne(0).all()  # UniP-3 from step 2
    assert t3[6:, 11].eq(0).all()  # lower_order_final: UniP-2, then UniP-1
    assert (o2.coef_table("cpu")[:, 10:] == 0).all()
    g = torch.Generator().manual_seed(1)
    x2 = x3 = torch.randn(SHAPE, generator=g)
    for i in range(8):
        mo = torch.randn(SHAPE, generator=g)
        x2, x3 = o2.step(mo, i, x2), o3.step(mo, i, x3)
    assert _rel(x3, x2) > 1e-3


def test_unipc3_reset_clears_m3():
    ours = UniPCSampler(NoiseSchedule("linear"), 6, solver_order=3)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(SHAPE, generator=g)
    mos = [torch.randn(SHAPE, generator=g) for _ in range(6)]

    def run(smp, upto=6):
        x = x_t
        for i in range(upto):
            x = smp.step(mos[i], i, x)
        return x

    first = run(ours)
    assert torch.equal(run(ours), first)  # restarting at i = 0 drops the history
    run(ours, 5)
    assert ours._m3 is not None
    ours.reset()
    assert ours._m3 is None and ours._m2 is None and ours._m1 is None
    assert torch.equal(run(UniPCSampler(NoiseSchedule("linear"), 6, solver_order=3)), first)


def test_unipc3_from_a_diffusers_scheduler_and_sample():
    """fastdiff.sample(schedule=UniPCMultistepScheduler(solver_order=3)) runs order 3, as
    diffusers' own loop."""
    cfg = dict(DIFFUSERS_BETAS["scaled_linear"])
    theirs = diffusers.UniPCMultistepScheduler(**cfg, solver_order=3)
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 3, 6, 6, generator=g)
    x_t = torch.randn(2, 3, 6, 6, generator=g)

    def model(x, t):
        return torch.tanh(0.3 * x) + 0.1 * w * t.float()[:, None, None, None] / 1000.0

    y = x_t.clone()
    for t in theirs.timesteps:
        y = theirs.step(model(y, t.expand(2)), t, y).prev_sample
    sch = diffusers.UniPCMultistepScheduler(**cfg, solver_order=3)
    assert _rel(fastdiff.sample(model, steps=8, schedule=sch, noise=x_t), y) <= 2e-5


# ---------------------------------------------------------------------------------- the op
def _row(steps=10, i=5) -> torch.Tensor:
    return UniPCSampler(NoiseSchedule("linear"), steps, solver_order=3).coef_table("cpu")[i].clone()


OP_CASES = backend_cases("unipc_step")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EMU = ("cpu", "cuda")


def test_unipc3_kernel_backends_are_not_filtered_out():
    """The op cases include the kernels built here (a stale build would drop them silently)."""
    names = {b for _, b in OP_CASES}
    assert "torch" in names
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        assert "triton" in names  # (CI's baseline-CPU stage runs without the interpreter)
    if fastdiff._ext._C is not None:
        assert "cpu" in names and fastdiff._ext._C.unipc_step_m3


OP_PARAMS = [
    ((2, 3, 5, 7), "contiguous", "epsilon", None, False),
    ((3, 4, 9, 5), "channels_last", "v_prediction", 1.0, True),
    ((1, 3, 6, 11), "strided", "sample", 0.7, False),
    ((5, 1031), "contiguous", "v_prediction", None, True),
]


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout,pred,clip,cfg", OP_PARAMS)
@pytest.mark.parametrize("nhist", [4, 3], ids=["m3", "m2-only"])
def test_unipc3_op_vs_float64_reference(case, dtype, shape, layout, pred, clip, cfg, nhist):
    """All four history operands (UniC-3 + UniP-3) and the step before (m_prev2 with p_m2, no
    m_prev3) on each backend."""
    dev, backend = case
    g = torch.Generator().manual_seed(stable_seed(shape, layout, pred, nhist))
    x, mo, hist = _inputs(shape, dtype, dev, layout, g, cfg)
    hist = hist[:nhist] + [None] * (4 - nhist)
    coef = _row().to(dev)
    assert coef[10] != 0 and coef[11] != 0
    gs = 2.5 if cfg else None
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef, *hist[:3], m_prev3=hist[3], prediction_type=pred,
                         clip_range=clip, guidance_scale=gs)  # fmt: skip
    refs = _ref64(x, mo, coef, hist, pred, clip, gs)
    eags = _eager(x, mo, coef, hist, pred, clip, gs)
    for name, o, r, e in zip(("x_c", "m", "x_next"), got, refs, eags, strict=True):
        assert o.dtype == dtype and o.shape == x.shape
        if layout == "channels_last":
            assert o.is_contiguous(memory_format=torch.channels_last)
        assert_fa_rule(o, r, e, atol=1e-6, name=f"{backend} {name}")


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc3_op_nan_poison_and_absent_operands(case, monkeypatch):
    """NaN in m_prev3 reaches x_c and x_next only where it is; outputs start poisoned (an
    unwritten element shows); NaN weights of absent operands (c_m3 without m_prev3, p_m2
    without m_prev2) do not leak: their terms are skipped, not multiplied by zero."""
    dev, backend = case
    g = torch.Generator().manual_seed(0)
    x, mo, hist = _inputs((2, 3, 4, 5), torch.float32, dev, "contiguous", g)
    hist[3][1, 2, 3, 4] = float("nan")
    coef = _row().to(dev)
    real_empty = torch.empty

    def poisoned(*a, **k):
        return poison_(real_empty(*a, **k)) if k.get("dtype") is not torch.int64 else \
            real_empty(*a, **k)  # fmt: skip

    with monkeypatch.context() as mp:  # not undo(): the emulator's patches must stay
        mp.setattr(torch, "empty", poisoned)
        with fastdiff.use_backend(backend, op="unipc_step"):
            xc, m, xn = unipc_step(x, mo, coef, *hist[:3], m_prev3=hist[3])
            bad = coef.clone()
            bad[10] = bad[11] = float("nan")
            a = unipc_step(x, mo, bad, hist[0], hist[1])
            b = unipc_step(x, mo, coef, hist[0], hist[1])
    ref = _ref64(x, mo, coef, hist, "epsilon", None, None)
    for o, r in zip((xc, m, xn), ref, strict=True):
        assert torch.equal(o.isnan(), r.isnan())
    assert xc.isnan().sum() == 1 and xn.isnan().sum() == 1 and not m.isnan().any()
    for u, v in zip(a, b, strict=True):
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "which,exc,match",
    [
        ("no-m2", ValueError, "m_prev3 .*needs m_prev and m_prev2.*without m_prev2"),
        ("no-m1-m2", ValueError, "m_prev3 .*without m_prev and m_prev2"),
        ("shape", ValueError, "m_prev3 must have x's shape"),
        ("dtype", TypeError, "m_prev3 must be"),
        ("short-coef", ValueError, "coef must have >= 12"),
    ],
)
def test_unipc3_op_bad_input_is_a_clear_error_and_writes_nothing(which, exc, match):
    g = torch.Generator().manual_seed(3)
    x, mo, (last, m1, m2, m3) = _inputs((2, 3, 4, 4), torch.float32, "cpu", "contiguous", g)
    coef = _row()
    kw = dict(m_prev3=m3)
    args = [x, mo, coef, last, m1, m2]
    if which == "no-m2":
        args[5] = None
    elif which == "no-m1-m2":
        args[4] = args[5] = None
    elif which == "shape":
        kw["m_prev3"] = m3[:1]
    elif which == "dtype":
        kw["m_prev3"] = m3.int()
    else:
        args[2] = coef[:11]
    before = [t.clone() for t in (x, mo, coef, last, m1, m2, m3)]
    backend = "cpu" if fastdiff._ext._C is not None else "torch"
    with (
        fastdiff.use_backend(backend, "unipc_step"),
        pytest.raises(exc, match=f"unipc_step: {match}"),
    ):
        unipc_step(*args, **kw)
    for t, b in zip((x, mo, coef, last, m1, m2, m3), before, strict=True):
        assert torch.equal(t, b)


def test_unipc3_cpu_cache_keys_on_m_prev3():
    """A call with m_prev3 does not reuse the validated-call entry of the same call without it
    (and the other way round)."""
    if fastdiff._ext._C is None:
        pytest.skip("no fastdiff._C")
    g = torch.Generator().manual_seed(4)
    x, mo, (last, m1, m2, m3) = _inputs((2, 3, 4, 4), torch.float32, "cpu", "contiguous", g)
    coef = _row()
    with fastdiff.use_backend("cpu", "unipc_step"):
        for _ in range(2):  # the second round runs from the cache
            without = unipc_step(x, mo, coef, last, m1, m2)
            with3 = unipc_step(x, mo, coef, last, m1, m2, m_prev3=m3)
            for u, r in zip(without, _ref64(x, mo, coef, [last, m1, m2, None], "epsilon", None,
                                           None), strict=True):  # fmt: skip
                torch.testing.assert_close(u.double(), r, rtol=1e-5, atol=1e-5)
            for u, r in zip(with3, _ref64(x, mo, coef, [last, m1, m2, m3], "epsilon", None, None),
                            strict=True):  # fmt: skip
                torch.testing.assert_close(u.double(), r, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="m_prev3"):
            unipc_step(x, mo, coef, last, m1, None, m_prev3=m3)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc3_op_opcheck(case):
    dev, backend = case
    from fastdiff.ops.unipc_step import _unipc_op

    g = torch.Generator().manual_seed(2)
    x, mo, (last, m1, m2, m3) = _inputs((2, 3, 4, 4), torch.float32, dev, "contiguous", g)
    coef = _row().to(dev)
    cfg = torch.cat([mo, mo])
    for args in [(x, mo, coef, last, m1, m2, m3, backend, 0, None, None),
                 (x, cfg, coef, None, m1, m2, m3, backend, 1, 1.0, 3.0)]:  # fmt: skip
        torch.library.opcheck(_unipc_op, args)


def test_unipc3_autograd_through_m_prev3():
    g = torch.Generator().manual_seed(8)
    x, mo, hist = _inputs((2, 3, 5, 5), torch.float32, "cpu", "contiguous", g)
    coef = _row()
    leaves = [t.clone().requires_grad_(True) for t in (x, mo, *hist)]
    refl = [t.clone().requires_grad_(True) for t in (x, mo, *hist)]
    w = torch.randn(3, *x.shape, generator=g)
    outs = unipc_step(*leaves[:2], coef, *leaves[2:5], m_prev3=leaves[5])
    sum((o * w[k]).sum() for k, o in enumerate(outs)).backward()
    ref = _eager(refl[0], refl[1], coef, refl[2:], "epsilon", None, None)
    sum((o * w[k]).sum() for k, o in enumerate(ref)).backward()
    for a, b in zip(leaves, refl, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- the CUDA kernel, on the CPU emulator
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout,pred,clip,cfg", OP_PARAMS)
@pytest.mark.usefixtures("emu")
def test_unipc3_emulated_cuda_kernel(dtype, shape, layout, pred, clip, cfg):
    """csrc/cuda/unipc_step.cu's order-3 instantiation through its real entry point."""
    assert hasattr(fastdiff._ext.native(), "unipc_step_cuda")
    for nhist in (4, 3):
        test_unipc3_op_vs_float64_reference(EMU, dtype, shape, layout, pred, clip, cfg, nhist)


@pytest.mark.usefixtures("emu")
def test_unipc3_emulated_cuda_nan_poison_and_sampler(monkeypatch):
    test_unipc3_op_nan_poison_and_absent_operands(EMU, monkeypatch)
    test_unipc3_op_opcheck(EMU)


# ------------------------------------------------------------------ CUDA-graph body, CLI
def test_unipc3_cuda_graph_step_body_on_cpu_equals_the_eager_loop():
    """fastdiff/_graph.py's captured step run without capture on CPU: a fourth static buffer
    holds m_{i-3}; the main table's rows with zeroed buffers give the eager loop's samples, and
    load() clears what a previous run left."""
    smp = UniPCSampler(NoiseSchedule("linear"), 8, solver_order=3, disable_corrector=[4])
    model, x_t, ref = graph_body_runs(smp, 4)
    # without the m_{i-3} buffer the graph body would be order 2's: the samples differ
    o2 = fastdiff.sample(model, steps=8, sampler=UniPCSampler(NoiseSchedule("linear"), 8,
                         disable_corrector=[4]), noise=x_t)  # fmt: skip
    assert _rel(ref, o2) > 1e-4


def test_unipc3_cli(tmp_path):
    from fastdiff.cli import main

    outs = [tmp_path / "u3.png", tmp_path / "u2.png"]
    for out, extra in zip(outs, (["--solver-order", "3"], []), strict=True):
        args = ["sample", "--steps", "5", "--n", "2", "--sampler", "unipc", "--quiet", *extra]
        assert main([*args, "--out", str(out)]) == 0
        assert out.stat().st_size > 0
    assert outs[0].read_bytes() != outs[1].read_bytes()


def test_unipc3_an_extension_without_m_prev3_is_a_stale_build(monkeypatch):
    """A fastdiff._C whose unipc kernels predate the 12-wide row (no ``unipc_step_m3``) would
    skip p_m2's term: an explicit cpu request names the stale build, auto runs the torch
    backend (the right answer)."""
    from fastdiff import _ext

    real = _ext._C
    if real is None:
        pytest.skip("no fastdiff._C")

    class Stale:
        def __getattr__(self, name):
            if name == "unipc_step_m3":
                raise AttributeError(name)
            return getattr(real, name)

    g = torch.Generator().manual_seed(18)
    x, mo, (last, m1, m2, _) = _inputs((2, 3, 4, 4), torch.float32, "cpu", "contiguous", g)
    coef = _row(i=2)  # UniP-3 after two steps: p_m2 != 0, no m_prev3 yet
    assert coef[11] != 0 and coef[10] == 0
    with fastdiff.use_backend("torch", op="unipc_step"):
        want = unipc_step(x, mo, coef, last, m1, m2)
    monkeypatch.setattr(_ext, "_C", Stale())
    with (
        pytest.raises(RuntimeError, match="stale build"),
        fastdiff.use_backend("cpu", op="unipc_step"),
    ):
        unipc_step(x, mo, coef, last, m1, m2)
    for u, v in zip(unipc_step(x, mo, coef, last, m1, m2), want, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_unipc3_digits_samples_are_recognised():
    """End to end on the shipped digits model, judged by the separate classifier of
    tests/test_digits_quality.py: order 3, 10 steps, guidance 2. (Measured: 60/60; 5 steps
    60/60; order 2 at 10 steps 60/60.)"""
    pytest.importorskip("sklearn")
    from test_digits_quality import HAS_WEIGHTS, _accuracy, digits_classifier

    if not HAS_WEIGHTS:
        pytest.skip("digits weights not shipped")
    from fastdiff.models import load_pretrained

    acc = _accuracy(load_pretrained("digits"), digits_classifier.fit(), "unipc", 10, 60, 2.0,
                    solver_order=3)  # fmt: skip
    assert acc >= 0.90, acc


class _TinyNet(torch.nn.Module):
    """A small model of x and t (weak-referenceable, with parameters: a graph-cache key)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + t[:, None, None, None].float() / 2000.0


@torch.no_grad()
def test_unipc3_graphed_loop_equals_eager_and_is_not_order_2s_graph(fake_cuda_graphs, monkeypatch):
    """The CUDA-graph loop (fake graphs on CPU): an order-3 run equals the eager one, twice; a
    graph captured for order 2 on the same model and shape is not reused for order 3 (the
    sampler's config carries solver_order: the fourth static buffer)."""
    from fastdiff import api

    torch.manual_seed(0)
    net = _TinyNet().eval()
    eager_loop = api._sample_eager
    x_t = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))

    def run(graphed, order):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(net, steps=7, sampler="unipc", solver_order=order, noise=x_t)

    two = run(True, 2)
    for _ in range(2):
        torch.testing.assert_close(run(True, 3), run(False, 3), rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2
    assert [len(g.hist) for g in fake_cuda_graphs] == [3, 4]
    assert _rel(run(False, 3), two) > 1e-4
