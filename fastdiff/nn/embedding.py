"""Timestep embedding: sinusoidal features followed by a two-layer MLP."""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` [N] -> [N x dim] (float32).

    ``[sin(t * f_i), cos(t * f_i)]`` with ``f_i = max_period ** (-i / (dim/2 - 1))``: the
    Transformer's positional encoding (Vaswani et al. 2017, sec. 3.5) as DDPM applies it to the
    timestep (Ho et al. 2020, appendix B). ``t`` may be integer or fractional. The frequencies
    are computed in float32 on ``t``'s device, so a half-precision model keeps exact phases and
    the call never syncs with the host (CUDA-graph safe).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"timestep_embedding: t must be a 1-D tensor [N], got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep_embedding: t must be integer or float, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(
            f"timestep_embedding: t must be a 1-D tensor [N], got shape {tuple(t.shape)}"
        )
    _check_dim("timestep_embedding", dim)
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(i * (-math.log(max_period) / (half - 1)))  # [dim/2]
    args = t.float()[:, None] * freqs[None, :]  # [N x dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [N x dim]


def _check_dim(owner: str, dim: int) -> None:
    """The sinusoid width: an even int >= 4 (two halves, sin and cos, of at least 2 frequencies,
    ``half - 1`` being the divisor of the frequency exponent)."""
    if isinstance(dim, bool) or not isinstance(dim, Integral) or dim < 4 or dim % 2:
        raise ValueError(f"{owner}: dim must be an even int >= 4, got {dim!r}")


class TimestepEmbedding(nn.Module):
    """t [N] -> sinusoidal features [N x dim] -> Linear -> SiLU -> Linear -> [N x emb_dim]."""

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        _check_dim("TimestepEmbedding", dim)
        self.dim = dim
        self.linear1 = nn.Linear(dim, emb_dim)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = timestep_embedding(t, self.dim).to(self.linear1.weight.dtype)  # [N x dim]
        return self.linear2(self.act(self.linear1(h)))  # [N x emb_dim]
