"""The validated-call cache of ``unipc_step`` on the cpu backend: a repeat of a validated call
skips the checks and the operand views, and reads its tensors' current addresses and values; a
call that differs in anything the checks read (shape, dtype, stride, device, options, a history
operand present or absent, another kind of tensor) is validated again."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_cases

import fastdiff
import fastdiff.ops.unipc_step as umod
from fastdiff.ops.unipc_step import unipc_step

pytestmark = pytest.mark.skipif(
    ("cpu", "cpu") not in backend_cases("unipc_step"), reason="needs the cpu backend"
)
OP = torch.ops.fastdiff.unipc_step.default
SHAPE = (2, 3, 7, 5)


def _args(shape=SHAPE, cfg=True, dtype=torch.float32):
    x = torch.randn(shape).to(dtype)
    mo = torch.randn((2 * shape[0] if cfg else shape[0], *shape[1:])).to(dtype)
    coef = torch.tensor([0.8, 0.6, 0.9, 0.1, 0.7, -0.3, 0.2, 1.1, 0.4, -0.2, 0.15, -0.05])
    last, m1, m2 = (torch.randn(shape).to(dtype) for _ in range(3))
    return x, mo, coef, last, m1, m2


def _ref(x, mo, coef, last, m1, m2, pred=0, clip=None, g=2.0):
    return OP(x, mo, coef, last, m1, m2, None, "cpu", pred, clip, g)


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.fixture
def checks(monkeypatch):
    """Counts the validations (calls of _check_common) of unipc_step."""
    count = [0]
    orig = umod._check_common

    def spy(*a, **k):
        count[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(umod, "_check_common", spy)
    umod._VALIDATED.clear()
    return count


def test_a_repeat_skips_validation_and_reads_current_values(checks):
    x, mo, coef, last, m1, m2 = _args()
    with fastdiff.use_backend("cpu", "unipc_step"):
        for i in range(4):
            got = unipc_step(x, mo, coef, last, m1, m2, guidance_scale=2.0)
            assert _same(got, _ref(x, mo, coef, last, m1, m2))
            assert checks[0] == 1, f"call {i} validated again"
            for t in (x, mo, coef, last, m1, m2):
                t.mul_(-1.25)  # in place: the next call reads the new values
        # other tensor objects of the same layout: their own addresses and values
        y = _args()
        assert _same(unipc_step(*y, guidance_scale=2.0), _ref(*y))
        assert checks[0] == 1


def test_channels_last_and_empty_repeats(checks):
    x, mo, coef, last, m1, m2 = _args(shape=(2, 4, 6, 5), cfg=False)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, mo, last, m1, m2)]
    with fastdiff.use_backend("cpu", "unipc_step"):
        for _ in range(2):
            got = unipc_step(cl[0], cl[1], coef, *cl[2:])
            want = _ref(cl[0], cl[1], coef, *cl[2:], g=None)
            assert _same(got, want)
            assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got)
        e = torch.empty(0, 3, 4, 4)
        for _ in range(2):
            outs = unipc_step(e, e, coef, e, e, e)
            assert all(o.shape == e.shape for o in outs)
    assert checks[0] == 2


def test_changed_arguments_are_validated_again(checks):
    x, mo, coef, last, m1, m2 = _args()
    kw = dict(guidance_scale=2.0)
    with fastdiff.use_backend("cpu", "unipc_step"):
        unipc_step(x, mo, coef, last, m1, m2, **kw)
        n = checks[0]
        bad = [
            ((x, mo, coef, last, m1, m2[:1]), kw, ValueError, "m_prev2 must have x's shape"),
            ((x, mo, coef, last, m1.int(), m2), kw, TypeError, "m_prev must be float32"),
            ((x, mo, coef, last.to("meta"), m1, m2), kw, ValueError, "last is on meta"),
            ((x, mo, coef[:11], last, m1, m2), kw, ValueError, "coef must have >= 12"),
            ((x, mo, coef.double(), last, m1, m2), kw, TypeError, "coef must be a float32"),
            ((x, mo[:2], coef, last, m1, m2), kw, ValueError, "batch 2N"),
            ((x, mo, coef, last, m1, m2), dict(guidance_scale=float("inf")), ValueError, "finite"),
            ((x, mo, coef, last, m1, m2), dict(kw, clip_range=-1.0), ValueError, "clip_range"),
            ((x, mo, coef, last, m1, m2), dict(kw, prediction_type="eps"), ValueError, "eps"),
            ((x, mo, coef, last, m1, m2), dict(kw, clip_range="1"), TypeError, "clip_range"),
        ]
        for args, opts, exc, msg in bad:
            with pytest.raises(exc, match=msg):
                unipc_step(*args, **opts)
        assert checks[0] == n + len(bad) - 1  # the coef length is checked before _check_common


@pytest.mark.parametrize(
    "change",
    ["no m_prev2", "no history", "strided m_prev", "fp16 m_prev", "another shape", "fp16 x",
     "no guidance", "another guidance", "clip", "v_prediction", "tensor clip"],
)  # fmt: skip
def test_each_changed_combination_is_validated_and_computed_afresh(checks, change):
    """After a cached call, a call that differs in one thing is validated again (or not cached
    at all) and gives what the op gives for it."""
    x, mo, coef, last, m1, m2 = _args()
    kw = dict(guidance_scale=2.0)
    with fastdiff.use_backend("cpu", "unipc_step"):
        unipc_step(x, mo, coef, last, m1, m2, **kw)
        unipc_step(x, mo, coef, last, m1, m2, **kw)
        assert checks[0] == 1
        args, ref_opts = [x, mo, coef, last, m1, m2], {}
        if change == "no m_prev2":
            args[5] = None
        elif change == "no history":
            args[3:] = [None, None, None]
        elif change == "strided m_prev":
            args[4] = torch.randn(SHAPE[::-1]).permute(3, 2, 1, 0)
        elif change == "fp16 m_prev":
            args[4] = m1.half()
        elif change == "another shape":
            args = list(_args(shape=(2, 3, 5, 7)))
        elif change == "fp16 x":
            args[0] = x.half()
        elif change == "no guidance":
            args[1], kw, ref_opts = mo[:2], {}, dict(g=None)
        elif change == "another guidance":
            kw, ref_opts = dict(guidance_scale=3.0), dict(g=3.0)
        elif change == "clip":
            kw, ref_opts = dict(kw, clip_range=0.5), dict(clip=0.5)
        elif change == "v_prediction":
            kw, ref_opts = dict(kw, prediction_type="v_prediction"), dict(pred=1)
        elif change == "tensor clip":  # not cacheable (a tensor's value can change in place)
            kw, ref_opts = dict(kw, clip_range=torch.tensor(0.5)), dict(clip=0.5)
        for _ in range(2):
            got = unipc_step(*args, **kw)
            assert _same(got, _ref(*args, **ref_opts))
        # operands the kernel cannot read in place (a copy or a cast), or a tensor option
        uncached = change in ("strided m_prev", "fp16 m_prev", "fp16 x", "tensor clip")
        assert checks[0] == (3 if uncached else 2)


def test_tensors_the_cache_does_not_serve(checks):
    """A tensor that requires grad, a lazily negated view or a subclass never takes the cached
    path: autograd works, the negation is materialised, the subclass is dispatched."""
    x, mo, coef, last, m1, m2 = _args()
    with fastdiff.use_backend("cpu", "unipc_step"):
        unipc_step(x, mo, coef, last, m1, m2, guidance_scale=2.0)
        m1g = m1.clone().requires_grad_(True)
        out = unipc_step(x, mo, coef, last, m1g, m2, guidance_scale=2.0)
        (g,) = torch.autograd.grad(out[2].sum(), m1g)
        assert g.abs().sum() > 0
        neg = torch.complex(torch.zeros_like(m2), m2).conj().imag  # -m2 in memory as m2
        assert neg.is_neg()
        got = unipc_step(x, mo, coef, last, m1, neg, guidance_scale=2.0)
        assert _same(got, _ref(x, mo, coef, last, m1, -m2))
    assert checks[0] == 3


def test_a_backend_change_is_honoured_after_a_cached_call(checks, monkeypatch):
    x, mo, coef, last, m1, m2 = _args()
    ran = []
    orig = umod._torch_unipc
    monkeypatch.setattr(umod, "_torch_unipc", lambda *a: ran.append(1) or orig(*a))
    with fastdiff.use_backend("cpu", "unipc_step"):
        unipc_step(x, mo, coef, last, m1, m2, guidance_scale=2.0)
        unipc_step(x, mo, coef, last, m1, m2, guidance_scale=2.0)
    with fastdiff.use_backend("torch", "unipc_step"):
        unipc_step(x, mo, coef, last, m1, m2, guidance_scale=2.0)
    assert ran == [1]
