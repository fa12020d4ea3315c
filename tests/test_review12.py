"""Regression tests from the session-12 review (review12) of ``fastdiff.optimize`` (pipelines,
the report), ``FastAttnProcessor``, the nn modules and the UNet, as a demanding user calls them.

Each test failed before its fix (the commit that fixed it names the test); the non-bugs that
were checked are listed in notes/s12/review12_log.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

import fastdiff

try:
    import diffusers
except ImportError:  # the UNet / nn tests below run without it
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers")


def _unet2d(**kw) -> torch.nn.Module:
    cfg = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    return randomize_(diffusers.UNet2DModel(**{**cfg, **kw}), 0.05)


def _run(model, x, t, **kw):
    with torch.no_grad():
        return model(x, t, **kw).sample


# ------------------------------------------------------------------ the report tells the truth
@needs_diffusers
def test_report_does_not_list_resnet_containers_as_left_alone():
    """ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (UNet2DModel block types) are containers
    of ResnetBlock2Ds, which optimize fuses; the report's catch-all for unknown resnet classes
    ("Resnet" in the class name) listed each container as "left alone: only ResnetBlock2D is
    fused", although everything in it was replaced."""
    torch.manual_seed(0)
    model = _unet2d(
        down_block_types=("ResnetDownsampleBlock2D",) * 2,
        up_block_types=("ResnetUpsampleBlock2D",) * 2,
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = _run(model, x, t)
    fastdiff.optimize(model)
    report = model.fastdiff_report
    mods = dict(model.named_modules())
    fused = [n for n, m in mods.items() if type(m).__name__ == "FusedResnetBlock2D"]
    assert len(fused) == 10
    for name, why in report.left:  # a module left alone has nothing replaced inside it
        assert not any(f.startswith(name + ".") for f in fused), (name, why)
    assert not [n for n, _ in report.left if n in ("down_blocks.0", "up_blocks.1")], str(report)
    torch.testing.assert_close(_run(model, x, t), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ folded Upsample in fp16
@pytest.mark.parametrize(
    "which",
    ["fastdiff.nn.Upsample", pytest.param("optimized Upsample2D", marks=needs_diffusers)],
)
def test_folded_upsample_in_fp16_keeps_the_fa_rule(which):
    """On CPU, nearest 2x + 3x3 conv ran as the folded stride-2 transposed conv in fp16 too,
    whose folded 4x4 kernel (sums of up to four 3x3 taps) is rounded to fp16: its error against
    the float64 definition was up to 2.9x eager fp16's (seed 0 below), over the FA rule's 2x."""
    from helpers import assert_fa_rule

    from fastdiff.nn import Upsample

    for seed in range(3):
        torch.manual_seed(seed)
        if which == "fastdiff.nn.Upsample":
            up = Upsample(64)
        else:
            from diffusers.models.upsampling import Upsample2D

            up = Upsample2D(64, use_conv=True)
        conv = up.conv
        with torch.no_grad():
            for p in up.parameters():
                p.mul_(3.0)  # trained-like weight scale
        x = torch.randn(2, 64, 16, 16)
        with torch.no_grad():
            ref = F.conv2d(
                F.interpolate(x.double(), scale_factor=2.0, mode="nearest"),
                conv.weight.double(),
                conv.bias.double(),
                padding=1,
            )
            up = up.half()
            eager = conv(F.interpolate(x.half(), scale_factor=2.0, mode="nearest"))
            if which != "fastdiff.nn.Upsample":
                up = fastdiff.optimize(torch.nn.Sequential(up), channels_last=False)
            out = up(x.half())
        assert out.dtype == torch.float16
        assert_fa_rule(out, ref, eager, name=f"{which} seed {seed}")


# ------------------------------------------------------------------ GroupNormSiLU input ranks
def test_group_norm_silu_module_takes_the_ranks_nn_group_norm_takes():
    """GroupNormSiLU ("a drop-in for nn.GroupNorm") refused [N x C] features and inputs with
    more than 3 spatial dims, which nn.GroupNorm takes: fuse_group_norm_silu turned a working
    MLP (Linear -> GroupNorm -> SiLU on [N x C]) into one raising ValueError."""
    from fastdiff.nn import GroupNormSiLU, fuse_group_norm_silu

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4)
    )
    x = torch.randn(3, 8)
    ref = mlp(x)
    assert fuse_group_norm_silu(mlp) == 1
    torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)

    gn = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    fused = GroupNormSiLU.from_group_norm(gn)
    for shape in [(3, 4), (0, 4), (2, 4, 2, 3, 2, 3), (0, 4, 1, 2, 1, 2)]:
        x = torch.randn(shape)
        out = fused(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, torch.nn.functional.silu(gn(x)), rtol=1e-5, atol=1e-6)
    add = torch.randn(3, 4)
    ref = torch.nn.functional.silu(gn(add))  # GN(x + add) at x = 0
    torch.testing.assert_close(fused(torch.zeros(3, 4), add=add), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ UNetConfig numpy scalars
def test_unet_config_takes_numpy_scalars_like_channel_mult(tmp_path):
    """UNetConfig took numpy ints inside channel_mult but refused them as in_channels /
    base_channels / num_heads ... with "must be a positive int, got np.int64(32)" (a sweep over
    np.arange), and from_preset's in_channels override then no longer set out_channels; a
    numpy float dropout was kept as such, so save_pretrained's config.json could not be
    written (np.float32 is not JSON serializable)."""
    import numpy as np

    from fastdiff.models import UNet
    from fastdiff.models.unet import UNetConfig

    model = UNet.from_preset(
        "tiny", in_channels=np.int64(1), base_channels=np.int32(8), dropout=np.float32(0.25)
    )
    cfg = model.config
    assert (cfg.in_channels, cfg.out_channels, cfg.base_channels) == (1, 1, 8)
    assert type(cfg.in_channels) is int and type(cfg.base_channels) is int
    assert type(cfg.dropout) is float and cfg.dropout == 0.25
    model.save_pretrained(tmp_path)
    assert UNet.from_pretrained(tmp_path).config == cfg
    for name in ("num_heads", "num_classes", "sample_size", "num_groups", "num_res_blocks"):
        value = getattr(UNetConfig(), name) or 2
        got = getattr(UNetConfig(**{name: np.int64(value)}), name)
        assert type(got) is int and got == value, name
    with pytest.raises(ValueError, match="in_channels must be a positive int, got True"):
        UNetConfig(in_channels=True)


def test_from_preset_with_a_non_string_name_says_what_it_takes():
    """UNet.from_preset(["tiny"]) (or a dict of overrides passed by position) raised Python's
    bare "unhashable type: 'list'", naming neither the argument nor the presets."""
    from fastdiff.models import UNet

    for bad in (["tiny"], {"base_channels": 16}):
        with pytest.raises(TypeError, match=r"unknown UNet preset .*; valid presets are .*'tiny'"):
            UNet.from_preset(bad)


# ------------------------------------------------------------------ optimize(pipe)
@needs_diffusers
def test_optimize_pipeline_with_a_compiled_unet_optimizes_the_unet():
    """``pipe.unet = torch.compile(pipe.unet)`` (the usual speed recipe), then
    ``fastdiff.optimize(pipe)``: the unet was left alone and reported as "OptimizedModule: not a
    diffusers model", although ``optimize(pipe.unet)`` on the same wrapper patches it (and
    ``save_model_file`` unwraps ``_orig_mod`` the same way)."""
    torch.manual_seed(0)
    unet = _unet2d()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = _run(unet, x, t)
    pipe = diffusers.DDIMPipeline(unet=torch.compile(unet), scheduler=diffusers.DDIMScheduler())
    fastdiff.optimize(pipe)  # the compiled wrapper is never run here: no compilation cost
    report = pipe.fastdiff_report
    assert "unet" in report and not [n for n, _ in report.left if n == "unet"], str(report)
    assert report["unet"].replaced and not report["unet"].left, str(report["unet"])
    assert all(not n.startswith("_orig_mod") for n, _ in report["unet"].replaced)
    assert any(type(m).__name__ == "FusedResnetBlock2D" for m in unet.modules())
    torch.testing.assert_close(_run(unet, x, t), ref, rtol=1e-4, atol=1e-4)


def test_optimize_report_of_a_compiled_fastdiff_unet_says_it_is_fused():
    """optimize(torch.compile(fastdiff_unet)) reported "0 replaced, 0 already optimized, 0 left
    alone": the wrapper is not a UNet, so the walk for diffusers blocks found nothing, where the
    uncompiled UNet reports "already: fastdiff UNet: built on fused modules"."""
    from fastdiff.models import UNet

    compiled = torch.compile(UNet.from_preset("tiny"))  # never run: no compilation cost
    report = fastdiff.optimize(compiled, channels_last=False).fastdiff_report
    assert report.already == [("", "fastdiff UNet: built on fused modules")], str(report)
    assert not report.replaced and not report.left
