"""Strict checks of FastAttnProcessor against diffusers' AttnProcessor2_0 (mutation round 2):
qk-norm with distinct (random) q/k norm weights, the spatial norm of VQ decoders, and
fastdiff.ops.attention's scale validation."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fastdiff.integrations.attn_processor import FastAttnProcessor
from fastdiff.ops import attention


def _randomize_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


def test_qk_norm_uses_each_norm():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm", bias=True)
    _randomize_(attn)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x)
        out = FastAttnProcessor()(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_spatial_norm_is_applied():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=1, dim_head=32, spatial_norm_dim=4, bias=True)
    _randomize_(attn)
    x = torch.randn(2, 32, 3, 5)
    temb = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, temb=temb)
        out = FastAttnProcessor()(attn, x, temb=temb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_attention_rejects_non_finite_scale(scale):
    q = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, q, q, scale=scale)
