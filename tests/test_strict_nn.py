"""ResBlock against its equations written out in plain PyTorch (found by mutation testing: the
UNet tests compared backends of the same module, so a swapped scale/shift passed them all)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from fastdiff.nn import ResBlock


def _gn(norm, h):
    return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_its_equations(scale_shift):
    """h = conv1(silu(GN1(x))); e = W emb + b; ADM scale-shift: silu(GN2(h) (1 + scale) + shift)
    with (scale, shift) = e.chunk(2) (Dhariwal & Nichol 2021, sec. 3), else silu(GN2(h + e));
    out = skip(x) + conv2(.)."""
    block = randomize_(ResBlock(8, 12, 16, use_scale_shift_norm=scale_shift, num_groups=4))
    x = torch.randn(3, 8, 5, 7)
    emb = torch.randn(3, 16)
    with torch.no_grad():
        got = block(x, emb)
        h = block.conv1(F.silu(_gn(block.norm1, x)))
        e = block.emb_proj(emb)[:, :, None, None]
        if scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(_gn(block.norm2, h) * (1 + scale) + shift)
        else:
            h = F.silu(_gn(block.norm2, h + e))
        want = block.skip(x) + block.conv2(h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
