"""fastdiff.sample / fastdiff.to_images: reproducibility, conditioning, CFG, bad input, graphs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import DEVICES, assert_no_host_sync
from torch import nn

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler


class TinyNet(nn.Module):
    """Toy eps-model: elementwise per-channel affine + tanh, plus a timestep / class bias.

    Elementwise only, so sample k's output is bitwise the same in any batch (a conv's GEMM
    blocking would differ by ~1e-7, which the 1/sqrt(alpha_bar) of early steps amplifies).
    """

    def __init__(self, c=3, out_mult=1, num_classes=None, ret="tensor"):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c * out_mult, 1, 1))
        self.b = nn.Parameter(torch.randn(c * out_mult, 1, 1))
        self.out_mult = out_mult
        self.in_channels, self.sample_size = c, 8
        self.learned_variance = out_mult == 2
        self.null_class = num_classes
        self.emb = nn.Embedding(num_classes + 1, c * out_mult) if num_classes else None
        self.ret = ret
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, class_labels=None):
        assert t.shape == (x.shape[0],) and t.dtype == torch.int64 and t.device == x.device
        self.seen_t.append(t)
        xx = torch.cat([x, x.flip(1)], 1) if self.out_mult == 2 else x
        h = 0.5 * torch.tanh(self.w * xx + self.b) + torch.sin(t.float() / 150)[:, None, None, None]
        if self.emb is not None:
            lab = class_labels if class_labels is not None else torch.full_like(t, self.null_class)
            h = h + self.emb(lab)[:, :, None, None]
        if self.ret == "sample":
            return SimpleNamespace(sample=h)
        if self.ret == "tuple":
            return (h,)
        return h


class CtxNet(nn.Module):
    """A cross-attention-like model: conditioning arrives as encoder_hidden_states [N x L x D]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.null_cond = torch.zeros(1, 2, 4)

    def forward(self, x, t, encoder_hidden_states):
        return 0.3 * x + self.proj(encoder_hidden_states.mean(1))[:, :, None, None]


def _net(**kw):
    torch.manual_seed(0)
    return TinyNet(**kw).eval()


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize(
    "opts",
    [
        dict(sampler="ddim", eta=1.0),
        dict(sampler="ddpm"),
        dict(sampler="dpm++"),
        dict(sampler="ddim", eta=0.5, guidance_scale=3.0),
    ],  # fmt: skip
    ids=["ddim-eta1", "ddpm", "dpm++", "ddim-cfg"],
)
@torch.no_grad()
def test_batch_equals_singles_with_generator_list(opts):
    opts = dict(opts)
    kw = {}
    model = _net(num_classes=4) if "guidance_scale" in opts else _net()
    labels = torch.tensor([1, 3, 0])
    if "guidance_scale" in opts:
        kw = dict(cond=labels)
    batch = fastdiff.sample(model, steps=12, generator=_gens([1, 2, 3]), **opts, **kw)
    assert batch.shape == (3, 3, 8, 8)
    for k, seed in enumerate([1, 2, 3]):
        kk = dict(cond=labels[k : k + 1]) if kw else {}
        one = fastdiff.sample(model, steps=12, generator=_gens([seed]), **opts, **kk)
        assert one.shape == (1, 3, 8, 8)
        err = (batch[k] - one[0]).abs().max().item()
        assert err <= 1e-5, f"sample {k}: {err}"
    other = fastdiff.sample(model, steps=12, generator=_gens([9, 2, 3]), **opts, **kw)
    assert not torch.allclose(other[0], batch[0]) and torch.allclose(other[1], batch[1], atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++"])
@torch.no_grad()
def test_same_seed_bitwise_equal(sampler):
    model = _net()
    kw = dict(steps=10, sampler=sampler, batch_size=2)
    if sampler == "ddim":
        kw["eta"] = 1.0
    a = fastdiff.sample(model, generator=torch.Generator().manual_seed(5), **kw)
    b = fastdiff.sample(model, generator=torch.Generator().manual_seed(5), **kw)
    c = fastdiff.sample(model, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@torch.no_grad()
def test_ddim_eta0_deterministic_given_x_T():
    model = _net()
    x_T = torch.randn(2, 3, 8, 8)
    a = fastdiff.sample(model, steps=10, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = fastdiff.sample(model, steps=10, noise=x_T.clone(), generator=_gens([7, 8]))
    assert torch.equal(a, b)
    c = fastdiff.sample(model, steps=10, noise=x_T, eta=1.0, generator=_gens([7, 8]))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@torch.no_grad()
def test_no_generator_uses_in_kernel_philox_and_global_seed(sampler):
    model = _net()
    kw = dict(steps=6, sampler=sampler, batch_size=2, **({"eta": 1.0} if sampler == "ddim" else {}))
    torch.manual_seed(123)
    a = fastdiff.sample(model, **kw)
    torch.manual_seed(123)
    b = fastdiff.sample(model, **kw)
    torch.manual_seed(124)
    c = fastdiff.sample(model, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_step_generator_state_is_philox_noise_and_advances():
    from fastdiff.ops.sampler_step import philox_randn

    smp = DDIMSampler(NoiseSchedule("linear"), 10, eta=1.0)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    state = torch.tensor([42, 96], dtype=torch.int64)
    z = philox_randn(state.clone(), tuple(x.shape))
    got = smp.step(mo, 3, x, generator_state=state)
    assert state.tolist() == [42, 96 + x.numel()]
    ref = smp.step(mo, 3, x, noise=z)
    assert (got - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(got, smp.step(mo, 3, x, noise=torch.randn_like(x)))
    quiet = DDIMSampler(NoiseSchedule("linear"), 10)  # eta = 0: the state is left alone
    quiet.step(mo, 3, x, generator_state=state)
    assert state.tolist() == [42, 96 + x.numel()]


# --------------------------------------------------------------------- loop = sampler.step
@pytest.mark.parametrize("ret", ["tensor", "sample", "tuple"])
@torch.no_grad()
def test_loop_matches_manual_sampler_steps(ret):
    model = _net(ret=ret)
    sched = NoiseSchedule("scaled_linear")
    x_T = torch.randn(2, 3, 8, 8)
    seen = []
    out, traj = fastdiff.sample(
        model, steps=8, schedule=sched, noise=x_T, return_trajectory=True,
        callback=lambda i, t, x: seen.append((i, t, x.clone())),
    )  # fmt: skip
    smp = DDIMSampler(sched, 8)
    ref = _net(ret="tensor")
    x = x_T
    for i, t in enumerate(smp.timesteps):
        x_new, x0 = smp.step(ref(x, t.expand(2)), i, x, return_x0=True)
        assert torch.equal(traj["x"][i], x) and torch.equal(traj["x0"][i], x0)
        assert seen[i][0] == i and seen[i][1] == int(t) and torch.equal(seen[i][2], x_new)
        x = x_new
    assert torch.equal(out, x) and torch.equal(traj["x"][-1], x)
    assert traj["x"].shape == (9, 2, 3, 8, 8) and traj["x0"].shape == (8, 2, 3, 8, 8)
    assert torch.equal(traj["timesteps"], smp.timesteps)
    assert [int(t[0]) for t in model.seen_t] == smp.timesteps.tolist()


@torch.no_grad()
def test_classifier_free_guidance_matches_manual_combine():
    model = _net(num_classes=5)
    labels = torch.tensor([2, 4])
    x_T = torch.randn(2, 3, 8, 8)
    w = 4.0
    out = fastdiff.sample(model, steps=6, noise=x_T, cond=labels, guidance_scale=w)
    assert [t.shape for t in model.seen_t] == [(4,)] * 6  # one batched call over [uncond, cond]
    null = torch.full((2,), 5)

    def manual(**opts):
        smp = DDIMSampler(NoiseSchedule("linear"), 6, **opts)
        x = x_T
        for i, t in enumerate(smp.timesteps):
            tt = t.expand(2)
            e_u, e_c = model(x, tt, class_labels=null), model(x, tt, class_labels=labels)
            x = smp.step(e_u + w * (e_c - e_u), i, x)
        return x

    # under guidance, DDIM re-derives eps from the clipped x0 by default
    assert (out - manual(use_clipped_model_output=True)).abs().max().item() <= 1e-5
    raw = fastdiff.sample(model, steps=6, noise=x_T, cond=labels, guidance_scale=w,
                          use_clipped_model_output=False)  # fmt: skip
    assert (raw - manual()).abs().max().item() <= 1e-5
    # guidance 1 is plain conditional sampling; an explicit uncond dict is accepted
    one = fastdiff.sample(model, steps=6, noise=x_T, cond={"class_labels": labels},
                          uncond={"class_labels": null}, guidance_scale=1.0)  # fmt: skip
    plain = fastdiff.sample(model, steps=6, noise=x_T, cond=labels)
    assert (one - plain).abs().max().item() <= 1e-5
    assert not torch.allclose(plain, fastdiff.sample(model, steps=6, noise=x_T))


@torch.no_grad()
def test_tensor_cond_goes_to_encoder_hidden_states():
    model = CtxNet()
    ctx = torch.randn(2, 2, 4)
    a = fastdiff.sample(model, steps=4, shape=(3, 4, 4), batch_size=2, cond=ctx,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    b = fastdiff.sample(model, steps=4, shape=(3, 4, 4), batch_size=2,
                        model_kwargs={"encoder_hidden_states": ctx},
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(a, b)
    g = fastdiff.sample(model, steps=4, shape=(3, 4, 4), batch_size=2, cond=ctx,
                        guidance_scale=2.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.isfinite(g).all() and not torch.allclose(g, a)


@torch.no_grad()
def test_learned_variance_model():
    model = _net(out_mult=2)
    x_T = torch.randn(2, 3, 8, 8)
    # DDPM picks learned_range from the model; DDIM drops the variance channels
    d = fastdiff.sample(model, steps=5, sampler="ddpm", noise=x_T, generator=_gens([0, 1]))
    smp = DDPMSampler(NoiseSchedule("linear"), 5, variance_type="learned_range")
    x, gens = x_T, _gens([0, 1])
    for i, t in enumerate(smp.timesteps):
        z = torch.cat([torch.randn(1, 3, 8, 8, generator=g) for g in gens])
        x = smp.step(model(x, t.expand(2)), i, x, noise=z if smp.needs_noise(i) else None)
    assert (d - x).abs().max().item() <= 1e-5
    e = fastdiff.sample(model, steps=5, noise=x_T)
    assert e.shape == x_T.shape and torch.isfinite(e).all()


def test_shape_inference_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()  # fmt: skip
    with torch.no_grad():
        x = fastdiff.sample(unet, steps=3, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 2, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    img = fastdiff.to_images(x)
    assert img.shape == (2, 8, 8, 2) and img.dtype == torch.uint8


def test_to_images():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2).expand(2, 3, 2, 2)
    img = fastdiff.to_images(x)
    assert img.shape == (2, 2, 2, 3) and img.dtype == torch.uint8
    assert img[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]
    assert fastdiff.to_images(x[0]).shape == (1, 2, 2, 3)
    pil = pytest.importorskip("PIL")
    from fastdiff.api import to_pil

    ims = to_pil(x)
    assert len(ims) == 2 and ims[0].size == (2, 2) and pil is not None
    with pytest.raises(ValueError, match="x"):
        fastdiff.to_images(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="x"):
        fastdiff.to_images([1, 2])
    with pytest.raises(TypeError, match="already images"):  # uint8 input is not model space
        fastdiff.to_images(img.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------- bad input
def _bad(match, exc=ValueError, model=None, **kw):
    model = model if model is not None else _net()
    with pytest.raises(exc, match=match), torch.no_grad():
        fastdiff.sample(model, **kw)


def test_bad_inputs():
    _bad("steps", steps=0)
    _bad("steps", steps=1001)
    _bad("steps", TypeError, steps=2.5)
    _bad("sampler", sampler="dpm_fast")
    _bad("sampler", TypeError, sampler=3)
    _bad("shape", model=lambda x, t: x)  # nothing to infer from; the message says how to pass it
    with pytest.raises(ValueError, match=r"shape=\(3, 64, 64\)"):
        fastdiff.sample(lambda x, t: x)
    _bad("model_output", model=lambda x, t: x[:, :2], shape=(3, 4, 4))
    _bad("2C", model=lambda x, t: torch.cat([x, x], 1), shape=(3, 4, 4))
    _bad("guidance_scale", guidance_scale=3.0)
    _bad("uncond", guidance_scale=3.0, cond=torch.tensor([1]))  # no null_class on this model
    _bad("generator", generator=_gens([1, 2]), batch_size=3)
    _bad("generator", TypeError, generator=[1, 2])
    _bad("eta", sampler="ddpm", eta=0.5)
    _bad("batch_size", batch_size=0)
    _bad("noise", TypeError, noise=[1.0])
    _bad(r"noise: expected x_T of shape \[N x \.\.\.\], got shape \(\)", noise=torch.tensor(1.0))
    _bad(r"batch_size: expected noise's batch 2 \(or None\), got 3",
         noise=torch.randn(2, 3, 8, 8), batch_size=3)  # fmt: skip
    _bad(r"shape: expected noise's per-sample shape \(3, 8, 8\) \(or None\), got \(3, 4, 4\)",
         noise=torch.randn(2, 3, 8, 8), shape=(3, 4, 4))  # fmt: skip
    _bad("model", TypeError, model=3)
    _bad("model", TypeError, model=lambda x, t: "nope", shape=(3, 4, 4))
    _bad("schedule", TypeError, schedule=42)
    _bad("steps", sampler=DDIMSampler(NoiseSchedule(), 10), steps=20)
    _bad("cuda_graph", cuda_graph=True, device="cpu")
    _bad("uncond", uncond=torch.tensor([0]))
    _bad(r"uncond: 'encoder_hidden_states' must match cond's per-sample shape \(5, 4\)",
         model=CtxNet(), shape=(3, 4, 4), guidance_scale=2.0, cond=torch.randn(1, 5, 4),
         uncond=torch.randn(1, 7, 4))  # fmt: skip
    _bad("dtype", TypeError, dtype=torch.int32)
    _bad("device", device="gpu")
    _bad("model.to", dtype=torch.float16)  # fp32 model, fp16 samples: a clear error
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # allowed under autocast
        assert fastdiff.sample(_net(), steps=2, dtype=torch.bfloat16).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        _bad("is_available", device="cuda")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['foo'\] for sampler 'ddim'"):
        fastdiff.sample(_net(), steps=2, foo=1)


@torch.no_grad()
def test_class_labels_outside_the_embedding():
    """A label past the model's classes (its null class included) is a ValueError before
    sampling, not an IndexError inside the first model call."""
    from fastdiff.models import UNet

    torch.manual_seed(0)
    net = UNet.from_preset("tiny", num_classes=4).eval()  # labels 0..3, null class 4
    out = fastdiff.sample(net, steps=2, batch_size=2, cond=torch.tensor([4, 3]))  # null: allowed
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match="class label 5 is outside the model's 5 class"):
        fastdiff.sample(net, steps=2, batch_size=2, cond=torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="class label -1"):
        fastdiff.sample(net, steps=2, cond=torch.tensor([-1]))
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(32, 64), norm_num_groups=8, num_class_embeds=5,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="class label 5 is outside the model's 5 class"):
        fastdiff.sample(unet, steps=2, cond=torch.tensor([5]))


@torch.no_grad()
def test_schedule_by_name():
    net = _net()
    x_t = torch.randn(1, 3, 8, 8)
    a = fastdiff.sample(net, steps=3, schedule="cosine", noise=x_t)
    b = fastdiff.sample(net, steps=3, schedule=NoiseSchedule("cosine"), noise=x_t)
    assert torch.equal(a, b)


def test_sampler_object_and_model_schedule():
    model = _net()
    model.schedule = NoiseSchedule("cosine")
    x_T = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a = fastdiff.sample(model, steps=5, noise=x_T)
        b = fastdiff.sample(model, sampler=DDIMSampler(NoiseSchedule("cosine"), 5), noise=x_T)
        c = fastdiff.sample(model, steps=5, noise=x_T, schedule=NoiseSchedule("linear"))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_model_schedule_given_by_name_is_used():
    """A plain model whose ``.schedule`` is a name samples on that schedule, not linear."""
    model = _net()
    model.schedule = "cosine"
    x_T = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a = fastdiff.sample(model, steps=5, noise=x_T)
        b = fastdiff.sample(model, steps=5, noise=x_T, schedule=NoiseSchedule("cosine"))
    assert torch.equal(a, b)


def test_sample_runs_without_autograd_even_when_the_caller_has_grad_on():
    """Parameters that require grad (a model straight from training) and no ``no_grad`` at the
    call site: no autograd graph through the steps, and the fused eager paths still run."""
    from fastdiff.models import UNet

    torch.manual_seed(0)
    model = UNet.from_preset("tiny")
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    x = fastdiff.sample(model, steps=3, batch_size=2)
    assert seen == [False] * 3
    assert not x.requires_grad and x.grad_fn is None
    with torch.no_grad():
        torch.manual_seed(1)
        a = fastdiff.sample(model, steps=3, batch_size=2)
    torch.manual_seed(1)
    torch.testing.assert_close(fastdiff.sample(model, steps=3, batch_size=2), a, rtol=0, atol=0)
    assert torch.is_grad_enabled()  # restored for the caller


@torch.no_grad()
def test_sample_runs_a_training_mode_model_in_eval_mode_and_restores_it():
    """A model sampled mid-training (dropout active) samples as in eval mode; every module's
    mode is back afterwards, including a submodule the user had put in eval mode."""
    from fastdiff.models import UNet

    torch.manual_seed(0)
    model = UNet.from_preset("tiny", dropout=0.5)
    with torch.no_grad():  # conv2 is zero-initialised: make the dropout matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.up[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    assert modes[""] and not modes["up.0"]
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    noise = torch.randn(2, model.in_channels, model.sample_size, model.sample_size)
    a = fastdiff.sample(model, steps=3, noise=noise, sampler="ddim")
    assert seen == [False] * 3
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.eval()
    b = fastdiff.sample(model, steps=3, noise=noise, sampler="ddim")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()  # the check can fail: in training mode the dropout changes the output
    x, t = noise, torch.tensor([500, 500])
    assert not torch.allclose(model(x, t), model(x, t))


@torch.no_grad()
def test_diffusers_scheduler_settings_become_sampler_defaults():
    """schedule=<a diffusers scheduler>: its non-default settings are the sampler's defaults
    (a v-prediction scheduler samples as v-prediction), explicit options win."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from fastdiff.api import _scheduler_options

    model = _net()
    noise = torch.randn(2, 3, 8, 8)
    sched = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                          clip_sample=False, steps_offset=1)  # fmt: skip
    got = fastdiff.sample(model, steps=4, noise=noise, schedule=sched)
    want = fastdiff.sample(model, steps=4, noise=noise, schedule=fastdiff.NoiseSchedule("linear"),
                           prediction_type="v_prediction", timestep_spacing="trailing",
                           clip_sample=False, steps_offset=1)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = fastdiff.sample(model, steps=4, noise=noise, schedule=DDIMScheduler())
    assert not torch.allclose(got, plain)
    assert _scheduler_options(DDIMScheduler(), "ddim") == {}
    assert _scheduler_options(sched, "euler") == {
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
    }
    assert _scheduler_options(DDPMScheduler(variance_type="fixed_large").config, "ddpm") == {
        "variance_type": "fixed_large"}  # fmt: skip
    assert _scheduler_options({"prediction_type": "sample", "shift": 3.0}, "dpm++") == {
        "prediction_type": "sample"}  # a plain dict: every key the sampler takes  # fmt: skip
    assert _scheduler_options({"flow_shift": 3.0}, "dpm++") == {"flow_shift": 3.0}
    explicit = fastdiff.sample(model, steps=4, noise=noise, schedule=sched,
                               prediction_type="epsilon", timestep_spacing="leading",
                               clip_sample=True, steps_offset=0)  # fmt: skip
    torch.testing.assert_close(explicit, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------ CUDA graphs
# sampler configurations the CUDA-graph loop is checked with (real graphs here, a fake on CPU)
GRAPH_OPTS = {
    "ddim-eta1": dict(sampler="ddim", eta=1.0),
    "ddpm-learned": dict(sampler="ddpm"),
    "dpm++": dict(sampler="dpm++"),
    "ddim-cfg": dict(sampler="ddim", guidance_scale=2.5, cond=torch.tensor([1, 0, 3])),
    "ddpm-philox": dict(sampler="ddpm", philox=True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("opts", list(GRAPH_OPTS.values()), ids=list(GRAPH_OPTS))
@torch.no_grad()
def test_cuda_graph_equals_eager(opts):
    opts = dict(opts)
    philox = opts.pop("philox", False)
    model = _net(num_classes=4, out_mult=2 if opts["sampler"] == "ddpm" else 1).cuda()
    if "cond" in opts:
        opts["cond"] = opts["cond"].cuda()
    runs = {}
    for graph in (False, True, True):  # the second graphed run replays the cached graph
        torch.manual_seed(0)  # philox: the seed comes from the global generator
        gens = None if philox else _gens([1, 2, 3])
        out, traj = fastdiff.sample(
            model, steps=10, generator=gens, batch_size=3, cuda_graph=graph,
            return_trajectory=True, **opts,
        )  # fmt: skip
        runs.setdefault(graph, []).append((out, traj))
    eager, graphed = runs[False][0], runs[True]
    for out, traj in graphed:
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, eager[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traj["x0"], eager[1]["x0"], rtol=1e-5, atol=1e-5)
    assert torch.equal(graphed[0][0], graphed[1][0])


@pytest.mark.parametrize(
    "opts",
    [*GRAPH_OPTS.values(), dict(sampler="euler")],
    ids=[*GRAPH_OPTS, "euler"],
)
@torch.no_grad()
def test_graphed_loop_bookkeeping_equals_eager_on_cpu(opts, fake_cuda_graphs, monkeypatch):
    """The CUDA-graph sampling loop (capture once, then per step: refresh t, coef, noise and
    the Philox state in static buffers and replay; DPM-Solver's x0 history; CFG; the graph cache
    across calls) run on CPU with a fake graph: same samples and x0 trajectory as the eager loop,
    and a second call with other x_T, noise, seed and conditioning replays the cached capture.
    The fake re-runs the step's Python on replay, so Python state that a real graph would freeze
    at capture is not checked here: the GPU suite runs the real graphs."""
    from fastdiff import api

    opts = dict(opts)
    philox = opts.pop("philox", False)
    model = _net(num_classes=4, out_mult=2 if opts["sampler"] == "ddpm" else 1)
    eager_loop = api._sample_eager

    def run(graphed, call):  # call 1 and 2: other x_T, noise, Philox seed and conditioning
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        torch.manual_seed(call)  # philox: the seed comes from the global generator
        gens = None if philox else _gens([call + 1, call + 2, call + 3])
        kw = dict(opts)
        if "cond" in kw and call == 2:
            kw["cond"] = torch.tensor([3, 3, 1])
        return fastdiff.sample(model, steps=10, generator=gens, batch_size=3,
                               return_trajectory=True, **kw)  # fmt: skip

    for call in (1, 2):  # the second call replays the first call's capture with new inputs
        eager, etraj = run(False, call)
        out, traj = run(True, call)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(etraj["x"][1], etraj["x"][-1])  # the steps did move x
    assert len(fake_cuda_graphs) == 1  # captured once
    assert not torch.allclose(out, run(False, 1)[0])  # the two calls differ


# ----------------------------------------------------------------------------- channels_last
def _tiny_unet():
    from fastdiff.models import UNet

    torch.manual_seed(0)
    return UNet.from_preset("tiny").eval()


def _is_cl(model):
    convs = [p for p in model.parameters() if p.ndim == 4]
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


@pytest.mark.parametrize("trajectory", [False, True])
def test_unet_on_cpu_runs_channels_last_by_default(trajectory):
    """sample() runs a fastdiff UNet on CPU in channels_last (weights converted in place with
    exact channels_last strides, same Parameter objects, values unchanged), returns contiguous
    samples, and matches the NCHW run within fp32 rounding."""
    import copy

    import safetensors.torch

    model = _tiny_unet()
    nchw = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    c, s = model.config.in_channels, 16
    x_t = torch.randn(2, c, s, s)
    kw = dict(steps=4, noise=x_t, return_trajectory=trajectory)
    during = []
    cl = torch.channels_last

    def exact_cl(m):  # also the 1x1 convs' strides (ambiguous layout: NCHW strides there made
        # oneDNN return NCHW outputs, copied back by the next op: 5 copies per digits forward)
        return all(p.stride() == p.to(memory_format=cl).stride() for p in m.parameters()
                   if p.ndim == 4)  # fmt: skip

    hook = model.register_forward_pre_hook(
        lambda m, a: during.append(exact_cl(m) and a[0].is_contiguous(memory_format=cl))
    )
    out = fastdiff.sample(model, **kw)
    hook.remove()
    ref = fastdiff.sample(nchw, channels_last=False, **kw)
    assert during == [True] * 4  # ran channels_last
    assert _is_cl(model) and not _is_cl(nchw)  # converted in place and kept
    assert list(model.parameters()) == params  # the same Parameter objects (optimizers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    if trajectory:
        (out, traj), (ref, traj_ref) = out, ref
        for k in ("x", "x0"):
            assert traj[k].is_contiguous()
            torch.testing.assert_close(traj[k], traj_ref[k], rtol=1e-4, atol=1e-4)
    assert out.is_contiguous() and out.shape == x_t.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # the converted model called directly on NCHW x still returns a contiguous tensor
    t = torch.full((2,), 500)
    direct = model(x_t, t)
    assert direct.is_contiguous()
    torch.testing.assert_close(direct, nchw(x_t, t), rtol=1e-4, atol=1e-4)
    # channels_last noise in -> channels_last samples out
    cl = fastdiff.sample(model, steps=4, noise=x_t.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(cl, out, rtol=1e-5, atol=1e-5)


def test_channels_last_option_on_other_models():
    """Explicit True converts any nn.Module; the default leaves non-fastdiff models alone."""
    conv = nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t):
        return conv(x)

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)

    net = ConvNet()
    fastdiff.sample(net, steps=2, shape=(3, 8, 8))
    assert not _is_cl(net)
    out = fastdiff.sample(net, steps=2, shape=(3, 8, 8), channels_last=True)
    assert _is_cl(net) and out.is_contiguous()
    fastdiff.sample(model, steps=2, shape=(3, 8, 8), channels_last=True)  # a plain callable
    from fastdiff.api import _weights_channels_last

    assert _weights_channels_last(net)  # converted above: the default now runs x channels_last
    one_in = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)).to(
        memory_format=torch.channels_last
    )
    assert _weights_channels_last(one_in)  # the 1-channel first conv is ambiguous: skipped
    assert not _weights_channels_last(nn.Sequential(nn.Conv2d(4, 4, 3)))
    with pytest.raises(TypeError, match="channels_last"):
        fastdiff.sample(net, steps=2, shape=(3, 8, 8), channels_last="yes")
    fresh = ConvNet()  # a call that fails its checks leaves the model's layout alone
    with pytest.raises(ValueError, match="cuda_graph"):
        fastdiff.sample(fresh, steps=2, shape=(3, 8, 8), channels_last=True, cuda_graph=True)
    assert not _is_cl(fresh)


def test_graph_cache_key_follows_the_weights_storage():
    """A captured CUDA graph reads the weights at their addresses: reallocating them (here a
    layout change, as channels_last=True does) must change the signature the graph cache checks;
    an in-place load_state_dict must not."""
    from fastdiff.api import _param_signature

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 1))
    sig = _param_signature(net)
    net.load_state_dict({k: torch.randn_like(v) for k, v in net.state_dict().items()})
    assert _param_signature(net) == sig
    net.to(memory_format=torch.channels_last)
    assert _param_signature(net) != sig
    assert _param_signature(lambda x, t: x) == ()


@torch.no_grad()
def test_graphed_loop_callback_gets_each_steps_x_not_the_static_buffer(
    fake_cuda_graphs, monkeypatch
):
    """With cuda_graph=True the callback got the graph's static x buffer, which the next replay
    overwrites: a callback that kept x (``xs.append(x)``, a preview queue) ended up with the
    final sample at every step. It now gets each step's x, as in the eager loop."""
    from fastdiff import api

    model = _net()
    eager_loop = api._sample_eager
    seen = {}
    for graphed in (False, True):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        xs: list[torch.Tensor] = []
        fastdiff.sample(model, steps=5, noise=torch.randn(2, 3, 8, 8, generator=_gens([0])[0]),
                        callback=lambda i, t, x, xs=xs: xs.append(x))  # fmt: skip
        seen[graphed] = torch.stack(xs)
    assert not torch.allclose(seen[True][0], seen[True][-1])
    torch.testing.assert_close(seen[True], seen[False], rtol=1e-6, atol=1e-6)


class _DictKwNet(nn.Module):
    """eps = 0.1 x + the mean of a tensor handed in a dict kwarg (diffusers added_cond_kwargs)."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.sample_size = 3, 4
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, extra):
        return 0.1 * self.w * x + extra["emb"].mean(1)[:, None, None, None]


@torch.no_grad()
def test_graphed_loop_reads_the_current_tensors_inside_dict_kwargs(fake_cuda_graphs, monkeypatch):
    """cuda_graph=True with a dict-valued kwarg (model_kwargs={"added_cond_kwargs": {...}}): the
    graph cache keyed it by repr(), which elides the middle of a tensor of more than 1000
    elements, and the capture kept the first call's tensors: a second call whose embedding
    differed only there replayed the first call's conditioning. Tensors inside dicts are now
    static buffers refreshed before each replay, like top-level ones (one capture)."""
    from fastdiff import api

    model = _DictKwNet()
    eager_loop = api._sample_eager
    noise = torch.randn(2, 3, 4, 4)
    for call in (1, 2):
        emb = torch.zeros(2, 1500)
        emb[:, 700:800] = call  # the middle: elided by repr
        outs = []
        for loop in (eager_loop, api._sample_graphed):
            monkeypatch.setattr(api, "_sample_eager", loop)
            outs.append(fastdiff.sample(model, steps=3, noise=noise, clip_sample=False,
                                        model_kwargs={"extra": {"emb": emb}}))  # fmt: skip
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 1


@torch.no_grad()
def test_graph_cache_is_keyed_by_the_requested_backend(fake_cuda_graphs, monkeypatch):
    """A capture made under the automatic choice is not replayed inside use_backend("torch")
    (on a GPU that would run the first capture's triton/cuda kernels: a silent fallback)."""
    from fastdiff import api

    model = _net()
    monkeypatch.setattr(api, "_sample_eager", api._sample_graphed)
    noise = torch.randn(2, 3, 4, 4)
    auto = fastdiff.sample(model, steps=3, noise=noise)
    with fastdiff.use_backend("torch"):
        forced = fastdiff.sample(model, steps=3, noise=noise)
    with fastdiff.use_backend("torch", op="sampler_step"):
        fastdiff.sample(model, steps=3, noise=noise)
    fastdiff.sample(model, steps=3, noise=noise)  # the automatic capture again: replayed
    assert len(fake_cuda_graphs) == 3
    torch.testing.assert_close(forced, auto, rtol=1e-5, atol=1e-5)


def test_philox_seed_comes_from_the_cpu_generator_under_a_default_device():
    """The in-kernel noise seed is drawn from torch's CPU generator even when the caller set a
    default device (on CUDA the draw would sync with the device; on meta it failed)."""
    from fastdiff._loop import _philox_state

    smp = DDIMSampler(NoiseSchedule("linear"), 5, eta=1.0)
    torch.manual_seed(0)
    a = _philox_state(smp, None, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.device("meta"):
        b = _philox_state(smp, None, torch.device("cpu"))
    assert a is not None and torch.equal(a, b)


def test_float64_dtype_error_says_where_the_dtype_came_from():
    """An fp64 model (e.g. built under torch.set_default_dtype(torch.float64)) or fp64 noise:
    the error names the source, since the user passed no dtype."""
    model = nn.Conv2d(3, 3, 1).double()
    with pytest.raises(TypeError, match=r"got torch.float64 \(the model's parameters"):
        fastdiff.sample(model, steps=2, shape=(3, 4, 4))
    with pytest.raises(TypeError, match=r"got torch.float64 \(noise's dtype"):
        fastdiff.sample(lambda x, t: x, steps=2, noise=torch.randn(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"got torch.float64$"):
        fastdiff.sample(nn.Conv2d(3, 3, 1), steps=2, shape=(3, 4, 4), dtype=torch.float64)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(callback=5), r"callback: expected a callable\(i, t, x\) or None, got int"),
        (dict(cuda_graph="yes"), "cuda_graph: expected a bool, got str"),
        (dict(progress=None), "progress: expected a bool, got NoneType"),
        (dict(return_trajectory=1), "return_trajectory: expected a bool, got int"),
    ],
)
def test_flags_are_checked_before_any_step(kw, match):
    calls = []

    def model(x, t):
        calls.append(t)
        return x

    with pytest.raises(TypeError, match=match):
        fastdiff.sample(model, steps=2, shape=(3, 4, 4), **kw)
    assert calls == []


@pytest.mark.parametrize(
    "opts",
    [
        dict(sampler="ddim"),
        dict(sampler="ddim", eta=1.0),  # in-kernel Philox noise
        dict(sampler="ddpm"),
        dict(sampler="dpm++"),
        dict(sampler="euler"),
        dict(sampler="heun"),
        dict(sampler="ddim", cfg=True),
    ],
    ids=["ddim", "ddim-eta1", "ddpm", "dpm++", "euler", "heun", "ddim-cfg"],
)
@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_no_host_sync_inside_the_sampling_loop(opts, device):
    """The loop reads no tensor value on the host (the README's "no .item() in the loop"). On
    CUDA, torch.cuda.set_sync_debug_mode("error") is armed too: any synchronizing call raises."""
    opts = dict(opts)
    if opts.pop("cfg", False):
        net = CtxNet()
        cond, uncond = torch.randn(2, 2, 4, device=device), torch.randn(2, 2, 4, device=device)
        opts.update(cond=cond, uncond=uncond, guidance_scale=3.0, shape=(3, 4, 4))
    else:
        net = _tiny_unet()
        opts.update(shape=(net.config.in_channels, 8, 8))
    net.to(device)
    cuda = device == "cuda"

    def model(x, t, encoder_hidden_states=None):  # the name tells sample() where cond goes
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        return net(x, t) if encoder_hidden_states is None else net(x, t, encoder_hidden_states)

    try:
        assert_no_host_sync(
            lambda m: fastdiff.sample(m, steps=4, batch_size=2, device=device, **opts), model
        )
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
