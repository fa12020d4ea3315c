"""Session 20 mutation review of the modules session 19 did not cover (the CLI and its
subcommands, fastdiff.repaint, img2img, inversion, viz, data, training) and the planned mutants it
did not run (_inpaint, nn, models.unet, integrations): one test per mutant that the existing suite
let survive, each checked against an independent reference (a hand-computed value, a formula
written out here, or the function called directly). Each test names the mutant it kills."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.cli import main


def _toy(x, t):
    """An elementwise eps-model (batches do not mix): ``0.3 tanh(x) + sin(t / 200)``."""
    return 0.3 * torch.tanh(x) + torch.sin(t.float() / 200)[:, None, None, None]


def _pictures(tmp_path):
    """A 16 x 16 grey picture and a 16 x 16 mask (white = repaint) in tmp_path: their paths."""
    pix = ((np.arange(16 * 16).reshape(16, 16) * 7) % 256).astype(np.uint8)
    Image.fromarray(pix).save(tmp_path / "in.png")
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 2:10] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return str(tmp_path / "in.png"), str(tmp_path / "mask.png")


# --------------------------------------------------------------------------------- _cli_repaint
def test_cli_repaint_jump_length_and_jump_n_sample_are_not_swapped(tmp_path, monkeypatch):
    """--jump-length is the paper's j, --jump-n-sample its r: distinct values reach
    fastdiff.repaint under their own names (the other CLI test used 2 and 2, which cannot tell
    them apart). Mutant: _cli_repaint.py passing jump_length=a.jump_n_sample and vice versa."""
    img, msk = _pictures(tmp_path)
    seen = []
    monkeypatch.setattr(fastdiff, "repaint", lambda m, i, k, s, **kw: seen.append(kw) or i)
    argv = ["repaint", "--init-image", img, "--mask", msk, "--steps", "12", "--jump-length", "3",
            "--jump-n-sample", "5", "--n", "1", "--out", str(tmp_path / "o.png")]  # fmt: skip
    assert main(argv) == 0
    assert (seen[0]["jump_length"], seen[0]["jump_n_sample"]) == (3, 5)


# ------------------------------------------------------------------------------------ inversion
def test_invert_sampler_names_are_case_insensitive():
    """invert(sampler=) reads names as sample() does, case-insensitively: "DDIM_Inverse" is
    "ddim_inverse" (the same x_T). Mutant: inversion.py checking ``sampler`` not
    ``sampler.lower()`` against INVERSE_SAMPLERS (a ValueError for "DDIM_Inverse")."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    want = fastdiff.invert(_toy, x, 4, sampler="ddim_inverse")
    assert torch.equal(fastdiff.invert(_toy, x, 4, sampler="DDIM_Inverse"), want)
    want = fastdiff.invert(_toy, x, 4, sampler="dpm++_inverse")
    assert torch.equal(fastdiff.invert(_toy, x, 4, sampler="DPM++_Inverse"), want)


# ------------------------------------------------------------------------------------------ viz
def test_to_uint8_clamps_out_of_range_values():
    """Model-space values outside [-1, 1] saturate at 0 / 255 (a sample slightly past 1 is
    white, not wrapped around to grey), and the rest round to the nearest pixel: x = 1.5,
    -2, 0, 0.5 -> 255, 0, 128 (127.5 rounds to even), 191 (191.25). Mutant: viz.to_uint8
    without ``.clamp(-1, 1)`` (1.5 -> 319 -> 63 after the uint8 cast)."""
    from fastdiff.viz import to_uint8

    x = torch.tensor([1.5, -2.0, 0.0, 0.5, 1.0, -1.0]).reshape(1, 1, 2, 3)
    assert to_uint8(x).flatten().tolist() == [255, 0, 128, 191, 255, 0]


# ----------------------------------------------------------------------------------------- data
def test_load_digits_is_scikit_learns_images_scaled_and_upsampled():
    """load_digits(8) is scikit-learn's 8 x 8 digits / 16 mapped to [-1, 1] (pixel 16 -> 1,
    0 -> -1, 8 -> 0), and load_digits(16) their bilinear (align_corners=False) upsampling of
    the [0, 1] images, then mapped. Mutants: data.py dividing by 15 (clamped: 15 and 16 both
    white), align_corners=True."""
    sk = pytest.importorskip("sklearn.datasets").load_digits()
    from fastdiff.data import load_digits

    x8, y = load_digits(8)
    img = torch.as_tensor(sk.images, dtype=torch.float64)[:, None] / 16
    assert x8.shape == (1797, 1, 8, 8) and y.tolist() == sk.target.tolist()
    torch.testing.assert_close(x8.double(), img * 2 - 1, rtol=0, atol=1e-7)
    up = torch.nn.functional.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    x16, _ = load_digits()
    torch.testing.assert_close(x16.double(), up.clamp(0, 1) * 2 - 1, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- nn
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


def test_stacked_linear_refuses_layers_of_mixed_dtypes():
    """One GEMM over the stacked weights needs one dtype: a float16 layer beside a float32 one
    makes stacked_linear decline (None: each layer runs as a module), rather than torch.cat
    promoting the half weights and returning float32 rows for the half layer. Mutant:
    stacked.py without the ``w.dtype != w0.dtype`` test."""
    from fastdiff.nn.stacked import stacked_linear

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2).half()
    assert stacked_linear([a, b], torch.randn(2, 4)) is None
    c = torch.nn.Linear(4, 2)
    got = stacked_linear([a, c], torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got[0], a(x))
    torch.testing.assert_close(got[1], c(x))


# ---------------------------------------------------------------------------------- models.unet
def _unet(**kw):
    from helpers import randomize_

    from fastdiff.models import UNet, UNetConfig

    cfg = dict(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_groups=4, sample_size=8)  # fmt: skip
    torch.manual_seed(0)
    return randomize_(UNet(UNetConfig(**{**cfg, **kw}))).eval()


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


# --------------------------------------------------------------------------------- integrations
def test_optimize_pipeline_optimizes_a_torch_compiled_component():
    """A pipeline component wrapped by torch.compile (pipe.unet = torch.compile(pipe.unet), as
    diffusers' docs advise) is optimized through the wrapper: its report is under the
    component's name and the model inside has the fused ResnetBlock2Ds. Mutant: pipeline.py
    without the ``_orig_mod`` unwrap (the wrapper is no ModelMixin: listed as left alone)."""
    import types

    pytest.importorskip("diffusers")
    from test_optimize import unet2d

    unet = unet2d()
    pipe = types.SimpleNamespace(components={"unet": torch.compile(unet), "scheduler": None})
    assert fastdiff.optimize(pipe) is pipe
    report = pipe.fastdiff_report
    assert "unet" in report and report.left == []
    assert type(unet.down_blocks[0].resnets[0]).__name__ == "FusedResnetBlock2D"
