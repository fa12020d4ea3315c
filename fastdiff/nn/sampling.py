"""2x spatial resampling: nearest-neighbour up / strided-conv or average-pool down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from fastdiff.nn._checks import check_nchw
from fastdiff.ops.group_norm_silu import is_channels_last

# Per axis, the 3 taps (w0, w1, w2) of a conv applied after 2x nearest upsampling, as the 4 taps
# k = 0..3 of a stride-2 transposed conv with padding 1 (see fold_upsample_conv).
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


_KRON: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _fold_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``kron(A, A)`` [16 x 9], (ky*4 + kx) <- (dy*3 + dx): a constant, cached per dtype and
    device (built outside inference mode, so autograd may save it for a later backward). Only
    a plain tensor is cached: one built while tracing (``torch.export``'s fake tensors) would
    make every later eager call return fake tensors."""
    key = (dtype, device)
    k = _KRON.get(key)
    if k is None:
        with torch.inference_mode(False):
            a = torch.tensor(_FOLD, dtype=dtype, device=device)
            k = torch.kron(a, a)
        if type(k) is torch.Tensor:
            _KRON[key] = k
    return k


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
    instead of 9 (0.44x the FLOPs) and no upsampled copy of the input.

    Computed as one small batched GEMM, ``kron(A, A) [16 x 9] @ W`` with W viewed as
    ``[Ci x 9 x Co]``, in at least fp32, cheap enough (~10% of the conv it replaces at 64
    channels) to redo on every call: no cache that an in-place ``.data`` update, a
    parametrization or ``inference_mode`` could make stale. The result has channels_last strides
    (memory ``[Ci x 4 x 4 x Co]``, the GEMM's own output order, no transposing copy), which
    oneDNN's transposed conv reads faster than the contiguous layout for NCHW and channels_last
    inputs alike (measured on CPU).
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [Co x Ci x 3 x 3], got {tuple(weight.shape)}")
    co, ci = weight.shape[:2]
    ct = torch.promote_types(weight.dtype, torch.float32)
    k = _fold_matrix(ct, weight.device)  # [16 x 9]
    w = weight.to(ct).contiguous().permute(1, 2, 3, 0).reshape(ci, 9, co)  # [Ci x 9 x Co] view
    w = torch.matmul(k, w)  # [Ci x 16 x Co]
    return w.view(ci, 4, 4, co).permute(0, 3, 1, 2).to(weight.dtype)  # [Ci x Co x 4 x 4]


def has_hooks(m: nn.Module) -> bool:
    """Module or global forward/backward hooks that calling ``m`` would run, or a ``forward``
    replaced on the instance (a monkeypatched LoRA, accelerate's offload hooks): either way the
    module must be called, not bypassed through its weights."""
    return own_hooks(m) or global_hooks()


def own_hooks(m: nn.Module) -> bool:
    """:func:`has_hooks` without the global hooks; reads the instance dict (~0.2 us)."""
    d = m.__dict__
    return bool(
        "forward" in d
        or d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or d["_backward_hooks"]
        or d["_backward_pre_hooks"]
    )


def global_hooks() -> bool:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook``...)."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def foldable_conv(conv: nn.Module, channels: int) -> str | None:
    """None when ``conv`` is a plain ``nn.Conv2d`` (3x3, stride 1, padding 1, zeros, no groups,
    no dilation, ``channels`` inputs) with no hooks, so that nearest 2x + ``conv`` may run as the
    folded transposed conv; otherwise why not (a subclass, a parametrization or a hook, e.g.
    LoRA or pruning, must run as a module)."""
    if type(conv) is not nn.Conv2d:
        return f"the conv is a {type(conv).__name__}, not a plain nn.Conv2d"
    if has_hooks(conv):
        return "the conv has hooks or a replaced forward"
    plain = (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels == channels
    )
    return None if plain else "the conv is not 3x3, stride 1, padding 1 on these channels"


# Input pixels (N * H * W) from which the folded path is faster on CPU, by layout (channels_last:
# True). It saves conv FLOPs but pays the weight fold on every call, and oneDNN's transposed conv
# is slow on tiny maps. Measured (1 thread, 64 / 128 / 256 channels, N = 1 and 8, H = 1..16): NCHW
# wins from 64 pixels (1.1-1.5x at 8x8, N=1) and loses below (0.3-0.8x at N=1, H <= 4);
# channels_last wins from 256 (1.3-1.4x at 16x16, N=1) and loses at 64-128 (0.65-0.9x).
FOLD_MIN_PIXELS = {False: 64, True: 256}


def fold_pays(x: Tensor) -> bool:
    """Whether the folded transposed conv beats nearest 2x + conv for ``x`` on CPU. Never in
    fp16: the folded kernel's taps (sums of up to four 3x3 taps) rounded to fp16 gave up to 2.9x
    eager fp16's error against the float64 definition (bf16: 1.1-1.35x, as output rounding
    dominates there)."""
    if x.dim() != 4 or x.dtype == torch.float16:
        return False
    cl = is_channels_last(x)  # vmap-safe (is_contiguous(memory_format=) is NYI in vmap)
    return x.shape[0] * x.shape[2] * x.shape[3] >= FOLD_MIN_PIXELS[cl]


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(up2(x))`` as one folded stride-2 transposed conv (``foldable_conv(conv)`` holds)."""
    return F.conv_transpose2d(x, fold_upsample_conv(conv.weight), conv.bias, stride=2, padding=1)


class Upsample(nn.Module):
    """[N x C x H x W] -> [N x C x 2H x 2W]: nearest-neighbour, then a 3x3 conv if ``use_conv``.

    On CPU, nearest + 3x3 conv runs as one stride-2 transposed conv with the folded 4x4 kernel
    (:func:`fold_upsample_conv`; same result up to fp rounding, 0.44x the FLOPs, and PyTorch's
    NCHW nearest upsampling is slow on CPU) when the input is large enough for that to pay
    (:func:`fold_pays`), unless the conv was replaced or hooked (:func:`foldable_conv`). NaN
    propagates as before; an inf input may give inf where the unfolded sum
    ``w1*inf + w2*inf`` gives NaN. CUDA keeps interpolate + conv (the folded path
    has not been measured on a GPU). The folded path's output is channels_last (the folded
    weight's layout, which oneDNN runs fastest) even for an NCHW input: same values, but call
    ``.contiguous()`` before a ``.view`` that needs NCHW strides.
    """

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nchw("Upsample", x, self.channels)
        conv = self.conv
        if (
            conv is not None
            and x.device.type == "cpu"
            and fold_pays(x)
            and foldable_conv(conv, x.shape[1]) is None
        ):
            return upsample_conv(x, conv)  # [N x C x 2H x 2W]
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [N x C x 2H x 2W]
        return conv(x) if conv is not None else x


class Downsample(nn.Module):
    """[N x C x H x W] -> [N x C x H/2 x W/2]: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nchw("Downsample", x, self.channels)
        if self.conv is not None:
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)
