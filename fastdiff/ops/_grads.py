"""Gradients of the fused ops through their torch references (backward is never the hot path)."""

from __future__ import annotations

import torch


def _grads(ctx, outs_fn, grads_out, tensors, grad_slots):
    """Gradients of ``outs_fn(*leaves)`` for the saved ``tensors`` whose input slot needs one."""
    slots = zip(grad_slots, tensors, strict=True)
    needs = [ctx.needs_input_grad[i] and t is not None for i, t in slots]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip(tensors, needs, strict=True)]  # fmt: skip
        outs = outs_fn(*leaves)
        # an output that does not depend on the leaves asked for (x0 when only the noise
        # needs a gradient) has no graph: skip it
        pairs = [(o, g) for o, g in zip(outs, grads_out, strict=True)
                 if g is not None and o.numel() > 0 and o.requires_grad]  # fmt: skip
        wrt = [t for t, n in zip(leaves, needs, strict=True) if n]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                       allow_unused=True) if wrt and pairs else ())  # fmt: skip
        return [next(got, None) if n else None for n in needs]
