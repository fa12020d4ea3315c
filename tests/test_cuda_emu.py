"""The csrc CUDA kernels, run without a GPU by the emulator in tests/cuda_emu.

``tests/cuda_emu/build.py`` compiles csrc/cuda/*.cu with g++ against a CPU emulation of the CUDA
execution model (one fiber per CUDA thread, block barriers, warp shuffles, mma.sync m16n8k16 per
the PTX fragment layouts, launch-limit checks, UBSan alignment/bounds/overflow checks) into a
second ``fastdiff._C``. The ``emu`` fixture swaps that module in and lets the dispatch run the
``cuda`` backend on CPU tensors, so the public ops take their real CUDA path: Python argument
marshalling, the pybind11 entry points, the host-side launch code and the kernels.

The emulated backend then passes the same checks as every other backend: the tests below call the
op test modules' own test functions with ``case = ("cpu", "cuda")``, plus cases that reach the
kernels' other plans (split GroupNorm, grid-stride sampler loops, long attention rows).

What this cannot show: speed, occupancy, races between blocks (blocks run one after another) and
the ``__CUDA_ARCH__`` branches of csrc/include (the host branches run). The GPU suite
(benchmarks/gpu_suite.sh) covers those on real hardware.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import test_attention as t_attn
import test_dpm3_op as t_dpm3
import test_dpm_hist_op as t_hist
import test_dpm_sde as t_sde
import test_group_norm_silu as t_gn
import test_sampler_step as t_step
import test_stage2_precision as t_stage2
import torch
from cuda_emu import build as emu_build
from helpers import assert_fa_rule, poison_
from test_attention import nan_empty  # noqa: F401  (fixture used by the attention cases)

import fastdiff
import fastdiff._dispatch as dispatch
import fastdiff._ext as ext
import fastdiff.ops.group_norm_silu as gmod

CASE = ("cpu", "cuda")


def over_checks(*checks):
    """Parametrize a test over other modules' test functions that take only ``case``."""
    return pytest.mark.parametrize("check", checks, ids=lambda f: f.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def emu_module():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite runs the real CUDA kernels")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulator's context switch is x86-64 assembly")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    if emu_build.cuda_include() is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found; set CUDA_HOME")
    return emu_build.load(emu_build.build())


@pytest.fixture
def emu(emu_module, monkeypatch, capfd):
    """fastdiff with the emulated fastdiff._C, and ``cuda`` runnable on CPU tensors. A UBSan
    report of the kernels (written to fd 2 while the test ran) fails the test."""
    real = dispatch._available_on

    def available_on(name: str, dev_type: str):
        if name == "cuda" and dev_type == "cpu":
            return True, ""
        return real(name, dev_type)

    monkeypatch.setattr(ext, "_C", emu_module)
    monkeypatch.setattr(ext, "native", lambda: emu_module)
    monkeypatch.setattr(dispatch, "_available_on", available_on)
    monkeypatch.setenv("FD_EMU_SMS", "1")  # small grids: the grid-stride loops run
    gmod._stale_build.cache_clear()
    gmod._unsupported_memo.cache_clear()
    yield emu_module
    gmod._stale_build.cache_clear()
    gmod._unsupported_memo.cache_clear()
    err = capfd.readouterr().err
    if "runtime error:" in err:
        pytest.fail(f"UBSan in the emulated CUDA kernels:\n{err[:4000]}")


def test_emulated_build_has_the_cuda_entry_points(emu):
    assert emu.BUILD_INFO["cuda"] is True and emu.BUILD_INFO["cuda_archs"] == "emulated"
    for sym in ("sampler_step_cuda", "group_norm_silu_cuda", "attention_forward_cuda"):
        assert hasattr(emu, sym)
    x = torch.randn(2, 8, 3, 3)
    with fastdiff.use_backend("cuda"):
        assert fastdiff._dispatch.resolve("group_norm_silu", x.device) == "cuda"


# ------------------------------------------------------------------------------ sampler step
@pytest.mark.parametrize("pred", t_step.PREDS)
@pytest.mark.parametrize("clip", ["none", "clip", "clip+recompute"])
def test_step_prediction_types_and_clip(emu, pred, clip):
    t_step.test_prediction_types_and_clip(CASE, pred, clip)


@pytest.mark.parametrize("combo", ["cfg", "lv", "cfg+lv", "noise", "cfg+lv+noise+clip"])
def test_step_guidance_variance_noise(emu, combo):
    t_step.test_guidance_variance_noise(CASE, combo)


@over_checks(
    t_step.test_fp16_large_values_stay_finite,
    t_step.test_layouts,
    t_step.test_nan_in_nan_out,
    t_step.test_philox_noise,
    t_step.test_opcheck_sampler_step,
    t_step.test_opcheck_dpm_solver_2m_step,
)
def test_step_checks(emu, check):
    check(CASE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_step_misaligned_views_take_the_scalar_path(emu, dtype):
    """Views starting one element into their storage (inner % 8 == 0 otherwise): the kernel must
    not use 16-byte vectors there (UBSan's alignment check would stop the run)."""
    shape = (2, 4, 8, 8)
    n = 2 * 4 * 8 * 8

    def view():
        return torch.randn(n + 1).to(dtype)[1:].view(shape)

    x, mo, z = view(), view(), view()
    assert x.data_ptr() % 16 and mo.data_ptr() % 16
    coef = t_step.make_coef("cpu")
    with fastdiff.use_backend("cuda", "sampler_step"):
        out, x0 = t_step.sampler_step(x, mo, coef, noise=z, clip_range=1.0, return_x0=True)
    t_step.check(out, x0, x, mo, coef, dtype, atol=1e-6, clip=1.0, z=z)


@pytest.mark.parametrize("pred", t_step.PREDS)
def test_step_dpm_solver_2m(emu, pred):
    t_step.test_dpm_solver_2m(CASE, pred)


@pytest.mark.parametrize("shape", [(3, 3, 70, 70), (2, 5, 33, 31)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_grid_stride_and_noise_match_cpu(emu, shape, layout, dtype):
    """Past one grid of threads (1 emulated SM: 16 blocks x 256 threads x 8 elements), with the
    vector path (inner % 8 == 0) and the scalar tail; the in-kernel Philox noise is the cpu
    backend's stream (the design's promise) and both match the float64 reference."""
    x = torch.randn(shape).to(dtype)
    mo = torch.randn(shape).to(dtype)
    if layout == "cl":
        x, mo = (t.to(memory_format=torch.channels_last) for t in (x, mo))
    coef = t_step.make_coef("cpu")
    outs = {}
    for backend in ("cuda", "cpu"):
        gs = torch.tensor([987654321, 12345], dtype=torch.int64)
        with fastdiff.use_backend(backend, "sampler_step"):
            outs[backend] = t_step.sampler_step(
                x, mo, coef, clip_range=1.0, generator_state=gs, return_x0=True
            )
    (out, x0), (out_cpu, x0_cpu) = outs["cuda"], outs["cpu"]
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), out_cpu.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(x0.float(), x0_cpu.float(), rtol=tol, atol=tol)
    z = t_step.philox_randn(torch.tensor([987654321, 12345]), shape)
    t_step.check(out, x0, x, mo, coef, dtype, atol=1e-6, clip=1.0, z=z)


@pytest.mark.parametrize("pred", t_sde.PREDS)
def test_step_dpm_sde_noise_tensor(emu, pred):
    t_sde.test_sde_step_with_noise_tensor(CASE, pred)


@over_checks(
    t_sde.test_sde_step_fp16_large_values_stay_finite,
    t_sde.test_sde_step_philox_noise_and_layouts,
    t_sde.test_philox_stream_is_the_same_on_every_backend,
    t_sde.test_noise_with_zero_c_noise_is_the_ode_step,
    t_sde.test_opcheck_sde,
)
def test_step_dpm_sde_checks(emu, check):
    check(CASE)


@pytest.mark.parametrize("shape", [(3, 3, 70, 70), (2, 5, 33, 31)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("noise", ["philox", "tensor"])
def test_step_dpm_sde_grid_stride_matches_cpu(emu, shape, layout, noise):
    """The SDE noise path of the dpm kernel past one grid (vector path and scalar tail): the
    in-kernel Philox z is the cpu backend's stream, and both match the float64 reference."""
    x, mo, prev = (torch.randn(shape) for _ in range(3))
    if layout == "cl":
        x, mo, prev = (t.to(memory_format=torch.channels_last) for t in (x, mo, prev))
    coef = t_sde._coef("cpu", t_sde.ROW)
    gs = torch.tensor([987654321, 12345], dtype=torch.int64)
    z = t_step.philox_randn(gs, shape)
    kw = dict(generator_state=gs) if noise == "philox" else dict(noise=z)
    outs = {}
    for backend in ("cuda", "cpu"):
        with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
            outs[backend] = t_sde.dpm_solver_2m_step(x, mo, coef, prev, **kw)
    (out, x0), (out_cpu, x0_cpu) = outs["cuda"], outs["cpu"]
    tol = 2 * torch.finfo(torch.float32).eps
    # the cpu backend's AVX2 normals are within ~5 ulp of the scalar ones (the stream promise:
    # equal uint32 stream, normals to the rounding of log/cos/sin)
    ztol = 1e-5 if noise == "philox" else tol
    torch.testing.assert_close(out, out_cpu, rtol=tol, atol=ztol)
    torch.testing.assert_close(x0, x0_cpu, rtol=tol, atol=tol)
    r, _ = t_sde.sde_reference(x, mo, prev, z, "epsilon", torch.float64)
    e, _ = t_sde.sde_reference(x, mo, prev, z, "epsilon", torch.float32)
    assert_fa_rule(out, r, e, atol=1e-6, name="x_next")


# ------------------------------------------------------------- DPM++ 3M (x0_prev2 operand)
@pytest.mark.parametrize("pred", t_dpm3.PREDS)
def test_step_dpm3_against_float64(emu, pred, poisoned):  # noqa: F811
    t_dpm3.test_3m_step_against_float64(CASE, pred, poisoned)


def test_step_dpm3_layouts_and_philox(emu, poisoned):  # noqa: F811
    t_dpm3.test_3m_step_layouts_and_philox(CASE, poisoned)


@over_checks(
    t_dpm3.test_3m_step_fp16_large_values_stay_finite,
    t_dpm3.test_absent_operand_term_is_skipped_not_zeroed,
    t_dpm3.test_zero_c_prev2_equals_the_2m_step,
    t_dpm3.test_opcheck_3m,
)
def test_step_dpm3_checks(emu, check):
    check(CASE)


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_step_dpm3_equals_diffusers_third_order_update(emu, algo):
    t_dpm3.test_one_3m_step_equals_diffusers_third_order_update(CASE, algo, "epsilon")


# -------------------------------------- the eps term (coef[7]; Heun's / DPM2's second stage)
@pytest.mark.parametrize("pred", t_stage2.PREDS)
def test_step_eps_term_against_float64(emu, pred, poisoned):  # noqa: F811
    t_stage2.test_eps_term_against_float64(CASE, pred, poisoned)


def test_step_eps_term_layouts_and_zero_coefficients(emu, poisoned):  # noqa: F811
    t_stage2.test_eps_term_layouts_and_zero_coefficients(CASE, poisoned)


@over_checks(t_stage2.test_eps_term_absent_at_zero_and_formed_otherwise)
def test_step_eps_term_checks(emu, check):
    check(CASE)


@t_stage2.needs_diffusers
@pytest.mark.parametrize("ill", [t_stage2.ILL[i] for i in (0, 1, 6, 7, 11)], ids=t_stage2._ill_id)
def test_step_stage2_calls_flash_attention_rule(emu, ill):
    t_stage2.test_stage2_calls_flash_attention_rule(CASE, ill)


@pytest.mark.parametrize("shape", [(3, 3, 70, 70), (2, 5, 33, 31)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("noise", ["none", "philox"])
def test_step_dpm3_grid_stride_matches_cpu(emu, shape, layout, noise):
    """The 3M path of the dpm kernel past one grid (vector path and scalar tail) equals the cpu
    backend's and the float64 reference."""
    x, mo, p1, p2 = (torch.randn(shape) for _ in range(4))
    if layout == "cl":
        x, mo, p1, p2 = (t.to(memory_format=torch.channels_last) for t in (x, mo, p1, p2))
    coef = t_dpm3._coef("cpu", t_dpm3.ROW)
    gs = torch.tensor([987654321, 12345], dtype=torch.int64)
    z = t_step.philox_randn(gs, shape) if noise == "philox" else None
    kw = dict(generator_state=gs) if noise == "philox" else {}
    outs = {}
    for backend in ("cuda", "cpu"):
        with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
            outs[backend] = t_dpm3.dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2, **kw)
    (out, x0), (out_cpu, x0_cpu) = outs["cuda"], outs["cpu"]
    tol = 2 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, out_cpu, rtol=tol, atol=1e-5 if z is not None else tol)
    torch.testing.assert_close(x0, x0_cpu, rtol=tol, atol=tol)
    r, _ = t_dpm3.reference(x, mo, p1, p2, z, "epsilon", torch.float64)
    e, _ = t_dpm3.reference(x, mo, p1, p2, z, "epsilon", torch.float32)
    assert_fa_rule(out, r, e, atol=1e-6, name="x_next")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_step_dpm3_misaligned_x0_prev2_takes_the_scalar_path(emu, dtype):
    """x0_prev2 alone one element into its storage (every other operand aligned, inner % 8 == 0):
    the kernel must not use 16-byte vector loads (UBSan's alignment check would stop the run)."""
    shape = (2, 4, 8, 8)
    x, mo, p1 = (torch.randn(shape).to(dtype) for _ in range(3))
    p2 = torch.randn(x.numel() + 1).to(dtype)[1:].view(shape)
    assert p2.data_ptr() % 16 and not x.data_ptr() % 16
    coef = t_dpm3._coef("cpu", t_dpm3.ROW)
    with fastdiff.use_backend("cuda", "dpm_solver_2m_step"):
        out, _ = t_dpm3.dpm_solver_2m_step(x, mo, coef, p1, x0_prev2=p2)
    r, _ = t_dpm3.reference(x, mo, p1, p2, None, "epsilon", torch.float64)
    e, _ = t_dpm3.reference(x, mo, p1, p2, None, "epsilon", dtype)
    assert_fa_rule(out, r, e, atol=1e-6, name="misaligned x0_prev2")


def test_raw_cuda_binding_refuses_x0_prev2_outside_a_3m_step(emu):
    """The C++ boundary: x0_prev2 with mode 0, or without x0_prev, is a ValueError and nothing
    is written (cpu and cuda entry points)."""
    x, mo, q = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    coef = t_dpm3._coef("cpu", t_dpm3.ROW)
    for name in ("sampler_step_cpu", "sampler_step_cuda"):
        out = poison_(torch.empty(2, 3))
        fn = getattr(emu, name)
        tail = (0,) if name.endswith("cuda") else ()  # the stream

        def call(mode, z, fn=fn, out=out, tail=tail):
            fn(mode, 2, 3, 0, 3, x.data_ptr(), 3, mo.data_ptr(), 3, 0, 0, 0, 0, z, 3, 0, 0, 0,
               coef.data_ptr(), out.data_ptr(), 0, 0, 0, 0, False, 0.0, False, False, 0.0, *tail,
               q.data_ptr(), 3)  # fmt: skip

        for mode, z in ((0, x.data_ptr()), (1, 0)):
            with pytest.raises(ValueError, match="x0_prev2 needs mode 1 and x0_prev"):
                call(mode, z)
        assert torch.isnan(out).all()
        call(1, x.data_ptr())
        assert torch.isfinite(out).all()


# ----------------------------- x0_prev3 / x0_prev4 (SA-Solver orders 3-4, singlestep SDE 3)
@pytest.mark.parametrize("pred", t_hist.PREDS)
def test_step_deep_history_against_float64(emu, pred, poisoned):  # noqa: F811
    t_hist.test_deep_history_step_against_float64(CASE, pred, poisoned)
    t_hist.test_deep_history_layouts_and_philox(CASE, poisoned)


@over_checks(t_hist.test_deep_history_nan_inf_masks, t_hist.test_zero_coefficient_drops_the_term,
             t_hist.test_absent_x0_prev4_never_reads_c_prev4,
             t_hist.test_opcheck_deep_history)  # fmt: skip
def test_step_deep_history_checks(emu, check):
    check(CASE)


@pytest.mark.parametrize("shape,layout", [((3, 3, 70, 70), "nchw"), ((2, 5, 33, 31), "cl")])
def test_step_deep_history_grid_stride_matches_cpu(emu, shape, layout):
    """x0_prev3 / x0_prev4 past one grid (vector path, scalar tail, Philox) = cpu, float64."""
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x, mo, p1, p2, p3, p4 = (torch.randn(shape).to(memory_format=fmt) for _ in range(6))
    coef = t_hist._coef("cpu", t_hist.ROW)
    gs = torch.tensor([987654321, 12345], dtype=torch.int64)
    z = t_step.philox_randn(gs, shape)
    kw = dict(x0_prev2=p2, x0_prev3=p3, x0_prev4=p4, generator_state=gs)
    outs = {}
    for backend in ("cuda", "cpu"):
        with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
            outs[backend] = t_hist.dpm_solver_2m_step(x, mo, coef, p1, **kw)
    (out, x0), (out_cpu, x0_cpu) = outs["cuda"], outs["cpu"]
    tol = 2 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, out_cpu, rtol=tol, atol=1e-5)
    torch.testing.assert_close(x0, x0_cpu, rtol=tol, atol=tol)
    r, _ = t_hist.reference(x, mo, (p1, p2, p3, p4), z, "epsilon", torch.float64)
    e, _ = t_hist.reference(x, mo, (p1, p2, p3, p4), z, "epsilon", torch.float32)
    assert_fa_rule(out, r, e, atol=1e-6, name="x_next")


def test_step_deep_history_misaligned_x0_prev4_takes_the_scalar_path(emu):
    """x0_prev4 alone one element into its storage (inner % 8 == 0): no 16-byte vector loads."""
    x, mo, p1, p2, p3 = (torch.randn(2, 4, 8, 8) for _ in range(5))
    p4 = torch.randn(x.numel() + 1)[1:].view(x.shape)
    assert p4.data_ptr() % 16 and not x.data_ptr() % 16
    with fastdiff.use_backend("cuda", "dpm_solver_2m_step"):
        out, _ = t_hist.dpm_solver_2m_step(x, mo, t_hist._coef("cpu", t_hist.ROW), p1, x0_prev2=p2,
                                           x0_prev3=p3, x0_prev4=p4)  # fmt: skip
    r, _ = t_hist.reference(x, mo, (p1, p2, p3, p4), None, "epsilon", torch.float64)
    e, _ = t_hist.reference(x, mo, (p1, p2, p3, p4), None, "epsilon", torch.float32)
    assert_fa_rule(out, r, e, atol=1e-6, name="misaligned x0_prev4")


def test_raw_cuda_binding_refuses_x0_prev3_without_x0_prev2(emu):
    """The cuda entry point: x0_prev3 without x0_prev2 (x0_prev4 without x0_prev3) refused."""
    x, mo, q, q3, q4 = (torch.randn(2, 3) for _ in range(5))
    coef, out = t_hist._coef("cpu", t_hist.ROW), poison_(torch.empty(2, 3))

    def call(q_, q3_, q4_):
        emu.sampler_step_cuda(1, 2, 3, 0, 3, x.data_ptr(), 3, mo.data_ptr(), 3, 0, 0, 0, 0,
                              x.data_ptr(), 3, 0, 0, 0, coef.data_ptr(), out.data_ptr(), 0, 0,
                              0, 2, False, 0.0, False, False, 0.0, 0, q_, 3, q3_, 3, q4_,
                              3)  # fmt: skip

    with pytest.raises(ValueError, match="x0_prev3 needs x0_prev2"):
        call(0, q3.data_ptr(), 0)
    with pytest.raises(ValueError, match="x0_prev4 needs x0_prev3"):
        call(q.data_ptr(), 0, q4.data_ptr())
    assert torch.isnan(out).all()
    call(q.data_ptr(), q3.data_ptr(), q4.data_ptr())
    r = t_hist.ROW
    want = r[2] * x + r[3] * mo + r[4] * x + r[6] * q + r[8] * q3 + r[9] * q4
    torch.testing.assert_close(out, want + r[7] * (x - r[0] * mo) / r[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- group norm
SD_IDS = [f"{c}-{l}" for c, l in t_gn.SD_CASES]
PATH_IDS = [str(s[0]) for s in t_gn.PATH_SHAPES]


@pytest.mark.parametrize("channels,layout", t_gn.SD_CASES, ids=SD_IDS)
def test_gn_sd_channels(emu, channels, layout):
    t_gn.test_sd_channels(CASE, channels, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", t_gn.SHAPES, ids=[str(s[0]) for s in t_gn.SHAPES])
def test_gn_shapes_dtypes_layouts(emu, shape, groups, layout, dtype):
    t_gn.test_shapes_dtypes_layouts(CASE, shape, groups, layout, dtype)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", t_gn.PATH_SHAPES, ids=PATH_IDS)
def test_gn_channels_with_far_apart_means(emu, shape, groups, layout):
    t_gn.test_channels_with_far_apart_means(CASE, shape, groups, layout)


@pytest.mark.parametrize("cond", [False, True])
def test_gn_activation_none(emu, cond):
    t_gn.test_plain_group_norm_activation_none(CASE, cond)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gn_constant_group(emu, layout):
    t_gn.test_constant_group_gives_silu_of_shift_plus_bias(CASE, layout)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gn_silu_range(emu, channels_last):
    t_gn.test_silu_of_very_negative_values_underflows_to_zero(CASE, channels_last)
    t_gn.test_silu_accuracy_over_its_range(CASE, channels_last)


@over_checks(
    t_gn.test_non_contiguous_inputs,
    t_gn.test_fp16_times_1000_stays_finite,
    t_gn.test_output_fully_written,
    t_gn.test_opcheck,
)
def test_gn_checks(emu, check):
    check(CASE)


# Shapes whose (n, g) slab is too large for the fused kernel (cpg * HW / vec > 2048): the split
# plan (partial statistics, finalize, apply), with 16-byte vectors and scalar accesses.
SPLIT_SHAPES = [
    ((1, 32, 48, 48), 4),  # NCHW and NHWC vectorised
    ((1, 16, 65, 65), 2),  # odd HW: NCHW scalar, NHWC vectorised
    ((2, 18, 40, 40), 2),  # C % 4 != 0: NHWC scalar
    ((2, 320, 24, 24), 32),  # SD channels (cpg 10), NHWC channel tiles
    ((1, 1152, 8, 8), 32),  # SDXL cpg 36: more than 256 channel vectors -> several NHWC tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", SPLIT_SHAPES, ids=[str(s[0]) for s in SPLIT_SHAPES])
def test_gn_split_plan(emu, shape, groups, layout, dtype):
    x, p = t_gn._inputs(shape, dtype, "cpu", cond=True)
    if dtype != torch.float32:  # a half model: parameters and conditioning in x's dtype
        p = {k: v.to(dtype) for k, v in p.items()}
    x = t_gn._to_layout(x, layout)
    out = t_gn._run("cuda", x, groups, p)
    t_gn._check(out, x, groups, p, name=f"cuda-emu split {shape} {layout} {dtype}")
    assert out.stride() == x.stride()


_COPIES = {"aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::copy_"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hw", [(5, 6), (48, 48)], ids=["fused", "split"])
def test_gn_operands_in_their_dtype_and_row_strides(emu, dtype, hw):
    """A half model: weight/bias and add/scale/shift are read in their dtype, scale/shift as
    chunk() views (row stride 2C) and add as an expanded row (stride 0), with no cast or copy,
    on both plans (48 x 48 x 8 channels per group is past the fused kernel's slab)."""
    n, c = 3, 64
    x = torch.randn(n, c, *hw).to(dtype)
    scale, shift = (0.5 * torch.randn(n, 2 * c)).to(dtype).chunk(2, dim=1)
    add = torch.randn(1, c).to(dtype).expand(n, c)
    p = {"weight": torch.randn(c).to(dtype), "bias": torch.randn(c).to(dtype), "add": add,
         "scale": scale, "shift": shift}  # fmt: skip
    assert scale.stride(0) == 2 * c and p["add"].stride(0) == 0
    with torch.profiler.profile(acc_events=True) as prof:  # (torch 2.11 warns without it)
        out = t_gn._run("cuda", x, 8, p)
    assert not {e.name for e in prof.events()} & _COPIES
    t_gn._check(out, x, 8, p, name=f"{dtype} operands")


def test_gn_mixed_operand_dtypes_are_cast(emu):
    """weight fp16 with bias fp32 (one dtype slot): both go to fp32; conditioning in bf16 with
    an fp32 x stays bf16."""
    n, c = 2, 48
    x = torch.randn(n, c, 7, 3)
    p = {"weight": torch.randn(c).half(), "bias": torch.randn(c), "add": None,
         "scale": torch.randn(n, c).bfloat16(), "shift": torch.randn(n, c).bfloat16()}  # fmt: skip
    out = t_gn._run("cuda", x, 6, p)
    t_gn._check(out, x, 6, p, name="mixed")


def test_gn_misaligned_input_takes_the_scalar_path(emu):
    """A view starting 1 element into its storage cannot use 16-byte vectors (UBSan's alignment
    check would abort the run if a kernel tried)."""
    base = torch.randn(2 * 64 * 8 * 8 + 1)
    x = base[1:].view(2, 64, 8, 8)
    assert x.data_ptr() % 16 != 0
    p = {"weight": torch.randn(64), "bias": torch.randn(64), "add": None, "scale": None,
         "shift": None}  # fmt: skip
    out = t_gn._run("cuda", x, 8, p)
    t_gn._check(out, x, 8, p, name="misaligned")


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("shape", t_attn.SHAPES, ids=lambda p: f"D{p[0]}-Lq{p[1][0]}-Lk{p[1][1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_attn_matches_reference(emu, shape, dtype, nan_empty):  # noqa: F811
    t_attn.test_matches_reference(CASE, shape, dtype, None)


@pytest.mark.parametrize("D", [40, 64, 160])
def test_attn_bfloat16(emu, D, nan_empty):  # noqa: F811
    q, k, v = t_attn._qkv(2, 3, 77, 130, D, torch.bfloat16, "cpu")
    t_attn._check(t_attn._run("cuda", q, k, v), q, k, v, name=f"cuda-emu bf16 D={D}")


@over_checks(
    t_attn.test_strided_views_of_fused_qkv,
    t_attn.test_custom_scale,
    t_attn.test_fp16_large_logits_finite,
    t_attn.test_opcheck,
)
def test_attn_checks(emu, check, nan_empty):  # noqa: F811
    params = check.__code__.co_varnames[: check.__code__.co_argcount]
    check(CASE, *([None] if "nan_empty" in params else []))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attn_block(emu, cross):
    t_attn.test_attention_block(CASE, cross)


def test_attn_several_query_tiles_and_heads(emu, nan_empty):  # noqa: F811
    """Lq over several 64-row tiles, keys over several 64-key tiles with a ragged end, B*H > 1."""
    q, k, v = t_attn._qkv(2, 2, 200, 300, 80, torch.float16, "cpu", scale=2.0)
    out = poison_(torch.empty_like(q))
    out.copy_(t_attn._run("cuda", q, k, v))
    ref = t_attn.attention_reference(q.double(), k.double(), v.double(), 80**-0.5)
    assert_fa_rule(out, ref, t_attn._eager(q, k, v, 80**-0.5), k=2.0, atol=1e-4, name="tiles")


# ------------------------------------------------ UniPC order 3 (m_prev3) on the cuda kernel
@pytest.mark.parametrize("shape", [(3, 3, 70, 70), (2, 5, 33, 31)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_unipc3_grid_stride_matches_cpu(emu, shape, layout):
    """The order-3 instantiation of the unipc kernel past one grid (FD_EMU_SMS=1) equals the cpu
    backend's and the float64 reference (imported here: test_unipc3 imports this module)."""
    from test_unipc3 import _eager, _ref64, _row

    from fastdiff.ops.unipc_step import unipc_step

    x, mo, last, m1, m2, m3 = (torch.randn(shape) for _ in range(6))
    if layout == "cl":
        x, mo, last, m1, m2, m3 = (
            t.to(memory_format=torch.channels_last) for t in (x, mo, last, m1, m2, m3)
        )
    coef = _row()
    outs = {}
    for backend in ("cuda", "cpu"):
        with fastdiff.use_backend(backend, "unipc_step"):
            outs[backend] = unipc_step(x, mo, coef, last, m1, m2, m_prev3=m3)
    tol = 2 * torch.finfo(torch.float32).eps
    refs = _ref64(x, mo, coef, [last, m1, m2, m3], "epsilon", None, None)
    eags = _eager(x, mo, coef, [last, m1, m2, m3], "epsilon", None, None)
    for k, name in enumerate(("x_c", "m", "x_next")):
        torch.testing.assert_close(outs["cuda"][k], outs["cpu"][k], rtol=tol, atol=1e-5)
        assert_fa_rule(outs["cuda"][k], refs[k], eags[k], atol=1e-6, name=name)


def test_raw_unipc_binding_refuses_m3_without_m2_and_m1(emu):
    """The C++ boundary (cpu and cuda entry points): m3 without m2 or m1 is a ValueError and
    nothing is written."""
    from test_unipc3 import _row

    x, mo, h = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    coef = _row()
    for name in ("unipc_step_cpu", "unipc_step_cuda"):
        outs = [poison_(torch.empty(2, 3)) for _ in range(3)]
        fn = getattr(emu, name)
        tail = (0,) if name.endswith("cuda") else ()  # the stream
        for m1, m2 in ((h.data_ptr(), 0), (0, h.data_ptr())):
            with pytest.raises(ValueError, match="m_prev3 needs m_prev2 and m_prev"):
                fn(2, 3, x.data_ptr(), 3, mo.data_ptr(), 3, 0, 0, 0, 0, m1, 3, m2, 3,
                   coef.data_ptr(), *(o.data_ptr() for o in outs), 0, 0, 0, False, 0.0, False,
                   0.0, h.data_ptr(), 3, *tail)  # fmt: skip
        assert all(torch.isnan(o).all() for o in outs)
