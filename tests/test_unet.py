"""fastdiff.models.UNet: forward/backward, persistence, layouts, presets, summary, bad configs."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from helpers import SMALL, randomize_

import fastdiff
from fastdiff.models import PRESETS, UNet, UNetConfig
from fastdiff.nn import GroupNormSiLU, ResBlock, timestep_embedding


def make(**overrides) -> UNet:
    return randomize_(UNet(UNetConfig(**{**SMALL, **overrides})))


def inputs(model: UNet, n: int = 2, labels: bool = False):
    c, s = model.in_channels, model.sample_size
    x = torch.randn(n, c, s, s)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, model.num_classes, (n,)) if labels else None
    return x, t, y


VARIANTS = [
    {},
    dict(num_classes=5, use_scale_shift_norm=True, resblock_updown=True),
    dict(head_dim=8, num_heads=None, out_channels=6, mid_attention=False),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=["ddpm", "adm", "learned-var"])
def test_forward_shape_and_fused_equals_torch(overrides):
    model = make(**overrides)
    x, t, y = inputs(model, labels=model.num_classes is not None)
    out = model(x, t, y)
    assert out.shape == (2, model.out_channels, 8, 8)
    assert torch.isfinite(out).all()
    with fastdiff.use_backend("torch"):
        ref = model(x, t, y)
    assert ref.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_interpreter_equals_torch():
    model = make(num_classes=3, use_scale_shift_norm=True, head_dim=32, num_heads=None)
    x, t, y = inputs(model, n=1, labels=True)
    with torch.no_grad(), fastdiff.use_backend("torch"):
        ref = model(x, t, y)
    with torch.no_grad(), fastdiff.use_backend("triton", "group_norm_silu"):
        out = model(x, t, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_backward_matches_torch_backend():
    model = make(num_classes=4, use_scale_shift_norm=True)
    x, t, y = inputs(model, labels=True)
    x.requires_grad_(True)

    def grads():
        model.zero_grad()
        x.grad = None
        model(x, t, y).square().mean().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    fused = grads()
    with fastdiff.use_backend("torch"):
        ref = grads()
    assert all(torch.isfinite(g).all() for g in fused)
    assert ref[0].abs().max() > 0
    for g, r in zip(fused, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS[:2], ids=["ddpm", "adm"])
def test_batched_emb_projections_equal_per_block(overrides):
    # one GEMM over the stacked emb_proj weights (the CUDA default), split into strided views
    # that the fused norms read in place: same output and gradients as per-block projections
    model = make(**overrides)
    x, t, y = inputs(model, n=3, labels=model.num_classes is not None)
    calls = []
    hook = torch.nn.Linear.forward

    def counting(self, inp):
        calls.append(self)
        return hook(self, inp)

    def run(batched):
        model.batch_emb_proj = batched
        model.zero_grad()
        calls.clear()
        torch.nn.Linear.forward = counting
        try:
            out = model(x, t, y)
        finally:
            torch.nn.Linear.forward = hook
        out.square().mean().backward()
        return out, [p.grad.clone() for p in model.parameters()], len(calls)

    ref, ref_g, n_ref = run(False)
    out, g, n_out = run(True)
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert n_res >= 8 and n_ref - n_out == n_res  # the projections ran as one F.linear
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), fastdiff.use_backend("torch"):
        torch.testing.assert_close(model(x, t, y), ref, rtol=1e-4, atol=1e-4)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the GPU path: triton norms, strided rows
        with torch.no_grad(), fastdiff.use_backend("triton", "group_norm_silu"):
            torch.testing.assert_close(model(x, t, y), ref, rtol=1e-4, atol=1e-4)
    # channels_last, and a projection that is no plain nn.Linear: per-block for all of them
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last), t, y), ref)
        model.down[0].layer.emb_proj.register_forward_hook(lambda m, i, o: o * 2)
        assert model._emb_projections(torch.randn(3, 64)) is None
        hooked = model(x, t, y)
        model.batch_emb_proj = False
        torch.testing.assert_close(hooked, model(x, t, y))
    assert not torch.allclose(hooked, ref)  # the hook ran


def test_channels_last_equals_nchw():
    model = make(num_classes=3, resblock_updown=True)
    x, t, y = inputs(model, labels=True)
    with torch.no_grad():
        ref = model(x, t, y)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last), t, y)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip():
    model = make(num_classes=3)
    x, t, y = inputs(model, labels=True)
    other = UNet(model.config).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path):
    model = make(num_classes=3, use_scale_shift_norm=True)
    x, t, y = inputs(model, labels=True)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 3
    loaded = UNet.from_pretrained(tmp_path)
    assert not loaded.training  # eval, as load_model_file.eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_schedule_round_trip(tmp_path):
    schedules = pytest.importorskip("fastdiff.schedules")
    pytest.importorskip("fastdiff.models.pretrained")
    model = make()
    assert model.schedule is None
    model.schedule = schedules.NoiseSchedule("cosine")
    model.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.schedule.betas, model.schedule.betas)


def test_class_conditioning():
    model = make(num_classes=4)
    assert model.null_class == 4
    x, t, _ = inputs(model)
    with torch.no_grad():
        uncond = model(x, t)
        null = model(x, t, torch.full((2,), 4))
        a = model(x, t, torch.tensor([0, 1]))
        b = model(x, t, torch.tensor([2, 3]))
    torch.testing.assert_close(uncond, null, rtol=0, atol=0)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="num_classes=None"):
        make()(x, t, torch.tensor([0, 1]))


def test_scalar_timestep_broadcasts():
    model = make()
    x, _, _ = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 7), model(x, torch.tensor([7, 7])))
        torch.testing.assert_close(model(x, torch.tensor(7.0)), model(x, torch.tensor([7, 7])))
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 1, 8, 8), 7)
    with pytest.raises(ValueError, match="multiples of 2"):  # 8 -> 4 -> 4.5: no clean U
        model(torch.randn(2, 3, 9, 8), 7)
    with pytest.raises(ValueError, match="N >= 1"):
        model(torch.randn(0, 3, 8, 8), 7)


@torch.no_grad()
def test_class_labels_checked_and_broadcast():
    model = make(num_classes=5)
    x, t, _ = inputs(model)
    ref = model(x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(model(x, t, 3), ref)  # a scalar label broadcasts, like t
    torch.testing.assert_close(model(x, t, torch.tensor([3])), ref)
    with pytest.raises(TypeError, match="integers"):
        model(x, t, torch.tensor([1.7, 2.0]))  # was truncated to 1
    with pytest.raises(ValueError, match=r"0\.\.5 \(the last one the null class\), got 6"):
        model(x, t, torch.tensor([1, 6]))  # was an IndexError inside the embedding
    with pytest.raises(ValueError, match="got -1"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class_labels must be a scalar"):
        model(x, t, torch.tensor([1, 2, 3]))


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = timestep_embedding(t, 8)  # 4 frequencies 10000^(-i/3)
    f = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    ref = torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], dim=1)
    torch.testing.assert_close(emb, ref)
    half = timestep_embedding(t.half(), 8)  # frequencies stay fp32 under a half model
    torch.testing.assert_close(half, ref)


def test_resblock_uses_fused_time_conditioning():
    block = randomize_(ResBlock(8, 16, 12, num_groups=4))
    assert isinstance(block.norm1, GroupNormSiLU) and isinstance(block.norm2, GroupNormSiLU)
    x, emb = torch.randn(2, 8, 5, 7), torch.randn(2, 12)
    with torch.no_grad():
        out = block(x, emb)
        import torch.nn.functional as F

        h = F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-5))
        h = block.conv1(h) + block.emb_proj(emb)[:, :, None, None]
        h = F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-5))
        ref = block.skip(x) + block.conv2(h)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_ddpm_cifar10_parameter_count():
    with torch.device("meta"):
        model = UNet.from_preset("ddpm-cifar10")
    n = model.num_parameters()
    assert abs(n - 35.7e6) <= 0.1e6, n
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    assert n == sum(p.numel() for p in ref.parameters())  # google/ddpm-cifar10-32: 35,746,307


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    with torch.device("meta"):
        model = UNet.from_preset(name)
    cfg = model.config
    assert model.in_channels == cfg.in_channels and model.sample_size == cfg.sample_size
    assert model.learned_variance == (cfg.out_channels == 2 * cfg.in_channels)
    assert model.null_class == cfg.num_classes
    if name == "adm-64":
        assert model.learned_variance and model.num_classes == 1000
        assert cfg.use_scale_shift_norm and cfg.resblock_updown
    if name == "digits":
        assert (model.in_channels, model.sample_size, model.num_classes) == (1, 16, 10)


def test_tiny_preset_runs():
    model = randomize_(UNet.from_preset("tiny"))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([10])).shape == x.shape
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet.from_preset("nope")


def test_summary_table():
    model = UNet(UNetConfig(**{**SMALL, "num_classes": 3}))
    text = model.summary()
    lines = text.splitlines()
    for path in ("down", "mid", "up"):
        for i in range(len(getattr(model, path))):
            assert any(f"{path}.{i} " in line for line in lines), f"{path}.{i} missing"
    total = lines[-1].split()
    assert total[0] == "total" and int(total[-1].replace(",", "")) == model.num_parameters()
    # every saved skip is concatenated exactly once
    n_skips = 1 + len(model.down)
    for k in range(n_skips):
        assert sum(f"save s{k}" in line for line in lines) == 1
        assert sum(f"cat s{k}" in line for line in lines) == 1
    # row parameter counts add up to the total
    counts = [int(line.split()[-1].replace(",", "")) for line in lines[2:-2]]
    assert sum(counts) == model.num_parameters()
    assert "class_embed" in text and "yes" in text  # attention marked


BAD = [
    (dict(base_channels=18), "base_channels=18 is not divisible by num_groups=4"),
    (dict(num_groups=32), "base_channels=16 is not divisible by num_groups=32"),
    (dict(num_heads=3), "num_heads=3 does not divide"),
    (dict(head_dim=12, num_heads=None), "head_dim=12 does not divide"),
    (dict(head_dim=8), "not both"),
    (dict(attention_resolutions=(5,)), "resolution 5 never occurs"),
    (dict(attention_resolutions=(16,)), "resolution 16 never occurs"),
    (dict(sample_size=6, channel_mult=(1, 1, 1)), "divisible by 2"),
    (dict(dropout=1.5), "dropout"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(num_classes=0), "num_classes"),
    (dict(channel_mult=()), "channel_mult"),
]


@pytest.mark.parametrize("overrides,match", BAD, ids=[m for _, m in BAD])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, **overrides})


def test_config_json_round_trip():
    cfg = UNetConfig(**{**SMALL, "num_classes": 3})
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.channel_mult, tuple)
    with pytest.raises(ValueError, match="unknown fields"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert dataclasses.replace(cfg, out_channels=None).out_channels == cfg.in_channels


def test_sinusoid_dim_validation():
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(torch.zeros(1), 7)
    assert math.isclose(timestep_embedding(torch.zeros(1), 4)[0, 2].item(), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tiny", "ddpm-cifar10"])
def test_cuda_graph_sampling_equals_eager(name):
    model = randomize_(UNet.from_preset(name), std=0.02).cuda().half()
    shape = (2, model.in_channels, model.sample_size, model.sample_size)
    noise = torch.randn(shape, device="cuda", dtype=torch.float16)
    eager = fastdiff.sample(model, steps=10, noise=noise.clone())
    graph = fastdiff.sample(model, steps=10, noise=noise.clone(), cuda_graph=True)
    again = fastdiff.sample(model, steps=10, noise=noise.clone(), cuda_graph=True)  # replay
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(graph.float(), eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(again, graph, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_channels_last_fp16_forward():
    model = randomize_(UNet.from_preset("ddpm-cifar10"), std=0.02).cuda().half()
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.float16)
    t = torch.randint(0, 1000, (4,), device="cuda")
    with torch.no_grad():
        ref = model(x, t)
        with fastdiff.use_backend("torch"):
            eager = model(x, t)
        out = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), t
        )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ref.float(), eager.float(), rtol=2e-2, atol=2e-2)
