"""Session 20 mutation review, second part: fastdiff.training, and the mutants session 19
planned but did not run in fastdiff.nn and fastdiff.models.unet (test_review20 has the CLI,
repaint, img2img, inversion, viz and data; test_review20c the integrations). One test per
surviving mutant, checked against an independent reference (the equations written out with
torch.nn.functional, the function called directly, a run written out step by step); each test
names its mutant."""

from __future__ import annotations

import pytest
import torch

import fastdiff


# ----------------------------------------------------------------------------------------- training
def _tiny_unet(**kw):
    """A 4 x 4 one-level class-conditional UNet (2 classes, label 2 the null class) from seed
    0, and 4 training images with their labels."""
    from fastdiff.models import UNet, UNetConfig

    cfg = dict(in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4, sample_size=4, num_classes=2)  # fmt: skip
    torch.manual_seed(0)
    data = (torch.linspace(-1, 1, 64).reshape(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
    return UNet(UNetConfig(**{**cfg, **kw})), data


def _tiny_train(tmp_path, **kw):
    """fastdiff.train of _tiny_unet with dropout 0.5 (the global RNG matters), batch 2, no
    warm-up, checkpointing to tmp_path/ck."""
    model, data = _tiny_unet(dropout=0.5)
    return fastdiff.train(model, batch_size=2, data=data, warmup=0, progress=False,
                          checkpoint=tmp_path / "ck", **kw)  # fmt: skip


def test_train_ema_warms_up_with_decay_one_over_ten_at_step_zero():
    """The EMA decay is min(ema_decay, (1 + s) / (10 + s)): after one step (s = 0) the EMA is
    0.1 x the initial weights + 0.9 x the trained ones, not 0.999 x the initial. Reference:
    the model's weights before and after train() (it trains the module it is given).
    Mutant: training.py ``_ema_update(ema, model, ema_decay)``."""
    import copy

    model, data = _tiny_unet()
    init = copy.deepcopy(model)
    ema = fastdiff.train(model, steps=1, batch_size=2, data=data, warmup=0, progress=False)
    moved = 0
    for e, p0, p1 in zip(ema.parameters(), init.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.1 * p0 + 0.9 * p1.detach(), rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(p0, p1))
    assert moved > 0


def test_train_resumed_past_stop_after_reports_the_checkpoints_step(tmp_path):
    """train(stop_after=1) on a checkpoint already at step 2 does nothing and says so: the
    returned EMA's training_info has steps_done 2 (where the checkpoint is), not 1. Mutant:
    training.py ``end = min(steps, stop_after)`` without ``max(start, ...)``."""
    first = _tiny_train(tmp_path, steps=4, stop_after=2)
    assert first.training_info["steps_done"] == 2
    again = _tiny_train(tmp_path, steps=4, stop_after=1)
    assert again.training_info["steps_done"] == 2
    for a, b in zip(again.parameters(), first.parameters(), strict=True):
        assert torch.equal(a, b)  # the checkpoint's EMA, unchanged


def test_train_stopped_early_writes_no_output_until_it_finishes(tmp_path):
    """out= is the finished model: a run stopped by stop_after checkpoints but writes no output
    file; resuming it to the end writes it. Mutant: training.py writing ``out`` whenever it is
    given (a half-trained model under the final name)."""
    out = tmp_path / "m.safetensors"
    _tiny_train(tmp_path, steps=2, stop_after=1, out=out)
    assert (tmp_path / "ck.safetensors").is_file() and not out.exists()
    _tiny_train(tmp_path, steps=2, out=out)
    assert out.is_file()


def test_train_grad_clip_zero_is_off(tmp_path):
    """grad_clip=0 means no clipping (as None; the documented "0 (off)"): accepted, and the
    same trained weights as grad_clip=None. Mutant: training.py requiring grad_clip > 0."""
    runs = [_tiny_train(tmp_path / str(c), steps=2, grad_clip=c) for c in (0.0, None)]
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_draws_t_from_zero_to_t_minus_one():
    """Algorithm 1's t ~ U{0 .. T-1} in fastdiff's 0-based timesteps: with T = 4 and 256 draws
    every value 0, 1, 2, 3 occurs (t = 0, the least noisy level, too). Mutant: training.py
    ``randint(1, T)`` (never trains at t = 0)."""
    from test_train import Recorder

    m = Recorder(num_classes=2)
    data = _tiny_unet()[1]
    fastdiff.train(m, steps=2, batch_size=128, num_train_timesteps=4, data=data, progress=False)
    assert sorted(set(torch.cat(m.seen_t).tolist())) == [0, 1, 2, 3]


def test_train_log_every_prints_at_its_multiples(capsys):
    """log_every=2 over 4 steps prints a line after steps 2 and 4 ("step k/4 loss ..."), none
    after 1 and 3. Mutant: training.py ``done % log_every == 1``."""
    from test_train import Recorder

    data = _tiny_unet()[1]
    fastdiff.train(Recorder(num_classes=2), steps=4, batch_size=2, data=data, log_every=2,
                   progress=False)  # fmt: skip
    out = capsys.readouterr()
    lines = [
        ln.split(" loss")[0] for ln in (out.out + out.err).splitlines() if ln.startswith("step")
    ]
    assert lines == ["step 2/4", "step 4/4"]


def test_train_refuses_labels_of_the_null_class():
    """Label num_classes is the model's null class (classifier-free guidance's "no class"):
    data holding it is refused by name before training, as a label beyond it. Mutant:
    training.py accepting labels up to null_class (it trained them as the unconditional
    class)."""
    model, (x, _) = _tiny_unet()
    data = (x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"data: expected class labels in 0\.\.1 .* got 0\.\.2"):
        fastdiff.train(model, steps=1, batch_size=2, data=data, progress=False)


def test_train_resumed_with_dropout_is_bit_identical(tmp_path):
    """A run stopped after 1 of 3 steps and resumed equals the uninterrupted run bit for bit
    with dropout on: the checkpoint restores torch's global RNG (dropout's masks) as well as
    the generator. Mutant: training.py's _load_checkpoint without torch.set_rng_state."""
    whole = _tiny_train(tmp_path / "a", steps=3)
    _tiny_train(tmp_path / "b", steps=3, stop_after=1)
    resumed = _tiny_train(tmp_path / "b", steps=3)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_again_on_a_finished_checkpoint_returns_its_model(tmp_path):
    """Calling train again with a checkpoint already at steps (finished) trains nothing and
    returns the checkpoint's EMA (steps_done = steps). Mutant: training.py refusing a
    checkpoint at step >= steps (only > steps is past the run)."""
    first = _tiny_train(tmp_path, steps=2)
    again = _tiny_train(tmp_path, steps=2)
    assert again.training_info["steps_done"] == 2
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_refuses_to_resume_with_another_learning_rate(tmp_path):
    """Resuming compares every hyperparameter with the checkpoint's record: another lr is a
    ValueError naming it and both values (a resumed run would not be the run it continues).
    Mutant: training.py leaving lr out of the comparison."""
    _tiny_train(tmp_path, steps=3, stop_after=1)
    with pytest.raises(ValueError, match=r"other settings: lr=0.002 \(checkpoint: 0.001\)"):
        _tiny_train(tmp_path, steps=3, lr=2e-3)


def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model():
    """training._ema_update: ema <- decay ema + (1 - decay) model for the parameters (0 and 1
    with decay 0.9: 0.1; then 0.19), buffers copied. Mutant: training.py lerp weight ``decay``
    instead of ``1 - decay``."""
    from fastdiff.training import _ema_update

    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
        model.running_mean.fill_(4.0)
    _ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())
    assert torch.equal(ema.running_mean, model.running_mean)
    _ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.19)) for p in ema.parameters())


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


def test_group_norm_silu_refuses_an_unknown_activation_when_built():
    """activation is "silu" or None: another name ("gelu") is a ValueError when the module is
    built, not at its first call. Mutant: group_norm.py without that check."""
    from fastdiff.nn import GroupNormSiLU

    with pytest.raises(ValueError, match="activation must be 'silu' or None, got 'gelu'"):
        GroupNormSiLU(2, 4, activation="gelu")


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
