"""Session 20 mutation review, third part: the mutants session 19 planned but did not run in
fastdiff.integrations (diffusers.py, attn_processor.py, pipeline.py, unoptimize.py). One test
per surviving mutant, checked against diffusers' own modules and processors (the unpatched
model, AttnProcessor2_0) or the report written out; each test names its mutant."""

from __future__ import annotations

import pytest
import torch

import fastdiff


# ------------------------------------------------------------------------------------- integrations
def test_optimize_pipeline_optimizes_a_torch_compiled_component():
    """A pipeline component wrapped by torch.compile (pipe.unet = torch.compile(pipe.unet), as
    diffusers' docs advise) is optimized through the wrapper: its report is under the
    component's name and the model inside has the fused ResnetBlock2Ds. Mutant: pipeline.py
    without the ``_orig_mod`` unwrap (the wrapper is no ModelMixin: listed as left alone)."""
    import types

    pytest.importorskip("diffusers")
    from test_optimize import unet2d

    unet = unet2d()
    pipe = types.SimpleNamespace(components={"unet": torch.compile(unet), "scheduler": None})
    assert fastdiff.optimize(pipe) is pipe
    report = pipe.fastdiff_report
    assert "unet" in report and report.left == []
    assert type(unet.down_blocks[0].resnets[0]).__name__ == "FusedResnetBlock2D"


@torch.no_grad()
def test_grouped_time_projections_skip_blocks_with_skip_time_act():
    """A ResnetBlock2D with skip_time_act projects temb without the SiLU: it stays out of the
    UNet's one-GEMM TimeProjections group (which projects silu(temb)), so with the group
    enabled (as on CUDA) every block still equals diffusers' own. Mutant: diffusers.py
    grouping blocks with skip_time_act too."""
    import copy

    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D
    from helpers import randomize_

    class Owner(torch.nn.Module):  # what _unet_owner looks for: a module with time_embedding
        def __init__(self):
            super().__init__()
            self.time_embedding = torch.nn.Identity()
            self.blocks = torch.nn.ModuleList(
                ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4,
                              skip_time_act=skip) for skip in (False, False, True)
            )  # fmt: skip

    torch.manual_seed(0)
    owner = randomize_(Owner(), 0.3).eval()
    ref = copy.deepcopy(owner)
    fastdiff.optimize(owner, channels_last=False)
    group = owner.blocks[0].__dict__["_fastdiff_time_group"]
    group.enabled = True
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    temb = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    for blk, want in zip(owner.blocks, ref.blocks, strict=True):
        torch.testing.assert_close(blk(x, temb), want(x, temb), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_optimize_leaves_the_out_norm_when_conv_act_has_hooks():
    """A forward hook on the UNet's conv_act (not on conv_norm_out) keeps the pair unfused (the
    fused module would never call conv_act): reported as left, the hook runs, the output is
    the unpatched one. Mutant: diffusers.py _patch_out_norm testing only the norm's hooks."""
    import copy

    pytest.importorskip("diffusers")
    from test_optimize import unet2d

    unet = unet2d().eval()
    ref = copy.deepcopy(unet)
    calls = []
    unet.conv_act.register_forward_hook(lambda m, i, o: calls.append(1))
    report = fastdiff.optimize(unet, channels_last=False).fastdiff_report
    assert ("conv_norm_out", "conv_norm_out or conv_act has hooks") in report.left
    assert type(unet.conv_norm_out) is torch.nn.GroupNorm and type(unet.conv_act) is torch.nn.SiLU
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unet(x, 10).sample, ref(x, 10).sample, rtol=1e-4, atol=1e-4)
    assert calls == [1]


def test_optimize_lists_an_upsample2d_with_a_norm_as_left():
    """An Upsample2D with a norm is not nearest + conv: left alone (class and forward
    diffusers'), and the report says so. Mutant: diffusers.py _foldable_upsample without the
    ``up.norm is not None`` test (class swapped, reported as folded)."""
    pytest.importorskip("diffusers")
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(8, use_conv=True, norm_type="rms_norm", eps=1e-5, elementwise_affine=True)
    report = fastdiff.optimize(_container(up), channels_last=False).fastdiff_report
    assert type(up) is Upsample2D and report.replaced == []
    assert report.left == [("0", "Upsample2D with a norm, a transposed conv, no interpolation or "
                                 "no conv")]  # fmt: skip


def _container(*mods):
    """The modules in a ModuleList, the way optimize() patches "any module holding" them."""
    return torch.nn.ModuleList(mods)


@torch.no_grad()
def test_optimize_leaves_attention_with_a_non_standard_scale_alone():
    """An Attention whose scale is not 1/sqrt(head_dim) (scale_qk=False: 1) keeps its processor
    (FastAttnProcessor computes the standard scale) and is reported as left; its output is
    unchanged. Mutant: diffusers.py without the scale test in _standard_attention."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False, norm_num_groups=8)
    proc = attn.processor  # diffusers' AttnProcessor for scale_qk=False
    x = torch.randn(2, 32, 3, 3)
    want = attn(x)
    report = fastdiff.optimize(_container(attn), channels_last=False).fastdiff_report
    assert attn.processor is proc
    assert report.left == [("0", "Attention with scale 1.0 instead of 1/sqrt(16)")]
    torch.testing.assert_close(attn(x), want, rtol=0, atol=0)


@torch.no_grad()
def test_optimize_leaves_a_hooked_attention_group_norm_as_a_module():
    """An Attention's group_norm with a forward hook stays an nn.GroupNorm (reported as left)
    while the processor is replaced: the hook still runs and the output is the unpatched one.
    Mutant: diffusers.py _fuse_norm without ``has_hooks(gn)``."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, norm_num_groups=8)
    calls = []
    attn.group_norm.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(2, 32, 3, 3)
    want = attn(x)
    report = fastdiff.optimize(_container(attn), channels_last=False).fastdiff_report
    assert type(attn.group_norm) is torch.nn.GroupNorm
    assert ("0.group_norm", "GroupNorm with hooks (or not a plain nn.GroupNorm): run as a module"
            ) in report.left  # fmt: skip
    calls.clear()
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_unoptimize_gives_an_added_kv_attention_its_default_processor():
    """An Attention optimized by a fastdiff that did not record its processor gets diffusers'
    default back: AttnAddedKVProcessor2_0 for added-K/V attention, AttnProcessor2_0 otherwise.
    Mutant: unoptimize.py always AttnProcessor2_0 (which ignores add_k_proj / add_v_proj)."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import (
        Attention,
        AttnAddedKVProcessor2_0,
        AttnProcessor2_0,
    )

    torch.manual_seed(0)
    added = Attention(query_dim=32, cross_attention_dim=32, added_kv_proj_dim=24, heads=2,
                      dim_head=16, norm_num_groups=8)  # fmt: skip
    added.set_processor(AttnAddedKVProcessor2_0())  # as SimpleCrossAttn blocks build it
    plain = Attention(query_dim=32, heads=2, dim_head=16, norm_num_groups=8)
    model = fastdiff.optimize(_container(added, plain), channels_last=False)
    for m in (added, plain):
        del m.__dict__["_fastdiff_processor"]  # as an optimize() before the record existed
    fastdiff.unoptimize(model)
    assert type(added.processor) is AttnAddedKVProcessor2_0
    assert type(plain.processor) is AttnProcessor2_0


def test_optimize_again_without_channels_last_keeps_the_record_for_unoptimize():
    """optimize(channels_last=True) then optimize(channels_last=False) (which converts nothing
    back) still reports channels_last, so unoptimize() restores the NCHW weights. Mutant:
    diffusers.py without carrying the earlier report's channels_last over."""
    pytest.importorskip("diffusers")
    from test_optimize import unet2d

    unet = unet2d()
    fastdiff.optimize(unet, channels_last=True)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fastdiff.optimize(unet, channels_last=False).fastdiff_report.channels_last
    fastdiff.unoptimize(unet)
    assert unet.conv_in.weight.is_contiguous()


def test_unoptimize_restores_conv_act_in_the_models_mode():
    """unoptimize() of an optimized eval() UNet2DModel gives back a conv_act SiLU in eval mode,
    as every other module (optimize kept the fused pair in eval). Mutant: unoptimize.py
    ``nn.SiLU()`` without ``.train(conv_norm_out.training)`` (a train-mode SiLU in an eval
    model)."""
    pytest.importorskip("diffusers")
    from test_optimize import unet2d

    for train in (False, True):
        unet = unet2d().train(train)
        fastdiff.unoptimize(fastdiff.optimize(unet, channels_last=False))
        assert type(unet.conv_act) is torch.nn.SiLU
        assert {m.training for m in unet.modules()} == {train}


@torch.no_grad()
@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_fused_resnet_block_broadcasts_a_batch_one_temb(norm):
    """diffusers' ResnetBlock2D adds a [1 x C] time embedding to every sample of the batch (a
    broadcast); the fused block equals it (float32 rounding) for a temb of batch 1 and a batch
    of 3 (default add and scale_shift). Mutant: diffusers.py without ``temb.expand(n, -1)``."""
    import copy

    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D
    from helpers import randomize_

    torch.manual_seed(0)
    block = randomize_(ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4,
                                     time_embedding_norm=norm), 0.3).eval()  # fmt: skip
    ref = copy.deepcopy(block)
    fastdiff.optimize(torch.nn.ModuleList([block]), channels_last=False)
    assert type(block).__name__ == "FusedResnetBlock2D"
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    temb = torch.randn(1, 12, generator=torch.Generator().manual_seed(2))
    want = ref(x, temb)
    torch.testing.assert_close(block(x, temb), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_scale_shift_block_without_temb_raises_as_diffusers():
    """A scale_shift ResnetBlock2D without a time projection called with temb=None raises
    diffusers' ValueError, fused or not (no silent GroupNorm without its scale and shift).
    Mutant: diffusers.py without that branch of the fused forward."""
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4,
                          time_embedding_norm="scale_shift")  # fmt: skip
    fastdiff.optimize(_container(block), channels_last=False)
    assert type(block).__name__ == "FusedResnetBlock2D"
    with pytest.raises(ValueError, match="`temb` should not be None when `time_embedding_norm`"):
        block(torch.randn(1, 8, 4, 4), None)


@torch.no_grad()
def test_optimize_leaves_a_resnet_block_subclass_alone():
    """A ResnetBlock2D subclass may compute otherwise (this one doubles the output): its class
    is kept, it is reported as left, its output unchanged. Mutant: diffusers.py
    ``isinstance(block, ResnetBlock2D)`` for the exact-class test (the class swap dropped the
    subclass's forward)."""
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    class Doubled(ResnetBlock2D):
        def forward(self, x, temb, *a, **k):
            return 2 * super().forward(x, temb, *a, **k)

    torch.manual_seed(0)
    block = Doubled(in_channels=8, out_channels=8, temb_channels=12, groups=4)
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 12)
    want = block(x, temb)
    report = fastdiff.optimize(_container(block), channels_last=False).fastdiff_report
    assert type(block) is Doubled and ("0", "Doubled: a ResnetBlock2D subclass") in report.left
    torch.testing.assert_close(block(x, temb), want, rtol=0, atol=0)


def test_optimize_of_a_vae_encoder_itself_reports_its_out_norm_once():
    """optimize(vae.encoder) (the Encoder as the model) fuses its conv_norm_out pair once and
    reports it under its own name, "conv_norm_out". Mutant: diffusers.py patching coders
    also at name "" (reported as ".conv_norm_out" replaced, then "conv_norm_out" already)."""
    pytest.importorskip("diffusers")
    from test_optimize import vae_kl

    enc = vae_kl().encoder
    report = fastdiff.optimize(enc, channels_last=False).fastdiff_report
    what = "conv_norm_out+conv_act: fused GroupNorm+SiLU"
    assert [e for e in report.replaced if e[1] == what] == [("conv_norm_out", what)]
    assert not [e for e in report.already if "conv_norm_out" in e[0]]


@torch.no_grad()
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cross_norm", [None, "layer_norm"])
def test_fast_attn_processor_residual_flag_and_cross_norm_as_attn_processor_2_0(
    residual, cross_norm
):
    """FastAttnProcessor mirrors AttnProcessor2_0 on an Attention without the residual
    connection (no x added back) and on cross-attention with a LayerNorm of the context
    (norm_cross), with a rescale factor. Mutants: attn_processor.py adding the residual
    whatever ``residual_connection`` says, and skipping ``norm_encoder_hidden_states``."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from fastdiff.integrations.attn_processor import FastAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True,
                     norm_num_groups=8, residual_connection=residual, rescale_output_factor=0.5,
                     cross_attention_norm=cross_norm)  # fmt: skip
    if cross_norm is not None:  # LayerNorm's default affine is (1, 0): make it matter
        attn.norm_cross.weight.normal_().mul_(0.5).add_(1)
        attn.norm_cross.bias.normal_()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 32, 3, 5, generator=g), torch.randn(2, 7, 24, generator=g) * 3 + 1
    ref = AttnProcessor2_0()(attn, x, ctx)
    torch.testing.assert_close(FastAttnProcessor()(attn, x, ctx), ref, rtol=1e-5, atol=1e-5)
