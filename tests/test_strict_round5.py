"""Mutation testing, round 5 (session 11): tests that kill the mutants of the C++ / CUDA shared
math (csrc/include), the C++ CPU kernels, the raw-address bindings, the Triton kernels and the
dispatch seam that the existing suite let live. Each test names the behaviour it pins;
/work/notes/s11/mutation5_log.md lists the mutants."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_cases, case_id, poison_

import fastdiff
from fastdiff.ops.sampler_step import dpm_solver_2m_step

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
