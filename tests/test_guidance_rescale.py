"""``fastdiff.sample(guidance_rescale=phi)``: classifier-free guidance rescaled as in Lin et al.
2023 (arXiv:2305.08891, Sec. 3.4) and diffusers' Stable Diffusion pipelines
(``rescale_noise_cfg``), for every sampler, in the eager and the CUDA-graph loop."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_host_sync

import fastdiff
from fastdiff import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 8, 8)


def _model(x, t, encoder_hidden_states=None):
    """A toy conditional eps / v model: the two halves differ in scale and offset, so guidance
    changes the output's standard deviation (what the rescale corrects)."""
    s = torch.sin(t.double() / 173.0).to(x.dtype).reshape(-1, 1, 1, 1)
    e = encoder_hidden_states
    return 0.6 * x * (1 + e.mean(1).reshape(-1, 1, 1, 1)) + s * e[:, :3].reshape(-1, 3, 1, 1)


def _rescale_noise_cfg(cfg, text, phi):
    """diffusers' ``rescale_noise_cfg`` (its pipelines' module imports transformers, which
    this environment need not have), restated."""
    dims = list(range(1, text.ndim))
    std_text = text.std(dim=dims, keepdim=True)
    std_cfg = cfg.std(dim=dims, keepdim=True)
    return phi * (cfg * (std_text / std_cfg)) + (1 - phi) * cfg


def _cond():
    g = torch.Generator().manual_seed(5)
    return torch.randn(SHAPE[0], 4, generator=g), torch.randn(SHAPE[0], 4, generator=g)


def _diffusers_loop(sched, steps, z, w, phi, cond, uncond):
    sched.set_timesteps(steps)
    x = z.clone()
    for t in sched.timesteps:
        tt = t.expand(SHAPE[0])
        u = _model(x, tt, encoder_hidden_states=uncond)
        c = _model(x, tt, encoder_hidden_states=cond)
        out = _rescale_noise_cfg(u + w * (c - u), c, phi)
        x = sched.step(out, t, x).prev_sample
    return x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("kind", ["ddim-zero-snr-v", "dpm++-karras"])
def test_matches_diffusers_rescaled_guidance(kind, phi):
    """SD 2.1-style zero-terminal-SNR v-prediction DDIM (trailing) and DPM++ 2M Karras with
    guidance 7.5: fastdiff's samples equal a diffusers loop with ``rescale_noise_cfg``."""
    if kind.startswith("ddim"):
        cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                   prediction_type="v_prediction", beta_schedule="scaled_linear",
                   clip_sample=False)  # fmt: skip
        make = lambda: diffusers.DDIMScheduler(**cfg)  # noqa: E731
    else:
        make = lambda: diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)  # noqa: E731
    cond, uncond = _cond()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(make(), 8, z, 7.5, phi, cond, uncond)
    got = fastdiff.sample(_model, schedule=make(), steps=8, noise=z, cond=cond, uncond=uncond,
                          guidance_scale=7.5, guidance_rescale=phi)  # fmt: skip
    assert _rel(got, ref) <= 1e-5
    if phi > 0:  # the check can fail: the rescale changes the samples
        plain = _diffusers_loop(make(), 8, z, 7.5, 0.0, cond, uncond)
        assert _rel(plain, ref) > 1e-3


def test_zero_is_plain_guidance_bitwise():
    cond, uncond = _cond()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    kw = dict(steps=5, sampler="dpm++", noise=z, cond=cond, uncond=uncond, guidance_scale=3.0)
    assert torch.equal(
        fastdiff.sample(_model, **kw), fastdiff.sample(_model, guidance_rescale=0, **kw)
    )


@pytest.mark.parametrize("sampler", ["euler_a", "heun", "unipc"])
def test_every_sampler_gets_the_rescaled_output(sampler):
    """Samplers stepped by hand on the rescaled output equal sample(guidance_rescale=...): the
    rescale sits in the loop, not in one sampler (Euler a: noise from the generator)."""
    from fastdiff.samplers import make_sampler

    cond, uncond = _cond()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    got = fastdiff.sample(_model, steps=4, sampler=sampler, noise=z, cond=cond, uncond=uncond,
                          guidance_scale=5.0, guidance_rescale=0.5,
                          generator=torch.Generator().manual_seed(9))  # fmt: skip
    smp = make_sampler(sampler, NoiseSchedule("linear"), 4)
    gen = torch.Generator().manual_seed(9)
    x = z * smp.init_noise_scale  # sample()'s x_T (diffusers' init_noise_sigma z)
    for i, t in enumerate(smp.timesteps):
        tt = t.expand(SHAPE[0])
        u = _model(x, tt, encoder_hidden_states=uncond)
        c = _model(x, tt, encoder_hidden_states=cond)
        noise = smp._draw_noise(x, gen) if smp.needs_noise(i) else None
        x = smp.step(_rescale_noise_cfg(u + 5.0 * (c - u), c, 0.5), i, x, noise=noise)
    assert _rel(got, x) <= 1e-6


def test_cuda_graph_loop_equals_eager(fake_cuda_graphs, monkeypatch):
    """The graph loop (a fake graph on CPU) rescales inside the captured step, and a new phi
    is a new capture (phi is baked into the graph)."""
    from fastdiff import api

    eager_loop = api._sample_eager
    cond, uncond = _cond()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    def run(graphed, phi):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(_model, steps=5, sampler="dpm++", noise=z, cond=cond,
                               uncond=uncond, guidance_scale=4.0, guidance_rescale=phi)  # fmt: skip

    for phi in (0.7, 0.7, 0.3):
        torch.testing.assert_close(run(True, phi), run(False, phi), rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2


@torch.no_grad()
def test_no_host_sync_inside_the_sampling_loop():
    cond, uncond = _cond()
    assert_no_host_sync(
        lambda m: fastdiff.sample(m, steps=3, shape=SHAPE[1:], batch_size=2, cond=cond,
                                  uncond=uncond, guidance_scale=2.0, guidance_rescale=0.7),
        _model,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(guidance_rescale="0.7"), TypeError, r"expected a real .* got '0.7'"),
        (dict(guidance_rescale=True), TypeError, r"guidance_rescale: expected a real"),
        (dict(guidance_rescale=1.5), ValueError, r"guidance_rescale: .* in \[0, 1\], got 1.5"),
        (dict(guidance_rescale=-0.1), ValueError, r"in \[0, 1\], got -0.1"),
        (dict(guidance_rescale=0.7, guidance_scale=None), ValueError, r"guidance_scale is None"),
        (dict(guidance_rescale=0.7, sampler="ddpm", variance_type="learned_range"), ValueError,
         r"learned-variance sampler"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_before_any_model_call(kw, err, match):
    calls = []
    cond, uncond = _cond()

    def model(x, t, encoder_hidden_states=None):
        calls.append(1)
        return _model(x, t, encoder_hidden_states)

    kw = {"guidance_scale": 3.0, **kw}
    with pytest.raises(err, match=match):
        fastdiff.sample(
            model, steps=3, shape=SHAPE[1:], batch_size=2, cond=cond, uncond=uncond, **kw
        )
    assert calls == []


def test_tensor_phi_is_taken_as_guidance_scale_is():
    cond, uncond = _cond()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    kw = dict(steps=3, sampler="ddim", noise=z, cond=cond, uncond=uncond, guidance_scale=3.0)
    want = fastdiff.sample(_model, guidance_rescale=0.5, **kw)
    assert torch.equal(fastdiff.sample(_model, guidance_rescale=torch.tensor(0.5), **kw), want)
