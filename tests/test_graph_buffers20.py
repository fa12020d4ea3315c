"""The CUDA-graph loop's history buffers (fastdiff._graph, faked on CPU): a step_with_history
sampler gets the static buffers it reads and each replay copies into those only.

flow_heun's correction reads the Euler stage's input x_i and velocity v_1: two buffers (``last``
and m_{i-1}, its ``graph_hist_buffers``), two device copies a step; the default of three (four
at solver order 3, UniPC's last, m_{i-1}, m_{i-2}, m_{i-3}) is kept for the others. Each count
goes with the graphed run equal to the eager one, so that a buffer too few would show.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import _graph, api

SHAPE = (2, 3, 5, 7)  # odd sizes


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth toy model output depending on x and t ``[N x C x H x W]``."""
    tt = t.to(torch.float32).reshape(-1, 1, 1, 1) / 1000.0
    return -0.7 * x + 0.3 * torch.sin(2.0 * x + tt) + 0.2 * tt


def _graphed_run(sampler: str, z: torch.Tensor, **opts) -> tuple[torch.Tensor, dict]:
    """``fastdiff.sample`` through the graphed loop, counting the step bodies run (warm-up,
    capture, replays) and the ``copy_`` calls by destination address while one runs."""
    seen: dict = {"bodies": 0, "dst": []}
    body, copy = _graph._StepGraph._body, torch.Tensor.copy_

    def counted_body(self):
        seen["bodies"] += 1
        seen["on"] = True
        try:
            return body(self)
        finally:
            seen["on"] = False

    def counted_copy(self, src, non_blocking=False):
        if seen.get("on"):
            seen["dst"].append(self.data_ptr())
        return copy(self, src, non_blocking)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_graph._StepGraph, "_body", counted_body)
        mp.setattr(torch.Tensor, "copy_", counted_copy)
        mp.setattr(api, "_sample_eager", api._sample_graphed)
        out = fastdiff.sample(_model, 4, sampler=sampler, noise=z, **opts)
    return out, seen


@torch.no_grad()
@pytest.mark.parametrize(
    "sampler,opts,n_hist",
    [
        ("flow_heun", {"shift": 3.0}, 2),  # x_i and v_1 only
        ("dpm++_sde", {"seed": 3}, 2),  # the first stage's input and x0 (its second stage)
        ("unipc", {}, 3),  # last, m_{i-1}, m_{i-2}
        ("unipc", {"solver_order": 3}, 4),  # and m_{i-3}
    ],
    ids=["flow_heun", "dpm_sde", "unipc2", "unipc3"],
)
def test_graph_history_buffers_and_copies(sampler, opts, n_hist, fake_cuda_graphs):
    """As many static history buffers as the sampler reads (the default for UniPC), one copy
    into each per step body, and the graphed run equal to the eager one."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    opts = dict(opts)
    seed = opts.pop("seed", None)  # a noisy sampler: the same noise stream in both runs

    def gen() -> dict:
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    eager = fastdiff.sample(_model, 4, sampler=sampler, noise=z, **opts, **gen())
    out, seen = _graphed_run(sampler, z, **opts, **gen())
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    (g,) = fake_cuda_graphs
    assert g.unipc and len(g.hist) == n_hist
    ptrs = [h.data_ptr() for h in g.hist]
    assert len(set(ptrs)) == n_hist  # distinct buffers
    hist_copies = [p for p in seen["dst"] if p in ptrs]
    # warm-up (3), capture (1) and one replay a model call: each body copies once into each
    # buffer (the shift m_{i-k-1} <- m_{i-k}, then m_{i-1} <- x0 and last <- x_c)
    assert seen["bodies"] == 4 + len(g.smp)
    assert len(hist_copies) == n_hist * seen["bodies"]
    assert all(hist_copies.count(p) == seen["bodies"] for p in ptrs)
