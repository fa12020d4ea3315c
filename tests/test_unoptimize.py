"""``fastdiff.unoptimize``: every patch ``fastdiff.optimize`` made is undone in place (classes,
processors, GroupNorms, time-projection groups, channels_last weights), parameters stay the same
tensors, and the outputs are the never-optimized model's, bitwise."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from helpers import randomize_  # noqa: E402
from test_optimize import unet2d, unet2d_cond, vae_kl  # noqa: E402

from fastdiff.integrations.attn_processor import FastAttnProcessor  # noqa: E402


def _vae() -> AutoencoderKL:
    return randomize_(vae_kl(), 0.05)


def _forward(kind: str):
    """(model, f(model) -> output) for each kind of model ``optimize`` patches."""
    torch.manual_seed(0)
    if kind == "unet2d":
        model, x = unet2d(size=16), torch.randn(2, 3, 16, 16)
        return model, lambda m: m(x, torch.tensor([3, 700])).sample
    if kind == "unet2d-cond":
        model, x, ctx = unet2d_cond(), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
        return model, lambda m: m(x, torch.tensor([3, 700]), ctx).sample
    vae, x = _vae(), torch.randn(1, 3, 16, 16)
    return vae, lambda m: m.decode(m.encode(x).latent_dist.mean).sample


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "strides": [p.stride() for p in model.parameters()],
        "procs": [
            (n, id(m.processor)) for n, m in model.named_modules() if hasattr(m, "processor")
        ],
        "attrs": sorted(k for m in model.modules() for k in m.__dict__ if "fastdiff" in k),
    }


@pytest.mark.parametrize("kind", ["unet2d", "unet2d-cond", "vae"])
@pytest.mark.parametrize("channels_last", [True, False])
@torch.no_grad()
def test_unoptimize_restores_the_diffusers_model(kind, channels_last):
    model, f = _forward(kind)
    before, ref = _snapshot(model), f(model)
    fastdiff.optimize(model, channels_last=channels_last)
    patched = _snapshot(model)
    assert patched["types"] != before["types"]  # the check below can fail: optimize changed them
    assert patched["procs"] != before["procs"] and patched["attrs"]
    assert (patched["strides"] != before["strides"]) == channels_last
    assert fastdiff.unoptimize(model) is model
    assert _snapshot(model) == before
    assert not hasattr(model, "fastdiff_report")
    assert torch.equal(f(model), ref)  # diffusers' own forward again: bitwise
    # and it can be optimized again (a second cycle)
    fastdiff.optimize(model, channels_last=channels_last)
    torch.testing.assert_close(f(model), ref, rtol=1e-4, atol=1e-4)
    fastdiff.unoptimize(model)
    assert _snapshot(model) == before


@torch.no_grad()
def test_unoptimize_puts_back_each_attention_s_own_processor():
    model = unet2d()
    for m in model.modules():  # diffusers' non-SDPA default, one object per Attention
        if hasattr(m, "set_processor"):
            m.set_processor(AttnProcessor())
    procs = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert procs and all(type(p) is AttnProcessor for p in procs)
    fastdiff.optimize(model)
    assert all(
        isinstance(m.processor, FastAttnProcessor)
        for m in model.modules()
        if hasattr(m, "processor")
    )
    fastdiff.unoptimize(model)
    assert [m.processor for m in model.modules() if hasattr(m, "processor")] == procs


def test_unoptimize_without_optimize_and_twice_is_a_no_op():
    model = unet2d()
    before = _snapshot(model)
    assert fastdiff.unoptimize(model) is model
    assert _snapshot(model) == before
    fastdiff.optimize(model)
    fastdiff.unoptimize(model)
    fastdiff.unoptimize(model)
    assert _snapshot(model) == before


def test_unoptimize_pipeline_and_compiled_wrapper():
    unet = unet2d()
    before = _snapshot(unet)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    assert fastdiff.optimize(pipe) is pipe and hasattr(pipe, "fastdiff_report")
    assert _snapshot(unet) != before
    assert fastdiff.unoptimize(pipe) is pipe
    assert _snapshot(unet) == before and not hasattr(pipe, "fastdiff_report")

    compiled = torch.compile(unet)  # never called: only the wrapper, nothing traced
    fastdiff.optimize(compiled)
    assert _snapshot(unet) != before
    assert fastdiff.unoptimize(compiled) is compiled
    assert _snapshot(unet) == before and not hasattr(compiled, "fastdiff_report")


def test_unoptimize_fastdiff_unet_layout_and_bad_input():
    from fastdiff.models import UNet, UNetConfig

    model = UNet(UNetConfig(sample_size=8, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                            attention_resolutions=(), num_groups=8))  # fmt: skip
    before = _snapshot(model)
    fastdiff.optimize(model, channels_last=True)
    assert _snapshot(model)["strides"] != before["strides"]
    fastdiff.unoptimize(model)
    assert _snapshot(model) == before
    with pytest.raises(TypeError, match=r"unoptimize: model must be .* got int"):
        fastdiff.unoptimize(3)


@torch.no_grad()
def test_hooks_added_after_optimize_carry_over():
    """A hook registered on a fused GroupNorm (or the emptied conv_act) after ``optimize``
    stays on its ``nn.GroupNorm`` / ``nn.SiLU`` replacement, and its handle still removes it."""
    model, f = _forward("unet2d")
    fastdiff.optimize(model, channels_last=False)
    seen = []
    h1 = model.conv_norm_out.register_forward_hook(lambda *a: seen.append("norm"))
    h2 = model.conv_act.register_forward_pre_hook(lambda *a: seen.append("act"))
    fastdiff.unoptimize(model)
    assert type(model.conv_norm_out) is torch.nn.GroupNorm
    f(model)
    assert seen == ["norm", "act"]
    h1.remove()
    h2.remove()
    seen.clear()
    f(model)
    assert seen == []
