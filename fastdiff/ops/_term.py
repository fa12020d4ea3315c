"""One term ``c v`` of a fused step's update, as the torch references form it.

A term whose coefficient is exactly 0 is absent: it contributes exactly 0 whatever its operand
(an inf / NaN operand gives no ``0 * inf = NaN``), because the sampler's math has no such term
(LCM's eps after clip_sample, PNDM's warm-up rows, DDIM's x, DDPM's eps). Every backend does the
same (csrc/include/fastdiff/sampler_math.h ``formed_operand``, the Triton kernels' ``_t``); a
formed term still propagates inf / NaN.

Autograd: the gradients are those of ``c v`` itself, so d(term)/dc is ``v`` also at ``c = 0``
(the derivative of the continuous map ``c -> c v``; a plain ``c * where(c == 0, 0, v)`` would give
0 there and freeze a coefficient that starts at 0) and d(term)/dv is ``c``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _formed(c: Tensor, v: Tensor) -> Tensor:
    return c * torch.where(c == 0, 0.0, v)


class _Term(torch.autograd.Function):
    """``c * where(c == 0, 0, v)`` with the gradients of ``c * v``."""

    @staticmethod
    def forward(c: Tensor, v: Tensor) -> Tensor:
        return _formed(c, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor):
        c, v = ctx.saved_tensors
        gc = (g * v).sum_to_size(c.shape) if ctx.needs_input_grad[0] else None
        gv = (g * c).sum_to_size(v.shape) if ctx.needs_input_grad[1] else None
        return gc, gv


def term(c: Tensor, v: Tensor) -> Tensor:
    """The term ``c v``, exactly 0 when the coefficient ``c`` is exactly 0 (elementwise when
    ``c`` is a tensor of ``v``'s shape, e.g. a learned variance's sigma)."""
    if torch.is_grad_enabled() and (c.requires_grad or v.requires_grad):
        return _Term.apply(c, v)
    return _formed(c, v)
