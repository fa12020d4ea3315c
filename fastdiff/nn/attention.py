"""``Attention``: the UNet's spatial self-attention block (optionally cross-attention).

    y = x + W_o · attn(W_q · GN(x), W_k · c, W_v · c)         c = GN(x) or a context

as in the DDPM/ADM UNets (Ho et al. 2020; Dhariwal & Nichol 2021) and Stable Diffusion's
cross-attention (Rombach et al. 2022, eq. 3), on the fused op :func:`fastdiff.ops.attention`.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff import _dispatch
from fastdiff.nn.group_norm import GroupNormSiLU
from fastdiff.ops.attention import attention, attention_reference

__all__ = ["Attention"]


class Attention(nn.Module):
    """GroupNorm -> one fused QKV projection -> attention -> output projection -> residual add.

    Args:
        channels: C of the input ``[B x C x *spatial]`` (or ``[B x C x L]``).
        num_heads: number of heads; default ``channels // head_dim`` or 1.
        head_dim: per-head width; default ``channels // num_heads``.
        num_groups: GroupNorm groups.
        context_dim: when given, keys/values come from a context ``[B x Lc x context_dim]``
            (cross-attention) and ``forward`` requires it.
        eps: GroupNorm epsilon.

    Queries/keys/values are views of one projection output ``[B x L x 3 x H x Dh]`` (strided; the
    attention kernels take strides), so the block adds no copies before attention. A float64
    block (``.double()``) runs PyTorch's SDPA (the fused kernels take fp16 / bf16 / fp32).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int | None = None,
        head_dim: int | None = None,
        num_groups: int = 32,
        context_dim: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        named = (
            ("channels", channels),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("context_dim", context_dim),
        )
        for name, v in named:
            if v is not None and (isinstance(v, bool) or not isinstance(v, Integral) or v < 1):
                raise ValueError(f"Attention: {name} must be a positive int, got {v!r}")
        if num_heads is None and head_dim is None:
            num_heads = 1
        # both positive from here on: channels is a positive multiple of the one given
        if num_heads is None:
            if channels % head_dim != 0:
                raise ValueError(
                    f"Attention: channels={channels} is not divisible by head_dim={head_dim}"
                )
            num_heads = channels // head_dim
        if head_dim is None:
            if channels % num_heads != 0:
                raise ValueError(
                    f"Attention: channels={channels} is not divisible by num_heads={num_heads}"
                )
            head_dim = channels // num_heads
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.context_dim = context_dim
        inner = num_heads * head_dim
        self.norm = GroupNormSiLU(num_groups, channels, eps=eps, activation=None)
        if context_dim is None:
            self.to_qkv = nn.Linear(channels, 3 * inner)
        else:
            self.to_q = nn.Linear(channels, inner)
            self.to_kv = nn.Linear(context_dim, 2 * inner)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B x C x *spatial] -> same shape; ``context`` [B x Lc x context_dim]."""
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"Attention: x must be [B x {self.channels} x *spatial], got {tuple(x.shape)}"
            )
        if self.context_dim is None and context is not None:
            raise ValueError("Attention: built without context_dim, so context must be None")
        if self.context_dim is not None:
            if context is None:
                raise ValueError("Attention: built with context_dim, so a context is required")
            cs = context.shape
            if len(cs) != 3 or cs[0] != x.shape[0] or cs[2] != self.context_dim:
                raise ValueError(
                    f"Attention: context must be [B={x.shape[0]} x Lc x {self.context_dim}], "
                    f"got {tuple(context.shape)}"
                )
            if cs[1] < 1:
                raise ValueError(f"Attention: context has no tokens (Lc = 0): {tuple(cs)}")
        if x.numel() == 0:  # no queries (B = 0 or an empty spatial dim): y = x
            return x.clone()
        B, C = x.shape[:2]
        H, Dh = self.num_heads, self.head_dim
        L = math.prod(x.shape[2:])  # product of the spatial dims
        h = self.norm(x).reshape(B, C, L).transpose(1, 2)  # [B x L x C]
        if self.context_dim is None:
            qkv = self.to_qkv(h).view(B, L, 3, H, Dh)  # [B x L x 3 x H x Dh]
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B x H x L x Dh] views
        else:
            Lc = context.shape[1]
            q = self.to_q(h).view(B, L, H, Dh).transpose(1, 2)
            kv = self.to_kv(context.to(h.dtype)).view(B, Lc, 2, H, Dh)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        o = _attend(q, k, v, 1.0 / math.sqrt(Dh))  # [B x H x L x Dh]
        o = self.to_out(o.transpose(1, 2).reshape(B, L, H * Dh))  # [B x L x C]
        return x + o.transpose(1, 2).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"context_dim={self.context_dim}"
        )


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The fused op, or for float64 (which the fused kernels do not take) PyTorch's SDPA, or the
    math reference when the torch backend is requested; another explicitly requested backend
    still raises for float64 (no silent fallback)."""
    if q.dtype == torch.float64:
        requested = _dispatch.requested_backend("attention")
        if requested in (None, "sdpa"):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if requested == "torch":
            return attention_reference(q, k, v, scale=scale)
    return attention(q, k, v, scale=scale)


def _reference_forward(block: Attention, x: Tensor, context: Tensor | None = None) -> Tensor:
    """Plain-PyTorch twin of :meth:`Attention.forward` (nn.GroupNorm + SDPA), for tests."""
    B, C = x.shape[:2]
    H, Dh = block.num_heads, block.head_dim
    h = torch.nn.functional.group_norm(
        x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps
    )
    h = h.reshape(B, C, -1).transpose(1, 2)
    if block.context_dim is None:
        q, k, v = block.to_qkv(h).chunk(3, dim=-1)
    else:
        q = block.to_q(h)
        k, v = block.to_kv(context.to(h.dtype)).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (H, Dh)).transpose(1, 2) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    o = block.to_out(o.transpose(1, 2).flatten(2))
    return x + o.transpose(1, 2).reshape(x.shape)
