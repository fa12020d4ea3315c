"""The DDPM / ADM residual block, with its GroupNorm+SiLU pairs and time conditioning fused."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.nn._checks import check_nchw
from fastdiff.nn.group_norm import GroupNormSiLU
from fastdiff.nn.sampling import Downsample, Upsample


class ResBlock(nn.Module):
    """Residual block conditioned on a time (and class) embedding.

    DDPM (Ho et al. 2020, appendix B) adds the projected embedding before the second norm::

        h = conv1(silu(GN(x)))
        h = conv2(dropout(silu(GN(h + W e))))
        out = skip(x) + h

    ADM's ``use_scale_shift_norm`` (Dhariwal & Nichol 2021, sec. 3, "adaptive group
    normalization") instead splits ``W e`` into ``(scale, shift)`` and uses
    ``silu(GN(h) * (1 + scale) + shift)``. Either way the add / scale-shift, the norm and the
    SiLU are one fused :class:`GroupNormSiLU` call. ``up`` / ``down`` resample both paths between
    the first norm and ``conv1`` (ADM's ``resblock_updown``).

    ``emb`` [N x E] is the embedding *after* its SiLU: the UNet applies it once for all blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be set")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNormSiLU(num_groups, in_channels)
        if up:
            self.resample = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = None
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * out_channels)
        self.norm2 = GroupNormSiLU(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM, DDPM)
        nn.init.zeros_(self.conv2.bias)
        if in_channels == out_channels:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, proj: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N x Cin x H x W], emb [N x E] -> [N x Cout x H' x W'] (H' = 2H up, H/2 down).

        ``proj``: ``emb_proj(emb)`` computed by the caller, e.g. by :class:`fastdiff.models.UNet`,
        which projects for all its blocks in one GEMM (any row stride)."""
        check_nchw("ResBlock", x, self.in_channels)
        if proj is None and emb.shape != (x.shape[0], self.emb_channels):
            raise ValueError(
                f"ResBlock: emb must be [N={x.shape[0]} x {self.emb_channels}], got "
                f"{tuple(emb.shape)}"
            )
        h = self.norm1(x)  # silu(GN(x))                            [N x Cin x H x W]
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)  #             [N x Cin x H' x W']
        h = self.conv1(h)  #                                        [N x Cout x H' x W']
        e = self.emb_proj(emb) if proj is None else proj  #         [N x Cout] or [N x 2Cout]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  #                     [N x Cout] each
            h = self.norm2(h, scale=scale, shift=shift)  # silu(GN(h) * (1 + scale) + shift)
        else:
            h = self.norm2(h, add=e)  # silu(GN(h + e))
        h = self.conv2(self.dropout(h))  #                          [N x Cout x H' x W']
        return self.skip(x) + h
