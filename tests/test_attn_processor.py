"""FastAttnProcessor vs diffusers' AttnProcessor2_0 on tiny random-weight UNets."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_cases, case_id

import fastdiff
from fastdiff.integrations.attn_processor import FastAttnProcessor, set_attn_processor

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import (  # noqa: E402
    Attention as DiffusersAttention,
)
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

CASES = backend_cases("attention")


@pytest.fixture(autouse=True)
def _fp32_convs_without_tf32():
    """On CUDA, cuDNN convolutions default to TF32: a 1e-7 difference between two fp32
    attention implementations can flip an input's TF32 rounding in the next conv and show up as
    ~1e-3 (seen on an H100). The comparisons here are of fp32 attention, so TF32 is off."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _tiny_unet(cls, device="cpu", **config):
    """A diffusers UNet class ``cls`` with random weights (seed 0), 8 x 8 samples, one layer
    per block of 32 / 64 channels, 8 groups, and ``config``."""
    torch.manual_seed(0)
    return cls(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
               **config).to(device)  # fmt: skip


def _unet2d(device):
    return _tiny_unet(
        diffusers.UNet2DModel,
        device,
        in_channels=3,
        out_channels=3,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=32,  # head dim 32: both the 32- and 64-channel blocks run fused
    )


def _unet2d_condition(device):
    return _tiny_unet(
        diffusers.UNet2DConditionModel,
        device,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40,
        attention_head_dim=1,  # diffusers' name for the head count: 1 head of 32 channels
    )


def _assert_fused_matches(unet, backend, *inputs):
    """``unet(*inputs)`` with FastAttnProcessor under ``backend``: every attention call fused
    (none through SDPA), the output that of diffusers' AttnProcessor2_0 (1e-4)."""
    assert set_attn_processor(unet, AttnProcessor2_0()) > 0
    with torch.no_grad():
        ref = unet(*inputs).sample
    proc = FastAttnProcessor()
    set_attn_processor(unet, proc)
    with torch.no_grad(), fastdiff.use_backend(backend, "attention"):
        out = unet(*inputs).sample
    assert proc.fused_calls > 0 and proc.sdpa_calls == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unet2d_matches_attn_processor_2_0(case):
    dev, backend = case
    unet = _unet2d(dev)
    x = torch.randn(2, 3, 8, 8, device=dev)
    t = torch.tensor([10, 500], device=dev)
    _assert_fused_matches(unet, backend, x, t)


def test_unet2d_condition_set_attn_processor_method():
    unet = _unet2d_condition("cpu")
    proc = FastAttnProcessor()
    unet.set_attn_processor(proc)
    assert all(p is proc for p in unet.attn_processors.values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unet2d_condition_matches_attn_processor_2_0(case):
    dev, backend = case
    unet = _unet2d_condition(dev)
    x = torch.randn(2, 4, 8, 8, device=dev)
    t = torch.tensor([3, 700], device=dev)
    ctx = torch.randn(2, 7, 40, device=dev)
    _assert_fused_matches(unet, backend, x, t, ctx)


def test_mask_goes_to_sdpa_and_matches():
    torch.manual_seed(0)
    attn = DiffusersAttention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32)
    x = torch.randn(2, 10, 64)
    ctx = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6)
    mask[0, 4:] = 0
    mask = (1 - mask) * -10000.0  # diffusers' additive mask convention
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, ctx, attention_mask=mask)
        proc = FastAttnProcessor()
        out = proc(attn, x, ctx, attention_mask=mask)
    assert proc.sdpa_calls == 1
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        proc(attn, x, ctx)
    assert proc.sdpa_calls == 1


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("what", ["mask", "float64"])
def test_sdpa_only_inputs_raise_under_an_explicit_kernel_backend(backend, what):
    """A mask or float64 goes to SDPA under the automatic choice, but an explicitly requested
    cuda/triton backend is an error, never a silent SDPA fallback (as in fastdiff.nn.Attention)."""
    torch.manual_seed(0)
    attn = DiffusersAttention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 6, 32)
    kw = {"attention_mask": torch.zeros(2, 6)} if what == "mask" else {}
    if what == "float64":
        attn, x, ctx = attn.double(), x.double(), ctx.double()
    proc = FastAttnProcessor()
    with torch.no_grad(), fastdiff.use_backend("sdpa", op="attention"):
        proc(attn, x, ctx, **kw)
    msg = f"backend '{backend}' was requested"
    with (
        torch.no_grad(),
        fastdiff.use_backend(backend, op="attention"),
        pytest.raises(RuntimeError, match=msg),
    ):
        proc(attn, x, ctx, **kw)
    assert proc.sdpa_calls == 1


def test_residual_rescale_and_group_norm():
    torch.manual_seed(0)
    attn = DiffusersAttention(
        query_dim=32,
        heads=1,
        dim_head=32,
        norm_num_groups=8,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
    )
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x)
        out = FastAttnProcessor()(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("only_cross", [False, True])
def test_added_kv_attention_matches_attn_added_kv_processor(case, only_cross):
    """An Attention with added K/V projections (SimpleCrossAttn / UnCLIP blocks): FastAttnProcessor
    ignored add_k_proj/add_v_proj and crashed with a matmul shape error (or, where the widths
    happened to agree, gave a different answer). It now mirrors AttnAddedKVProcessor2_0."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    device, backend = case
    torch.manual_seed(0)
    attn = DiffusersAttention(query_dim=64, cross_attention_dim=64, added_kv_proj_dim=40,
                              heads=2, dim_head=32, norm_num_groups=8,
                              only_cross_attention=only_cross).to(device)  # fmt: skip
    x = torch.randn(2, 64, 3, 5, device=device)
    ctx = torch.randn(2, 7, 40, device=device)
    with torch.no_grad():
        ref = AttnAddedKVProcessor2_0()(attn, x, ctx)
        proc = FastAttnProcessor()
        with fastdiff.use_backend(backend, "attention"):
            out = proc(attn, x, ctx)
    assert proc.fused_calls == 1 and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if only_cross:
        return  # diffusers' own processor pads the mask by the image keys it does not have
    mask = torch.ones(2, 1, 7, device=device)  # [B x 1 x Lctx]: diffusers pads the image keys
    mask[0, :, 3:] = 0
    mask = (1 - mask) * -10000.0
    with torch.no_grad():
        ref = AttnAddedKVProcessor2_0()(attn, x, ctx, attention_mask=mask)
        out = proc(attn, x, ctx, attention_mask=mask)
    assert proc.sdpa_calls == 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_simple_cross_attn_unet_optimized():
    """optimize() replaces the added-KV processors of a SimpleCrossAttn UNet2DConditionModel
    (they were left alone) and the output is unchanged."""
    import copy

    unet = _tiny_unet(
        diffusers.UNet2DConditionModel, in_channels=4, out_channels=4, cross_attention_dim=24,
        attention_head_dim=32, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    ref_unet = copy.deepcopy(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = ref_unet(x, t, ctx).sample
        fastdiff.optimize(unet)
        with fastdiff.use_backend("torch", "attention"):
            out = unet(x, t, ctx).sample
    report = unet.fastdiff_report
    assert report.left == []
    assert report.counts(report.replaced)["Attention: FastAttnProcessor"] == 4
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
