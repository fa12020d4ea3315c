"""``fastdiff.repaint(cuda_graph=True)``: the captured reverse step (faked on CPU: a replay
re-runs the captured body, which reads only the static buffers that ``load`` / ``replay``
refresh, as a real graph would) equals the eager loop: samples, trajectories and callbacks,
with guidance, eta 0 / 1, generator lists, several runs on one capture with other images,
masks, noise and conditioning; the capture cache's keys; the refusals. On a GPU: graphed vs
eager for real (skipped without CUDA).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import fake_cuda_graph_api
from test_repaint import SHAPE, _inputs, toy

import fastdiff

rp = importlib.import_module("fastdiff.repaint")  # the module (fastdiff.repaint: the function)


@pytest.fixture
def fake_graphs(monkeypatch):
    """repaint(cuda_graph=True)'s loop on CPU: torch.cuda's graph API faked, the device check
    skipped (the graphed loop called for a CPU run); yields the captured steps."""
    from fastdiff import _repaint_graph

    return fake_cuda_graph_api(monkeypatch, _repaint_graph._RePaintStep, _repaint_graph)


def _both(*args, gen, **kw):
    """(eager, graphed) results of the same call, each with the generator(s) ``gen()``."""
    eager = fastdiff.repaint(*args, generator=gen(), **kw)
    loop = rp._repaint_loop
    rp._repaint_loop = rp._repaint_graphed
    try:
        graphed = fastdiff.repaint(*args, generator=gen(), **kw)
    finally:
        rp._repaint_loop = loop
    return eager, graphed


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mask_kind", ["binary", "soft", "one"])
def test_graphed_loop_equals_eager(fake_graphs, monkeypatch, eta, mask_kind):
    image, mask = _inputs(1, mask_kind)
    seen = {True: [], False: []}
    for graphed in (False, True):
        if graphed:
            monkeypatch.setattr(rp, "_repaint_loop", rp._repaint_graphed)
        out, traj = fastdiff.repaint(
            toy, image, mask, 12, jump_length=3, jump_n_sample=3, eta=eta,
            generator=torch.Generator().manual_seed(3), return_trajectory=True,
            callback=lambda i, t, x, g=graphed: seen[g].append((i, t, x)),
        )  # fmt: skip
        seen[graphed].append((out, traj))
    (e_out, e_traj), (g_out, g_traj) = seen[False].pop(), seen[True].pop()
    _close(g_out, e_out)
    for key in ("x", "x0"):
        _close(g_traj[key], e_traj[key])
    assert torch.equal(g_traj["timesteps"], e_traj["timesteps"])
    assert torch.equal(g_traj["reverse"], e_traj["reverse"])
    assert [(i, t) for i, t, _ in seen[True]] == [(i, t) for i, t, _ in seen[False]]
    xs = [x for _, _, x in seen[True]]
    assert len({x.data_ptr() for x in xs}) == len(xs)  # the callback's own copies
    for (_, _, a), (_, _, b) in zip(seen[True], seen[False], strict=True):
        _close(a, b)
    assert len(fake_graphs) == 1


@torch.no_grad()
def test_one_capture_serves_runs_with_other_inputs(fake_graphs):
    """The image, mask, x_T and conditioning of each run reach the replays (static buffers
    loaded per run), with guidance and a generator list; a new mask shape or guidance scale
    captures anew."""
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)

    def model(x, t, encoder_hidden_states):
        return toy(x, t) + 0.1 * encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)

    for seed in (1, 2, 3):
        image, mask = _inputs(seed)
        c = cond * seed
        kw = dict(jump_length=3, jump_n_sample=2, eta=1.0, cond=c, uncond=uncond,
                  guidance_scale=2.0, noise=torch.randn(SHAPE))  # fmt: skip
        eager, graphed = _both(
            model, image, mask, 10, **kw,
            gen=lambda s=seed: [torch.Generator().manual_seed(s + k) for k in range(2)],
        )  # fmt: skip
        _close(graphed, eager)
        assert (graphed - eager).abs().max() < 1e-5
    assert len(fake_graphs) == 1


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_channels_last(fake_graphs, dtype):
    """x_T channels_last in fp16 / bf16: the captured buffers keep its layout and dtype, the
    replays give the eager loop's result bit for bit (the same kernels on the same values)."""
    image, mask = _inputs(7)
    noise = torch.randn(SHAPE).to(memory_format=torch.channels_last)
    eager, graphed = _both(toy, image, mask, 9, jump_length=3, jump_n_sample=2, eta=1.0,
                           noise=noise, dtype=dtype,
                           gen=lambda: torch.Generator().manual_seed(2))  # fmt: skip
    assert graphed.dtype == dtype and graphed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(graphed, eager)


@torch.no_grad()
def test_cache_keys(fake_graphs, monkeypatch):
    from fastdiff import _repaint_graph

    monkeypatch.setattr(rp, "_repaint_loop", rp._repaint_graphed)
    image, mask = _inputs(4)
    kw = dict(jump_length=3, jump_n_sample=2)
    fastdiff.repaint(toy, image, mask, 10, **kw)
    fastdiff.repaint(toy, image, mask, 10, **kw, eta=1.0)  # rows only: the same capture
    fastdiff.repaint(toy, image, mask, 6, **kw)  # another time list: the same capture
    assert len(fake_graphs) == 1
    fastdiff.repaint(toy, image, mask[:1], 10, **kw)  # the mask's shape
    fastdiff.repaint(toy, image, mask, 10, **kw, clip_sample=False)
    fastdiff.repaint(toy, image, mask, 10, **kw, prediction_type="v_prediction")
    fastdiff.repaint(toy, image[:1], mask[:1], 10, **kw)  # the batch
    assert len(fake_graphs) == 5
    assert len(_repaint_graph._GRAPHS[toy]) == 6  # five captures and the params signature


def test_refusals_before_any_model_call():
    calls = []

    def model(x, t):
        calls.append(t)
        return toy(x, t)

    image, mask = _inputs(5)
    with pytest.raises(ValueError, match="^cuda_graph: CUDA graphs need CUDA tensors, but "
                                         "sampling runs on cpu"):  # fmt: skip
        fastdiff.repaint(model, image, mask, 4, cuda_graph=True)
    with pytest.raises(TypeError, match="^cuda_graph: expected a bool, got int"):
        fastdiff.repaint(model, image, mask, 4, cuda_graph=1)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cuda_graph_equals_eager_on_gpu(eta):
    image, mask = (t.cuda() for t in _inputs(6))
    kw = dict(jump_length=3, jump_n_sample=3, eta=eta, return_trajectory=True)
    for seed in (0, 1):  # the second run replays the first's capture
        eager, etraj = fastdiff.repaint(
            toy, image, mask, 12, **kw, generator=torch.Generator("cuda").manual_seed(seed)
        )
        graphed, gtraj = fastdiff.repaint(
            toy,
            image,
            mask,
            12,
            **kw,
            cuda_graph=True,
            generator=torch.Generator("cuda").manual_seed(seed),
        )
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gtraj["x0"], etraj["x0"], rtol=1e-5, atol=1e-5)
