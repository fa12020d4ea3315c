"""Mutation testing, round 6 (session 11): tests that kill the mutants of today's UniPC code
(fastdiff/samplers/unipc.py, fastdiff/ops/unipc_step.py, its Triton and C++ kernels, the UniPC
part of the CUDA-graph loop) that tests/test_unipc.py and tests/test_review11b.py let live. Each
test names the behaviour it pins; /work/notes/s11/mutation6_log.md lists the mutants."""

from __future__ import annotations

import pytest
import torch
from helpers import PARITY_SHAPE, backend_cases, case_id
from test_unipc import _loop, _pair, _ref64, _row

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops.unipc_step import unipc_step
from fastdiff.samplers import UniPCSampler

pytest.importorskip("diffusers")

OP_CASES = backend_cases("unipc_step")


@pytest.mark.parametrize("solver_type", ["bh2", "bh1"])
def test_unipc_karras_sigma_min_without_lower_order_final_matches_diffusers(solver_type):
    """The Karras grid with final_sigmas_type="sigma_min" ends on sigma_min twice: the last
    step has h = 0 and is the identity (x_n = x_c); with lower_order_final=False its UniP-2
    would divide by that h = 0 (the row builder's h == 0 guard)."""
    for steps in (6, 11):
        ours, theirs = _pair(
            steps,
            use_karras_sigmas=True,
            final_sigmas_type="sigma_min",
            lower_order_final=False,
            solver_type=solver_type,
        )
        _loop(ours, theirs)


def test_unipc_sampler_reused_at_the_same_shape_for_img2img_drops_its_history():
    """A sampler that ran a whole run, then starts another at i = 3 with x of the same shape
    (img2img with the same batch), must not use the old run's history: it equals a fresh
    sampler and diffusers with set_begin_index(3). Also a skipped step (i jumps by 2)."""
    fresh, theirs = _pair(10)
    ref = _loop(fresh, theirs, begin=3, seed=4)
    reused, theirs2 = _pair(10)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(PARITY_SHAPE, generator=g)
    for i in range(10):
        y = reused.step(torch.randn(y.shape, generator=g), i, y)
    got = _loop(reused, theirs2, begin=3, seed=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    # steps 0, 1, then 3: step 3 starts a new run (no corrector), as a fresh sampler at 3
    x = torch.randn(PARITY_SHAPE, generator=g)
    mo = torch.randn(PARITY_SHAPE, generator=g)
    skip = UniPCSampler(NoiseSchedule("scaled_linear"), 10)
    for i in (0, 1):
        skip.step(torch.randn(x.shape, generator=g), i, torch.randn(x.shape, generator=g))
    want = UniPCSampler(NoiseSchedule("scaled_linear"), 10).step(mo, 3, x)
    assert torch.equal(skip.step(mo, 3, x), want)


@pytest.mark.parametrize("i", [0, 4])
def test_unipc_clip_sample_clips_the_data_prediction(i):
    """clip_sample=True (a fastdiff extension) clips m = x0 to [-r, r] before the corrector and
    predictor use it: the returned m is the unclipped sampler's m clamped, x_next follows it."""
    r = 0.5
    sch = NoiseSchedule("linear")
    plain = UniPCSampler(sch, 10)
    clipped = UniPCSampler(sch, 10, clip_sample=True, clip_sample_range=r)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(PARITY_SHAPE, generator=g)
    hist = [torch.randn(PARITY_SHAPE, generator=g) for _ in range(3)]
    mo = torch.randn(PARITY_SHAPE, generator=g)
    coef = plain.coef_table("cpu")[i]
    last, m1, m2 = hist if i else (None, None, None)
    _, m_plain, _ = plain.step_with_history(mo, i, x, coef, last, m1, m2)
    x_c, m_clip, xn_clip = clipped.step_with_history(mo, i, x, coef, last, m1, m2)
    assert m_plain.abs().max() > 2 * r  # the clip matters here
    torch.testing.assert_close(m_clip, m_plain.clamp(-r, r), rtol=0, atol=0)
    c = coef.double()
    want = c[7] * x_c.double() + c[8] * m_clip.double()
    if m1 is not None:
        want = want + c[9] * m1.double()
    torch.testing.assert_close(xn_clip.double(), want, rtol=1e-6, atol=1e-6)
    # and through step(): the clipped sampler's data prediction stays in range
    _, m_step = UniPCSampler(sch, 10, clip_sample=True, clip_sample_range=r).step(
        mo, 0, x, return_x0=True
    )
    assert m_step.abs().max() <= r


# --------------------------------------------------------------------------- the fused op
def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of the float64 ``ref`` (subnormals: the least)."""
    fi = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    e = torch.floor(torch.log2(ref.abs().clamp_min(fi.smallest_normal)))
    return torch.exp2(e - mant)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unipc_op_half_outputs_are_the_fp32_math_rounded_once(case, dtype):
    """x_c stays fp32 inside the step (the module docstring): x_next = p_xc x_c + ... from the
    unrounded x_c, then one rounding to x's dtype. The FlashAttention rule's fp16 yardstick is
    too loose to see an extra rounding of x_c; half an ulp of the result (+ fp32 slack) is not
    (x_next cancels: p_xc x_c ~ -(p_m m + p_m1 m_prev) on many elements)."""
    if case == ("cpu", "triton") and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 store truncates (no bf16 arithmetic)")
    dev, backend = case
    g = torch.Generator().manual_seed(11)
    shape = (2, 4, 16, 16)
    x, mo, last, m1, m2 = (torch.randn(shape, generator=g).to(dev, dtype) for _ in range(5))
    coef = _row(i=4).to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef, last, m1, m2)
    c = coef.double()
    a, s = c[0], c[1]
    m = (x.double() - s * mo.double()) / a
    terms_c = [c[2] * x.double(), c[3] * last.double(), c[4] * m, c[5] * m1.double(),
               c[6] * m2.double()]  # fmt: skip
    xc = sum(terms_c)
    terms_n = [c[7] * xc, c[8] * m, c[9] * m1.double()]
    xn = sum(terms_n)
    for name, o, r, terms in (("x_c", got[0], xc, terms_c), ("x_next", got[2], xn, terms_n)):
        scale = sum(t.abs() for t in terms)
        tol = 0.5 * _ulp(r, dtype) + 2.0**-18 * scale
        err = (o.double() - r).abs()
        bad = err > tol
        assert not bad.any(), (
            f"{backend} {name}: {int(bad.sum())} elements beyond half an ulp, worst "
            f"{(err / _ulp(r, dtype)).max().item():.2f} ulp"
        )


def _batch_strided(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t``'s values as every k-th sample of a bigger tensor: each sample dense, batch stride
    k * inner (no copy on the op's side)."""
    big = torch.full((k * t.shape[0], *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    big[::k] = t
    return big[::k]


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_unipc_op_batch_strided_and_strided_operands(case, cfg):
    """Every operand with its own batch stride (samples dense, strides 2 / 3 / 4 / 5 / 6 x
    inner), and a guided model output that is not dense in any way (the uncond half must be
    made dense as the cond half): equals the float64 reference on every backend."""
    dev, backend = case
    g = torch.Generator().manual_seed(12)
    shape = (3, 2, 5, 7)
    x, last, m1, m2 = (torch.randn(shape, generator=g).to(dev) for _ in range(4))
    n_mo = 2 * shape[0] if cfg else shape[0]
    mo = torch.randn(n_mo, *shape[1:], generator=g).to(dev)
    coef = _row(i=4).to(dev)
    gs = 1.7 if cfg else None
    ref = _ref64(x, mo, coef, last, m1, m2, "epsilon", None, gs)
    xs, l_s, m1s, m2s = (_batch_strided(t, k) for t, k in ((x, 2), (last, 3), (m1, 4), (m2, 5)))
    if cfg:  # not dense at all: every other element of the last dim
        wide = torch.zeros(*mo.shape[:-1], 2 * mo.shape[-1], device=dev)
        wide[..., ::2] = mo
        mos = wide[..., ::2]
    else:
        mos = _batch_strided(mo, 6)
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(xs, mos, coef, l_s, m1s, m2s, guidance_scale=gs)
    for name, o, r in zip(("x_c", "m", "x_next"), got, ref, strict=True):
        torch.testing.assert_close(o.double(), r, rtol=2e-6, atol=2e-6, msg=f"{backend} {name}")


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("pred", ["epsilon", "sample"])
def test_unipc_op_clip_propagates_nan_and_clamps_both_sides(case, pred):
    """clip_range clamps m to [-r, r] on both sides and a NaN data prediction stays NaN (a
    max/min clamp would turn it into -r or r), on every backend."""
    dev, backend = case
    r = 0.8
    mo = torch.tensor([float("nan"), -5.0, -0.8, -0.3, 0.0, 0.3, 0.8, 5.0, float("inf"),
                       -float("inf")]).reshape(1, 10).to(dev)  # fmt: skip
    x = torch.zeros_like(mo) if pred == "sample" else 0.1 * torch.ones_like(mo)
    coef = _row(i=0).to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        _, m, xn = unipc_step(x, mo, coef, prediction_type=pred, clip_range=r)
    want = _ref64(x, mo, coef, None, None, None, pred, r, None)[1]
    assert torch.isnan(m[0, 0]) and torch.isnan(xn[0, 0])
    assert torch.equal(torch.isnan(m), torch.isnan(want))
    torch.testing.assert_close(m.double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert m[0, 1:].abs().max() <= r


# --------------------------------------------------------------------------- sampler options
def test_unipc_clip_sample_range_must_be_positive():
    with pytest.raises(ValueError, match="clip_sample_range"):
        UniPCSampler(NoiseSchedule("linear"), 5, clip_sample=True, clip_sample_range=0.0)
    UniPCSampler(NoiseSchedule("linear"), 5, clip_sample=False, clip_sample_range=0.0)


@pytest.mark.parametrize("opts", [dict(), dict(thresholding=True, sample_max_value=1.2)],
                         ids=["plain", "thresholding"])  # fmt: skip
def test_unipc_guidance_equals_the_precombined_output(opts):
    """step(cat([uncond, cond]), guidance_scale=g) equals step(uncond + g (cond - uncond)):
    the guidance is applied before the data prediction on the thresholding path too."""
    sch, gs = NoiseSchedule("linear"), 3.0
    a, b = UniPCSampler(sch, 6, **opts), UniPCSampler(sch, 6, **opts)
    g = torch.Generator().manual_seed(9)
    x = y = torch.randn(PARITY_SHAPE, generator=g)
    for i in range(6):
        unc, cond = (torch.randn(PARITY_SHAPE, generator=g) for _ in range(2))
        x = a.step(torch.cat([unc, cond]), i, x, guidance_scale=gs)
        y = b.step(unc + gs * (cond - unc), i, y)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unipc_cuda_graph_cache_keys_on_the_clip_range(fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True) (fake graphs on CPU): a UniPC sampler with another
    clip_sample_range must not replay the graph captured for the first (its range is baked
    into the captured call): both runs equal the eager loop."""
    from fastdiff import api

    g = torch.Generator().manual_seed(13)
    x_t = torch.randn(2, 3, 6, 6, generator=g)
    w = torch.randn(2, 3, 6, 6, generator=g)

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return 3.0 * torch.tanh(x) + w * t[:, None, None, None].float() / 300.0

    net = Net()
    eager_loop = api._sample_eager
    for r in (0.3, 1.5):
        outs = []
        for graphed in (False, True):
            monkeypatch.setattr(
                api, "_sample_eager", api._sample_graphed if graphed else eager_loop
            )
            smp = UniPCSampler(NoiseSchedule("linear"), 5, clip_sample=True, clip_sample_range=r)
            outs.append(fastdiff.sample(net, steps=5, sampler=smp, noise=x_t))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert len(fake_cuda_graphs) == 2


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(2, 2048), (3, 2 * 2048 + 5), (1, 3, 1025)])
def test_unipc_op_tile_edges_every_element_written(case, shape, monkeypatch):
    """Per-sample sizes at and across the kernels' tile sizes (the CPU kernel's 2048-element
    tiles, Triton's 1024): every output element written (outputs start as NaN) and right."""
    dev, backend = case
    g = torch.Generator().manual_seed(14)
    x, mo, last, m1, m2 = (torch.randn(shape, generator=g).to(dev) for _ in range(5))
    coef = _row(i=4).to(dev)
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as mp, fastdiff.use_backend(backend, op="unipc_step"):
        mp.setattr(torch, "empty", poisoned)
        got = unipc_step(x, mo, coef, last, m1, m2, prediction_type="v_prediction")
    ref = _ref64(x, mo, coef, last, m1, m2, "v_prediction", None, None)
    for name, o, r in zip(("x_c", "m", "x_next"), got, ref, strict=True):
        assert not o.isnan().any(), f"{backend} {name}: unwritten elements"
        torch.testing.assert_close(o.double(), r, rtol=2e-6, atol=2e-6, msg=f"{backend} {name}")


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
@pytest.mark.parametrize(
    "x_dtype,mo_dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_unipc_op_model_output_in_another_dtype(case, x_dtype, mo_dtype):
    """A model output in another float dtype than x (a half-precision model on an fp32 loop):
    the history operands are read in x's dtype, the model output in its own."""
    dev, backend = case
    g = torch.Generator().manual_seed(15)
    shape = (2, 3, 7, 5)
    x, last, m1, m2 = (torch.randn(shape, generator=g).to(dev, x_dtype) for _ in range(4))
    mo = torch.randn(shape, generator=g).to(dev, mo_dtype)
    coef = _row(i=4).to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef, last, m1, m2)
    ref = _ref64(x, mo, coef, last, m1, m2, "epsilon", None, None)
    tol = 2e-6 if x_dtype == torch.float32 else 2e-3
    for name, o, r in zip(("x_c", "m", "x_next"), got, ref, strict=True):
        assert o.dtype == x_dtype
        torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol, msg=f"{backend} {name}")


def test_unipc_solver_order_true_is_refused():
    """solver_order=True is not the order 1 (True == 1 in Python)."""
    with pytest.raises(ValueError, match="solver_order"):
        UniPCSampler(NoiseSchedule("linear"), 5, solver_order=True)


@pytest.mark.parametrize(
    "setting",
    [
        dict(solver_p="a UniPC predictor"),
        dict(use_dynamic_shifting=True),  # without mu (use_flow_sigmas is implemented)
        dict(sigma_min=0.1),
        dict(sigma_max=10.0),
        dict(shift_terminal=0.5),
    ],
    ids=lambda d: next(iter(d)),
)
def test_unipc_schedule_with_an_unimplemented_setting_is_refused(setting):
    """A UniPCMultistepScheduler config with a setting fastdiff's UniPC lacks: ValueError
    naming it (sample() would silently differ from diffusers)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(diffusers.UniPCMultistepScheduler().config)
    cfg.update(setting, _class_name="UniPCMultistepScheduler")
    key = next(iter(setting))
    with pytest.raises(ValueError, match=key):
        fastdiff.sample(lambda x, t: x, steps=4, shape=(3, 4, 4), schedule=cfg)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc_op_opcheck_channels_last_and_fake_strides(case):
    """The fake (meta) outputs have x's memory format, as the real ones: opcheck on
    channels_last inputs, and the compiled op's outputs keep channels_last."""
    from fastdiff.ops.unipc_step import _unipc_op

    dev, backend = case
    g = torch.Generator().manual_seed(16)
    x, mo, last, m1, m2 = (
        torch.randn(2, 3, 4, 5, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
        for _ in range(5)
    )
    coef = _row(i=4).to(dev)
    torch.library.opcheck(_unipc_op, (x, mo, coef, last, m1, m2, None, backend, 0, None, None))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        outs = _unipc_op(fx, mode.from_tensor(mo), mode.from_tensor(coef), None, None, None,
                         None, backend, 0, None, None)  # fmt: skip
    for o in outs:
        assert o.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc_op_strided_coef_and_history_in_another_dtype(case):
    """A coefficient row that is a strided view (every other element of a longer tensor) and
    history operands in another float dtype than x: as the float64 reference."""
    dev, backend = case
    g = torch.Generator().manual_seed(17)
    shape = (2, 3, 5, 4)
    x, mo = (torch.randn(shape, generator=g).to(dev) for _ in range(2))
    last, m1, m2 = (torch.randn(shape, generator=g).to(dev, torch.float16) for _ in range(3))
    row = _row(i=4)
    wide = torch.full((2 * row.numel(),), float("nan"))
    wide[::2] = row
    coef = wide.to(dev)[::2]
    assert not coef.is_contiguous()
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef, last, m1, m2)
    ref = _ref64(x, mo, row.to(dev), last, m1, m2, "epsilon", None, None)
    for name, o, r in zip(("x_c", "m", "x_next"), got, ref, strict=True):
        torch.testing.assert_close(o.double(), r, rtol=2e-6, atol=2e-6, msg=f"{backend} {name}")


def test_unipc_op_with_an_extension_built_before_it_names_the_stale_build(monkeypatch):
    """A fastdiff._C without unipc_step_cpu (built before the op existed): an explicit cpu
    request is a RuntimeError naming the stale build, auto runs the torch backend."""
    from fastdiff import _ext

    real = _ext._C

    class Stale:
        def __getattr__(self, name):
            if name.startswith("unipc_step"):
                raise AttributeError(name)
            return getattr(real, name)

    g = torch.Generator().manual_seed(18)
    x, mo = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    coef = _row(i=0)
    want = unipc_step(x, mo, coef)
    monkeypatch.setattr(_ext, "_C", Stale())
    with (
        pytest.raises(RuntimeError, match="stale build"),
        fastdiff.use_backend("cpu", op="unipc_step"),
    ):
        unipc_step(x, mo, coef)
    got = unipc_step(x, mo, coef)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_unipc_op_absent_operand_skips_even_a_non_finite_coefficient(case):
    """The op's contract: a term whose operand is None is skipped, not multiplied by zero. With
    an inf / NaN coefficient for an absent operand, every backend must give the torch result."""
    dev, backend = case
    g = torch.Generator().manual_seed(19)
    x, mo = (torch.randn(1, 8, generator=g).to(dev) for _ in range(2))
    inf, nan = float("inf"), float("nan")
    coef = torch.tensor([0.9, 0.4, 1.0, inf, 0.1, nan, -inf, 1.0, 0.2, inf, nan, -inf]).to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        got = unipc_step(x, mo, coef)
    ref = _ref64(x, mo, coef, None, None, None, "epsilon", None, None)
    for o, r in zip(got, ref, strict=True):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, rtol=2e-6, atol=2e-6)
