"""Review 17: inpainting (``sample(image=, mask=)``), RePaint and the consistency sampler as a
demanding user runs them: half-precision models with fp32 images and masks, a sampler object
that carries its own strength, the CLI's grey mask pixels, RePaint's shared mask check and its
dtype errors.

Killing tests for mutants that survived test_inpaint / test_repaint / test_consistency (log:
notes/s17/review17_log.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_img2img import _scheduler
from test_inpaint import _masks
from test_inpaint import _model as _mixing
from test_repaint import _inputs, toy

import fastdiff

diffusers = pytest.importorskip("diffusers")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class ConvNet(torch.nn.Module):
    """A small conv eps-model with parameters: sample() / repaint() run in its dtype."""

    def __init__(self, c: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(c, generator=g) * 0.1)

    def forward(self, x, t):
        tt = torch.sin(t.float() / 150.0).reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(self.conv(x)) + 0.3 * tt


def _half(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    other = ConvNet(model.conv.in_channels)
    other.load_state_dict(model.state_dict())
    return other.to(dtype)


# -------------------------------------------------------------------- sample(image=, mask=)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dpm++", "heun", "euler_a"])
def test_half_model_with_fp32_image_and_mask(dtype, name):
    """A half-precision model with the user's fp32 image and fp32 soft [H x W] mask: the run is
    in the model's dtype, the kept region is the image in that dtype exactly, and the error vs
    the fp32 model's run is at most 2x that of the same run without a mask (img2img)."""
    g = torch.Generator().manual_seed(11)
    image = torch.randn(3, 3, 7, 5, generator=g)
    z = torch.randn(image.shape, generator=g)
    mask = torch.rand(7, 5, generator=g)
    mask[mask < 0.3] = 0.0
    full = ConvNet()

    def run(model, m):
        return fastdiff.sample(model, 8, sampler=name, image=image, mask=m, noise=z,
                               strength=0.7, schedule="scaled_linear")  # fmt: skip

    half = run(_half(full, dtype), mask)
    assert half.dtype == dtype and torch.isfinite(half).all()
    keep = (mask == 0).expand(image.shape)
    assert torch.equal(half[keep], image.to(dtype)[keep])
    err = _rel(half, run(full, mask))
    yardstick = _rel(run(_half(full, dtype), None), run(full, None))
    assert err <= 2 * yardstick, (err, yardstick)


def test_sampler_object_with_its_own_strength_inpaints():
    """A flow-Euler sampler object built with strength 0.6 (its grid's option) and a mask, no
    strength=: the object's strength is used (as without a mask), the same run as by name."""
    from fastdiff.samplers import FlowMatchEulerSampler

    image, mask = torch.randn(2, 4, 8, 8), _masks()["soft"]
    z = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    smp = FlowMatchEulerSampler(None, 10, shift=3.0, strength=0.6)
    got = fastdiff.sample(_mixing, sampler=smp, image=image, mask=mask, noise=z)
    want = fastdiff.sample(_mixing, 10, sampler="flow_euler", schedule=_scheduler("flow_euler"),
                           image=image, mask=mask, noise=z, strength=0.6)  # fmt: skip
    assert torch.equal(got, want)
    pure = fastdiff.sample(_mixing, 10, sampler="flow_euler", schedule=_scheduler("flow_euler"),
                           image=image, mask=mask, noise=z)  # fmt: skip
    assert not torch.allclose(got, pure)


# ------------------------------------------------------------------------------------ CLI
def test_cli_mask_grey_pixels_binarize_at_half(tmp_path, monkeypatch):
    """--mask: grey 120 (0.47) keeps, grey 135 (0.53) repaints (diffusers' mask_processor
    binarizes at 0.5); 0 / 255 are the ends."""
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(tmp_path / "in.png")
    m = np.zeros((16, 16), dtype=np.uint8)
    m[:, 4:8], m[:, 8:12], m[:, 12:] = 120, 135, 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    seen, real = [], fastdiff.sample

    def spy(model, **kw):
        seen.append(kw["mask"])
        return real(model, **kw)

    monkeypatch.setattr(fastdiff, "sample", spy)
    argv = ["sample", "--init-image", str(tmp_path / "in.png"), "--mask",
            str(tmp_path / "mask.png"), "--n", "1", "--steps", "2", "--quiet",
            "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(argv) == 0
    want = torch.zeros(16, 16)
    want[:, 8:] = 1.0
    assert torch.equal(seen[0][0, 0], want)


# ---------------------------------------------------------------------------------- RePaint
BAD_MASKS = [
    [[1.0]],
    "mask",
    torch.ones(2, 1, 8, 8, dtype=torch.bool),
    torch.ones(2, 1, 8, 8, dtype=torch.uint8),
    torch.ones(2, 1, 8, 8, dtype=torch.complex64),
    torch.full((2, 1, 8, 8), 1.5),
    torch.full((2, 1, 8, 8), -0.25),
    torch.full((1, 1, 8, 8), math.nan),
    torch.ones(2, 1, 8, 9),
    torch.ones(3, 1, 8, 8),
    torch.ones(1, 2, 3, 8, 8),
    torch.ones(2, 1, 8, 8, device="meta"),
]


@pytest.mark.parametrize("i", range(len(BAD_MASKS)))
def test_repaint_refuses_masks_as_sample_does(i):
    """RePaint's mask check is sample(mask=)'s: same exception, same message, nothing run."""
    image = _inputs(0)[0]
    calls = []

    def model(x, t):
        calls.append(1)
        return toy(x, t)

    with pytest.raises((TypeError, ValueError)) as theirs:
        fastdiff.sample(model, 10, sampler="ddim", image=image, mask=BAD_MASKS[i])
    with pytest.raises(theirs.type) as ours:
        fastdiff.repaint(model, image, BAD_MASKS[i], 10)
    assert str(ours.value) == str(theirs.value) and str(ours.value).startswith("mask: ")
    assert calls == []


def test_repaint_needs_a_mask():
    with pytest.raises(TypeError, match="^mask: expected a torch.Tensor"):
        fastdiff.repaint(toy, _inputs(0)[0], None, 10)


def test_repaint_float64_image_names_image():
    """A float64 image with a parameter-free model: a TypeError naming image (the user passed no
    dtype=); with dtype=torch.float32 it runs, the same run as the fp32 image."""
    image, mask = _inputs(1)
    with pytest.raises(TypeError, match=r"^image: expected torch.float32.*got torch.float64"):
        fastdiff.repaint(toy, image.double(), mask, 10)
    with pytest.raises(TypeError, match=r"^dtype: "):
        fastdiff.repaint(toy, image, mask, 10, dtype=torch.float64)
    kw = dict(jump_length=3, jump_n_sample=2)
    got = fastdiff.repaint(toy, image.double(), mask.double(), 10, dtype=torch.float32,
                           generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    want = fastdiff.repaint(toy, image, mask, 10, generator=torch.Generator().manual_seed(0), **kw)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repaint_half_model_with_fp32_image(dtype):
    """A half-precision model: RePaint samples in its dtype (the fp32 image and mask are
    converted: the same run as with them in its dtype), the kept region is the image in that
    dtype exactly."""
    image, mask = _inputs(2, "soft")
    model = _half(ConvNet(), dtype)
    kw = dict(jump_length=3, jump_n_sample=2, eta=0.5)
    got = fastdiff.repaint(model, image, mask, 12, generator=torch.Generator().manual_seed(4), **kw)
    assert got.dtype == dtype and torch.isfinite(got).all()
    same = fastdiff.repaint(model, image.to(dtype), mask.to(dtype), 12,
                            generator=torch.Generator().manual_seed(4), **kw)  # fmt: skip
    assert torch.equal(got, same)
    keep = (mask == 0).expand(image.shape)
    assert torch.equal(got[keep], image.to(dtype)[keep])


def test_repaint_callback_sees_the_sample():
    """callback(i, t, x): x is the run's current sample (the last one is the result)."""
    image, mask = _inputs(3)
    xs = []
    out = fastdiff.repaint(toy, image, mask, 8, jump_length=3, jump_n_sample=2,
                           callback=lambda i, t, x: xs.append(x.clone()))  # fmt: skip
    assert torch.equal(xs[-1], out)
    assert not torch.equal(xs[0], image) and not torch.equal(xs[0], xs[1])
