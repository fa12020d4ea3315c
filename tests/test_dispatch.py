import os
import platform

import pytest
import torch

import fastdiff
from fastdiff import _dispatch


def test_unknown_backend_lists_valid():
    with pytest.raises(ValueError, match="valid backends"):
        fastdiff.set_backend("tpu")
    with pytest.raises(ValueError, match="valid backends"), fastdiff.use_backend("nope"):
        pass


def test_unknown_op():
    with pytest.raises(ValueError, match="valid ops"):
        fastdiff.set_backend("torch", op="conv")


def test_auto_choice_cpu_prefers_native():
    assert _dispatch.resolve("sampler_step", torch.device("cpu")) == "cpu"


def test_context_manager_overrides_and_restores():
    dev = torch.device("cpu")
    with fastdiff.use_backend("torch"):
        assert _dispatch.resolve("group_norm_silu", dev) == "torch"
        with fastdiff.use_backend("cpu", op="group_norm_silu"):
            assert _dispatch.resolve("group_norm_silu", dev) == "cpu"
            assert _dispatch.resolve("sampler_step", dev) == "torch"
    assert _dispatch.resolve("group_norm_silu", dev) == "cpu"


def test_set_backend_and_clear():
    dev = torch.device("cpu")
    fastdiff.set_backend("torch", op="sampler_step")
    try:
        assert _dispatch.resolve("sampler_step", dev) == "torch"
    finally:
        fastdiff.set_backend(None, op="sampler_step")
    assert _dispatch.resolve("sampler_step", dev) == "cpu"


def test_env_var(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "group_norm_silu=torch")
    assert _dispatch.resolve("group_norm_silu", torch.device("cpu")) == "torch"
    assert _dispatch.resolve("sampler_step", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="valid backends"):
        _dispatch.resolve("sampler_step", torch.device("cpu"))


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastdiff.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.resolve("sampler_step", torch.device("cpu"))
    with fastdiff.use_backend("cuda"), pytest.raises(RuntimeError, match="CUDA tensors"):
        _dispatch.resolve("sampler_step", torch.device("cpu"))


def test_unsupported_inputs_skip_in_auto_but_error_when_explicit():
    dev = torch.device("cpu")
    assert _dispatch.resolve("attention", dev, {"cpu": "no"}) == "sdpa"
    with fastdiff.use_backend("cpu"), pytest.raises(RuntimeError, match="head dim"):
        _dispatch.resolve("attention", dev, {"cpu": "head dim 512 is not supported"})


def test_build_info_fields():
    info = fastdiff.build_info()
    for key in ("cuda_compiled", "cuda_archs", "openmp", "backends", "torch", "triton"):
        assert key in info
    assert info["native"], info["native_error"]
    assert "torch" in info["backends"]["cpu"]["sampler_step"]
    if os.environ.get("TRITON_INTERPRET") == "1" and info["triton"]:
        assert "triton" in info["backends"]["cpu"]["sampler_step"]


def test_cpu_dispatch_of_the_build():
    """x86-64 GCC builds carry AVX2+FMA kernels picked at run time beside the baseline ones; CI's
    second build (CXXFLAGS=-DFD_CPU_BASELINE, FASTDIFF_EXPECT_CPU_BASELINE=1) has the baseline
    loops only, which it then tests as aarch64 would run them."""
    got = fastdiff.build_info()["cpu_dispatch"]
    if os.environ.get("FASTDIFF_EXPECT_CPU_BASELINE") == "1":
        assert got == "baseline"
    elif platform.machine() == "x86_64" and "GNU" in fastdiff.build_info()["cxx_compiler"]:
        assert got == "x86-64-v3,baseline"
    else:
        assert got == "baseline"


def test_backend_of_another_op_hints_at_op_scoping():
    """use_backend("sdpa") (attention's backend) on group_norm_silu: the error says how to scope
    the request to the op that has it."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    with fastdiff.use_backend("sdpa"), pytest.raises(RuntimeError, match="op='attention'"):
        group_norm_silu(torch.randn(1, 8, 2, 2), 2)


def test_abi_version_matches_the_header_and_the_build():
    from pathlib import Path

    from fastdiff import _ext

    header = Path(__file__).parents[1] / "csrc/include/fastdiff/common.h"
    line = next(ln for ln in header.read_text().splitlines() if "define FASTDIFF_ABI_VERSION" in ln)
    assert int(line.split()[-1]) == _ext.ABI_VERSION
    if _ext.has_native():
        assert _ext.native().ABI_VERSION == _ext.ABI_VERSION


def test_stale_native_build_is_refused_with_a_reason(monkeypatch):
    import types

    from fastdiff import _ext

    stale = types.ModuleType("fastdiff._C")
    stale.__file__ = "/somewhere/_C.so"
    stale.ABI_VERSION = _ext.ABI_VERSION - 1
    monkeypatch.setattr(fastdiff, "_C", stale, raising=False)
    with pytest.warns(UserWarning, match="stale build"):
        mod, why = _ext._load_native()
    assert mod is None
    assert f"ABI_VERSION {_ext.ABI_VERSION - 1}" in why and "pip install ." in why
    del stale.ABI_VERSION  # built before the stamp existed
    with pytest.warns(UserWarning, match="ABI_VERSION None"):
        assert _ext._load_native()[0] is None
    # the disabled module makes the native backends unavailable, with that reason
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "C_IMPORT_ERROR", why)
    monkeypatch.setattr(_dispatch, "_AVAILABLE", {})
    ok, reason = _dispatch.backend_available("cpu", "cpu")
    assert not ok and "stale build" in reason


def test_cached_verdicts_follow_every_input(monkeypatch):
    """resolve caches its verdict in eager mode: every input of the verdict is part of the key
    (env values read on each call, set_backend, use_backend, device, unsupported's items)."""
    dev = torch.device("cpu")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    resolve = _dispatch.resolve
    assert resolve("sampler_step", dev) == resolve("sampler_step", dev) == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert resolve("sampler_step", dev) == "torch"
    monkeypatch.setenv("FASTDIFF_BACKEND", "sampler_step=cpu,torch")
    assert resolve("sampler_step", dev) == "cpu"
    assert resolve("group_norm_silu", dev) == "torch"
    monkeypatch.delenv("FASTDIFF_BACKEND")
    assert resolve("group_norm_silu", dev) == "cpu"
    fastdiff.set_backend("torch")
    try:
        assert resolve("sampler_step", dev) == "torch"
        fastdiff.set_backend("cpu", op="sampler_step")
        assert resolve("sampler_step", dev) == "cpu"
        assert resolve("group_norm_silu", dev) == "torch"
    finally:
        fastdiff.set_backend(None, op="sampler_step")
        fastdiff.set_backend(None)
    assert resolve("group_norm_silu", dev) == "cpu"
    with fastdiff.use_backend("torch"):
        assert resolve("sampler_step", dev) == "torch"
        with fastdiff.use_backend("cpu", op="sampler_step"):
            assert resolve("sampler_step", dev) == "cpu"
        assert resolve("sampler_step", dev) == "torch"
    unsupported = {}
    assert resolve("sampler_step", dev, unsupported) == "cpu"
    unsupported["cpu"] = "not these inputs"
    assert resolve("sampler_step", dev, unsupported) == "torch"
    assert resolve("sampler_step", "cpu", unsupported) == "torch"
    with fastdiff.use_backend("cpu"), pytest.raises(RuntimeError, match="not these inputs"):
        resolve("sampler_step", dev, unsupported)
    assert resolve("sampler_step", "cpu") == _dispatch._resolve("sampler_step", "cpu", None)


def test_cached_verdicts_never_cache_errors(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastdiff.use_backend("triton"):
        for _ in range(2):
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                _dispatch.resolve("sampler_step", dev)
        if _dispatch._triton_importable()[0]:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert _dispatch.resolve("sampler_step", dev) == "triton"
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                _dispatch.resolve("sampler_step", dev)


def test_cached_verdicts_reset_with_availability(monkeypatch):
    """A reset of the availability memo (as after a native module change) drops the verdicts."""
    from fastdiff import _ext

    if not _ext.has_native():
        pytest.skip("needs fastdiff._C")
    dev = torch.device("cpu")
    with fastdiff.use_backend("cpu"):
        assert _dispatch.resolve("sampler_step", dev) == "cpu"
        monkeypatch.setattr(_ext, "_C", None)
        monkeypatch.setattr(_ext, "C_IMPORT_ERROR", "gone for this test")
        monkeypatch.setattr(_dispatch, "_AVAILABLE", {})
        with pytest.raises(RuntimeError, match="gone for this test"):
            _dispatch.resolve("sampler_step", dev)


def test_bad_env_var_error_names_the_variable(monkeypatch):
    from fastdiff.ops.group_norm_silu import group_norm_silu

    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"FASTDIFF_BACKEND='bogus': unknown fastdiff backend"):
        group_norm_silu(x, 2)
    monkeypatch.setenv("FASTDIFF_BACKEND", "attention=torch,nope=cpu")
    with pytest.raises(ValueError, match=r"FASTDIFF_BACKEND='attention=torch,nope=cpu': .*nope"):
        group_norm_silu(x, 2)
