"""``GroupNormSiLU``: a drop-in for ``nn.GroupNorm`` (+ ``nn.SiLU``) on the fused kernel."""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import Tensor, nn

from fastdiff.ops.group_norm_silu import group_norm_silu

__all__ = ["GroupNormSiLU", "fuse_group_norm_silu"]


class GroupNormSiLU(nn.Module):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)`` in one fused kernel.

    Parameters are named like ``nn.GroupNorm``'s (``weight``, ``bias``), so a GroupNorm's
    ``state_dict`` loads directly (``bias=False`` for an ``nn.GroupNorm(..., bias=False)``).
    ``activation="silu"`` (default) or ``None`` (plain GroupNorm).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"GroupNormSiLU: {name} must be a positive int, got {v!r}")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNormSiLU: num_channels={num_channels} must be divisible by "
                f"num_groups={num_groups}"
            )
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """``weight = 1``, ``bias = 0``, as ``nn.GroupNorm.reset_parameters`` (meta-device init:
        ``to_empty()`` then ``reset_parameters()``)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: Tensor,
        add: Tensor | None = None,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
    ) -> Tensor:
        """``x`` [N x C x *spatial] (any number of spatial dims, none included, as
        ``nn.GroupNorm``); optional ``add``/``scale``/``shift`` [N x C]."""
        shape = None
        if x.dim() == 2 or x.dim() > 5:  # the op takes 1-3 spatial dims: flatten them into one
            shape = x.shape
            x = x.reshape(*shape[:2], math.prod(shape[2:]))  # [N x C x 1] for [N x C]
        out = group_norm_silu(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            add=add,
            scale=scale,
            shift=shift,
            activation=self.activation,
        )
        return out if shape is None else out.reshape(shape)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: str | None = "silu") -> GroupNormSiLU:
        """A ``GroupNormSiLU`` sharing ``gn``'s parameters (same tensors, not copies)."""
        w = gn.weight
        mod = cls(
            gn.num_groups,
            gn.num_channels,
            gn.eps,
            gn.affine,
            activation,
            device=w.device if w is not None else None,
            dtype=w.dtype if w is not None else None,
            bias=gn.bias is not None,
        )
        if gn.affine:
            mod.weight = gn.weight
            mod.bias = gn.bias
        mod.train(gn.training)
        return mod

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            + ("bias=False, " if self.affine and self.bias is None else "")
            + f"activation={self.activation!r}"
        )


def fuse_group_norm_silu(module: nn.Module) -> int:
    """Replace, in place, every ``nn.GroupNorm`` directly followed by ``nn.SiLU`` inside an
    ``nn.Sequential`` (anywhere in ``module``) by one ``GroupNormSiLU`` and an ``nn.Identity``
    (indices stay valid). Left alone, since fusing could change the result: a pair where either
    module has hooks (which the fused module would silently drop), subclasses of ``GroupNorm`` /
    ``SiLU``, and a ``Sequential`` subclass with its own ``forward`` (which need not run its
    children in order). Returns how many pairs were replaced."""
    from fastdiff.nn.sampling import has_hooks

    count = 0
    for sub in list(module.modules()):
        if not isinstance(sub, nn.Sequential) or type(sub).forward is not nn.Sequential.forward:
            continue
        keys = list(sub._modules.keys())
        i = 0
        while i + 1 < len(keys):
            a, b = sub._modules[keys[i]], sub._modules[keys[i + 1]]
            if (
                type(a) is nn.GroupNorm
                and type(b) is nn.SiLU
                and not has_hooks(a)
                and not has_hooks(b)
            ):
                sub._modules[keys[i]] = GroupNormSiLU.from_group_norm(a)
                sub._modules[keys[i + 1]] = nn.Identity()
                count += 1
                i += 2
            else:
                i += 1
    return count
