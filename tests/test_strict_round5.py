"""Mutation testing, round 5 (session 11): tests that kill the mutants of the C++ / CUDA shared
math (csrc/include), the C++ CPU kernels, the raw-address bindings, the Triton kernels and the
dispatch seam that the existing suite let live. Each test names the behaviour it pins;
/work/notes/s11/mutation5_log.md lists the mutants."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule, backend_cases, case_id, poison_

import fastdiff
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_reference
from fastdiff.ops.sampler_step import dpm_solver_2m_step

# Inputs include inf, NaN payloads and products that overflow fp16 on purpose: the Triton
# interpreter's numpy arithmetic warns on those (results are compared with torch's, NaN/inf
# included).
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DPM_CASES = backend_cases("dpm_solver_2m_step")
STORE_DTYPES = [torch.float16, torch.bfloat16]


def _every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float type: zeros, subnormals, normals, inf, NaN."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).reshape(4, 4, 64, 64)


def _same_values(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal where ``want`` is a number (+0 == -0: x_next = c x + 0 x0 is +0 for x = -0);
    NaN exactly where ``want`` is NaN."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN mask differs"
    g, w = got[~nan], want[~nan]
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} values differ, e.g. got {g[bad[0]]} for {w[bad[0]]}"


@pytest.mark.parametrize("dtype", STORE_DTYPES, ids=str)
@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
@pytest.mark.parametrize("c", [1.5, 0.75, 3.0], ids=lambda c: f"c{c}")
def test_half_outputs_round_to_nearest_even_like_torch_casts(case, dtype, c):
    """x_next = c x with c in {1.5, 0.75, 3}: the fp32 product of every fp16 / bf16 value is
    exact and often lies halfway between two neighbours of the storage type (or in the
    subnormal / overflow range), so the store must round to nearest even as torch's cast does,
    bit for bit. Also pins the fp16/bf16 loads (every bit pattern) and NaN passing through."""
    if case == ("cpu", "triton") and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    x = _every_value(dtype)
    mo = torch.zeros_like(x)
    coef = torch.tensor([1.0, 1.0, c, 0.0, 0.0, 0.0, 0.0, 0.0])
    with fastdiff.use_backend(case[1]):
        got, _ = dpm_solver_2m_step(x, mo, coef, prediction_type="sample")
    _same_values(got, (x.float() * c).to(dtype))
    # the model output's loads: x_next = c x0 with x0 = model_output (prediction "sample")
    coef = torch.tensor([1.0, 1.0, 0.0, c, 0.0, 0.0, 0.0, 0.0])
    with fastdiff.use_backend(case[1]):
        got, x0 = dpm_solver_2m_step(mo, x, coef, prediction_type="sample")
    _same_values(got, (x.float() * c).to(dtype))
    _same_values(x0, x)


def test_raw_cpu_binding_checks_its_arguments_and_writes_nothing():
    """The raw-address entry point checks what Python cannot be trusted to: a mode other than
    0 / 1 and guidance without the uncond operand are ValueErrors naming the problem, and the
    output stays untouched (a missing uncond address would be read as a null pointer)."""
    from fastdiff import _ext

    c = _ext.native()
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    out = poison_(torch.empty(2, 3))
    coef = torch.tensor([1.0, 0.5, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])

    def call(mode=0, mu=0, cfg=False, dtype_x=0, pred=0):
        c.sampler_step_cpu(mode, 2, 3, 0, 3, x.data_ptr(), 3, mo.data_ptr(), 3, mu, 3, 0, 0,
                           0, 0, 0, 0, 0, coef.data_ptr(), out.data_ptr(), 0, dtype_x, 0, pred,
                           False, 0.0, False, cfg, 1.5)  # fmt: skip

    with pytest.raises(ValueError, match="mode must be 0 or 1"):
        call(mode=2)
    with pytest.raises(ValueError, match="cfg needs the uncond operand"):
        call(cfg=True)
    with pytest.raises(ValueError, match="prediction type code"):
        call(pred=3)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        call(dtype_x=7)
    assert torch.isnan(out).all()
    call()
    assert torch.isfinite(out).all()


def test_cuda_backend_needs_a_cuda_build_of_the_extension():
    """fastdiff._C built without nvcc has no *_cuda entry points: the cuda backend is then
    unavailable on CUDA tensors, with the reason (an explicit request is a RuntimeError saying
    so, never an AttributeError from the missing binding)."""
    from fastdiff import _dispatch, _ext

    if not _ext.has_native() or _ext.has_native_cuda():
        pytest.skip("needs fastdiff._C built without CUDA")
    ok, why = fastdiff.backend_available("cuda", "cuda")
    assert not ok and "built without CUDA" in why
    assert "cuda" not in fastdiff.available_backends("group_norm_silu", "cuda")
    with fastdiff.use_backend("cuda"), pytest.raises(RuntimeError, match="built without CUDA"):
        _dispatch.resolve("sampler_step", torch.device("cuda"))


@pytest.mark.parametrize("dtype", STORE_DTYPES, ids=str)
@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
def test_nan_payloads_in_the_low_bits_stay_nan_in_half_outputs(case, dtype):
    """fp32 model output, fp16/bf16 x: x0 = model_output (prediction "sample", no clip) is
    stored without arithmetic, so a NaN whose payload sits only in the low mantissa bits (lost
    by the narrowing) must still be stored as a NaN (the quiet bit set), never as inf."""
    if case == ("cpu", "triton") and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    bits = torch.tensor([0x7F800001, -0x007FFFFF, 0x7F80FFFF, 0x7F801000, 0x3F800000],
                        dtype=torch.int32)  # fmt: skip
    mo = bits.view(torch.float32).repeat(4).reshape(4, 5)
    x = torch.zeros(4, 5, dtype=dtype)
    coef = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    with fastdiff.use_backend(case[1]):
        out, x0 = dpm_solver_2m_step(x, mo, coef, prediction_type="sample")
    for t in (x0, out):
        assert torch.isnan(t[:, :4]).all(), t
        assert (t[:, 4] == 1).all()


GN_CASES = backend_cases("group_norm_silu", include_torch=False)
# Shapes that walk the CPU kernel's other loops (csrc/cpu/group_norm.cpp), each with a
# conditioning add/scale/shift that differs per sample:
GN_SHAPES = [
    # fp32 NCHW, rows <= kTile: 80 channels per group = one whole and one partial block of 64
    ((2, 160, 5, 7), 2, torch.float32, "nchw"),
    # fp32 NHWC sample <= 64k elements: 195 rows = two row chunks (the per-chunk sums restart),
    # C = 40: one 32-channel block plus an 8-channel tail
    ((2, 40, 15, 13), 8, torch.float32, "cl"),
    # fp16 NHWC: the general path, 300 rows in chunks of 128 (a partial last chunk)
    ((3, 24, 20, 15), 6, torch.float16, "cl"),
    # fp16 NCHW: the general row path, add/scale/shift rows of each sample
    ((3, 12, 9, 7), 3, torch.float16, "nchw"),
]


@pytest.mark.parametrize("case", GN_CASES, ids=case_id)
@pytest.mark.parametrize("shape,groups,dtype,layout", GN_SHAPES, ids=lambda v: str(v))
def test_group_norm_kernel_loops_match_the_float64_reference(case, shape, groups, dtype, layout):
    """Channel blocks past the first, row chunks past the first, channel tails of the NHWC
    sums and per-sample conditioning rows: every element by the FlashAttention rule against
    float64, with a different mean per group so a misplaced block shows."""
    if case == ("cpu", "triton") and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    dev = case[0]
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen) * 2
    x += 0.1 * torch.arange(c, dtype=torch.float32).reshape(1, c, *([1] * (len(shape) - 2)))
    p = {
        "weight": torch.randn(c, generator=gen),
        "bias": torch.randn(c, generator=gen),
        "add": torch.randn(n, c, generator=gen),
        "scale": 0.5 * torch.randn(n, c, generator=gen),
        "shift": torch.randn(n, c, generator=gen),
    }
    x = x.to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dev)
    pd = {k: v.to(dev) for k, v in p.items()}
    with fastdiff.use_backend(case[1], op="group_norm_silu"):
        out = group_norm_silu(x, groups, **pd)
    p64 = {k: v.double() for k, v in p.items()}
    ref = group_norm_silu_reference(x.cpu().double(), groups, p64["weight"], p64["bias"], 1e-5,
                                    p64["add"], p64["scale"], p64["shift"])  # fmt: skip
    bshape = (n, c) + (1,) * (len(shape) - 2)
    u = x.cpu() + p["add"].to(dtype).reshape(bshape)
    y = torch.nn.functional.group_norm(u, groups, p["weight"].to(dtype), p["bias"].to(dtype))
    y = y * (1 + p["scale"].to(dtype).reshape(bshape)) + p["shift"].to(dtype).reshape(bshape)
    eager = torch.nn.functional.silu(y)
    atol = 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    assert_fa_rule(out.cpu(), ref, eager, atol=atol, name=f"{shape} {layout}")


@pytest.mark.parametrize("case", GN_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_conditioning_chunks_of_a_projection(case, layout, monkeypatch):
    """add / scale / shift as ``chunk`` views of one [N x 3C] projection (row stride 3C, as a
    UNet's time-embedding projection gives them): each sample must read its own row at that
    stride (the Triton kernels take the views as they are), for every plan."""
    from fastdiff.kernels.triton import group_norm_silu as tk

    dev = case[0]
    gen = torch.Generator().manual_seed(11)
    n, c = 3, 24
    x = torch.randn(n, c, 6, 5, generator=gen)
    proj = torch.randn(n, 3 * c, generator=gen)
    add, scale, shift = proj.chunk(3, dim=1)
    assert add.stride(0) == 3 * c
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    ref = group_norm_silu_reference(x.double(), 4, w.double(), b.double(), 1e-5, add.double(),
                                    scale.double(), shift.double())  # fmt: skip
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    args = [t.to(dev) for t in (x, w, b, add, scale, shift)]
    for max_fused in (tk._MAX_FUSED, 0):  # the fused plan, then the split one
        monkeypatch.setattr(tk, "_MAX_FUSED", max_fused)
        tk._plan.cache_clear()
        try:
            with fastdiff.use_backend(case[1], op="group_norm_silu"):
                out = group_norm_silu(args[0], 4, args[1], args[2], add=args[3],
                                      scale=args[4], shift=args[5])  # fmt: skip
        finally:
            tk._plan.cache_clear()
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
def test_sde_philox_step_without_history_skips_the_history_term(case):
    """DPM-Solver++ 2M SDE, noise drawn in the kernel (generator_state), x0_prev=None: the
    first-order step, whose c_prev x0_prev term is skipped whatever c_prev holds (the Philox
    state must not switch the history operand on; it would then read another operand). Three
    calls: the cpu backend's first call and its cached (planned) repeats."""
    gen = torch.Generator().manual_seed(21)
    x, mo = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)
    coef = torch.tensor([0.8, 0.6, 0.9, 0.4, 0.7, 0.3, 0.0, 0.0])  # c_prev = 0.7
    gs = torch.tensor([1234, 40], dtype=torch.int64)
    with fastdiff.use_backend("torch"):
        want, want_x0 = dpm_solver_2m_step(x, mo, coef, generator_state=gs)
    for _ in range(3):
        with fastdiff.use_backend(case[1]):
            got, x0 = dpm_solver_2m_step(x, mo, coef, generator_state=gs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(x0, want_x0, rtol=1e-6, atol=1e-6)
