"""UniPC: the sampler vs diffusers' UniPCMultistepScheduler step by step, the fused unipc_step op
on every backend vs a float64 reference (FlashAttention rule), validation, opcheck, wiring."""

from __future__ import annotations

import itertools

import _unipc_ref as _uref
import pytest
import torch
from helpers import (
    DIFFUSERS_BETAS,
    PARITY_RTOL,
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
from fastdiff.samplers import SAMPLERS, UniPCSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = PARITY_SHAPE, PARITY_RTOL


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _schedule(name: str, zero_snr: bool = False) -> tuple[NoiseSchedule, dict]:
    cfg = dict(DIFFUSERS_BETAS[name], rescale_betas_zero_snr=zero_snr)
    return NoiseSchedule.from_diffusers(cfg), cfg


def _model_output(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 0.6 * torch.randn(x.shape, generator=g) + 0.4 * x.clamp(-3, 3)


def _pair(steps: int, sched: str = "scaled_linear", zero_snr: bool = False, **opts):
    sch, cfg = _schedule(sched, zero_snr)
    theirs = diffusers.UniPCMultistepScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    return UniPCSampler(sch, steps, **opts), theirs


def _loop(ours, theirs, *, begin: int = 0, seed: int = 0) -> torch.Tensor:
    """Both samplers over the run, each step fed diffusers' previous output; parity per step."""
    assert torch.equal(ours.timesteps, theirs.timesteps.to(torch.int64))
    if begin:
        theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    for i in range(begin, len(ours)):
        mo = _model_output(x, g)
        ref = theirs.step(mo, theirs.timesteps[i], x).prev_sample
        got = ours.step(mo, i, x)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        if not torch.isfinite(ref).all():
            # diffusers' bh1 last step to sigma 0: B(h) = -h = -inf times its zero order-1
            # residual is NaN; the limit (as bh2's) is x_n = m_{n-1}, the data prediction
            assert i == len(ours) - 1 and ours.solver_type == "bh1"
            assert ours.final_sigmas_type == "zero"
            ref = theirs.model_outputs[-1]
        err = _rel(got, ref)
        assert err <= RTOL, f"step {i}: rel err {err:.2e}"
        x = ref
    return x


CASES = list(
    itertools.product(
        ["linear", "scaled_linear", "cosine"],
        ["linspace", "leading", "trailing"],
        ["epsilon", "v_prediction", "sample"],
    )
)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("sched,spacing,pred", CASES)
def test_unipc_parity(sched, spacing, pred, steps):
    ours, theirs = _pair(steps, sched, prediction_type=pred, timestep_spacing=spacing)
    _loop(ours, theirs)


@pytest.mark.parametrize(
    "opts",
    [
        dict(solver_type="bh1"),
        dict(solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(disable_corrector=[0, 3]),
        dict(disable_corrector=[1, 2, 5], solver_type="bh1"),
        dict(final_sigmas_type="sigma_min"),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(thresholding=True, sample_max_value=1.5),
        dict(prediction_type="v_prediction", timestep_spacing="trailing", zero_snr=True),
        dict(use_karras_sigmas=True),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        dict(use_exponential_sigmas=True),
        dict(use_beta_sigmas=True),
    ],
    ids=[
        "bh1",
        "bh1-no-lof",
        "no-corr",
        "no-corr-bh1",
        "sigma_min",
        "no-lof",
        "offset",
        "thresh",
        "zero-snr-v",
        "karras",
        "karras-min",
        "exp",
        "beta",
    ],  # fmt: skip
)
@pytest.mark.parametrize("steps", [6, 20])
def test_unipc_parity_options(opts, steps):
    opts = dict(opts)
    zero = opts.pop("zero_snr", False)
    if opts.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    ours, theirs = _pair(steps, "scaled_linear", zero, **opts)
    _loop(ours, theirs)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_unipc_parity_few_steps(steps):
    _loop(*_pair(steps))


@pytest.mark.parametrize("begin", [1, 3, 7])
def test_unipc_img2img_start_matches_diffusers_begin_index(begin):
    """A fresh sampler started at i = begin (diffusers: set_begin_index): no corrector at the
    first step, UniC-1 at the second, as diffusers' lower_order_nums; a sampler reused after a
    full run at another batch size gives the same (no stale history)."""
    ours, theirs = _pair(10)
    ref = _loop(ours, theirs, begin=begin, seed=3)
    reused, theirs2 = _pair(10)
    y = torch.randn(3, *SHAPE[1:])
    for i in range(10):
        y = reused.step(torch.randn(y.shape), i, y)
    got = _loop(reused, theirs2, begin=begin, seed=3)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_unipc_whole_run_parity():
    """A whole run on each side (each fed its own outputs), a model of x and t."""
    x, y = _uref.whole_runs(*_pair(12, "linear"))
    assert _rel(x, y) <= 1e-5


def test_unipc_reset_and_fresh_sampler_clear_history():
    ours = UniPCSampler(NoiseSchedule("linear"), 6)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(SHAPE, generator=g)
    mos = [torch.randn(SHAPE, generator=g) for _ in range(6)]

    def run(smp):
        x = x_t
        for i in range(6):
            x = smp.step(mos[i], i, x)
        return x

    first = run(ours)
    assert torch.equal(run(ours), first)  # restarting at i = 0 drops the history
    ours.step(mos[0], 0, x_t)
    ours.reset()
    assert ours._m1 is None and ours._last is None and ours._m2 is None
    assert torch.equal(run(UniPCSampler(NoiseSchedule("linear"), 6)), first)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=0), "solver_order"),
        (dict(predict_x0=False), "predict_x0"),
        (dict(solver_type="bh3"), "solver_type"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "at most one"),
        (dict(lower_order_final=False), "lower_order_final"),
        (dict(thresholding=True, dynamic_thresholding_ratio=0.0), "dynamic_thresholding_ratio"),
    ],
)
def test_unipc_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        UniPCSampler(NoiseSchedule("linear"), 8, **kw)


def test_unipc_unsupported_diffusers_settings_are_refused():
    sch = diffusers.UniPCMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_order"):
        fastdiff.sample(lambda x, t: x, steps=4, sampler="unipc", shape=(3, 4, 4), schedule=sch)
    sch = diffusers.UniPCMultistepScheduler(predict_x0=False)
    with pytest.raises(ValueError, match="predict_x0"):
        fastdiff.sample(lambda x, t: x, steps=4, schedule=sch, shape=(3, 4, 4))


def test_unipc_registry_and_sample_defaults_from_scheduler():
    assert SAMPLERS["unipc"] is UniPCSampler
    assert isinstance(make_sampler("unipc", NoiseSchedule("linear"), 5), UniPCSampler)
    sch = diffusers.UniPCMultistepScheduler(solver_type="bh1", prediction_type="v_prediction")
    from fastdiff._sampler_setup import infer_sampler, resolve_sampler

    assert infer_sampler(sch) == "unipc"
    smp = resolve_sampler(None, None, 7, sch, None, None, {})
    assert isinstance(smp, UniPCSampler)
    assert smp.solver_type == "bh1" and smp.prediction_type == "v_prediction"


def test_unipc_sample_matches_diffusers_loop():
    """fastdiff.sample(sampler="unipc") on a model vs diffusers' own loop, same x_T."""
    sch, cfg = _schedule("linear")
    theirs = diffusers.UniPCMultistepScheduler(**cfg)
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 3, 6, 6, generator=g)

    def model(x, t):
        return torch.tanh(0.3 * x) + 0.1 * w * t.float()[:, None, None, None] / 1000.0

    x_t = torch.randn(2, 3, 6, 6, generator=g)
    y = x_t.clone()
    for t in theirs.timesteps:
        y = theirs.step(model(y, t.expand(2)), t, y).prev_sample
    x = fastdiff.sample(model, steps=8, sampler="unipc", schedule=sch, noise=x_t)
    assert _rel(x, y) <= 2e-5


# --------------------------------------------------------------------------- the fused op
def _ref64(x, mo, coef, last, m1, m2, pred, clip, g):
    """The op's math in float64 (p_m2: 0 in the order-2 rows used here; order 3:
    tests/test_unipc3.py)."""
    return _uref.ref64(x, mo, coef, [last, m1, m2], pred, clip, g)


def _eager(x, mo, coef, last, m1, m2, pred, clip, g):
    """Plain PyTorch in x's dtype (the FlashAttention rule's yardstick)."""
    return _uref.eager(x, mo, coef, [last, m1, m2], pred, clip, g)


OP_CASES = backend_cases("unipc_step")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _row(steps=10, i=4, **kw) -> torch.Tensor:
    return UniPCSampler(NoiseSchedule("linear"), steps, **kw).coef_table("cpu")[i].clone()


def _inputs(shape, dtype, device, layout, g, cfg=False):
    """x, the model output, last, m_prev, m_prev2."""
    x, mo, hist = _uref.inputs(shape, dtype, device, layout, g, cfg, n_hist=3)
    return x, mo, *hist


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout,pred,clip,cfg,hist",
    [
        ((2, 3, 5, 7), "contiguous", "epsilon", None, False, 3),
        ((3, 4, 9, 5), "channels_last", "v_prediction", 1.0, True, 2),
        ((1, 3, 6, 11), "strided", "sample", 0.7, False, 1),
        ((2, 5, 3, 3), "contiguous", "epsilon", None, True, 0),
        ((5, 1031), "contiguous", "v_prediction", None, False, 3),
    ],
)
def test_unipc_op_vs_float64_reference(case, dtype, shape, layout, pred, clip, cfg, hist):
    dev, backend = case
    g = torch.Generator().manual_seed(stable_seed(shape, layout, pred))
    x, mo, last, m1, m2 = _inputs(shape, dtype, dev, layout, g, cfg)
    ops = [last, m1, m2][:hist] + [None] * (3 - hist)
    coef = _row(i=4 if hist else 0).to(dev)
    gs = 2.5 if cfg else None
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef, *ops, prediction_type=pred, clip_range=clip,
                         guidance_scale=gs)  # fmt: skip
    refs = _ref64(x, mo, coef, *ops, pred, clip, gs)
    eags = _eager(x, mo, coef, *ops, pred, clip, gs)
    for name, o, r, e in zip(("x_c", "m", "x_next"), got, refs, eags, strict=True):
        assert o.dtype == dtype and o.shape == x.shape
        if layout == "channels_last":
            assert o.is_contiguous(memory_format=torch.channels_last)
        assert_fa_rule(o, r, e, atol=1e-6, name=f"{backend} {name}")


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc_op_nan_in_nan_out_and_poisoned_outputs(case, monkeypatch):
    dev, backend = case
    g = torch.Generator().manual_seed(0)
    x, mo, last, m1, m2 = _inputs((2, 3, 4, 5), torch.float32, dev, "contiguous", g)
    x[0, 0, 0, 0] = float("nan")
    m2[1, 2, 3, 4] = float("nan")
    real_empty = torch.empty

    def poisoned(*a, **k):  # every output buffer starts as NaN: an unwritten element shows
        return poison_(real_empty(*a, **k)) if k.get("dtype") is not torch.int64 else \
            real_empty(*a, **k)  # fmt: skip

    with monkeypatch.context() as mp:  # not undo(): the emulator's patches must stay
        mp.setattr(torch, "empty", poisoned)
        with fastdiff.use_backend(backend, op="unipc_step"):
            xc, m, xn = unipc_step(x, mo, _row().to(dev), last, m1, m2)
    ref = _ref64(x, mo, _row().to(dev), last, m1, m2, "epsilon", None, None)
    for o, r in zip((xc, m, xn), ref, strict=True):
        assert torch.equal(o.isnan(), r.isnan())
        assert o.isnan().sum() >= 1
    assert torch.isnan(xc[1, 2, 3, 4]) and not torch.isnan(m[1, 2, 3, 4])


def test_unipc_op_skips_absent_history():
    """A None operand's term is skipped, not multiplied by zero: NaN in an unused buffer does
    not leak, and the row without history equals the step with zero coefficients."""
    g = torch.Generator().manual_seed(1)
    x, mo, last, m1, m2 = _inputs((2, 3, 4, 4), torch.float32, "cpu", "contiguous", g)
    coef = _row(i=0)
    a = unipc_step(x, mo, coef)
    b = unipc_step(x, mo, coef, torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert torch.equal(a[0], x)  # no corrector: x_c = x exactly


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(coef=torch.zeros(8)), ValueError, "coef must have >= 12"),
        (dict(coef=torch.zeros(12, dtype=torch.float64)), TypeError, "coef must be a float32"),
        (dict(last=torch.zeros(2, 3, 4)), ValueError, "last must have x's shape"),
        (dict(m_prev=torch.zeros(2, 3, 4, 4, dtype=torch.int32)), TypeError, "m_prev must be"),
        (dict(m_prev2=torch.zeros(1, 3, 4, 4)), ValueError, "m_prev2 must have x's shape"),
        (dict(prediction_type="flow"), ValueError, "prediction_type"),
        (dict(guidance_scale=2.0), ValueError, "guidance_scale needs model_output"),
        (dict(clip_range=-1.0), ValueError, "clip_range"),
    ],
)
def test_unipc_op_bad_input_is_a_clear_error(kw, exc, match):
    x = torch.randn(2, 3, 4, 4)
    args = dict(model_output=torch.randn(2, 3, 4, 4), coef=_row())
    args.update(kw)
    with pytest.raises(exc, match=f"unipc_step: .*{match}"):
        unipc_step(x, **args)


def test_unipc_step_bad_input_writes_nothing():
    smp = UniPCSampler(NoiseSchedule("linear"), 5)
    x = torch.randn(2, 3, 4, 4)
    smp.step(torch.randn(2, 3, 4, 4), 0, x)
    hist = (smp._last, smp._m1, smp._prev_i)
    with pytest.raises(ValueError, match="model_output"):
        smp.step(torch.randn(2, 3, 4, 5), 1, x)
    assert (smp._last, smp._m1, smp._prev_i) == hist


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc_op_opcheck(case):
    dev, backend = case
    from fastdiff.ops.unipc_step import _unipc_op

    g = torch.Generator().manual_seed(2)
    x, mo, last, m1, m2 = _inputs((2, 3, 4, 4), torch.float32, dev, "contiguous", g)
    coef = _row().to(dev)
    cfg = torch.cat([mo, mo])
    for args in [(x, mo, coef, last, m1, m2, None, backend, 0, None, None),
                 (x, cfg, coef, None, m1, None, None, backend, 1, 1.0, 3.0)]:  # fmt: skip
        torch.library.opcheck(_unipc_op, args)
    assert COEF_LEN == 12


# (solver_order, steps, disable_corrector) of the whole runs below: order 2, and order 3 (UniP-3 /
# UniC-3, m_prev3)
SAMPLER_RUNS = [(2, 7, [2]), (3, 8, [4])]


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("order,steps,off", SAMPLER_RUNS, ids=["order2", "order3"])
def test_unipc_sampler_on_every_backend_matches_the_reference(case, order, steps, off):
    """A whole guided run (a disabled corrector, clipping) on each backend vs the torch
    backend: the same history handling and rows on every backend."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 3, 5, 6, generator=g).to(dev)
    w = torch.randn(4, 3, 5, 6, generator=g).to(dev)
    outs = []
    for b in ("torch", backend):
        smp = UniPCSampler(NoiseSchedule("linear"), steps, solver_order=order,
                           disable_corrector=off, clip_sample=True)  # fmt: skip
        x = x_t
        with fastdiff.use_backend(b, op="unipc_step"):
            for i in range(steps):
                mo = torch.tanh(0.4 * torch.cat([x, x])) + 0.2 * w  # [uncond, cond]
                x = smp.step(mo, i, x, guidance_scale=2.0)
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- the CUDA kernel, on the CPU emulator
EMU = ("cpu", "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout,pred,clip,cfg,hist",
    [
        ((2, 3, 5, 7), "contiguous", "epsilon", None, False, 3),
        ((3, 4, 9, 5), "channels_last", "v_prediction", 1.0, True, 2),
        ((1, 3, 6, 11), "strided", "sample", 0.7, False, 1),
        ((2, 5, 3, 3), "contiguous", "epsilon", None, True, 0),
        ((5, 1031), "contiguous", "v_prediction", None, False, 3),
    ],
)
@pytest.mark.usefixtures("emu")
def test_unipc_emulated_cuda_kernel(dtype, shape, layout, pred, clip, cfg, hist):
    """csrc/cuda/unipc_step.cu through its real entry point, on tests/cuda_emu."""
    assert hasattr(fastdiff._ext.native(), "unipc_step_cuda")
    test_unipc_op_vs_float64_reference(EMU, dtype, shape, layout, pred, clip, cfg, hist)


@pytest.mark.usefixtures("emu")
def test_unipc_emulated_cuda_nan_poison_and_sampler(monkeypatch):
    test_unipc_op_nan_in_nan_out_and_poisoned_outputs(EMU, monkeypatch)
    for run in SAMPLER_RUNS:
        test_unipc_sampler_on_every_backend_matches_the_reference(EMU, *run)
    test_unipc_op_opcheck(EMU)


def test_unipc_cuda_graph_step_body_on_cpu_equals_the_eager_loop():
    """fastdiff/_graph.py's captured step, run without capture on CPU: static zeroed history
    buffers and the main table's rows (no skipped operands) give the eager loop's samples, and
    load() clears the history a previous run left (no aliasing between replays)."""
    _uref.graph_body_runs(UniPCSampler(NoiseSchedule("linear"), 6, disable_corrector=[1]), 3)


def test_unipc_op_under_torch_compile_and_autograd():
    """fullgraph torch.compile gives the eager outputs; gradients through the custom op equal
    autograd through plain PyTorch."""
    coef = _row()
    g = torch.Generator().manual_seed(8)
    x, mo, last, m1, _ = _inputs((2, 3, 5, 5), torch.float32, "cpu", "contiguous", g)

    def op(x_, mo_, last_, m1_):
        return unipc_step(x_, mo_, coef, last_, m1_, prediction_type="v_prediction")

    compiled = torch.compile(op, fullgraph=True)
    for u, v in zip(compiled(x, mo, last, m1), op(x, mo, last, m1), strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    leaves = [t.clone().requires_grad_(True) for t in (x, mo, last, m1)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, mo, last, m1)]
    w = torch.randn(3, *x.shape, generator=g)
    sum((o * w[k]).sum() for k, o in enumerate(op(*leaves))).backward()
    ref = _eager(*ref_leaves[:2], coef, ref_leaves[2], ref_leaves[3], None, "v_prediction", None,
                 None)  # fmt: skip
    sum((o * w[k]).sum() for k, o in enumerate(ref)).backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_unipc_cli(tmp_path):
    from fastdiff.cli import main

    out = tmp_path / "u.png"
    args = ["sample", "--steps", "3", "--n", "2", "--sampler", "unipc", "--karras", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.stat().st_size > 0
