"""Session 19 mutation review of the core loop and modules (api, _loop, _conditioning, _prepare,
_inpaint, nn, models.unet, integrations.diffusers, schedules, _dispatch): one test per mutant
that the existing suite let survive, each checked against an independent reference (a
hand-computed value, a float64 formula, diffusers, or the model called directly). The mutants
and their verdicts are listed in notes/s19/review19_log.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import NoiseSchedule, _dispatch
from fastdiff.api import to_pil
from fastdiff.samplers import DDIMSampler, DDPMSampler


class _LabelNet(nn.Module):
    """A class-conditional toy eps-model (elementwise, so batches do not mix): the label's
    embedding is added to ``0.4 tanh(x) + sin(t / 150)``; label ``null_class`` is "no class"."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(num_classes + 1, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(num_classes + 1, 3, generator=g))
        self.num_classes = num_classes
        self.null_class = num_classes
        self.in_channels, self.sample_size = 3, 4

    def forward(self, x, t, class_labels=None):
        if class_labels is None:
            class_labels = torch.full_like(t, self.null_class)
        assert t.shape == (x.shape[0],) and class_labels.shape == (x.shape[0],)
        h = 0.4 * torch.tanh(x) + torch.sin(t.float() / 150)[:, None, None, None]
        return h + self.emb(class_labels)[:, :, None, None]


def _manual_ddim(model, x_T, steps, eps_fn):
    """DDIM (eta 0, no clipping) with ``eps_fn(x, t)`` as the model's prediction, step by step."""
    smp = DDIMSampler(NoiseSchedule("linear"), steps, clip_sample=False)
    x = x_T
    for i, t in enumerate(smp.timesteps):
        x = smp.step(eps_fn(x, t.expand(x.shape[0])), i, x)
    return x


# ---------------------------------------------------------------------------------- _loop.py
@torch.no_grad()
def test_guidance_scale_zero_is_the_unconditional_model():
    """w = 0 in eps = eps_u + w (eps_c - eps_u) is the unconditional prediction: still one
    batched [uncond, cond] call (a falsy 0.0 must not be read as "no guidance", which sent the
    model N rows against 2N timesteps / labels). Reference: DDIM on the null-class model."""
    model = _LabelNet().eval()
    labels = torch.tensor([1, 3])
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    null = torch.full((2,), model.null_class)
    got = fastdiff.sample(model, steps=5, noise=x_T, cond=labels, guidance_scale=0.0,
                          sampler="ddim", clip_sample=False)  # fmt: skip
    ref = _manual_ddim(model, x_T, 5, lambda x, t: model(x, t, null))
    assert (got - ref).abs().max().item() <= 1e-5
    cond_only = _manual_ddim(model, x_T, 5, lambda x, t: model(x, t, labels))
    assert (got - cond_only).abs().max().item() > 1e-2  # the labels matter: w = 0 is visible


@torch.no_grad()
def test_stochastic_steps_without_a_generator_use_in_kernel_philox_only():
    """No generator: every noisy step's noise is the op's in-kernel Philox draw from the
    generator_state (no host randn per step; CUDA-graph safe), also for DDPM, whose last step
    adds none (any step adding noise turns Philox on, not only all of them)."""
    model = _LabelNet().eval()
    smp = DDPMSampler(NoiseSchedule("linear"), 5)
    noisy = [smp.needs_noise(i) for i in range(smp.steps)]
    assert any(noisy) and not all(noisy)

    def host_draw(*a, **k):
        raise AssertionError("a host-side noise draw inside the loop")

    smp._draw_noise = host_draw
    torch.manual_seed(7)
    a = fastdiff.sample(model, sampler=smp, batch_size=2)
    torch.manual_seed(7)
    b = fastdiff.sample(model, sampler=smp, batch_size=2)
    assert torch.equal(a, b) and torch.isfinite(a).all()


# -------------------------------------------------------------------------- _conditioning.py
class _VarNet(nn.Module):
    """A learned-variance eps-model: 2C output channels, the eps half first (as ADM / diffusers
    ``learned_range`` UNets), the variance half very different from it."""

    learned_variance = True

    def forward(self, x, t):
        eps = 0.5 * torch.tanh(x) + torch.sin(t.float() / 150)[:, None, None, None]
        return torch.cat([eps, 3.0 - 2.0 * x], 1)


@torch.no_grad()
def test_a_sampler_without_learned_variance_takes_the_eps_channels_of_a_2c_output():
    """DDIM on a learned-variance model uses the first C channels (the prediction), not the
    variance channels: reference DDIM steps on ``model(x, t)[:, :C]``."""
    model = _VarNet()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    got = fastdiff.sample(model, steps=5, sampler="ddim", noise=x_T, clip_sample=False)
    ref = _manual_ddim(model, x_T, 5, lambda x, t: model(x, t)[:, :3])
    assert (got - ref).abs().max().item() <= 1e-5


# -------------------------------------------------------------------------------- _prepare.py
class _ConvNet(nn.Module):
    """A small conv eps-model (not a fastdiff UNet) that records the layout of each x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.in_channels, self.sample_size = 3, 4
        self.layouts: list[bool] = []

    def forward(self, x, t):
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return 0.1 * self.conv(x)


@torch.no_grad()
def test_channels_last_default_follows_a_models_channels_last_weights_on_cpu():
    """channels_last=None on CPU: a model whose conv weights are channels_last (e.g. after
    fastdiff.optimize on CPU) gets x in channels_last; one with NCHW weights gets NCHW x. The
    samples come back contiguous either way (x_T's layout)."""
    torch.manual_seed(0)
    plain = _ConvNet().eval()
    a = fastdiff.sample(plain, steps=2, sampler="ddim", batch_size=2)
    assert plain.layouts == [False, False] and a.is_contiguous()
    cl = _ConvNet().eval().to(memory_format=torch.channels_last)
    b = fastdiff.sample(cl, steps=2, sampler="ddim", batch_size=2)
    assert cl.layouts == [True, True] and b.is_contiguous()


# ------------------------------------------------------------------------------------- api.py
def test_to_pil_of_one_channel_samples_is_grayscale():
    """[N x 1 x H x W] samples -> mode "L" images of size (W, H) with to_images' pixels."""
    pytest.importorskip("PIL")
    x = torch.linspace(-1.2, 1.2, 2 * 3 * 5).reshape(2, 1, 3, 5)
    ims = to_pil(x)
    assert [(im.mode, im.size) for im in ims] == [("L", (5, 3))] * 2
    want = fastdiff.to_images(x)[..., 0]
    for im, w in zip(ims, want, strict=True):
        assert torch.equal(torch.tensor(list(im.getdata()), dtype=torch.uint8).reshape(3, 5), w)


# ----------------------------------------------------------------------------------- nn/*.py
@pytest.mark.parametrize("training", [False, True])
def test_group_norm_silu_from_group_norm_keeps_the_training_mode(training):
    """from_group_norm's module is in the GroupNorm's mode: fastdiff.optimize on an eval()
    model leaves no fused norm in training mode (as it keeps conv_act's)."""
    from fastdiff.nn import GroupNormSiLU

    gn = nn.GroupNorm(2, 4).train(training)
    assert GroupNormSiLU.from_group_norm(gn).training is training


def test_upsample_runs_a_conv_with_other_padding_as_a_module():
    """Nearest 2x + a 3x3 conv folds into one transposed conv only for padding 1: with a
    padding-0 conv the result is conv(up2(x)) itself, [N x C x 2H-2 x 2W-2]."""
    from fastdiff.nn import Upsample, sampling

    torch.manual_seed(0)
    up = Upsample(8)
    up.conv = nn.Conv2d(8, 8, 3, padding=0)
    x = torch.randn(2, 8, 8, 8)  # large enough for the folded path (fold_pays)
    assert sampling.fold_pays(x) and sampling.foldable_conv(up.conv, 8) is not None
    with torch.no_grad():
        got = up(x)
        ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert got.shape == (2, 8, 14, 14)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_stacked_linear_of_layers_with_different_input_widths_is_none():
    """stacked_linear declines (None: the caller runs each layer as a module) unless every
    layer takes the same input width; it does not try to concatenate the weights."""
    from fastdiff.nn.stacked import stacked_linear

    x = torch.randn(3, 4)
    assert stacked_linear([nn.Linear(4, 2), nn.Linear(5, 2)], x) is None
    a, b = nn.Linear(4, 2), nn.Linear(4, 3)
    got = stacked_linear([a, b], x)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(got, 1), torch.cat([a(x), b(x)], 1))


@torch.no_grad()
def test_inpainting_with_a_strength_grid_sampler_object_uses_its_strength():
    """mask= without strength= and an LCM sampler object built with strength 0.5: the run is
    that strength's (its grid and its noised start, not the pure-noise start of the default
    1.0), the same as sampler="lcm" with strength=0.5; the kept region is the image."""
    from fastdiff.samplers import LCMSampler

    model = _LabelNet().eval()
    g = torch.Generator().manual_seed(6)
    image = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    z = torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0
    smp = LCMSampler(NoiseSchedule("scaled_linear"), 4, strength=0.5)
    got = fastdiff.sample(
        model,
        sampler=smp,
        image=image,
        mask=mask,
        noise=z,
        generator=torch.Generator().manual_seed(1),
    )
    ref = fastdiff.sample(model, 4, sampler="lcm", schedule=NoiseSchedule("scaled_linear"),
                          strength=0.5, image=image, mask=mask, noise=z,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(got, ref)
    keep = mask.expand_as(image) == 0
    assert torch.equal(got[keep], image[keep])


# --------------------------------------------------------------------------- models/unet.py
@torch.no_grad()
def test_unet_resblocks_get_silu_of_the_time_plus_class_embedding():
    """The ResBlocks' emb is silu(time_embed(t) + class_embed(label)) (DDPM / ADM: the
    projection sees the activated embedding; the UNet applies the SiLU once for all blocks).
    Reference: the sinusoid [sin(t f_i), cos(t f_i)], f_i = 10000^(-i / (d/2 - 1)), through
    the two linears by hand in float64."""
    import math

    from fastdiff.models import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=3, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                     attention_resolutions=(), num_groups=4, sample_size=4, num_classes=3,
                     mid_attention=False)  # fmt: skip
    model = UNet(cfg).double().eval()
    seen = []
    model.down[0].layer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    t, labels = torch.tensor([7, 640]), torch.tensor([2, 0])
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64), t, labels)
    half = 4
    f = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=torch.float64)
    arg = t.double()[:, None] * f
    te = model.time_embed
    h = torch.cat([arg.sin(), arg.cos()], 1) @ te.linear1.weight.T + te.linear1.bias
    h = torch.nn.functional.silu(h) @ te.linear2.weight.T + te.linear2.bias
    want = torch.nn.functional.silu(h + model.class_embed.weight[labels])
    assert math.isclose(float((seen[0] - want).abs().max()), 0.0, abs_tol=1e-6)


# ---------------------------------------------------------------- integrations/diffusers.py
def _tiny_unet2d():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip


def test_optimize_keeps_an_eval_model_in_eval_mode():
    """Every module that optimize() puts into an eval() model (the fused out norm, the
    nn.Identity that replaces conv_act) is in eval mode too, and a train() model stays train."""
    for train in (False, True):
        model = _tiny_unet2d().train(train)
        fastdiff.optimize(model, channels_last=False)
        assert model.conv_act.__class__ is nn.Identity
        assert {m.training for m in model.modules()} == {train}


def test_optimize_default_channels_last_only_for_a_model_on_cpu():
    """channels_last=None converts a CPU model's weights, not a model on another device (here
    the meta device, as accelerate's init_empty_weights leaves it): its report says so."""
    model = _tiny_unet2d()
    assert fastdiff.optimize(model).fastdiff_report.channels_last is True
    meta = _tiny_unet2d().to("meta")
    report = fastdiff.optimize(meta).fastdiff_report
    assert report.channels_last is False
    assert meta.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_hook_on_a_resnet_blocks_nonlinearity_still_runs_after_optimize(when):
    """A forward hook on a ResnetBlock2D's SiLU (diffusers calls it on both norms' outputs and
    on temb; the fused forward on temb only): set before optimize() the block is left alone
    (and reported so), set after it the block runs diffusers' forward while the hook is
    there. Either way the output is the unpatched model's with the hook."""
    model = _tiny_unet2d().eval()
    block = model.down_blocks[0].resnets[0]
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([10])
    handle = block.nonlinearity.register_forward_hook(lambda m, args, out: 0.5 * out)
    with torch.no_grad():
        ref = model(x, t).sample
    if when == "after":
        handle.remove()
    fastdiff.optimize(model, channels_last=False)
    if when == "before":
        left = dict(model.fastdiff_report.left)
        assert "nonlinearity" in left["down_blocks.0.resnets.0"]
    else:
        block.nonlinearity.register_forward_hook(lambda m, args, out: 0.5 * out)
    with torch.no_grad():
        got = model(x, t).sample
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ _dispatch.py
@pytest.fixture
def global_backends(monkeypatch):
    """set_backend's process-wide table, restored afterwards (and no FASTDIFF_BACKEND)."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    saved = dict(_dispatch._global_override)
    _dispatch._global_override.clear()
    _dispatch._global_key = ()
    yield
    _dispatch._global_override.clear()
    _dispatch._global_override.update(saved)
    _dispatch._global_key = tuple(saved.items())


def test_set_backend_none_clears_only_that_setting(global_backends):
    """set_backend(None, op=...) clears the per-op setting only (the all-ops one applies
    again), set_backend(None) the all-ops one only (a per-op one stays): set_backend's doc."""
    dev = torch.device("cpu")
    fastdiff.set_backend("torch")
    fastdiff.set_backend("cpu", op="group_norm_silu")
    assert _dispatch.resolve("group_norm_silu", dev) == "cpu"
    assert _dispatch.resolve("sampler_step", dev) == "torch"
    fastdiff.set_backend(None, op="group_norm_silu")
    assert _dispatch.resolve("group_norm_silu", dev) == "torch"  # the all-ops setting
    assert _dispatch.resolve("sampler_step", dev) == "torch"
    fastdiff.set_backend("torch", op="attention")
    fastdiff.set_backend(None)
    assert _dispatch.requested_backend("attention") == "torch"  # the per-op one stays
    assert _dispatch.requested_backend("sampler_step") is None
    assert _dispatch.resolve("sampler_step", dev) == "cpu"  # automatic again


_CLIP_SAMPLERS = ["DDIMSampler", "DDPMSampler", "DPMSolverPPSampler", "UniPCSampler",
                  "DDIMInverseSampler"]  # fmt: skip


@pytest.mark.parametrize("cls", _CLIP_SAMPLERS)
@pytest.mark.parametrize(
    ("value", "exc"),
    [("x", TypeError), (True, TypeError), (None, TypeError), (0.0, ValueError),
     (-1.0, ValueError), (float("nan"), ValueError)],
)  # fmt: skip
def test_clip_sample_range_refused_by_name(cls, value, exc):
    """clip_sample=True with a range that is not a float > 0: an error naming clip_sample_range
    (a str was a bare "could not convert string to float", True was read as 1.0)."""
    import fastdiff.samplers as samplers
    from fastdiff.schedules import NoiseSchedule

    with pytest.raises(exc, match="^clip_sample_range: expected"):
        getattr(samplers, cls)(NoiseSchedule("linear"), 5, clip_sample=True,
                               clip_sample_range=value)  # fmt: skip
    smp = getattr(samplers, cls)(NoiseSchedule("linear"), 5, clip_sample=True,
                                 clip_sample_range=2)  # fmt: skip
    assert smp.clip_sample_range == 2.0 and type(smp.clip_sample_range) is float
