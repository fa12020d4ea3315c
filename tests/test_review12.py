"""Regression tests from the session-12 review (review12) of ``fastdiff.optimize`` (pipelines,
the report), ``FastAttnProcessor``, the nn modules and the UNet, as a demanding user calls them.

Each test failed before its fix (the commit that fixed it names the test); the non-bugs that
were checked are listed in notes/s12/review12_log.md.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402


def _rand_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _unet2d(**kw) -> UNet2DModel:
    cfg = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    return _rand_(UNet2DModel(**{**cfg, **kw}))


def _run(model, x, t, **kw):
    with torch.no_grad():
        return model(x, t, **kw).sample


# ------------------------------------------------------------------ the report tells the truth
def test_report_does_not_list_resnet_containers_as_left_alone():
    """ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (UNet2DModel block types) are containers
    of ResnetBlock2Ds, which optimize fuses; the report's catch-all for unknown resnet classes
    ("Resnet" in the class name) listed each container as "left alone: only ResnetBlock2D is
    fused", although everything in it was replaced."""
    torch.manual_seed(0)
    model = _unet2d(
        down_block_types=("ResnetDownsampleBlock2D",) * 2,
        up_block_types=("ResnetUpsampleBlock2D",) * 2,
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = _run(model, x, t)
    fastdiff.optimize(model)
    report = model.fastdiff_report
    mods = dict(model.named_modules())
    fused = [n for n, m in mods.items() if type(m).__name__ == "FusedResnetBlock2D"]
    assert len(fused) == 10
    for name, why in report.left:  # a module left alone has nothing replaced inside it
        assert not any(f.startswith(name + ".") for f in fused), (name, why)
    assert not [n for n, _ in report.left if n in ("down_blocks.0", "up_blocks.1")], str(report)
    torch.testing.assert_close(_run(model, x, t), ref, rtol=1e-4, atol=1e-4)
