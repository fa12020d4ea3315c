"""Cross-version shims of fastdiff's Triton code (fastdiff/kernels/triton/_compat.py).

The shim under test works around Triton 3.6's interpreter with NumPy >= 2.4: its scalar
``tl.tensor.__index__`` did ``int(array)`` on a 1-element 1-D array, which NumPy 2.4 rejects, so
every ``range(0, n, BLOCK)`` over a runtime bound failed under ``TRITON_INTERPRET=1``. These tests
hold on every Triton: they check the detection on stand-in functions, the wrapper on the real
interpreter hook (its ``__index__`` must convert a 1-element 1-D handle after the shim, whatever
the installed Triton did), and a kernel looping over a runtime bound under the interpreter.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from fastdiff.kernels.triton import _compat  # noqa: E402


def _handle(data) -> types.SimpleNamespace:
    return types.SimpleNamespace(handle=types.SimpleNamespace(data=data))


def test_index_broken_detects_a_failing_or_wrong_conversion():
    def raises(self):  # Triton 3.6 + NumPy 2.4: int() of a 1-D array
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    def wrong(self):
        return 0

    def squeezes(self):  # Triton 3.9's conversion
        return int(self.handle.data.squeeze())

    assert _compat._index_broken(raises)
    assert _compat._index_broken(wrong)
    assert not _compat._index_broken(squeezes)
    assert _compat._index(_handle(np.array([7], dtype=np.int64))) == 7
    assert _compat._index(_handle(np.array(-5, dtype=np.int32))) == -5


def test_patched_interpreter_hook_converts_one_element_arrays_and_restores():
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    assert _compat.patch_interpreter(force=True)
    assert _compat.patch_interpreter()  # idempotent: wrapped once
    hook = interpreter._patch_lang_tensor
    assert hasattr(hook, "__wrapped__") and not hasattr(hook.__wrapped__, "__wrapped__")

    class Stand:  # stands in for tl.tensor: the hook patches attributes onto the class
        pass

    scope = interpreter._LangPatchScope()
    hook(Stand, scope)
    for data in (np.array([11], dtype=np.int32), np.array(12, dtype=np.int64)):
        assert Stand.__index__(_handle(data)) == int(data.reshape(-1)[0])
    scope.restore()
    assert "__index__" not in vars(Stand)  # the launch's scope undoes the shim with the rest


def test_interpreting_reads_tritons_setting(monkeypatch):
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if not hasattr(runtime, "interpret"):
        pytest.skip("this Triton has no knobs: the environment fallback is tested below")
    for val in (True, False):
        monkeypatch.setattr(runtime, "interpret", val)
        assert _compat.interpreting() is val


def test_interpreting_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(), raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _compat.interpreting() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _compat.interpreting() is False


def test_interpreter_loop_over_a_runtime_bound():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs a kernel on CPU tensors: needs TRITON_INTERPRET=1")
    import triton.language as tl

    from fastdiff.kernels.triton import sampler_step  # noqa: F401  (installs the shim)

    @triton.jit
    def _strided_sum_kernel(
        X,  # [n] fp32 input
        OUT,  # [nprog] fp32 per-program sums
        n,  # elements (runtime bound of the loop)
        BLOCK: tl.constexpr,  # elements per iteration
    ):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            acc += tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(OUT + pid, tl.sum(acc, axis=0))

    x = torch.randn(1000, dtype=torch.float32) + 3.0
    out = torch.full((3,), float("nan"))
    _strided_sum_kernel[(3,)](x, out, x.numel(), BLOCK=64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum().double(), x.double().sum(), rtol=1e-5, atol=1e-3)


def _torch_bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_f32_to_bf16_bits_is_round_to_nearest_even():
    """The shim's cast against torch's (RNE): random values over many binades, ties, the carry
    into the next binade, subnormals, infinities, signed zero; NaN stays NaN."""
    g = torch.Generator().manual_seed(11)
    scale = torch.exp2(torch.randint(-130, 120, (50000,), generator=g))
    x = torch.randn(50000, generator=g) * scale
    mant = torch.randint(0, 1 << 7, (4096,), generator=g, dtype=torch.int32)
    ties = (((0x3F80 | mant) << 16) | 0x8000).view(torch.float32)  # halfway cases in [1, 2)
    inf = float("inf")
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 4 - 2**-7, 3.4e38, inf, -inf, -0.0, 1e-40])
    for v in (x, ties, special):
        assert np.array_equal(_compat.f32_to_bf16_bits(v.numpy()), _torch_bf16_bits(v))
    nan = _compat.f32_to_bf16_bits(np.array([np.nan, -np.nan], np.float32))
    assert torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).isnan().all()


def test_bf16_rounding_broken_detects_truncation():
    def truncating(v):
        return (np.asarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16)

    def raises(v):
        raise TypeError("unknown layout")

    assert _compat._bf16_rounding_broken(truncating)
    assert not _compat._bf16_rounding_broken(_compat.f32_to_bf16_bits)
    assert not _compat._bf16_rounding_broken(raises)  # unknown: left alone


def test_interpreter_bf16_store_rounds_to_nearest_even():
    """A kernel's fp32 -> bf16 store rounds as the GPU's cvt.rn does (the Triton 3.9 interpreter
    truncated: up to 1 bf16 ulp, which took fused bf16 outputs past 2x eager's error)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs a kernel on CPU tensors: needs TRITON_INTERPRET=1")
    import triton.language as tl

    from fastdiff.kernels.triton import unipc_step  # noqa: F401  (installs the shims)

    @triton.jit
    def _to_bf16_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs).to(Y.dtype.element_ty))

    x = torch.randn(4096, generator=torch.Generator().manual_seed(2)) * 3
    y = torch.full((4096,), float("nan"), dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
