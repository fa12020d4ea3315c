"""``fastdiff.optimize`` on a diffusers ``AutoencoderKL`` (its ResnetBlock2Ds, mid-block
attention, upsamplers and the encoder's / decoder's ``conv_norm_out -> conv_act`` pairs run on the
fused ops, and encode / decode equal the unpatched VAE's) and on a whole pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders.vae import Decoder  # noqa: E402
from test_optimize import vae_kl  # noqa: E402

from fastdiff.nn import GroupNormSiLU  # noqa: E402


def _vae() -> AutoencoderKL:
    vae = vae_kl()
    with torch.no_grad():  # GroupNorm affine parameters off their (1, 0) init
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return vae.eval()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@torch.no_grad()
def test_optimized_vae_encodes_and_decodes_as_diffusers(backend):
    if backend not in fastdiff.available_backends("group_norm_silu", "cpu"):
        pytest.skip(f"{backend} not built")
    vae = _vae()
    x = torch.randn(2, 3, 24, 20)
    ref_lat = vae.encode(x).latent_dist.mean
    ref_img = vae.decode(ref_lat).sample
    opt = fastdiff.optimize(copy.deepcopy(vae))
    report = opt.fastdiff_report
    assert not report.left, str(report)
    names = {n for n, _ in report.replaced}
    assert {"encoder.conv_norm_out", "decoder.conv_norm_out"} <= names
    for coder in (opt.encoder, opt.decoder):
        assert isinstance(coder.conv_norm_out, GroupNormSiLU)
        assert isinstance(coder.conv_act, torch.nn.Identity)
    assert opt.state_dict().keys() == vae.state_dict().keys()
    with fastdiff.use_backend(backend):
        lat = opt.encode(x).latent_dist.mean
        img = opt.decode(ref_lat).sample
    torch.testing.assert_close(lat, ref_lat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    # the check can fail: the pair computes silu(GN(x)), not GN(x)
    opt.decoder.conv_norm_out.activation = None
    assert not torch.allclose(opt.decode(ref_lat).sample, ref_img, atol=1e-3)


def test_optimize_vae_is_idempotent_and_reports_already():
    opt = fastdiff.optimize(_vae())
    again = fastdiff.optimize(opt).fastdiff_report
    assert not again.replaced and not again.left
    assert {"encoder.conv_norm_out", "decoder.conv_norm_out"} <= {n for n, _ in again.already}


def test_hooked_or_spatial_norm_pair_is_left_and_named():
    vae = _vae()
    vae.decoder.conv_act.register_forward_hook(lambda *a: None)
    report = fastdiff.optimize(vae).fastdiff_report
    assert ("decoder.conv_norm_out", "conv_norm_out or conv_act has hooks") in report.left
    assert isinstance(vae.encoder.conv_norm_out, GroupNormSiLU)
    assert type(vae.decoder.conv_norm_out) is torch.nn.GroupNorm
    # MoVQ's decoder: conv_norm_out is a SpatialNorm (it takes latent_embeds), not fused
    holder = torch.nn.Module()
    holder.dec = Decoder(
        in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,), norm_num_groups=8, norm_type="spatial",
    )  # fmt: skip
    report = fastdiff.optimize(holder).fastdiff_report
    assert ("dec.conv_norm_out", "SpatialNorm -> SiLU") in report.left


class _Pipe:
    """A diffusers-pipeline stand-in: ``components`` as ``DiffusionPipeline`` has it."""

    def __init__(self, **components: object) -> None:
        self.__dict__.update(components)
        self.components = components


@torch.no_grad()
def test_optimize_pipeline_optimizes_each_diffusers_model():
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()  # fmt: skip
    pipe = DDIMPipeline(unet=copy.deepcopy(unet), scheduler=DDIMScheduler())
    ref = pipe(batch_size=1, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert fastdiff.optimize(pipe) is pipe
    report = pipe.fastdiff_report
    assert set(report) == {"unet"} and report["unet"].replaced and not report["unet"].left
    assert ("scheduler", "DDIMScheduler: not a diffusers model") in report.left
    assert "unet: fastdiff.optimize(UNet2DModel)" in str(report)
    got = pipe(batch_size=1, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert abs(got - ref).max() < 1e-4

    vae, text = _vae(), torch.nn.Linear(4, 4)
    other = _Pipe(unet=unet, vae=vae, text_encoder=text, safety_checker=None)
    report = fastdiff.optimize(other, channels_last=False).fastdiff_report
    assert set(report) == {"unet", "vae"}
    assert isinstance(vae.decoder.conv_norm_out, GroupNormSiLU)
    assert report.left == [("text_encoder", "Linear: not a diffusers model")]
    assert all(not r.channels_last for r in report.values())
    assert type(text) is torch.nn.Linear and not hasattr(text, "fastdiff_report")
    with pytest.raises(TypeError, match="torch.nn.Module or a diffusers pipeline, got _Pipe"):
        fastdiff.optimize(_Pipe())
    with pytest.raises(TypeError, match="channels_last must be True, False or None"):
        fastdiff.optimize(other, channels_last=1)
