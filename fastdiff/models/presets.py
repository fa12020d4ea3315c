"""Named UNet architectures for :meth:`fastdiff.models.UNet.from_preset`."""

from __future__ import annotations

from fastdiff.models.unet import UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # DDPM (Ho et al. 2020, appendix B) CIFAR-10: 35.7M parameters, as google/ddpm-cifar10-32.
    "ddpm-cifar10": UNetConfig(
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        sample_size=32,
    ),
    # ADM ImageNet 64x64 (Dhariwal & Nichol 2021, table 14): class-conditional, learned
    # variance, scale-shift norm, resblock up/down-sampling, 64-channel heads.
    "adm-64": UNetConfig(
        in_channels=3,
        out_channels=6,
        base_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        head_dim=64,
        dropout=0.1,
        num_classes=1000,
        use_scale_shift_norm=True,
        resblock_updown=True,
        sample_size=64,
    ),
    # ADM ImageNet 256x256 (class-conditional): the benchmark's large model.
    "adm-256": UNetConfig(
        in_channels=3,
        out_channels=6,
        base_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        head_dim=64,
        dropout=0.0,
        num_classes=1000,
        use_scale_shift_norm=True,
        resblock_updown=True,
        sample_size=256,
    ),
    # For tests: every feature, runs in milliseconds on a CPU.
    "tiny": UNetConfig(
        in_channels=3,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=2,
        num_groups=4,
        sample_size=16,
    ),
    # Class-conditional 16x16 handwritten digits (sklearn load_digits): trains on 2 CPU cores.
    "digits": UNetConfig(
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        head_dim=32,
        dropout=0.1,
        num_classes=10,
        num_groups=8,
        sample_size=16,
    ),
}
