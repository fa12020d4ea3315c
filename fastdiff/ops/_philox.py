"""Philox4x32-10 normals in torch: the reference for the noise the sampler-step kernels draw.

Counter-based random numbers (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2,
3"): the ``(seed, offset)`` pair on the device fully determines the stream, so a kernel (cpu,
cuda, triton) draws the same noise without any generator state on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox_randn"]

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # 32x32 -> 64 bit product of constant a and uint32 values b held in int64, without overflow
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi & _M32, lo


def philox_randn(generator_state: Tensor, shape: tuple[int, ...]) -> Tensor:
    """N(0,1) fp32 of ``shape``: element ``e`` (row-major) = lane ``e % 4`` of Triton
    ``tl.randn4x(seed, offset + e // 4)``.

    Philox4x32-10 in int64 torch arithmetic masked to 32 bits (Salmon et al. 2011), key =
    (seed lo, seed hi), counter = (ctr lo, ctr hi, 0, 0); Box-Muller on the output pairs (0, 1)
    and (2, 3) with Triton's uint -> uniform conversion, giving 4 normals per counter. Uses
    ``ceil(numel / 4)`` counters. No host sync: seed and offset stay on the device.
    """
    dev = generator_state.device
    numel = 1
    for s in shape:
        numel *= s
    seed, offset = generator_state[0], generator_state[1]
    ctr = torch.arange((numel + 3) // 4, dtype=torch.int64, device=dev) + offset
    c0, c1 = ctr & _M32, (ctr >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32

    def uniform(u: Tensor) -> Tensor:
        # bitcast to int32, x<0 -> ~x, times 4.6566127342e-10 in fp32
        u = torch.where(u >= 2**31, _M32 - u, u)
        return u.to(torch.float32) * 4.6566127342e-10

    def box_muller(ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(uniform(ua), 1.0e-7)))
        th = uniform(ub) * 6.283185307179586
        return r * torch.cos(th), r * torch.sin(th)

    n0, n1 = box_muller(c0, c1)
    n2, n3 = box_muller(c2, c3)
    # [ceil(numel/4) x 4] lanes -> element order
    return torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)[:numel].reshape(shape)
