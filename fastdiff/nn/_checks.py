"""Input checks shared by the :mod:`fastdiff.nn` blocks and :class:`fastdiff.models.UNet`."""

from __future__ import annotations

from torch import Tensor


def check_nchw(name: str, x: Tensor, channels: int) -> None:
    """ValueError unless ``x`` is ``[N x channels x H x W]``: a 3-D ``[N x C x L]`` would reach
    conv2d as one unbatched image and silently mix the batch. ``name`` prefixes the message."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: x must be [N x {channels} x H x W], got {tuple(x.shape)}")
