"""Mutation round 8 (session 13): tests that kill mutants of the session-12 code (DPM++ 3M, UniPC
order 3, the graph history buffers) which the other tests let through."""

from __future__ import annotations

import pytest
import torch
from test_euler_ancestral import _Net

import fastdiff
from fastdiff.ops import unipc_step


@torch.no_grad()
def test_dpm3_graph_is_not_reused_from_an_order_2_capture(fake_cuda_graphs, monkeypatch):
    """A graph captured for DPM++ 2M on a model and shape is not reused for 3M (solver_order is
    part of the graph-cache key: 3M needs the second static history buffer x0_prev2). Reusing
    it would skip the c_prev2 m_{i-2} term on every step. The graphed 3M run after the 2M
    capture equals the eager 3M run (itself checked against diffusers in test_dpm3)."""
    from fastdiff import api

    torch.manual_seed(0)
    net = _Net(num_classes=4).eval()
    eager_loop = api._sample_eager
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(graphed, order):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(net, steps=7, sampler="dpm++", solver_order=order, noise=x_t,
                               cond=torch.tensor([1, 2]), guidance_scale=2.0)  # fmt: skip

    two = run(True, 2)
    three = run(True, 3)
    eager3 = run(False, 3)
    torch.testing.assert_close(three, eager3, rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2
    assert fake_cuda_graphs[0].x0_prev2 is None and fake_cuda_graphs[1].x0_prev2 is not None
    assert (eager3 - two).abs().max() > 1e-4  # 3M is not 2M: the test can see a reused graph


@torch.no_grad()
def test_dpm3_graph_load_clears_the_second_history_buffer(fake_cuda_graphs, monkeypatch):
    """A graph's load() zeroes x0_prev2 (m_{i-2}) before a run: what a previous run left there
    (here NaN, as a diverged run leaves) must not reach the first two steps, whose rows have
    c_prev2 = 0 (0 x NaN is NaN). The second graphed run equals the eager one."""
    from fastdiff import api

    torch.manual_seed(0)
    net = _Net(num_classes=4).eval()
    eager_loop = api._sample_eager
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    def run(graphed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(net, steps=6, sampler="dpm++", solver_order=3, noise=x_t,
                               cond=torch.tensor([3, 0]), guidance_scale=2.0)  # fmt: skip

    run(True)
    assert len(fake_cuda_graphs) == 1
    fake_cuda_graphs[0].x0_prev2.fill_(float("nan"))
    again = run(True)
    assert len(fake_cuda_graphs) == 1  # the same graph, replayed
    torch.testing.assert_close(again, run(False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_unipc_step_m_prev3_with_m_prev2_but_without_m_prev_is_refused(backend):
    """m_prev3 needs m_prev and m_prev2: given with m_prev2 but without m_prev it is a ValueError
    naming m_prev (the torch reference would otherwise add c_m3 m_{i-3} and c_m2 m_{i-2} and skip
    m_{i-1}'s terms), and nothing is written."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(8)
    x, mo, m2, m3 = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    coef = torch.randn(12, generator=g)
    before = [t.clone() for t in (x, mo, m2, m3)]
    with (
        fastdiff.use_backend(backend, op="unipc_step"),
        pytest.raises(ValueError, match=r"m_prev3 .*without m_prev\b(?! and)"),
    ):
        unipc_step(x, mo, coef, None, None, m2, m_prev3=m3)
    for t, b in zip((x, mo, m2, m3), before, strict=True):
        assert torch.equal(t, b)
