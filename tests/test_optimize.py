"""fastdiff.optimize on diffusers UNets: equal outputs, idempotence, the report, pipelines."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import randomize_

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from fastdiff.integrations.diffusers import FastAttnProcessor, OptimizeReport  # noqa: E402
from fastdiff.nn import GroupNormSiLU  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def unet2d(size: int = 16, **kw) -> UNet2DModel:
    """A tiny google/ddpm-cifar10-32-style UNet2DModel (attention at the second level)."""
    cfg = dict(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )
    return randomize_(UNet2DModel(**{**cfg, **kw}), 0.05)


def vae_kl() -> AutoencoderKL:
    """A tiny AutoencoderKL (two levels of 16 / 32 channels, 8 GroupNorm groups, 4 latent
    channels) as built from seed 0; test_optimize_vae / test_unoptimize perturb it their way."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )  # fmt: skip


def unet2d_cond(**kw) -> UNet2DConditionModel:
    """A tiny Stable-Diffusion-style UNet2DConditionModel (cross-attention, 4 latent channels)."""
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        norm_num_groups=8,
        attention_head_dim=1,  # diffusers: the head *count* here; 1 head of dim 32
    )
    return randomize_(UNet2DConditionModel(**{**cfg, **kw}), 0.05)


def run(model, x, t, ctx=None):
    with torch.no_grad():
        if ctx is None:
            return model(x, t).sample
        return model(x, t, ctx).sample


def backends() -> list[str]:
    """Backends that can run both fused ops on CPU tensors here (triton: interpreter only).

    ``torch`` is always there: it checks the fused forwards' wiring (temb add, scale/shift).
    """
    gn = set(fastdiff.available_backends("group_norm_silu", "cpu"))
    at = set(fastdiff.available_backends("attention", "cpu"))
    return [b for b in ("torch", "cpu", "triton") if b in gn and b in at]


MODELS = {
    "unet2d": lambda: (unet2d(), torch.randn(2, 3, 16, 16), None),
    "unet2d-scale-shift": lambda: (
        unet2d(resnet_time_scale_shift="scale_shift", add_attention=True),
        torch.randn(2, 3, 16, 16),
        None,
    ),
    "unet2d-cond": lambda: (unet2d_cond(), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)),
    "unet2d-cond-scale-shift": lambda: (
        unet2d_cond(resnet_time_scale_shift="scale_shift"),
        torch.randn(2, 4, 8, 8),
        torch.randn(2, 5, 24),
    ),
}


# every model on cpu; torch/triton (interpreter: slow) on one model per class
PATCH_CASES = [
    (kind, b) for b in backends() for kind in sorted(MODELS)
    if b == "cpu" or not kind.endswith("scale-shift")
]  # fmt: skip


@pytest.mark.parametrize("kind,backend", PATCH_CASES, ids=[f"{k}-{b}" for k, b in PATCH_CASES])
def test_patched_equals_unpatched(kind, backend):
    model, x, ctx = MODELS[kind]()
    t = torch.tensor([3, 700])
    ref = run(model, x, t, ctx)
    fastdiff.optimize(model)
    report = model.fastdiff_report
    assert report.replaced and not report.left, str(report)
    resnets = [m for m in model.modules() if type(m).__name__.endswith("ResnetBlock2D")]
    assert resnets and all(type(m).__name__ == "FusedResnetBlock2D" for m in resnets)
    with fastdiff.use_backend(backend):
        out = run(model, x, t, ctx)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_patch_keeps_state_dict_and_is_idempotent():
    model, x, _ = MODELS["unet2d"]()
    t = torch.tensor([5, 900])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastdiff.optimize(model) is model
    first = model.fastdiff_report
    out1 = run(model, x, t)
    assert fastdiff.optimize(model) is model
    second = model.fastdiff_report
    assert not second.replaced and not second.left
    assert [n for n, _ in second.already] == [n for n, _ in first.replaced]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(run(model, x, t), out1, rtol=0, atol=0)
    kinds = {what for _, what in first.replaced}
    assert "ResnetBlock2D: fused GroupNorm+SiLU" in kinds
    assert "Attention: FastAttnProcessor" in kinds
    assert "conv_norm_out+conv_act: fused GroupNorm+SiLU" in kinds
    assert isinstance(model.conv_norm_out, GroupNormSiLU)
    procs = {type(m.processor) for m in model.modules() if hasattr(m, "set_processor")}
    assert procs == {FastAttnProcessor}
    assert "2 replaced" not in str(second) and "already optimized" in str(second)


def test_report_lists_what_it_left_and_output_still_equal():
    class CustomProcessor(AttnProcessor2_0):
        pass

    model = unet2d(act_fn="mish")
    model.mid_block.attentions[0].set_processor(CustomProcessor())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([50])
    ref = run(model, x, t)
    fastdiff.optimize(model)
    report = model.fastdiff_report
    assert isinstance(report, OptimizeReport)
    left = dict(report.left)
    assert any("Mish, not SiLU" in why for why in left.values()), str(report)
    assert "CustomProcessor" in left["mid_block.attentions.0"]
    text = str(report)
    assert "left" in text and "mid_block.attentions.0" in text
    assert type(model.mid_block.attentions[0].processor) is CustomProcessor
    torch.testing.assert_close(run(model, x, t), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_resnet_output_scale_factor(factor):
    """(x + h) / output_scale_factor as diffusers computes it; a factor of 1 skips the division
    kernel, which changes nothing (x / 1 == x exactly)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(3)
    block = randomize_(ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4,
                                     output_scale_factor=factor), 0.05).eval()  # fmt: skip
    ref = copy.deepcopy(block)
    fastdiff.optimize(torch.nn.ModuleDict({"b": block}), channels_last=False)
    assert type(block).__name__ == "FusedResnetBlock2D"
    x, temb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-5, atol=1e-5)


def test_unknown_resnet_class_is_listed():
    from diffusers.models.resnet import ResnetBlockCondNorm2D

    model = unet2d(size=8)
    model.extra = ResnetBlockCondNorm2D(in_channels=32, temb_channels=16, groups=8)
    fastdiff.optimize(model)
    left = dict(model.fastdiff_report.left)
    assert "ResnetBlockCondNorm2D" in left["extra"]
    assert type(model.extra) is ResnetBlockCondNorm2D


def _time_group(model):
    block = next(m for m in model.modules() if type(m).__name__ == "FusedResnetBlock2D")
    return block.__dict__.get("_fastdiff_time_group")


@pytest.mark.parametrize("kind", ["unet2d", "unet2d-scale-shift", "unet2d-cond"])
def test_time_projections_in_one_gemm(kind, monkeypatch):
    """All ResnetBlock2Ds' silu(temb) @ W_i^T + b_i from one SiLU and one GEMM (the CUDA
    default, forced here) in forwards without autograd: same output, one Linear call instead
    of one per block; with grad on, a hooked projection, or after deepcopy: correct too."""
    from fastdiff.integrations.diffusers import TimeProjections

    model, x, ctx = MODELS[kind]()
    t = torch.tensor([3, 700])
    ref_model = copy.deepcopy(model)
    ref = run(ref_model, x, t, ctx)
    fastdiff.optimize(model, channels_last=False)
    group = _time_group(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "FusedResnetBlock2D"]
    assert isinstance(group, TimeProjections) and group.blocks == blocks and len(blocks) >= 4
    assert all(b.__dict__["_fastdiff_time_group"] is group for b in blocks)
    assert any("one SiLU + one GEMM" in w for _, w in model.fastdiff_report.replaced)

    calls = []
    forward = torch.nn.Linear.forward

    def counting(self, inp):
        calls.append(self)
        return forward(self, inp)

    def projections_called():
        return sum(any(m is b.time_emb_proj for b in blocks) for m in calls)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    counts = {}
    for enabled in (False, True):
        group.enabled = enabled
        calls.clear()
        torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-4, atol=1e-4)
        counts[enabled] = projections_called()
    assert counts == {False: len(blocks), True: 0}
    # autograd (training, gradient checkpointing): diffusers' per-block path, same gradients
    calls.clear()
    model.zero_grad()
    ref_model.zero_grad()
    model(x, t, *([ctx] if ctx is not None else [])).sample.square().mean().backward()
    ref_model(x, t, *([ctx] if ctx is not None else [])).sample.square().mean().backward()
    assert projections_called() == len(blocks)
    for p, r in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5)
    # deepcopy after a forward (an EMA copy): the copy has its own group and an empty cache
    run(model, x, t, ctx)
    clone = copy.deepcopy(model)
    cgroup = _time_group(clone)
    assert cgroup is not group and cgroup._cache[0] is None and cgroup.enabled is True
    torch.testing.assert_close(run(clone, x, t, ctx), ref, rtol=1e-4, atol=1e-4)
    # a hook on one projection: every block projects itself again, and the hook runs
    seen = []
    blocks[-1].time_emb_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    calls.clear()
    torch.testing.assert_close(run(model, x, t, ctx), ref, rtol=1e-4, atol=1e-4)
    assert len(seen) == 1 and projections_called() == len(blocks)
    fastdiff.optimize(model, channels_last=False)  # idempotent: the same group stays
    assert _time_group(model) is group


def test_time_projections_one_group_per_unet_in_a_container():
    """Two UNets of different widths and dtypes in one container: one group each, each
    forward computes only its own UNet's projections."""
    a, xa, _ = MODELS["unet2d"]()
    b = unet2d(block_out_channels=(16, 32), norm_num_groups=4, attention_head_dim=16).double()
    xb = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([3, 700])
    refs = run(copy.deepcopy(a), xa, t), run(copy.deepcopy(b), xb, t)
    box = torch.nn.ModuleDict({"a": a, "b": b})
    fastdiff.optimize(box, channels_last=False)
    ga, gb = _time_group(a), _time_group(b)
    assert ga is not None and gb is not None and ga is not gb
    assert {n for n, w in box.fastdiff_report.replaced if "one GEMM" in w} == {"a", "b"}
    ga.enabled = gb.enabled = True
    torch.testing.assert_close(run(a, xa, t), refs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(b, xb, t), refs[1], rtol=1e-6, atol=1e-6)
    assert ga._cache[0] is not None and gb._cache[0] is not None


@torch.no_grad()
def test_torch_compile_of_an_optimized_model():
    """dynamo traces the patched classes (fullgraph: no graph break), same output as eager."""
    model, x, _ = MODELS["unet2d"]()
    t = torch.tensor([3, 700])
    ref = run(model, x, t)
    fastdiff.optimize(model, channels_last=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t).sample, ref, rtol=1e-4, atol=1e-4)


def test_backward_through_patched_model():
    model, x, _ = MODELS["unet2d"]()
    t = torch.tensor([5, 900])
    ref = copy.deepcopy(model)
    fastdiff.optimize(model)
    grads = []
    for m in (ref, model):
        m.zero_grad()
        m(x, t).sample.square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for g, r in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_deepcopy_and_channels_last():
    model, x, _ = MODELS["unet2d-cond"]()
    ctx, t = torch.randn(2, 5, 24), torch.tensor([1, 999])
    ref = run(model, x, t, ctx)
    fastdiff.optimize(model, channels_last=True)
    assert model.fastdiff_report.channels_last
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    clone = copy.deepcopy(model)
    assert type(clone.down_blocks[0].resnets[0]).__name__ == "FusedResnetBlock2D"
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(run(clone, xc, t, ctx), ref, rtol=1e-4, atol=1e-4)


def test_channels_last_by_default_on_cpu_only_when_asked_otherwise():
    """optimize() on a CPU model converts it to channels_last unless channels_last=False; the
    outputs match the unpatched model either way; a non-bool is a TypeError."""
    model, x, _ = MODELS["unet2d"]()
    t = torch.tensor([1, 999])
    ref = run(model, x, t)
    nchw = fastdiff.optimize(copy.deepcopy(model), channels_last=False)
    assert not nchw.fastdiff_report.channels_last and nchw.conv_in.weight.is_contiguous()
    fastdiff.optimize(model)
    assert model.fastdiff_report.channels_last
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(run(model, x, t), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(nchw, x, t), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="channels_last"):
        fastdiff.optimize(model, channels_last="yes")


def test_ddim_pipeline_with_optimized_unet():
    model = unet2d(size=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    ref_pipe = DDIMPipeline(unet=copy.deepcopy(model), scheduler=scheduler)
    pipe = DDIMPipeline(unet=fastdiff.optimize(model), scheduler=scheduler)
    kw = dict(batch_size=2, num_inference_steps=2, output_type="np", return_dict=False)
    (ref,) = ref_pipe(generator=torch.Generator().manual_seed(0), **kw)
    (out,) = pipe(generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == (2, 8, 8, 3)
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=1e-4, atol=1e-4)


def test_fastdiff_sample_with_optimized_unet():
    pytest.importorskip("fastdiff.api")
    model = unet2d(size=8)
    ref = copy.deepcopy(model)
    fastdiff.optimize(model)
    noise = torch.randn(2, 3, 8, 8)
    a = fastdiff.sample(ref, steps=3, noise=noise.clone())
    b = fastdiff.sample(model, steps=3, noise=noise.clone())
    assert a.shape == (2, 3, 8, 8)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_optimize_fastdiff_unet_and_bad_input():
    from fastdiff.models import UNet

    model = UNet.from_preset("tiny")
    assert fastdiff.optimize(model, channels_last=True) is model
    assert "fastdiff UNet" in str(model.fastdiff_report)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastdiff.optimize("unet")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["unet2d", "unet2d-cond"])
def test_cuda_fp16_optimized_equals_unpatched(kind):
    model, x, ctx = MODELS[kind]()
    model = model.cuda().half()
    x = x.cuda().half()
    ctx = None if ctx is None else ctx.cuda().half()
    t = torch.tensor([3, 700], device="cuda")
    ref = run(model, x, t, ctx)
    with torch.no_grad():
        ref32 = run(
            copy.deepcopy(model).float(), x.float(), t, None if ctx is None else ctx.float()
        )
    fastdiff.optimize(model)
    out = run(model, x, t, ctx)
    err = (out.float() - ref32).abs().max()
    eager_err = (ref.float() - ref32).abs().max()
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)


@pytest.mark.cuda
def test_cuda_graph_sampling_with_optimized_unet():
    pytest.importorskip("fastdiff.api")
    model = fastdiff.optimize(unet2d(size=32).cuda().half())
    noise = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float16)
    eager = fastdiff.sample(model, steps=10, noise=noise.clone())
    graph = fastdiff.sample(model, steps=10, noise=noise.clone(), cuda_graph=True)
    again = fastdiff.sample(model, steps=10, noise=noise.clone(), cuda_graph=True)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(graph.float(), eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(again, graph, rtol=0, atol=0)


def test_upsample2d_folded_on_cpu_equals_diffusers(monkeypatch):
    """FoldedUpsample2D: the transposed-conv path on CPU matches diffusers' interpolate + conv;
    an explicit output_size runs diffusers' own forward; odd modules are left with a reason."""
    from diffusers.models.upsampling import Upsample2D

    from fastdiff.nn import sampling

    monkeypatch.setattr(sampling, "FOLD_MIN_PIXELS", {False: 0, True: 0})  # fold at any size
    folds = []
    real = sampling.upsample_conv
    monkeypatch.setattr(fastdiff.integrations.diffusers, "upsample_conv",
                        lambda x, c: folds.append(1) or real(x, c))  # fmt: skip

    torch.manual_seed(0)
    up = randomize_(Upsample2D(8, use_conv=True), 0.05)
    ref = copy.deepcopy(up)
    odd = Upsample2D(8, use_conv=True, kernel_size=5, padding=2)
    wide = randomize_(Upsample2D(8, use_conv=True, out_channels=16), 0.05)  # Co != Ci folds too
    wide_ref = copy.deepcopy(wide)
    holder = torch.nn.ModuleDict({"up": up, "odd": odd, "wide": wide})
    report = fastdiff.optimize(holder, channels_last=False).fastdiff_report
    assert type(up).__name__ == "FoldedUpsample2D"
    assert report.counts(report.replaced) == {"Upsample2D: folded transposed conv on CPU": 2}
    why = "Upsample2D: the conv is not 3x3, stride 1, padding 1 on these channels"
    assert report.left == [("odd", why)]
    assert set(up.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        got, want = up(x), ref(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sized = up(x, output_size=(11, 15))  # not 2x: diffusers' forward
        torch.testing.assert_close(sized, ref(x, output_size=(11, 15)), rtol=0, atol=0)
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(up(xc), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide(x), wide_ref(x), rtol=1e-5, atol=1e-5)
        assert len(folds) == 3  # x, xc and wide folded; the sized call did not
        calls = []  # a hooked conv (e.g. a LoRA wrapper's) runs diffusers' own forward
        up.conv.register_forward_hook(lambda m, i, o: calls.append(1))
        torch.testing.assert_close(up(x), want, rtol=1e-5, atol=1e-5)
        assert calls == [1]


def test_upsample2d_small_maps_run_diffusers_forward(monkeypatch):
    """Below fold_pays' threshold (per layout) the folded path would be slower: diffusers'
    interpolate + conv runs."""
    from diffusers.models.upsampling import Upsample2D

    from fastdiff.nn import sampling

    torch.manual_seed(1)
    up = randomize_(Upsample2D(8, use_conv=True), 0.05)
    ref = copy.deepcopy(up)
    fastdiff.optimize(torch.nn.ModuleDict({"up": up}), channels_last=False)
    folds = []
    real = sampling.upsample_conv
    monkeypatch.setattr(fastdiff.integrations.diffusers, "upsample_conv",
                        lambda x, c: folds.append(tuple(x.shape)) or real(x, c))  # fmt: skip
    small, big = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 8, 8)  # 16 and 64 pixels
    big_cl = torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)  # 256
    with torch.no_grad():
        for x in (small, big, big.contiguous(memory_format=torch.channels_last), big_cl):
            torch.testing.assert_close(up(x), ref(x), rtol=1e-5, atol=1e-5)
    assert folds == [(1, 8, 8, 8), (1, 8, 16, 16)]
