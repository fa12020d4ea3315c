"""The ``unipc_step`` op's math (float64 reference and plain PyTorch in x's dtype), its test
inputs, and the whole-run / CUDA-graph-body scaffolding, shared by tests/test_unipc.py (order 2)
and tests/test_unipc3.py (order 3: m_prev3)."""

from __future__ import annotations

import torch
from helpers import PARITY_SHAPE, poison_

import fastdiff

_XC_COLS = (3, 5, 6, 10)  # c_last, c_m1, c_m2, c_m3: the corrector's history weights
_XN_COLS = (9, 11)  # p_m1, p_m2: the predictor's


def _pad(hist):
    return [*hist, *[None] * (4 - len(hist))]


def _combine(x, mo, c, hist, pred, clip, g, cast):
    n = x.shape[0]
    m = mo if g is None else mo[:n] + g * (mo[n:] - mo[:n])
    x0 = {"epsilon": (x - c[1] * m) / c[0], "v_prediction": c[0] * x - c[1] * m, "sample": m}[pred]
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    hist = _pad(hist)
    xc = c[2] * x + c[4] * x0
    for t, k in zip(hist, _XC_COLS, strict=True):
        if t is not None:
            xc = xc + c[k] * cast(t)
    xn = c[7] * xc + c[8] * x0
    for t, k in zip(hist[1:3], _XN_COLS, strict=True):
        if t is not None:
            xn = xn + c[k] * cast(t)
    return xc, x0, xn


def ref64(x, mo, coef, hist, pred, clip, g):
    """The op's math in float64; ``hist`` = [last, m1, m2, m3] (each or None; a shorter list
    has no further operands). Returns (x_c, m, x_next)."""
    return _combine(x.double(), mo.double(), coef.double(), hist, pred, clip, g,
                    lambda t: t.double())  # fmt: skip


def eager(x, mo, coef, hist, pred, clip, g):
    """Plain PyTorch in x's dtype (the FlashAttention rule's yardstick)."""
    return _combine(x, mo, coef.to(x.dtype), hist, pred, clip, g, lambda t: t)


def inputs(shape, dtype, device, layout, g, cfg=False, n_hist=4):
    """x, the model output ([uncond, cond] halves with ``cfg``) and ``n_hist`` history operands,
    in ``layout``: contiguous, channels_last, or strided (a non-contiguous view)."""

    def mk(s):
        t = torch.randn(s, generator=g).to(device=device, dtype=dtype)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "strided":  # a non-contiguous view
            return torch.randn((*s[:-1], 2 * s[-1]), generator=g).to(device, dtype)[..., ::2]
        return t

    x = mk(shape)
    mo = mk((2 * shape[0], *shape[1:]) if cfg else shape)
    return x, mo, [mk(shape) for _ in range(n_hist)]


def whole_runs(ours, theirs) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole run on each side (each fed its own outputs) from one x_T, a model of x and t:
    (ours, diffusers' UniPCMultistepScheduler ``theirs``)."""
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(PARITY_SHAPE, generator=g)
    w = torch.randn(PARITY_SHAPE, generator=g)

    def model(x, t):
        return torch.tanh(0.5 * x + w * (int(t) / 1000.0))

    x, y = x_t.clone(), x_t.clone()
    for i, t in enumerate(theirs.timesteps):
        y = theirs.step(model(y, t), t, y).prev_sample
        x = ours.step(model(x, ours.timesteps[i]), i, x)
    return x, y


def graph_body_runs(smp, n_hist: int):
    """fastdiff/_graph.py's captured step run without capture on CPU: a :class:`_StepGraph`
    with the attributes ``__init__`` sets before capturing (``n_hist`` static history buffers),
    its body stepped over the main table's rows, twice: the second run after poisoning the
    history the first left (load() must clear it: 0 * NaN would leak). Asserts each run's
    samples equal the eager loop's; returns (model, x_T, the eager samples)."""
    from fastdiff._graph import _StepGraph

    steps = smp.steps
    g = torch.Generator().manual_seed(6)
    x_t = torch.randn(2, 3, 4, 4, generator=g)
    w = torch.randn(2, 3, 4, 4, generator=g)

    def model(x, t):
        return torch.tanh(0.5 * x) + w * t[:, None, None, None].float() / 1000.0

    ref = fastdiff.sample(model, steps=steps, sampler=smp, noise=x_t)
    step = _StepGraph.__new__(_StepGraph)  # the attributes __init__ sets before capturing
    step.model, step.gs, step.smp, step.multistep = model, None, smp, True
    step.x, step.t = x_t.clone(), smp.timesteps[:1].expand(2).clone()
    step.coef = smp.coef_table("cpu")[0].clone()
    step.i_cap, step.gen_state, step.noise, step.kwargs = 0, None, None, {}
    step.has_noise = False  # no noise buffer (the singlestep SDE reads it)
    step.x0_prev, step.x0_prev2 = None, None  # UniPC's history rides in hist
    step.unipc, step.hist = True, [torch.zeros_like(x_t) for _ in range(n_hist)]
    for run in range(2):
        if run:  # stale history: load() must clear it (0 * NaN would leak)
            for h in step.hist:
                poison_(h)
        step.load(x_t, {}, None)
        # cleared by load() itself: every buffer is written by the body before a row reads it
        # with a nonzero weight, so the samples alone would not show a stale history
        assert all(torch.equal(h, torch.zeros_like(h)) for h in step.hist)
        for i in range(steps):
            step.coef.copy_(smp.coef_table("cpu")[i])
            step.t.copy_(smp.timesteps[i].expand(2))
            step._body()
        torch.testing.assert_close(step.x, ref, rtol=1e-6, atol=1e-6)
    return model, x_t, ref
