"""2x spatial resampling: nearest-neighbour up / strided-conv or average-pool down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per axis, the 3 taps (w0, w1, w2) of a conv applied after 2x nearest upsampling, as the 4 taps
# k = 0..3 of a stride-2 transposed conv with padding 1 (see fold_upsample_conv).
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def fold_upsample_conv(weight: Tensor) -> Tensor:
    """``[Co x Ci x 3 x 3]`` conv weight -> ``[Ci x Co x 4 x 4]`` transposed-conv weight with
    ``conv_transpose2d(x, W', b, stride=2, padding=1) == conv2d(up2(x), W, b, padding=1)``,
    ``up2`` the 2x nearest-neighbour upsampling.

    Per axis, output pixel ``2i + a`` of the upsampled-then-convolved map sees input rows
    ``(i-1, i, i)`` for ``a = 0`` and ``(i, i, i+1)`` for ``a = 1`` through the taps
    ``(w0, w1, w2)``: a 2-tap filter ``[w0, w1 + w2]`` on rows ``(i-1, i)``, or
    ``[w0 + w1, w2]`` on rows ``(i, i+1)``. A stride-2 transposed conv with padding 1 reaches
    output ``2i + a`` from row ``i`` through tap ``k = a + 1``, from row ``i - 1`` through
    ``k = a + 3`` and from row ``i + 1`` through ``k = a - 1``, hence the 4-tap kernel
    ``[w2, w1 + w2, w0 + w1, w0]`` and, in 2-D, ``W' = A W A^T``. That is 4 taps per output pixel
    instead of 9 (0.44x the FLOPs) and no upsampled copy of the input. Sums in fp32.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [Co x Ci x 3 x 3], got {tuple(weight.shape)}")
    a = torch.tensor(_FOLD, dtype=torch.float32, device=weight.device)
    w = torch.einsum("kd,oidx,lx->iokl", a, weight.float(), a).to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return w.contiguous(memory_format=torch.channels_last)
    return w.contiguous()


class Upsample(nn.Module):
    """[N x C x H x W] -> [N x C x 2H x 2W]: nearest-neighbour, then a 3x3 conv if ``use_conv``.

    On CPU, nearest + 3x3 conv runs as one stride-2 transposed conv with the folded 4x4 kernel
    (:func:`fold_upsample_conv`; same result up to fp rounding, 0.44x the FLOPs, and PyTorch's
    NCHW nearest upsampling is slow on CPU). NaN propagates as before; an inf input may give
    inf where the unfolded sum ``w1*inf + w2*inf`` gives NaN. The folded weight is cached while
    the conv weight is unchanged (its version counter) and recomputed under autograd. CUDA keeps
    interpolate + conv (the folded path has not been measured on a GPU).
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None and x.device.type == "cpu":
            w = self._folded_weight()
            return F.conv_transpose2d(x, w, self.conv.bias, stride=2, padding=1)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [N x C x 2H x 2W]
        return self.conv(x) if self.conv is not None else x

    def _folded_weight(self) -> Tensor:
        return cached_fold(self, self.conv.weight)


def cached_fold(owner: nn.Module, weight: Tensor) -> Tensor:
    """:func:`fold_upsample_conv` of ``weight``, cached on ``owner`` while the weight is
    unchanged (same storage, layout and version counter); recomputed, differentiably, when
    autograd records or under ``torch.compile``."""
    if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
        return fold_upsample_conv(weight)
    try:
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.stride())
    except RuntimeError:  # an inference tensor has no version counter: do not cache
        return fold_upsample_conv(weight)
    hit = owner.__dict__.get("_fastdiff_fold")
    if hit is None or hit[0] != key:
        hit = (key, fold_upsample_conv(weight))
        owner.__dict__["_fastdiff_fold"] = hit
    return hit[1]


class Downsample(nn.Module):
    """[N x C x H x W] -> [N x C x H/2 x W/2]: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)
