"""Several ``nn.Linear`` applied to one input as one GEMM over their stacked weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn.sampling import has_hooks


def stacked_linear(lins: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    """``[lin(x) for lin in lins]`` from one GEMM: ``x [... x E] @ cat(W_i)^T + cat(b_i)``, split
    into ``[... x C_i]`` views. One kernel (plus two small weight concatenations) instead of one
    per layer; the weights are stacked on every call, never cached (an in-place ``.data`` update
    cannot make them stale). None, so the caller runs each layer as a module, unless every layer
    is a plain ``nn.Linear`` with a bias and no hooks, all of one input width, dtype and device.
    """
    if not lins:
        return None
    w0 = lins[0].weight
    for m in lins:
        if type(m) is not nn.Linear or m.bias is None or has_hooks(m):
            return None
        w = m.weight
        if w.shape[1] != w0.shape[1] or w.dtype != w0.dtype or w.device != w0.device:
            return None
    w = torch.cat([m.weight for m in lins])  # [sum C_i x E]
    b = torch.cat([m.bias for m in lins])  # [sum C_i]
    out = F.linear(x, w, b)  # [... x sum C_i]
    return list(out.split([m.out_features for m in lins], dim=-1))  # [... x C_i] views
