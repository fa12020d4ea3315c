"""The contract every sampler keeps through ``fastdiff.sample``, one parametrized check per
property over the samplers (settings in tests/_sampler_cases.py): no host sync inside the loop,
the CUDA-graph loop (faked on CPU) equals the eager one, guidance equals manual classifier-free
guidance, a saved diffusers config infers the sampler with its settings and channels_last x_T
keeps its layout, a reused sampler starts without history, eta / unknown options are refused,
and every backend of the fused unipc_step op (and the emulated CUDA kernel) lands where
diffusers' own loop does.

The sampler-specific checks (per-step parity with diffusers against float64 restatements, the
rows, the options) stay in the per-sampler files.
"""

from __future__ import annotations

import pytest
import torch
from _sampler_cases import (
    BACKEND,
    CFG,
    EMULATED,
    GRAPH,
    HISTORY,
    NO_SYNC,
    SAVED,
    SCHEDULER_CLASS,
    SHAPE,
    UNKNOWN_OPTION,
    check_graph_loop,
    cond_toy,
    diffusers_loop,
    graph_id,
    rel,
    scheduler,
    toy,
    vp_noise,
)
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, assert_no_host_sync, backend_cases, case_id
from test_cuda_emu import emu, emu_module  # noqa: F401  (fixtures: the emulated CUDA kernels)

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, make_sampler

pytest.importorskip("diffusers")

RTOL = PARITY_RTOL


# ---------------------------------------------------------------------------- the sampling loop
@torch.no_grad()
@pytest.mark.parametrize("name,steps,opts", NO_SYNC, ids=[c[0] for c in NO_SYNC])
def test_no_host_sync_inside_the_sampling_loop(name, steps, opts):
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=steps, sampler=name, shape=SHAPE[1:], batch_size=2,
                                  **opts),
        toy,
    )  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("case", GRAPH, ids=graph_id)
def test_cuda_graph_loop_equals_eager(case, fake_cuda_graphs, monkeypatch):
    """sample(cuda_graph=True)'s loop on CPU with a fake graph (one capture replayed with the
    row, the history and the noise / Philox state in static buffers): the eager loop's samples
    and trajectory, also for a second call with new inputs, and with guidance. A run that
    changes the sampler's structure (another order; a noiseless one-step run before noisy ones)
    captures a graph of its own."""
    check_graph_loop(case, fake_cuda_graphs, monkeypatch)


@pytest.mark.parametrize("name,steps,w,opts,tol", CFG, ids=[c[0] for c in CFG])
def test_sample_with_guidance_equals_manual_cfg(name, steps, w, opts, tol):
    """Guidance combines [uncond, cond] in the op: the same as stepping with the combined
    output, and not the unguided samples."""
    cond, uncond = torch.randn(SHAPE[0], 4), torch.randn(SHAPE[0], 4)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    got = fastdiff.sample(cond_toy, steps=steps, sampler=name, noise=z, cond=cond, uncond=uncond,
                          guidance_scale=w, **opts)  # fmt: skip
    smp = make_sampler(name, NoiseSchedule("linear"), steps, **opts)
    x = z * smp.init_noise_scale  # sample()'s start (diffusers' init_noise_sigma z)
    for i, t in enumerate(smp.timesteps):
        tt = t.expand(SHAPE[0])
        u = cond_toy(x, tt, encoder_hidden_states=uncond)
        c = cond_toy(x, tt, encoder_hidden_states=cond)
        x = smp.step(u + w * (c - u), i, x)
    kind, bound = tol
    if kind == "rel":
        assert rel(got, x) <= bound
    else:
        torch.testing.assert_close(got, x, rtol=bound, atol=bound)
    plain = fastdiff.sample(cond_toy, steps=steps, sampler=name, noise=z, cond=cond, **opts)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("name,opts,vp", SAVED, ids=[c[0] for c in SAVED])
def test_saved_config_and_channels_last(name, opts, vp):
    """A saved diffusers scheduler config (scheduler_config.json) infers the sampler with its
    settings and lands where diffusers' loop does; a channels_last x_T gives the contiguous
    run's samples, in channels_last."""
    saved = dict(DIFFUSERS_BETAS["scaled_linear"], _class_name=SCHEDULER_CLASS[name], **opts)
    sch = scheduler(name, **opts)
    z = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(7))
    ref = diffusers_loop(sch, 9, z)
    got = fastdiff.sample(toy, steps=9, schedule=saved, noise=z)  # z init_noise_scale: x_T
    assert 0.0 < rel(got, ref) <= RTOL
    cl = fastdiff.sample(toy, steps=9, schedule=saved,
                         noise=z.contiguous(memory_format=torch.channels_last))  # fmt: skip
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,steps,opts,first", HISTORY, ids=[c[0] for c in HISTORY])
def test_history_reset_and_reuse(name, steps, opts, first):
    """A sampler reused for a second run starts without history; a step out of order starts a
    new run (DEIS / DPM-Solver: at first order)."""
    smp = make_sampler(name, NoiseSchedule("linear"), steps, **opts)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    one = fastdiff.sample(toy, sampler=smp, noise=z, steps=steps)
    two = fastdiff.sample(toy, sampler=smp, noise=z, steps=steps)
    assert torch.equal(one, two)
    mo = toy(z, smp.timesteps[2])
    again = smp.step(mo, 2, z)  # after the last step: a new run from step 2
    fresh = make_sampler(name, NoiseSchedule("linear"), steps, **first).step(mo, 2, z)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("name,unknown", UNKNOWN_OPTION, ids=[c[0] for c in UNKNOWN_OPTION])
def test_bad_settings_through_sample(name, unknown):
    z = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(toy, steps=5, sampler=name, noise=z, eta=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        fastdiff.sample(toy, steps=5, sampler=name, noise=z, **{unknown: True})


# ---------------------------------------------------------------------------- backends
@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
@pytest.mark.parametrize("run", BACKEND, ids=[c[0] for c in BACKEND])
def test_every_backend_matches_diffusers(case, run):
    """A guided run at an odd size on each backend of the fused op (cpu: the C++ kernel, triton
    under TRITON_INTERPRET=1) equals diffusers' loop on the combined output."""
    dev, backend = case
    _, name, steps, opts, vp = run
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 7, generator=g)
    w = torch.randn(4, 3, 5, 7, generator=g)
    gs = 2.5

    def raw(x, t):
        return torch.tanh(0.4 * torch.cat([x, x])) + 0.2 * w + torch.sin(t[:1].float() / 300.0)

    def combined(x, t):
        u, c = raw(x, t.expand(x.shape[0])).chunk(2)
        return u + gs * (c - u)

    sch = scheduler(name, **opts)
    ref = diffusers_loop(sch, steps, z, combined)
    schedule = NoiseSchedule.from_diffusers(DIFFUSERS_BETAS["scaled_linear"])
    smp = make_sampler(name, schedule, steps, **opts)
    assert torch.equal(smp.timesteps, sch.timesteps.round().to(torch.int64))
    x = (vp_noise(z, sch) if vp else z).to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, t in enumerate(smp.timesteps):
            x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, guidance_scale=gs)
    assert x.device.type == dev
    err = rel(x.cpu(), ref)
    assert 0.0 < err <= 2 * RTOL, f"{backend}: rel err {err:.2e}"


@pytest.mark.usefixtures("emu")
@pytest.mark.parametrize("run", EMULATED, ids=[c[0] for c in EMULATED])
def test_emulated_cuda_kernel_matches_diffusers(run):
    """csrc/cuda/unipc_step.cu through its real entry point, on tests/cuda_emu."""
    test_every_backend_matches_diffusers(("cpu", "cuda"), run)


def test_every_case_names_a_registered_sampler():
    """The tables name samplers sample() knows (a typo would test nothing)."""
    names = {c[0] for c in NO_SYNC + CFG + HISTORY + UNKNOWN_OPTION} | {c[1] for c in BACKEND}
    names |= {c.sampler for c in GRAPH}
    assert names <= set(SAMPLERS), names - set(SAMPLERS)
