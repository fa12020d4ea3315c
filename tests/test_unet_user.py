"""fastdiff.models.UNet and its fastdiff.nn blocks used as a user who trains and samples their own
model does (session 7 exploration): each test pins a bug a user hit."""

from __future__ import annotations

import copy
import os
import stat

import pytest
import torch
from helpers import SMALL, randomize_

import fastdiff
from fastdiff.models import UNet, UNetConfig
from fastdiff.models.pretrained import load_model_file, save_model_file
from fastdiff.nn import Attention
from fastdiff.nn.attention import _reference_forward

# ---- from_preset with a different in_channels --------------------------------------------


@pytest.mark.parametrize(
    "name,in_ch,out_ch", [("tiny", 1, 1), ("ddpm-cifar10", 4, 4), ("adm-64", 1, 2)]
)
def test_from_preset_in_channels_override_keeps_out_channels_coupled(name, in_ch, out_ch):
    # was: from_preset("tiny", in_channels=1) kept the preset's out_channels=3, so the model
    # predicted 3 channels for 1-channel images and fastdiff.sample failed on the shape
    # (adm-64's learned variance became 6 channels for 1-channel input: no learned variance)
    with torch.device("meta"):
        model = UNet.from_preset(name, in_channels=in_ch)
    assert model.out_channels == out_ch
    assert model.learned_variance == (name == "adm-64")


def test_from_preset_in_channels_override_samples():
    model = randomize_(UNet.from_preset("tiny", in_channels=1))
    x = fastdiff.sample(model, steps=2, batch_size=1, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 1, 16, 16)
    # an explicit out_channels still wins
    assert UNet.from_preset("tiny", in_channels=1, out_channels=2).out_channels == 2


# ---- UNetConfig validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(channel_mult=(1, 1.5)), "channel_mult"),  # was silently truncated to (1, 1)
        (dict(attention_resolutions=(4.5,)), "attention_resolutions"),  # was 4
        (dict(channel_mult=(1, True)), "channel_mult"),
    ],
)
def test_config_non_integer_sequences_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(channel_mult=2), "channel_mult"),  # was "'int' object is not iterable"
        (dict(attention_resolutions=4), "attention_resolutions"),
        (dict(dropout="0.1"), "dropout"),  # was "'<=' not supported between ..."
    ],
)
def test_config_wrong_types_raise_naming_the_field(overrides, match):
    with pytest.raises(TypeError, match=match):
        UNetConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_heads=2.0), "num_heads"),  # config accepted it, UNet(config) then failed
        (dict(num_heads=None, head_dim=8.0), "head_dim"),
        (dict(num_res_blocks=True), "num_res_blocks must be a positive int, got True"),
        (dict(num_res_blocks=0), "num_res_blocks must be a positive int, got 0"),
        (dict(num_heads=0), "num_heads"),
        (dict(use_scale_shift_norm="no"), "use_scale_shift_norm"),  # "no" meant True
        (dict(resblock_updown=1), "resblock_updown"),
        (dict(mid_attention="False"), "mid_attention"),
    ],
)
def test_config_invalid_values_raise_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, **overrides})


def test_config_integer_like_values_still_accepted():
    import numpy as np

    cfg = UNetConfig(**{**SMALL, "channel_mult": [np.int64(1), 2], "attention_resolutions": [4]})
    assert cfg.channel_mult == (1, 2) and cfg.attention_resolutions == (4,)
    assert all(type(m) is int for m in cfg.channel_mult)
    assert UNetConfig(**{**SMALL, "dropout": 0}).dropout == 0


# ---- float64 -------------------------------------------------------------------------------


def test_attention_float64():
    # was: TypeError "attention: q must be float16, bfloat16 or float32" from inside forward
    torch.manual_seed(0)
    block = randomize_(Attention(32, num_heads=2, num_groups=4)).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    out = block(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference_forward(block, x), rtol=1e-12, atol=1e-12)
    ctx_block = randomize_(Attention(32, num_heads=2, num_groups=4, context_dim=6)).double()
    ctx = torch.randn(2, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(
        ctx_block(x, ctx), _reference_forward(ctx_block, x, ctx), rtol=1e-12, atol=1e-12
    )


def test_unet_float64_forward_backward_is_the_fp32_reference():
    torch.manual_seed(0)
    model = randomize_(UNet(UNetConfig(**{**SMALL, "num_classes": 3})))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, t, y)
    m64 = copy.deepcopy(model).double()
    x64 = x.double().requires_grad_()
    out = m64(x64, t, y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert x64.grad is not None and x64.grad.isfinite().all()


def test_attention_float64_explicit_fused_backend_still_raises():
    block = Attention(32, num_heads=1, num_groups=4).double()
    x = torch.randn(1, 32, 2, 2, dtype=torch.float64)
    with (
        fastdiff.use_backend("cpu", op="attention"),
        pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"),
    ):
        block(x)


def test_attention_float64_torch_backend_is_the_reference():
    # an explicit torch backend runs float64 through the math reference, not SDPA or an error
    torch.manual_seed(0)
    block = randomize_(Attention(32, num_heads=2, num_groups=4)).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    with fastdiff.use_backend("torch", op="attention"):
        out = block(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference_forward(block, x), rtol=1e-12, atol=1e-12)


# ---- persistence -----------------------------------------------------------------------------


def test_save_pretrained_weights_file_mode_like_config(tmp_path):
    # was: model.safetensors 0600 (safetensors' private temporary), config.json 0644
    model = UNet(UNetConfig(**SMALL))
    old = os.umask(0o022)  # a umask of 077 would make both files 0600 and hide the bug
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode) == 0o644


def tied_model() -> UNet:
    model = randomize_(UNet(UNetConfig(**SMALL)))
    model.up[1].layer.emb_proj.weight = model.up[0].layer.emb_proj.weight  # tied weights
    return model


def test_save_pretrained_tied_weights_round_trip(tmp_path):
    # was: safetensors RuntimeError "Some tensors share memory"
    model = tied_model()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    model.save_pretrained(tmp_path)
    again = UNet.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t), model(x, t), rtol=0, atol=0)
    # as documented: eval mode, requires_grad on (load_model_file freezes instead)
    assert not again.training and all(p.requires_grad for p in again.parameters())


def test_save_model_file_tied_weights_round_trip(tmp_path):
    model = tied_model()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    path = tmp_path / "m.safetensors"
    save_model_file(model, path)
    again = load_model_file(path)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t), model(x, t), rtol=0, atol=0)
    assert not again.training and not any(p.requires_grad for p in again.parameters())


# ---- timesteps -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [torch.tensor([True, False]), torch.tensor([1 + 2j, 3j])])
def test_non_real_timesteps_raise(t):
    # was: bool t silently meant 0/1, complex t dropped its imaginary part (with a warning)
    model = UNet(UNetConfig(**SMALL))
    with pytest.raises(TypeError, match="t must be integer or float"):
        model(torch.randn(2, 3, 8, 8), t)


def test_timestep_embedding_rejects_bool():
    from fastdiff.nn import timestep_embedding

    with pytest.raises(TypeError, match="t must be integer or float"):
        timestep_embedding(torch.tensor([True]), 8)


# ---- the model's config is its own -----------------------------------------------------------


def test_config_reused_for_a_second_model_does_not_change_the_first(tmp_path):
    # was: UNet kept the caller's config object; `cfg.base_channels = 32; UNet(cfg)` (a sweep)
    # changed the first model's .config, so its save_pretrained could not be loaded back
    cfg = UNetConfig(**SMALL)
    first = UNet(cfg)
    cfg.base_channels = 32
    UNet(cfg)
    assert first.config.base_channels == 16
    first.save_pretrained(tmp_path)
    assert UNet.from_pretrained(tmp_path).config == first.config


def test_unet_config_type_checked():
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet(dict(SMALL))


@pytest.mark.parametrize("x", [[[1.0]], "img"])
def test_non_tensor_x_is_a_type_error(x):
    # was: AttributeError "'list' object has no attribute 'ndim'"
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        UNet(UNetConfig(**SMALL))(x, 3)


def test_non_tensor_numpy_x_is_a_type_error():
    # was: conv2d's "received an invalid combination of arguments" from deep inside
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        UNet(UNetConfig(**SMALL))(torch.randn(1, 3, 8, 8).numpy(), 3)


# ---- the two weight formats point to each other ----------------------------------------------


def test_from_pretrained_on_a_model_file_says_which_loader(tmp_path):
    # was: NotADirectoryError "m.safetensors/config.json"
    path = tmp_path / "m.safetensors"
    save_model_file(UNet(UNetConfig(**SMALL)), path)
    with pytest.raises(ValueError, match="load_model_file"):
        UNet.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet.from_pretrained(tmp_path / "missing")


def test_load_model_file_on_save_pretrained_output_says_which_loader(tmp_path):
    UNet(UNetConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_pretrained"):
        load_model_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "name,overrides,heads",
    [("adm-64", dict(num_heads=4), (4, None)), ("ddpm-cifar10", dict(head_dim=64), (None, 64))],
)
def test_from_preset_heads_override_replaces_the_presets_other_head_field(name, overrides, heads):
    # was: ValueError "give num_heads or head_dim, not both" although the user gave one
    with torch.device("meta"):
        model = UNet.from_preset(name, **overrides)
    assert (model.config.num_heads, model.config.head_dim) == heads
    with pytest.raises(ValueError, match="not both"):
        UNet.from_preset(name, num_heads=4, head_dim=64)


def test_save_model_file_of_a_compiled_unet_loads_back(tmp_path):
    # was: the OptimizedModule's state_dict keys carry "_orig_mod." and load_model_file failed
    # with 'Missing key(s) in state_dict' for every weight
    model = randomize_(UNet(UNetConfig(**SMALL)))
    path = tmp_path / "m.safetensors"
    save_model_file(torch.compile(model, backend="aot_eager"), path)
    again = load_model_file(path)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t), model(x, t), rtol=0, atol=0)


def test_save_model_file_refuses_a_model_it_cannot_load(tmp_path):
    # was: a diffusers UNet2DModel was written, then load_model_file said "unknown UNetConfig
    # fields [...]"; an nn.Linear raised AttributeError 'config'
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="fastdiff.models.UNet"):
        save_model_file(torch.nn.Linear(2, 2), path)
    assert not os.listdir(tmp_path)


# ---- tracing must not leak into eager calls ------------------------------------------------


def test_export_then_eager_upsample_returns_real_tensors():
    # was: torch.export traced nn.Upsample's folded path with fake tensors and cached the fake
    # fold matrix in a module-level dict: every later eager call returned a FakeTensor
    from fastdiff.nn import Upsample, sampling

    sampling._KRON.clear()
    up = randomize_(Upsample(8))
    x = torch.randn(2, 8, 8, 8)  # 128 pixels: the folded path
    assert sampling.fold_pays(x) and sampling.foldable_conv(up.conv, 8) is None
    exported = torch.export.export(up, (x,))
    out = up(x)
    assert type(out) is torch.Tensor
    assert sampling._KRON and all(type(k) is torch.Tensor for k in sampling._KRON.values())
    torch.testing.assert_close(exported.module()(x), out)
    ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- a module whose forward was replaced on the instance runs as a module ------------------


def test_upsample_honours_a_patched_conv_forward():
    # was: the folded CPU path read conv.weight directly, bypassing `conv.forward = ...`
    # (a monkeypatched LoRA, accelerate's offload hooks)
    from fastdiff.nn import Upsample, sampling

    up = Upsample(8)
    x = torch.randn(2, 8, 8, 8)
    assert sampling.fold_pays(x) and sampling.foldable_conv(up.conv, 8) is None  # would fold
    orig = up.conv.forward
    up.conv.forward = lambda inp: orig(inp) * 0 + 1.0
    assert sampling.foldable_conv(up.conv, 8) is not None
    assert (up(x) == 1).all()


def test_batched_emb_projection_honours_a_patched_linear_forward():
    model = randomize_(UNet(UNetConfig(**SMALL)))
    model.batch_emb_proj = True
    calls = []
    lin = model.down[0].layer.emb_proj
    orig = lin.forward

    def patched(inp):
        calls.append(1)
        return orig(inp)

    lin.forward = patched
    model(torch.randn(1, 3, 8, 8), 3)
    assert calls == [1]


@pytest.mark.parametrize("base", [2, 3, 5])
def test_config_base_channels_too_small_or_odd_for_the_timestep_embedding(base):
    # was: the config and the model built; the first forward said "timestep embedding dim must
    # be even and >= 4" without naming base_channels (the sinusoid width)
    with pytest.raises(ValueError, match="base_channels"):
        UNetConfig(**{**SMALL, "base_channels": base, "num_groups": 1})


def test_timestep_embedding_module_validates_dim_at_construction():
    from fastdiff.nn import TimestepEmbedding

    with pytest.raises(ValueError, match="TimestepEmbedding: dim must be an even int >= 4"):
        TimestepEmbedding(15, 64)


@pytest.mark.parametrize("dim", [7, 2, 8.0, True])
def test_timestep_embedding_dim_checked_like_the_module(dim):
    # the function took a float dim (8.0 ran) and named no argument in its message
    from fastdiff.nn import timestep_embedding

    with pytest.raises(ValueError, match="timestep_embedding: dim must be an even int >= 4"):
        timestep_embedding(torch.zeros(2), dim)


# ---- nn.Attention edge cases ------------------------------------------------------------------


def test_attention_heads_not_dividing_channels_name_the_block():
    with pytest.raises(ValueError, match="Attention: channels=32 is not divisible by head_dim=5"):
        Attention(32, head_dim=5, num_groups=4)
    with pytest.raises(ValueError, match="Attention: channels=32 is not divisible by num_heads=3"):
        Attention(32, num_heads=3, num_groups=4)


@pytest.mark.parametrize("context_dim", [0, -3, 2.0, True])
def test_attention_context_dim_validated(context_dim):
    # was: 0 accepted (a Linear with 0 inputs), 2.0 torch's "empty(): argument 'size' ..."
    with pytest.raises(ValueError, match="context_dim"):
        Attention(32, num_groups=4, context_dim=context_dim)


def test_attention_empty_context_is_a_clear_error():
    block = Attention(32, num_groups=4, context_dim=6)
    with pytest.raises(ValueError, match="context has no tokens"):
        block(torch.randn(2, 32, 3, 3), torch.randn(2, 0, 6))


@pytest.mark.parametrize("shape", [(0, 32, 4, 4), (2, 32, 0, 4), (0, 32, 5)])
def test_attention_empty_input_returns_empty(shape):
    # was: B=0 RuntimeError "cannot reshape tensor of 0 elements ... ambiguous"; L=0 an error
    # from the attention op about q's dimensions
    block = Attention(32, num_groups=4)
    x = torch.randn(shape)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out is not x


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16"])
def test_save_model_file_storage_dtype_must_be_floating(tmp_path, dtype):
    # was: int8 / bool silently truncated every weight (the file loaded back as garbage);
    # "float16" said "Invalid device string"
    path = tmp_path / "m.safetensors"
    with pytest.raises((TypeError, ValueError), match="dtype"):
        save_model_file(UNet(UNetConfig(**SMALL)), path, dtype=dtype)
    assert not os.listdir(tmp_path)


# ---- model.schedule ------------------------------------------------------------------------------


def test_schedule_name_on_the_model_is_used_by_sample_and_saved(tmp_path):
    # was: `model.schedule = "cosine"` was silently sampled with the linear schedule (sample
    # only reads a NoiseSchedule there) and save_pretrained / save_model_file raised
    # AttributeError 'str' object has no attribute 'beta_schedule' after writing the weights
    from fastdiff.schedules import NoiseSchedule

    model = randomize_(UNet(UNetConfig(**SMALL)))
    model.schedule = "cosine"
    assert isinstance(model.schedule, NoiseSchedule)
    assert model.schedule.beta_schedule == "cosine"
    kw = dict(steps=3, batch_size=1, sampler="ddim")
    noise = torch.randn(1, 3, 8, 8)
    got = fastdiff.sample(model, noise=noise, **kw)
    ref = fastdiff.sample(model, noise=noise, schedule="cosine", **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert UNet.from_pretrained(tmp_path).schedule.beta_schedule == "cosine"
    path = tmp_path / "m.safetensors"
    save_model_file(model, path)
    assert load_model_file(path).schedule.beta_schedule == "cosine"


def test_schedule_of_a_wrong_type_is_refused_when_set():
    model = UNet(UNetConfig(**SMALL))
    with pytest.raises(TypeError, match="schedule"):
        model.schedule = 0.02
    with pytest.raises(ValueError, match="beta_schedule"):
        model.schedule = "nope"
    assert model.schedule is None
    model.schedule = None


def test_save_model_file_explicit_schedule_name(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model_file(UNet(UNetConfig(**SMALL)), path, schedule="cosine")
    assert load_model_file(path).schedule.beta_schedule == "cosine"


def test_save_model_file_schedule_of_a_wrong_type_writes_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="schedule: expected a fastdiff.NoiseSchedule"):
        save_model_file(UNet(UNetConfig(**SMALL)), path, schedule=0.02)
    assert not os.listdir(tmp_path)


# ---- nn.Upsample / nn.Downsample input checks ----------------------------------------------


@pytest.mark.parametrize("use_conv", [True, False])
@pytest.mark.parametrize("cls", ["Upsample", "Downsample"])
@pytest.mark.parametrize("shape", [(8, 8, 16), (2, 5, 8, 8), (8, 16)])
def test_resamplers_check_the_input_shape(cls, use_conv, shape):
    # was: a 3-D [N x C x L] input with N == C went through conv2d as one unbatched image
    # ([8, 8, 16] -> [8, 8, 32] mixing the batch); a wrong channel count passed without a conv
    import fastdiff.nn as fnn

    block = getattr(fnn, cls)(8, use_conv=use_conv)
    with pytest.raises(ValueError, match=f"{cls}: x must be"):
        block(torch.randn(shape))


@pytest.mark.parametrize(
    "x_shape,emb_shape,match",
    [
        ((16, 16, 10), (16, 20), "x must be"),  # was: silently ran as one unbatched image
        ((2, 8, 8, 8), (2, 20), "x must be"),
        ((2, 16, 8, 8), (20,), "emb must be"),
        ((2, 16, 8, 8), (1, 20), "emb must be"),
        ((2, 16, 8, 8), (2, 19), "emb must be"),
    ],
)
def test_resblock_checks_its_inputs(x_shape, emb_shape, match):
    from fastdiff.nn import ResBlock

    block = ResBlock(16, 16, 20, num_groups=4)
    with pytest.raises(ValueError, match=f"ResBlock: {match}"):
        block(torch.randn(x_shape), torch.randn(emb_shape))


def test_config_fields_edited_after_construction_are_normalised_by_unet():
    # a config edited after construction (out_channels back to its None default, a list
    # channel_mult, a float channel_mult) is normalised and validated by UNet(config)
    cfg = UNetConfig(**SMALL)
    cfg.out_channels = None
    cfg.channel_mult = [1, 2]
    model = UNet(cfg)
    assert model.out_channels == 3 and model.config.channel_mult == (1, 2)
    cfg.channel_mult = (1, 2.5)
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(cfg)
