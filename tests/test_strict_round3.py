"""Strict checks from mutation testing round 3 (session 9): what ``fastdiff.optimize`` patches
and leaves alone, timestep spacing, schedules, training, the online-softmax row update.

Each test here failed on a mutant of the code that the rest of the suite let pass
(/work/notes/s8/mutation_log.md, "Round 3")."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_

import fastdiff
from fastdiff.nn import GroupNormSiLU

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402


def _block(**kw) -> ResnetBlock2D:
    cfg = dict(in_channels=8, out_channels=16, temb_channels=12, groups=4)
    return randomize_(ResnetBlock2D(**{**cfg, **kw}), 0.1)


# ---- optimize(): ResnetBlock2D --------------------------------------------------------------


def test_fused_resnet_broadcasts_a_batch_one_temb():
    """diffusers adds ``time_emb_proj(temb)[:, :, None, None]`` by broadcasting, so one temb row
    serves a whole batch; the fused block must expand it the same way."""
    torch.manual_seed(0)
    block = _block()
    ref = copy.deepcopy(block)
    fastdiff.optimize(torch.nn.ModuleDict({"b": block}), channels_last=False)
    assert type(block).__name__ == "FusedResnetBlock2D"
    x, temb = torch.randn(3, 8, 5, 7), torch.randn(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-5, atol=1e-5)


class _DoubledGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm subclass with its own forward: optimize() cannot know what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("which", ["norm1", "norm2"])
def test_resnet_with_a_norm_subclass_is_left_alone(which):
    torch.manual_seed(1)
    block = _block()
    chans = block.norm1.num_channels if which == "norm1" else block.norm2.num_channels
    setattr(block, which, randomize_(_DoubledGroupNorm(4, chans), 0.1))
    ref = copy.deepcopy(block)
    box = fastdiff.optimize(torch.nn.ModuleDict({"b": block}), channels_last=False)
    assert type(block) is ResnetBlock2D
    assert "not nn.GroupNorm" in dict(box.fastdiff_report.left)["b"]
    x, temb = torch.randn(2, 8, 5, 7), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-5, atol=1e-5)


# ---- optimize(): attention, the output norm -------------------------------------------------


def test_attention_with_a_non_default_scale_is_left_alone():
    """FastAttnProcessor computes softmax(q k^T / sqrt(d)); an Attention with ``scale_qk=False``
    (scale 1) must keep its processor (and its output)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(2)
    attn = randomize_(Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False, bias=True), 0.1)
    attn.set_processor(AttnProcessor2_0())
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = attn(x)
    box = fastdiff.optimize(torch.nn.ModuleDict({"a": attn}), channels_last=False)
    assert type(attn.processor) is AttnProcessor2_0
    assert "scale" in dict(box.fastdiff_report.left)["a"]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_non_affine_conv_norm_out_is_fused_with_its_silu():
    """conv_norm_out -> conv_act is fused for a non-affine GroupNorm too (no weight, no bias);
    the SiLU must not be lost."""
    from diffusers import UNet2DModel

    torch.manual_seed(3)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    model.conv_norm_out = torch.nn.GroupNorm(4, 16, affine=False)
    randomize_(model, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        ref = model(x, t).sample
    fastdiff.optimize(model, channels_last=False)
    assert isinstance(model.conv_norm_out, GroupNormSiLU) and not model.conv_norm_out.affine
    assert model.conv_norm_out.activation == "silu"
    assert isinstance(model.conv_act, torch.nn.Identity)
    assert "conv_norm_out" in dict(model.fastdiff_report.replaced)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, ref, rtol=1e-4, atol=1e-4)


def test_attention_and_transformer_group_norms_run_fused():
    """optimize() promises the fused GroupNorm kernel (no activation) for every replaced
    Attention's ``group_norm`` and every Transformer2DModel's input norm, sharing the
    GroupNorm's parameters; outputs unchanged."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(4)
    plain = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=16,
    )  # fmt: skip
    cond = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    for model, name, x, extra in (
        (plain, "Attention", torch.randn(2, 3, 8, 8), ()),
        (cond, "Transformer2DModel", torch.randn(2, 4, 8, 8), (torch.randn(2, 3, 8),)),
    ):
        randomize_(model, 0.1)
        t = torch.tensor([7, 800])
        norms = {
            n: (m, getattr(m, "group_norm", None) if name == "Attention" else m.norm)
            for n, m in model.named_modules()
            if type(m).__name__ == name
        }
        norms = {n: v for n, v in norms.items() if isinstance(v[1], torch.nn.GroupNorm)}
        assert norms, name
        with torch.no_grad():
            ref = model(x, t, *extra).sample
        fastdiff.optimize(model, channels_last=False)
        for n, (m, gn) in norms.items():
            fused = m.group_norm if name == "Attention" else m.norm
            assert isinstance(fused, GroupNormSiLU), (n, type(fused))
            assert fused.activation is None and fused.weight is gn.weight, n
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, *extra).sample, ref, rtol=1e-4, atol=1e-4)


class _HalvedResnet(ResnetBlock2D):
    """A user subclass with its own forward: the fused class would drop it."""

    def forward(self, x, temb, *a, **k):
        return 0.5 * super().forward(x, temb, *a, **k)


def test_resnet_subclass_keeps_its_class_and_forward():
    torch.manual_seed(5)
    block = randomize_(
        _HalvedResnet(in_channels=8, out_channels=16, temb_channels=12, groups=4), 0.1
    )
    ref = copy.deepcopy(block)
    box = fastdiff.optimize(torch.nn.ModuleDict({"b": block}), channels_last=False)
    assert type(block) is _HalvedResnet
    assert "subclass" in dict(box.fastdiff_report.left)["b"]
    x, temb = torch.randn(2, 8, 5, 7), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-5, atol=1e-5)


def test_skip_time_act_blocks_project_the_raw_temb():
    """ResnetBlock2D(skip_time_act=True) (UnCLIP-style UNets) projects temb without the SiLU:
    the fused forward must skip it too, and such blocks stay out of the stacked one-GEMM
    projections (which apply the SiLU), also when those are forced on (as on CUDA)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(6)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_skip_time_act=True,
    )  # fmt: skip
    randomize_(model, 0.1)
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) >= 4 and all(b.skip_time_act for b in blocks)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([9, 900]), torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = model(x, t, ctx).sample
    fastdiff.optimize(model, channels_last=False)
    assert all(type(b).__name__ == "FusedResnetBlock2D" for b in blocks)
    groups = {id(g): g for b in blocks if (g := b.__dict__.get("_fastdiff_time_group"))}
    for g in groups.values():
        g.enabled = True
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx).sample, ref, rtol=1e-4, atol=1e-4)
    assert not groups


# ---- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [[0.0, 0.1, 0.2], [0.1, 0.0, 0.2], [0.1, -0.01, 0.2]])
def test_user_betas_must_be_positive(betas):
    """beta = 0 makes alpha_bar_0 = 1: sqrt(1 - alpha_bar) = 0, log-SNR = inf and every
    x0 -> eps conversion divides by zero."""
    from fastdiff.schedules import NoiseSchedule

    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(betas=betas)


def test_one_timestep_broadcasts_over_the_batch():
    """t of shape [1] (documented: an int, ``[N]`` or ``[1]``) serves every sample."""
    from fastdiff.schedules import NoiseSchedule

    s = NoiseSchedule("linear", num_train_timesteps=100)
    x0, noise, mo = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    one, scalar = torch.tensor([37]), 37
    torch.testing.assert_close(s.q_sample(x0, one, noise), s.q_sample(x0, scalar, noise))
    torch.testing.assert_close(s.velocity(x0, one, noise), s.velocity(x0, scalar, noise))
    for kind in ("epsilon", "v_prediction", "sample"):
        torch.testing.assert_close(
            s.predict_x0(x0, one, mo, kind), s.predict_x0(x0, scalar, mo, kind)
        )
        torch.testing.assert_close(
            s.predict_eps(x0, one, mo, kind), s.predict_eps(x0, scalar, mo, kind)
        )


# ---- timestep spacing -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm++", "euler"])
def test_steps_offset_past_the_last_training_timestep_is_rejected(name):
    """leading spacing + steps_offset may pass T - 1 (as in diffusers); the samplers must say so
    up front. T = 100, 10 steps: the largest timestep is 90 + offset (DDIM, DDPM, Euler) or
    90 + offset (DPM-Solver++: 100 // 11 = 9 apart, 10 of the 11 kept)."""
    from fastdiff.samplers import make_sampler
    from fastdiff.schedules import NoiseSchedule

    sched = NoiseSchedule("linear", num_train_timesteps=100)
    ok = make_sampler(name, sched, 10, timestep_spacing="leading", steps_offset=9)
    assert int(ok.timesteps.max()) == 99 and int(ok.timesteps.min()) >= 9
    with pytest.raises(ValueError, match="steps_offset"):
        make_sampler(name, sched, 10, timestep_spacing="leading", steps_offset=10)


# ---- attention_math.h (the CUDA kernels' online-softmax row update, via its CPU twin) ------


@pytest.mark.parametrize("block", [1, 4])
def test_online_softmax_twin_with_minus_inf_logits(block):
    """Keys whose logits are -inf (a -inf key entry met by a positive query entry) get zero
    weight. When a whole first tile is -inf the running max is still -inf: the row update must
    use 0 as its reference there (2^(-inf - -inf) is NaN), as attention_math.h says."""
    from fastdiff import _ext

    if not _ext.has_native():
        pytest.skip("fastdiff._C is not built")
    torch.manual_seed(7)
    B, H, Lq, Lk, D, scale = 1, 2, 5, 11, 8, 0.4
    q, k, v = (torch.randn(B, H, n, D) for n in (Lq, Lk, Lk))
    q[..., 0] = q[..., 0].abs() + 0.5
    k[:, :, :4, 0] = float("-inf")  # keys 0..3: logit -inf for every query
    out = torch.full_like(q, float("nan"))
    _ext.native().attention_twin_cpu(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, Lq, Lk, D, scale, block
    )
    qd, kd, vd = q.double(), k[:, :, 4:].double(), v[:, :, 4:].double()
    ref = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1) @ vd
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---- training -----------------------------------------------------------------------------------


class _TinyEps(torch.nn.Module):
    """A one-conv class-conditional eps-model that records its weights at every forward (the
    weights after the previous optimiser step) and counts its forwards in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.null_class = 10
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.seen: list[list[torch.Tensor]] = []

    def forward(self, x, t, class_labels=None):
        self.seen.append([p.detach().clone() for p in self.parameters()])
        self.calls += 1
        return self.conv(x) + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


def _digits_like(n: int = 24):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 10


def test_ema_follows_its_warm_up_formula_exactly():
    """EMA after step s: ema <- ema + (1 - d_s) (w_s - ema), d_s = min(decay, (1 + s) / (10 + s)),
    w_s the weights after step s, starting from the initial weights; buffers copied."""
    from fastdiff.training import train

    torch.manual_seed(0)
    model = _TinyEps()
    init = [p.detach().clone() for p in model.parameters()]
    steps, decay = 5, 0.3
    ema = train(model, steps=steps, batch_size=4, warmup=1, ema_decay=decay,
                data=_digits_like(), progress=False)  # fmt: skip
    weights = model.seen[1:] + [[p.detach() for p in model.parameters()]]  # w_0 .. w_{steps-1}
    expect = init
    for s, w in enumerate(weights):
        d = min(decay, (1 + s) / (10 + s))
        expect = [torch.lerp(e, p, 1.0 - d) for e, p in zip(expect, w, strict=True)]
    for got, want in zip(ema.parameters(), expect, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(ema.calls) == steps == int(model.calls)


def test_gradients_are_clipped_to_grad_clip(monkeypatch):
    from fastdiff.training import train

    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(_TinyEps(), steps=3, batch_size=4, grad_clip=0.25, data=_digits_like(), progress=False)
    assert seen == [0.25] * 3
    seen.clear()
    train(_TinyEps(), steps=2, batch_size=4, grad_clip=None, data=_digits_like(), progress=False)
    assert seen == []
    with pytest.raises(ValueError, match="grad_clip"):
        train(_TinyEps(), steps=1, grad_clip=-1.0, data=_digits_like(), progress=False)


def test_stopped_run_writes_no_output_and_checkpoint_collisions_are_rejected(tmp_path):
    from fastdiff.models import UNet
    from fastdiff.training import train

    def unet():  # out= saves fastdiff UNets only (checked before training)
        return UNet.from_preset("tiny", in_channels=1, num_classes=10)

    out = tmp_path / "m.safetensors"
    kw = dict(steps=4, batch_size=4, data=_digits_like(), progress=False)
    train(unet(), out=out, checkpoint=tmp_path / "ck", stop_after=2, **kw)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert (tmp_path / "ck.json").is_file()
    for stem in (tmp_path / "m", tmp_path / "m.json"):
        with pytest.raises(ValueError, match="same files"):
            train(unet(), out=out, checkpoint=stem, **kw)


def test_checkpoint_past_the_requested_steps_is_an_error(tmp_path):
    """A checkpoint json without recorded hyperparameters (hand-made or older) at step 4 cannot
    resume a 2-step run."""
    import json

    from fastdiff.training import train

    ck = tmp_path / "ck"
    kw = dict(batch_size=4, data=_digits_like(), progress=False)
    train(_TinyEps(), steps=4, checkpoint=ck, **kw)
    meta = json.loads((tmp_path / "ck.json").read_text())
    del meta["hparams"]
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="at step 4 > steps=2"):
        train(_TinyEps(), steps=2, checkpoint=ck, **kw)


@pytest.mark.parametrize(
    "name, spacing, steps, offset",
    [
        ("dpm++", "trailing", 7, 0),
        ("dpm++", "trailing", 13, 0),
        ("dpm++", "leading", 7, 1),
        ("dpm++", "linspace", 13, 0),
        ("euler", "trailing", 7, 0),
        ("euler", "leading", 13, 1),
    ],
)
def test_sampler_timesteps_match_diffusers_for_uneven_step_counts(name, spacing, steps, offset):
    """DPM-Solver++ spaces its own timesteps (steps + 1 points, the last dropped); Euler uses the
    shared spacing. Step counts that do not divide T, and steps_offset, against diffusers."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from fastdiff.samplers import make_sampler
    from fastdiff.schedules import NoiseSchedule

    cls = DPMSolverMultistepScheduler if name == "dpm++" else EulerDiscreteScheduler
    theirs = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(steps)
    ours = make_sampler(name, NoiseSchedule("linear"), steps, timestep_spacing=spacing,
                        steps_offset=offset)  # fmt: skip
    assert ours.timesteps.tolist() == theirs.timesteps.round().long().tolist()
