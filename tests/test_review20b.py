"""Session 20 mutation review, second part: the mutants session 19 planned but did not run in
fastdiff.nn, fastdiff.models.unet and fastdiff.integrations (the first part, test_review20, has
the CLI, repaint, img2img, inversion, viz, data and training). One test per surviving mutant,
checked against an independent reference (the equations written out with torch.nn.functional,
diffusers' own modules, or the function called directly); each test names its mutant."""

from __future__ import annotations

import pytest
import torch

import fastdiff


# ----------------------------------------------------------------------------------------------- nn
def test_group_norm_silu_module_takes_n_by_c_inputs_as_nn_group_norm():
    """GroupNormSiLU is a drop-in for nn.GroupNorm (+ SiLU), which takes [N x C] (no spatial
    dim; the op needs 1-3, so the module flattens to [N x C x 1]): the result is
    silu(F.group_norm(x)) in float64. Mutant: group_norm.py flattening only x.dim() > 5 (the
    op's ValueError for [N x C])."""
    from fastdiff.nn import GroupNormSiLU

    g = torch.Generator().manual_seed(2)
    mod = GroupNormSiLU(2, 6)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(6, generator=g))
        mod.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(5, 6, generator=g) * 3 + 1
    ref = torch.nn.functional.group_norm(x.double(), 2, mod.weight.double(), mod.bias.double())
    got = mod(x)
    assert got.shape == (5, 6)
    torch.testing.assert_close(got.double(), torch.nn.functional.silu(ref), rtol=0, atol=1e-5)


def test_group_norm_silu_reset_parameters_is_group_norms():
    """reset_parameters() sets weight 1 and bias 0, as nn.GroupNorm's (the meta-device init:
    to_empty() then reset_parameters()). Mutant: group_norm.py filling the bias with ones."""
    from fastdiff.nn import GroupNormSiLU

    with torch.device("meta"):
        mod = GroupNormSiLU(2, 6)
    mod.to_empty(device="cpu")
    mod.reset_parameters()
    assert torch.equal(mod.weight, torch.ones(6)) and torch.equal(mod.bias, torch.zeros(6))


def test_timestep_embedding_is_float32_for_any_timestep_dtype():
    """timestep_embedding computes in float32 whatever t's dtype (int64, float16, float64): the
    documented float32 [N x dim], equal to [sin(t f), cos(t f)] with f_i = 10000^(-i / (dim/2
    - 1)) written out in float64. Mutant: embedding.py without ``t.float()`` (float64 t gave
    a float64 embedding)."""
    import math

    from fastdiff.nn import timestep_embedding

    t = torch.tensor([0, 1, 37, 999])
    f = torch.tensor([10000 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    ref = torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], dim=1)
    for dt in (torch.int64, torch.float16, torch.float64):
        got = timestep_embedding(t.to(dt), 8)
        assert got.dtype == torch.float32 and got.shape == (4, 8)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4 * math.pi)


@torch.no_grad()
def test_resblock_starts_as_its_skip_path():
    """A fresh ResBlock is its skip path (conv2 zero-initialised, ADM / DDPM): x itself for equal
    channels, the 1 x 1 skip conv otherwise. Mutant: resblock.py without the zero init of
    conv2's weight."""
    from fastdiff.nn import ResBlock

    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    same, wider = ResBlock(8, 8, 12, num_groups=4), ResBlock(8, 16, 12, num_groups=4)
    assert torch.equal(same(x, emb), x)
    torch.testing.assert_close(wider(x, emb), wider.skip(x), rtol=0, atol=0)


def test_fuse_group_norm_silu_leaves_a_silu_subclass_alone():
    """fuse_group_norm_silu replaces exact nn.GroupNorm -> nn.SiLU pairs only: a SiLU subclass
    with its own forward is left to run (the fused kernel would compute plain SiLU). The
    result equals the unfused Sequential. Mutant: group_norm.py ``isinstance(b, nn.SiLU)``."""
    from fastdiff.nn import fuse_group_norm_silu

    class ScaledSiLU(torch.nn.SiLU):
        def forward(self, x):
            return 2 * super().forward(x)

    seq = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), ScaledSiLU())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    want = seq(x)
    assert fuse_group_norm_silu(seq) == 0 and type(seq[1]) is ScaledSiLU
    torch.testing.assert_close(seq(x), want, rtol=0, atol=0)
    plain = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())
    assert fuse_group_norm_silu(plain) == 1


def test_fuse_group_norm_silu_leaves_a_sequential_with_its_own_forward_alone():
    """A Sequential subclass with its own forward need not run its children in order (this one
    applies the SiLU's input to the norm twice): its pairs are left, its output unchanged.
    Mutant: group_norm.py fusing in every nn.Sequential instance."""
    from fastdiff.nn import fuse_group_norm_silu

    class Twice(torch.nn.Sequential):
        def forward(self, x):
            return self[1](self[0](self[0](x)))

    seq = Twice(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())
    with torch.no_grad():
        seq[0].weight.fill_(3.0)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    want = seq(x)
    assert fuse_group_norm_silu(seq) == 0
    torch.testing.assert_close(seq(x), want, rtol=0, atol=0)


def test_fuse_group_norm_silu_leaves_a_hooked_silu_alone():
    """A pair whose SiLU has a forward hook is left alone (the fused module would never call
    the SiLU, so the hook would silently not run); the hook still runs. Mutant: group_norm.py
    without ``not has_hooks(b)``."""
    from fastdiff.nn import fuse_group_norm_silu

    seq = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())
    calls = []
    seq[1].register_forward_hook(lambda m, i, o: calls.append(1))
    assert fuse_group_norm_silu(seq) == 0 and type(seq[1]) is torch.nn.SiLU
    seq(torch.randn(1, 4, 2, 2))
    assert calls == [1]


@torch.no_grad()
def test_upsample_with_a_reflect_padded_conv_is_not_folded():
    """The folded transposed conv is nearest 2x + a zero-padded 3x3 conv: an Upsample whose
    conv pads by reflection runs as interpolate + its conv (equal to that reference at the
    borders too), on an input large enough for folding to pay. Mutant: sampling.py's
    foldable_conv without the ``padding_mode == "zeros"`` test."""
    from fastdiff.nn import Upsample

    torch.manual_seed(0)
    up = Upsample(4)
    up.conv.padding_mode = "reflect"
    x = torch.randn(2, 4, 8, 8)
    ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_float64_attention_block_runs_sdpa_when_sdpa_is_requested():
    """A float64 Attention block (which the fused kernels do not take) under
    use_backend("sdpa", op="attention") runs PyTorch's SDPA, as with no backend requested:
    equal to the nn.GroupNorm + SDPA twin in float64. Mutant: nn/attention.py sending float64
    to SDPA only when no backend is requested (the op's float64 ValueError under "sdpa")."""
    from fastdiff.nn import Attention
    from fastdiff.nn.attention import _reference_forward

    torch.manual_seed(0)
    blk = Attention(8, num_heads=2, num_groups=2).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with fastdiff.use_backend("sdpa", op="attention"):
        got = blk(x)
    torch.testing.assert_close(got, _reference_forward(blk, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 4])
def test_attention_context_of_another_batch_is_refused_by_name(batch):
    """A context whose batch differs from x's (1 or 4 for 2) is a ValueError naming context
    and the expected [B=2 x Lc x 6], before the projections (which failed with a bare view
    error). Mutant: nn/attention.py without ``cs[0] != x.shape[0]``."""
    from fastdiff.nn import Attention

    block = Attention(8, num_heads=2, num_groups=2, context_dim=6)
    with pytest.raises(ValueError, match=r"context must be \[B=2 x Lc x 6\]"):
        block(torch.zeros(2, 8, 3, 3), torch.zeros(batch, 5, 6))


@torch.no_grad()
def test_attention_context_in_another_dtype_is_cast_to_the_blocks():
    """A float64 context for a float32 cross-attention block is cast to the block's dtype (as
    a float32 context gives): equal outputs. Mutant: nn/attention.py without
    ``context.to(h.dtype)`` (F.linear's dtype mismatch)."""
    from fastdiff.nn import Attention

    torch.manual_seed(0)
    block = Attention(8, num_heads=2, num_groups=2, context_dim=6)
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x, ctx), block(x, ctx.float()), rtol=0, atol=0)


def test_stacked_linear_refuses_layers_of_mixed_dtypes():
    """One GEMM over the stacked weights needs one dtype: a float16 layer beside a float32 one
    makes stacked_linear decline (None: each layer runs as a module), rather than torch.cat
    promoting the half weights and returning float32 rows for the half layer; so does a
    Linear subclass with its own forward (LoRA). Mutants: stacked.py without the
    ``w.dtype != w0.dtype`` test, ``isinstance(m, nn.Linear)`` for ``type(m) is``, without
    ``m.bias is None`` (a layer without bias: torch.cat of None)."""
    from fastdiff.nn.stacked import stacked_linear

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2).half()
    assert stacked_linear([a, b], torch.randn(2, 4)) is None

    class Lora(torch.nn.Linear):  # a subclass with its own forward must run as a module
        def forward(self, x):
            return super().forward(x) + 1

    assert stacked_linear([a, Lora(4, 2)], torch.randn(2, 4)) is None
    assert stacked_linear([a, torch.nn.Linear(4, 2, bias=False)], torch.randn(2, 4)) is None
    c = torch.nn.Linear(4, 2)
    got = stacked_linear([a, c], torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got[0], a(x))
    torch.testing.assert_close(got[1], c(x))


def test_resblock_drops_out_before_conv2():
    """In training, DDPM's block is conv2(dropout(silu(GN(h + W e)))) (Ho et al. 2020, appendix
    B; ADM the same): the dropout mask hits conv2's input. Reference: the block's equations
    written out with F.group_norm and F.dropout drawing the same mask (same seed, same shape).
    Mutant: resblock.py dropout(conv2(h))."""
    from helpers import randomize_

    from fastdiff.nn import ResBlock

    torch.manual_seed(0)
    blk = randomize_(ResBlock(8, 8, 12, dropout=0.5, num_groups=4), 0.3).train()
    g = torch.Generator().manual_seed(4)
    x, emb = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 12, generator=g)
    torch.manual_seed(7)
    got = blk(x, emb)
    F = torch.nn.functional
    with torch.no_grad():
        h = blk.conv1(F.silu(F.group_norm(x, 4, blk.norm1.weight, blk.norm1.bias)))
        h = h + blk.emb_proj(emb)[:, :, None, None]
        h = F.silu(F.group_norm(h, 4, blk.norm2.weight, blk.norm2.bias))
        torch.manual_seed(7)
        ref = x + blk.conv2(F.dropout(h, 0.5, training=True))
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-5)


def test_upsample_runs_its_conv_as_a_module_under_global_or_backward_hooks():
    """Where folding would pay, a hook that must see the conv keeps Upsample on nearest 2x +
    the conv module: a global forward pre-hook (register_module_forward_pre_hook) sees the conv
    called, and a full backward hook on the conv runs in the backward pass. Mutants:
    sampling.py's global_hooks without the forward pre-hooks, own_hooks without
    ``_backward_hooks``."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from fastdiff.nn import Upsample

    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    seen = []
    handle = register_module_forward_pre_hook(lambda m, args: seen.append(m))
    try:
        up(x)
    finally:
        handle.remove()
    assert any(m is up.conv for m in seen)
    grads = []
    up.conv.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    up(x).sum().backward()
    assert grads == [(2, 4, 16, 16)]


@torch.no_grad()
def test_half_precision_upsample_is_not_folded():
    """In float16 the folded kernel's taps (sums of up to four 3x3 taps, rounded to fp16) cost
    accuracy, so an fp16 Upsample on CPU runs nearest 2x + its conv even where folding would
    pay in fp32: bitwise that computation. Mutant: sampling.py's fold_pays without the fp16
    test."""
    from fastdiff.nn import Upsample

    torch.manual_seed(0)
    up = Upsample(4).half()
    x = torch.randn(2, 4, 8, 8).half()
    ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), ref, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- models.unet
def _unet(**kw):
    from helpers import randomize_

    from fastdiff.models import UNet, UNetConfig

    cfg = dict(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_groups=4, sample_size=8)  # fmt: skip
    torch.manual_seed(0)
    return randomize_(UNet(UNetConfig(**{**cfg, **kw}))).eval()


def test_unet_config_checks_the_bottleneck_attention_heads():
    """The bottleneck's attention (mid_attention) is at the last level's channels even when
    attention_resolutions has none there: num_heads=16 does not divide its 24 channels, a
    ValueError from UNetConfig naming the field (not later from Attention inside UNet()).
    Mutant: unet.py validate() without the mid level in attn_levels."""
    from fastdiff.models import UNetConfig

    kw = dict(in_channels=1, base_channels=8, channel_mult=(2, 3), num_res_blocks=1,
              attention_resolutions=(8,), num_groups=4, sample_size=8, num_heads=16)  # fmt: skip
    with pytest.raises(ValueError, match="UNetConfig.num_heads=16 does not divide the 24 "):
        UNetConfig(**kw)
    UNetConfig(**{**kw, "mid_attention": False})  # 16 divides level 0's 16 channels


def test_unet_config_dropout_must_be_below_one():
    """dropout is a probability in [0, 1): 1 would zero every activation it touches, a
    ValueError naming the field. Mutant: unet.py ``0 <= dropout <= 1``."""
    from fastdiff.models import UNetConfig

    with pytest.raises(ValueError, match=r"UNetConfig.dropout must be in \[0, 1\), got 1.0"):
        UNetConfig(dropout=1.0)
    assert UNetConfig(dropout=0.999).dropout == 0.999


@torch.no_grad()
def test_unet_output_is_contiguous_for_a_contiguous_input_with_channels_last_weights():
    """UNet.forward's output is NCHW-contiguous for an NCHW x even when the weights are
    channels_last (what fastdiff.sample / optimize do on CPU), so callers' .view works; the
    values equal the NCHW model's. Mutant: unet.py without the final ``.contiguous()``."""
    model = _unet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = model(x, torch.tensor([3, 9]))
    model.to(memory_format=torch.channels_last)
    got = model(x, torch.tensor([3, 9]))
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet_one_element_timestep_tensor_broadcasts_over_the_batch():
    """t = tensor([7]) (one element, 1-D) is the scalar 7 for every sample, as a one-element
    class_labels is. Mutant: unet.py broadcasting only t.ndim == 0 (a ValueError "t must be a
    scalar or [N]" for the one-element tensor)."""
    model = _unet()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = model(x, torch.tensor([7, 7, 7]))
    assert want.abs().max() > 0  # randomized: not the zero-initialised output layer
    torch.testing.assert_close(model(x, torch.tensor([7])), want, rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.tensor([[7.0]])), want, rtol=0, atol=0)


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
