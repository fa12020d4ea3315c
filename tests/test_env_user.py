"""fastdiff under the global state a user's program sets up: autocast, default dtype, threads."""

import os
import threading

import pytest
import torch
from helpers import backend_cases

import fastdiff
from fastdiff.ops.attention import attention


@pytest.mark.parametrize("device,backend", backend_cases("attention"))
def test_attention_under_autocast_keeps_q_dtype_and_fp32_accuracy(device, backend):
    # autocast around fp32 inputs: the op's contract is "in q's dtype, fp32 statistics". The
    # cpu/sdpa backends returned bf16 (SDPA autocasts), the torch backend ran its matmuls in bf16.
    if backend == "triton" and device == "cpu":
        pytest.skip("no bf16 arithmetic under the interpreter")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 32, generator=g).to(device) for _ in range(3))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32**0.5, -1) @ v.double()
    with fastdiff.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_use_backend_is_per_thread():
    # A use_backend context in one thread must not leak into another thread.
    from fastdiff import _dispatch

    entered, release, seen = threading.Event(), threading.Event(), []

    def holder():
        with fastdiff.use_backend("torch"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(10)
    other = threading.Thread(target=lambda: seen.append(_dispatch.requested_backend("attention")))
    other.start()
    other.join()
    release.set()
    t.join()
    assert seen == [None]


@pytest.fixture
def meta_default_device():
    # torch.set_default_device("cuda") is a common notebook setup; "meta" stands in for it on a
    # CPU machine (a tensor created without device= lands there and cannot be read back).
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedule_is_host_float64_under_a_default_device(meta_default_device, name):
    # The schedule is a host float64 table; under set_default_device it was built on that
    # device (Euler then failed with "can't convert ... to numpy", the others in .item()).
    for sch in (
        fastdiff.NoiseSchedule(name, num_train_timesteps=50),
        fastdiff.NoiseSchedule(betas=[0.1, 0.2, 0.3], rescale_betas_zero_snr=True),
    ):
        for v in (sch.betas, sch.alphas_cumprod, sch.log_snr):
            assert v.device.type == "cpu" and v.dtype == torch.float64


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++", "euler"])
def test_sample_cpu_model_under_a_default_device(sampler):
    torch.manual_seed(0)
    model = fastdiff.models.UNet.from_preset("tiny")

    def run():
        g = torch.Generator(device="cpu").manual_seed(3)
        return fastdiff.sample(model, steps=3, sampler=sampler, schedule="cosine", generator=g)

    ref = run()
    torch.set_default_device("meta")
    try:
        out = run()
    finally:
        torch.set_default_device(None)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_schedule_checks_int_t_under_a_default_device(meta_default_device):
    # an int t became a tensor on the default device, where the range check is skipped (no sync):
    # a negative t then silently indexed from the end of the tables
    sch = fastdiff.NoiseSchedule("linear", num_train_timesteps=50)
    x0 = torch.randn(2, 3, device="cpu")
    for bad in (-1, 50):
        with pytest.raises(ValueError, match="t: expected timesteps in 0..49"):
            sch.q_sample(x0, bad, torch.randn(2, 3, device="cpu"))


def _gn_sum(seed: int) -> float:
    x = torch.randn(8, 64, 32, 32, generator=torch.Generator().manual_seed(seed))
    return float(fastdiff.ops.group_norm_silu.group_norm_silu(x, 32).double().sum())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_pool_with_one_thread_per_worker_runs_after_the_parent_used_openmp():
    """README's workaround: GNU OpenMP's thread pool does not survive fork (plain PyTorch hangs
    too), so fork workers set one thread. The parent uses the OpenMP pool first."""
    import multiprocessing as mp

    expect = [_gn_sum(s) for s in (1, 2)]
    ctx = mp.get_context("fork")
    with ctx.Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        got = pool.map_async(_gn_sum, [1, 2]).get(timeout=120)
    assert got == pytest.approx(expect, rel=1e-6)
