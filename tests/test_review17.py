"""Review 17: inpainting (``sample(image=, mask=)``), RePaint and the consistency sampler as a
demanding user runs them: half-precision models with fp32 images and masks, a sampler object
that carries its own strength, the CLI's grey mask pixels, RePaint's shared mask check and its
dtype errors.

Killing tests for mutants that survived test_inpaint / test_repaint / test_consistency (log:
notes/s17/review17_log.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _sampler_cases import rel as _rel
from test_img2img import CASES, VARIANTS, _image, _scheduler
from test_inpaint import _diffusers_inpaint, _masks
from test_inpaint import _model as _mixing
from test_repaint import _inputs, toy

import fastdiff

diffusers = pytest.importorskip("diffusers")


class ConvNet(torch.nn.Module):
    """A small conv eps-model with parameters: sample() / repaint() run in its dtype."""

    def __init__(self, c: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(c, generator=g) * 0.1)

    def forward(self, x, t):
        tt = torch.sin(t.float() / 150.0).reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(self.conv(x)) + 0.3 * tt


def _half(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    other = ConvNet(model.conv.in_channels)
    other.load_state_dict(model.state_dict())
    return other.to(dtype)


# -------------------------------------------------------------------- sample(image=, mask=)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dpm++", "heun", "euler_a"])
def test_half_model_with_fp32_image_and_mask(dtype, name):
    """A half-precision model with the user's fp32 image and fp32 soft [H x W] mask: the run is
    in the model's dtype, the kept region is the image in that dtype exactly, and the error vs
    the fp32 model's run is at most 2x that of the same run without a mask (img2img)."""
    g = torch.Generator().manual_seed(11)
    image = torch.randn(3, 3, 7, 5, generator=g)
    z = torch.randn(image.shape, generator=g)
    mask = torch.rand(7, 5, generator=g)
    mask[mask < 0.3] = 0.0
    full = ConvNet()

    def run(model, m):
        return fastdiff.sample(model, 8, sampler=name, image=image, mask=m, noise=z,
                               strength=0.7, schedule="scaled_linear")  # fmt: skip

    half = run(_half(full, dtype), mask)
    assert half.dtype == dtype and torch.isfinite(half).all()
    keep = (mask == 0).expand(image.shape)
    assert torch.equal(half[keep], image.to(dtype)[keep])
    err = _rel(half, run(full, mask))
    yardstick = _rel(run(_half(full, dtype), None), run(full, None))
    assert err <= 2 * yardstick, (err, yardstick)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inpaint_variants_match_diffusers(variant):
    """The grid / solver variants (Karras, SDE, third order, v-prediction, exponential,
    trailing, stochastic flow) with binary / soft masks at strength 1 and 0.6 vs diffusers'
    inpaint loop (rel <= 1e-5; same generator)."""
    name, cfg = VARIANTS[variant]
    steps = CASES[name][2]
    for mname in ("binary", "soft"):
        for strength in (1.0, 0.6):
            image, mask = _image(9), _masks()[mname]
            theirs = _diffusers_inpaint(name, _scheduler(name, **cfg), image, mask, strength,
                                        steps, torch.Generator().manual_seed(9))  # fmt: skip
            ours = fastdiff.sample(
                _mixing, steps, sampler=name, schedule=_scheduler(name, **cfg), image=image,
                mask=mask, strength=strength, generator=torch.Generator().manual_seed(9),
            )  # fmt: skip
            assert _rel(ours, theirs) <= 1e-5, (variant, mname, strength, _rel(ours, theirs))
            keep = (mask == 0).expand(image.shape)
            assert torch.equal(ours[keep], image[keep])


def test_sampler_object_with_its_own_strength_inpaints():
    """A flow-Euler sampler object built with strength 0.6 (its grid's option) and a mask, no
    strength=: the object's strength is used (as without a mask), the same run as by name."""
    from fastdiff.samplers import FlowMatchEulerSampler

    image, mask = torch.randn(2, 4, 8, 8), _masks()["soft"]
    z = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    smp = FlowMatchEulerSampler(None, 10, shift=3.0, strength=0.6)
    got = fastdiff.sample(_mixing, sampler=smp, image=image, mask=mask, noise=z)
    want = fastdiff.sample(_mixing, 10, sampler="flow_euler", schedule=_scheduler("flow_euler"),
                           image=image, mask=mask, noise=z, strength=0.6)  # fmt: skip
    assert torch.equal(got, want)
    pure = fastdiff.sample(_mixing, 10, sampler="flow_euler", schedule=_scheduler("flow_euler"),
                           image=image, mask=mask, noise=z)  # fmt: skip
    assert not torch.allclose(got, pure)


# ------------------------------------------------------------------------------------ CLI
def test_cli_mask_grey_pixels_binarize_at_half(tmp_path, monkeypatch):
    """--mask: grey 120 (0.47) keeps, grey 135 (0.53) repaints (diffusers' mask_processor
    binarizes at 0.5); 0 / 255 are the ends."""
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(tmp_path / "in.png")
    m = np.zeros((16, 16), dtype=np.uint8)
    m[:, 4:8], m[:, 8:12], m[:, 12:] = 120, 135, 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    seen, real = [], fastdiff.sample

    def spy(model, **kw):
        seen.append(kw["mask"])
        return real(model, **kw)

    monkeypatch.setattr(fastdiff, "sample", spy)
    argv = ["sample", "--init-image", str(tmp_path / "in.png"), "--mask",
            str(tmp_path / "mask.png"), "--n", "1", "--steps", "2", "--quiet",
            "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(argv) == 0
    want = torch.zeros(16, 16)
    want[:, 8:] = 1.0
    assert torch.equal(seen[0][0, 0], want)


# ---------------------------------------------------------------------------------- RePaint
BAD_MASKS = [
    [[1.0]],
    "mask",
    torch.ones(2, 1, 8, 8, dtype=torch.bool),
    torch.ones(2, 1, 8, 8, dtype=torch.uint8),
    torch.ones(2, 1, 8, 8, dtype=torch.complex64),
    torch.full((2, 1, 8, 8), 1.5),
    torch.full((2, 1, 8, 8), -0.25),
    torch.full((1, 1, 8, 8), math.nan),
    torch.ones(2, 1, 8, 9),
    torch.ones(3, 1, 8, 8),
    torch.ones(1, 2, 3, 8, 8),
    torch.ones(2, 1, 8, 8, device="meta"),
]


@pytest.mark.parametrize("i", range(len(BAD_MASKS)))
def test_repaint_refuses_masks_as_sample_does(i):
    """RePaint's mask check is sample(mask=)'s: same exception, same message, nothing run."""
    image = _inputs(0)[0]
    calls = []

    def model(x, t):
        calls.append(1)
        return toy(x, t)

    with pytest.raises((TypeError, ValueError)) as theirs:
        fastdiff.sample(model, 10, sampler="ddim", image=image, mask=BAD_MASKS[i])
    with pytest.raises(theirs.type) as ours:
        fastdiff.repaint(model, image, BAD_MASKS[i], 10)
    assert str(ours.value) == str(theirs.value) and str(ours.value).startswith("mask: ")
    assert calls == []


def test_repaint_needs_a_mask():
    with pytest.raises(TypeError, match="^mask: expected a torch.Tensor"):
        fastdiff.repaint(toy, _inputs(0)[0], None, 10)


def test_repaint_float64_image_names_image():
    """A float64 image with a parameter-free model: a TypeError naming image (the user passed no
    dtype=); with dtype=torch.float32 it runs, the same run as the fp32 image."""
    image, mask = _inputs(1)
    with pytest.raises(TypeError, match=r"^image: expected torch.float32.*got torch.float64"):
        fastdiff.repaint(toy, image.double(), mask, 10)
    with pytest.raises(TypeError, match=r"^dtype: "):
        fastdiff.repaint(toy, image, mask, 10, dtype=torch.float64)
    kw = dict(jump_length=3, jump_n_sample=2)
    got = fastdiff.repaint(toy, image.double(), mask.double(), 10, dtype=torch.float32,
                           generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    want = fastdiff.repaint(toy, image, mask, 10, generator=torch.Generator().manual_seed(0), **kw)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repaint_half_model_with_fp32_image(dtype):
    """A half-precision model: RePaint samples in its dtype (the fp32 image and mask are
    converted: the same run as with them in its dtype), the kept region is the image in that
    dtype exactly."""
    image, mask = _inputs(2, "soft")
    model = _half(ConvNet(), dtype)
    kw = dict(jump_length=3, jump_n_sample=2, eta=0.5)
    got = fastdiff.repaint(model, image, mask, 12, generator=torch.Generator().manual_seed(4), **kw)
    assert got.dtype == dtype and torch.isfinite(got).all()
    same = fastdiff.repaint(model, image.to(dtype), mask.to(dtype), 12,
                            generator=torch.Generator().manual_seed(4), **kw)  # fmt: skip
    assert torch.equal(got, same)
    keep = (mask == 0).expand(image.shape)
    assert torch.equal(got[keep], image.to(dtype)[keep])


def test_repaint_callback_sees_the_sample():
    """callback(i, t, x): x is the run's current sample (the last one is the result)."""
    image, mask = _inputs(3)
    xs = []
    out = fastdiff.repaint(toy, image, mask, 8, jump_length=3, jump_n_sample=2,
                           callback=lambda i, t, x: xs.append(x.clone()))  # fmt: skip
    assert torch.equal(xs[-1], out)
    assert not torch.equal(xs[0], image) and not torch.equal(xs[0], xs[1])


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_repaint_prediction_types_equal_the_eps_run(kind, clip):
    """prediction_type v_prediction / sample: the same run as an eps model giving the eps those
    outputs mean (eps = sqrt(ab) v + sqrt(1 - ab) x; eps = (x - sqrt(ab) x0) / sqrt(1 - ab)),
    with and without clipping x0 (diffusers' RePaint takes eps only; the direction term reads
    the unclipped eps there)."""
    from fastdiff._sampler_setup import _resolve_schedule

    ab_all = _resolve_schedule(toy, None).alphas_cumprod

    def coefs(x, t):
        ab = ab_all[t.long()].to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    def out_model(x, t):  # the v / x0 network (x0 beyond [-1, 1] at times: clipping acts)
        return 3.0 * toy(x, t) - 0.3 * x

    def eps_model(x, t):
        a, s = coefs(x, t)
        o, xd = out_model(x, t).double(), x.double()
        eps = a * o + s * xd if kind == "v_prediction" else (xd - a * o) / s
        return eps.to(x.dtype)

    image, mask = _inputs(5, "soft")
    kw = dict(jump_length=3, jump_n_sample=2, eta=0.6, clip_sample=clip)
    got = fastdiff.repaint(out_model, image, mask, 10, prediction_type=kind,
                           generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
    want = fastdiff.repaint(eps_model, image, mask, 10,
                            generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
    assert _rel(got, want) <= 1e-5, _rel(got, want)
    other = fastdiff.repaint(out_model, image, mask, 10,
                             generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
    assert _rel(other, want) > 1e-2  # the output read as eps is another run
    flipped = fastdiff.repaint(out_model, image, mask, 10, prediction_type=kind,
                               generator=torch.Generator().manual_seed(2),
                               **{**kw, "clip_sample": not clip})  # fmt: skip
    assert _rel(flipped, got) > 1e-3  # clipping acts in this run


# ------------------------------------------------------------------------ consistency models
def test_cm_graph_cache_tells_clip_settings_apart(fake_cuda_graphs, monkeypatch):
    """sample(sampler="cm", cuda_graph=True) (faked on CPU) with clip_denoised on, then off,
    then on again, same model and shape: two captures (the clip is baked into the captured
    op call), each run equal to the eager loop, and the clip acts in these runs."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def model(x, t):  # denoised well outside [-1, 1]: clipping changes the samples
        return 3.0 * torch.tanh(x) + 0.5

    def run(graphed, clip):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        return fastdiff.sample(model, 3, sampler="cm", noise=z, clip_denoised=clip,
                               generator=torch.Generator().manual_seed(2))  # fmt: skip

    outs = {}
    for clip in (True, False, True):
        outs[clip] = run(False, clip)
        torch.testing.assert_close(run(True, clip), outs[clip], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2
    assert (outs[True] - outs[False]).abs().max() > 0.1


def test_cm_sigmas_are_diffusers_float32_sigmas():
    """The grid is diffusers' float32 sigmas bit for bit (then sigma_min), at the leading grid
    and at explicit timesteps, for T = 40 / 151 / 201."""
    from diffusers import CMStochasticIterativeScheduler

    from fastdiff.samplers import ConsistencyModelSampler

    for T, kw in ((40, {"steps": 1}), (40, {"steps": 7}), (40, {"timesteps": [22, 0]}),
                  (151, {"timesteps": [17, 0]}), (201, {"steps": 5})):  # fmt: skip
        sch = CMStochasticIterativeScheduler(num_train_timesteps=T)
        if "steps" in kw:
            sch.set_timesteps(kw["steps"])
        else:
            sch.set_timesteps(timesteps=kw["timesteps"])
        smp = ConsistencyModelSampler(None, num_train_timesteps=T, **kw)
        theirs = sch.sigmas.numpy()
        assert smp.sigmas.dtype == np.float64 and len(smp.sigmas) == len(theirs)
        assert np.array_equal(smp.sigmas.astype(np.float32), theirs), (T, kw)
        assert np.array_equal(smp.sigmas[:-1], theirs[:-1].astype(np.float64)), (T, kw)
        assert torch.equal(smp.timesteps, sch.timesteps.float()), (T, kw)


@pytest.mark.parametrize("ts", [[22, 5], [30, 12, 3]])
@torch.no_grad()
def test_cm_timesteps_not_ending_at_zero_match_the_pipeline(ts):
    """Explicit timesteps that do not end at training index 0: the first sigma is below
    sigma_max while the pipeline still starts from sigma_max z (init_noise_sigma), scaled by
    the first sigma's c_in: fastdiff's start and whole run equal the pipeline's loop."""
    from diffusers import CMStochasticIterativeScheduler
    from test_consistency import pipeline_loop

    from fastdiff.samplers import ConsistencyModelSampler

    z = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(5))
    sch = CMStochasticIterativeScheduler(num_train_timesteps=40)
    sch.set_timesteps(timesteps=ts)
    assert float(sch.sigmas[0]) < 79.0  # the case: sigma_0 < sigma_max

    def model(x, t):
        return 3.0 * toy(x, t)

    ref = pipeline_loop(sch, z, torch.Generator().manual_seed(6), model)
    got = fastdiff.sample(model, sampler="cm", noise=z, timesteps=ts,
                          generator=torch.Generator().manual_seed(6))  # fmt: skip
    assert 0.0 < _rel(got, ref) <= 1e-5
    smp = ConsistencyModelSampler(None, timesteps=ts)
    s0 = float(smp.sigmas[0])
    assert smp.init_noise_scale == pytest.approx(80.0 / math.sqrt(s0 * s0 + 0.25), rel=1e-12)


def test_cm_s_noise_zero_is_deterministic():
    """s_noise = 0 (diffusers takes any s_noise): no noise is added between the steps, so
    runs with other generators give the same samples; a small s_noise does not."""
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(s_noise, seed):
        return fastdiff.sample(toy, 3, sampler="cm", noise=z, s_noise=s_noise,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.equal(run(0.5, 1), run(0.5, 2))


def test_cm_in_kernel_noise_is_fresh_each_step():
    """Without a generator the steps' noise comes from in-kernel Philox: each step draws new
    values (the counter moves on), each ~N(0, 1). With F = 0 and no clipping the noise is read
    back from the trajectory: X_{i+1} = c_skip(sigma_i) X_i + std_i z_i, X = u / c_in."""
    from fastdiff.samplers import ConsistencyModelSampler

    smp = ConsistencyModelSampler(None, 3, clip_denoised=False)
    z0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # the Philox seed
    _, traj = fastdiff.sample(lambda x, t: torch.zeros_like(x), sampler=smp, noise=z0,
                              return_trajectory=True)  # fmt: skip
    xs = traj["x"].double()
    zs = []
    for i in range(2):
        s, s_next = float(smp.sigmas[i]), float(smp.sigmas[i + 1])
        X, X_next = xs[i] / smp.c_in(s), xs[i + 1] / smp.c_in(s_next)
        zs.append((X_next - smp.c_skip(s) * X) / smp.noise_std(i))
    for z in zs:
        assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1
    corr = float((zs[0] * zs[1]).mean() / (zs[0].std() * zs[1].std()))
    assert abs(corr) < 0.1, corr


@pytest.mark.parametrize(
    "kw",
    [
        {"mask": torch.full((1, 1, 7, 5), 2.0)},
        {
            "mask": torch.ones(1, 1, 7, 5),
            "sampler": "ddim_inverse",
            "noise": torch.zeros(3, 3, 7, 5),
        },
        {"mask": torch.ones(1, 1, 7, 5), "strength": 0.01},
        {"mask": torch.ones(1, 1, 7, 5), "sampler": "sa_solver"},
    ],
    ids=["range", "inverse", "strength", "refused-sampler"],
)
def test_refused_inpainting_leaves_the_model_alone(kw):
    """A refused sample(image=, mask=, channels_last=True): nothing ran and the model's weights
    were not converted to channels_last (the conversion comes after every check)."""
    model = ConvNet()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"^(mask|strength): "):
        fastdiff.sample(model, 10, image=torch.randn(3, 3, 7, 5), channels_last=True, **kw)
    assert calls == [] and model.conv.weight.is_contiguous()
    assert not model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    fastdiff.sample(model, 2, image=torch.randn(3, 3, 7, 5), mask=torch.ones(7, 5),
                    channels_last=True)  # fmt: skip
    assert calls and model.conv.weight.is_contiguous(memory_format=torch.channels_last)
