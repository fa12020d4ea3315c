"""Blended inpainting for ``fastdiff.sample(image=..., mask=...)``: an ordinary (non-inpainting)
model repaints the region where ``mask`` is 1 and keeps the image where it is 0.

After every model call i the known region is replaced by the image noised to the level of the
next call, ``x <- (1 - mask) add_noise(image, z, i + 1) + mask x``, and after the last call by
the clean image: the "replacement" method of Lugmayr et al. 2022 (RePaint, arXiv:2201.09865,
Sec. 3, eq. 8 without its resampling) and Avrahami et al. 2023 (Blended Latent Diffusion,
arXiv:2206.02779, Alg. 1), as diffusers' StableDiffusionInpaintPipeline runs a 4-channel UNet
(and the SD3 / Flux inpaint pipelines a 16-channel transformer, with ``scale_noise``). ``z`` is
the noise of the start (diffusers reuses ``noise``).

Heun's correction (``heun``) rebuilds the Euler stage's slope from the sample it gets:
x_{i+1} = (x_i + x') / 2 + (h / 2) d_2 with h d_1 = x' - x_i. diffusers keeps d_1 from before
the blend (it stores it), so after a blended Euler stage the correction's result is moved back
by half the blend's change of x': ``x <- x - (x'_blended - x') / 2`` before its own blend (exact
for binary masks anyway, m (1 - m) = 0; a soft mask's partly-kept pixels need it). The flow
Heun correction (``flow_heun``) reads the stored velocity v_1 itself, x_i + (h / 2)(v_1 + v_2):
nothing to take back.
DPM++ SDE's stage 2 (``dpm++_sde``) reads its sample x_m with weight k only to recover stage 1's
noise, which diffusers keeps unblended (its Brownian increment): its result is moved back by k
times the blend's change of x_m (the sampler's :meth:`blend_takeback`).

Per call the blend is three elementwise kernels (``image a + z s``, then a ``lerp`` by the
mask; Heun: two more) with (a, s) read from a device-resident fp32 table ``[calls x 3]``
computed on the host in float64 before the loop: no host sync, and the same code runs inside a
captured CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastdiff.samplers import Sampler
from fastdiff.samplers.base import vp_of_sigma
from fastdiff.samplers.heun import HeunSampler

#: ``fastdiff.sample(mask=...)``'s strength when none is given (diffusers' inpainting
#: pipelines: 1.0, a start from pure noise)
DEFAULT_STRENGTH = 1.0


def check_mask(mask: Any, image: Any) -> None:
    """``mask`` is a floating tensor on ``image``'s device, broadcastable to ``image``'s shape
    (without enlarging it), with values in [0, 1] (checked once on the host, before anything
    runs: one device sync for a CUDA mask). TypeError / ValueError naming ``mask``."""
    if image is None:
        raise ValueError(
            "mask: inpainting needs image= (x_0 whose masked region is repainted), got a mask "
            "without an image"
        )
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask: expected a torch.Tensor broadcastable to image (1 = repaint, 0 = keep), got "
            f"{type(mask).__name__}"
        )
    if not mask.is_floating_point():
        raise TypeError(
            f"mask: expected a floating tensor with values in [0, 1] (1 = repaint, 0 = keep), "
            f"got dtype {mask.dtype} (use mask.float(); a uint8 image mask: mask / 255)"
        )
    if mask.device != image.device:
        raise ValueError(f"mask: expected image's device {image.device}, got {mask.device}")
    try:
        full = torch.broadcast_shapes(tuple(mask.shape), tuple(image.shape))
    except RuntimeError:
        full = None
    if full != tuple(image.shape):
        raise ValueError(
            f"mask: expected a shape broadcastable to image's {tuple(image.shape)} (e.g. "
            f"[N or 1 x 1 x H x W]), got {tuple(mask.shape)}"
        )
    if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails both
        lo, hi = float(mask.min()), float(mask.max())
        raise ValueError(
            f"mask: expected values in [0, 1] (1 = repaint, 0 = keep), got values in "
            f"[{lo}, {hi}]" + (" or NaN" if bool(mask.isnan().any()) else "")
        )


def blend_noising(smp: Sampler, j: int) -> tuple[float, float]:
    """(a, s): the known region ``a image + s z`` blended into the state that model call ``j``
    gets, in the sampler's state units, as diffusers' inpaint loop blends it (its
    ``add_noise`` / ``scale_noise`` at ``timesteps[j]`` after ``j`` scheduler steps, i.e. at
    ``sigmas[step_index = j]``).

    That is :meth:`~fastdiff.samplers.Sampler.add_noise`'s level of call ``j`` except for
    DPM2 / DPM2 a, whose first stage lands on the log-midpoint sigma_m while diffusers'
    interleaved ``sigmas[j]`` is already the step's end sigma_{k+1}: the known region carries
    sigma_{k+1}'s noise there (scaled to the midpoint's state units), as in diffusers."""
    call_sigmas = getattr(smp, "call_sigmas", None)
    if call_sigmas is not None and hasattr(smp, "_sig"):  # DPM2 / DPM2 a
        a = vp_of_sigma(float(call_sigmas()[j]))[0]
        return a, a * float(smp._sig[(j + 1) // 2])
    return smp._noising(j)


def rebuilds_slope(smp: Sampler) -> bool:
    """Whether the sampler's Heun correction (odd calls) rebuilds the Euler stage's slope from
    the sample it gets, with weight 1/2 on it (``heun``; ``flow_heun`` reads the stored slope:
    module docstring)."""
    return isinstance(smp, HeunSampler)


def blend_table(smp: Sampler) -> torch.Tensor:
    """float64 ``[calls x 3]``: row i is the (a, s) blended after model call i (the next
    call's level, :func:`blend_noising`; the last row's is (1, 0): the clean image), and the
    weight c of the previous blend's change taken back first (1/2 after a Heun correction)."""
    rows = [blend_noising(smp, i + 1) for i in range(smp.steps - 1)] + [(1.0, 0.0)]
    return torch.tensor(
        [(a, s, takeback(smp, i)) for i, (a, s) in enumerate(rows)], dtype=torch.float64
    )


def takeback(smp: Sampler, i: int) -> float:
    """The weight of the previous blend's change of x taken back from model call ``i``'s
    result: 1/2 after a Heun correction (odd calls), the sampler's ``blend_takeback(i)`` where
    it has one (``dpm++_sde``), else 0."""
    if rebuilds_slope(smp):
        return 0.5 if i % 2 == 1 else 0.0
    hook = getattr(smp, "blend_takeback", None)
    return float(hook(i)) if hook is not None else 0.0


class Inpaint:
    """The static operands of the blend on the sampling device: the image and the start noise
    (in x's dtype and memory layout), the mask (x's dtype, its own broadcastable shape) and the
    fp32 (a, s, c) table (:func:`blend_table`), and for Heun the last blend's change of x;
    :meth:`blend` is one call's blend."""

    def __init__(self, smp: Sampler, image: Tensor, mask: Tensor, z: Tensor, like: Tensor):
        fmt = torch.contiguous_format
        cl = like.ndim == 4 and like.is_contiguous(memory_format=torch.channels_last)
        if cl and not like.is_contiguous():
            fmt = torch.channels_last
        conv = {"device": like.device, "dtype": like.dtype}
        self.image = image.to(**conv).contiguous(memory_format=fmt)
        self.z = z.to(**conv).contiguous(memory_format=fmt)
        self.mask = mask.to(**conv)
        table = blend_table(smp)
        self.table = table.to(torch.float32).to(like.device)
        # Heun, DPM++ SDE: the last blend's change of x, taken back after the next call
        self.delta = torch.zeros_like(self.image) if bool(table[:, 2].any()) else None

    def blend(self, x: Tensor, row: Tensor) -> Tensor:
        """``(1 - mask) (image a + z s) + mask x`` for the table row ``row`` = (a, s, c): a new
        tensor, exactly the image where mask is 0 after the last call, exactly x where mask is
        1 (Heun: x is first moved back by c times the previous blend's change)."""
        if self.delta is not None:
            x = torch.addcmul(x, self.delta, row[2], value=-1)
        known = self.image * row[0]
        known.addcmul_(self.z, row[1])
        out = known.lerp_(x, self.mask)
        if self.delta is not None:
            torch.sub(out, x, out=self.delta)
        return out

    def signature(self) -> tuple:
        """What a captured graph's blend depends on beyond the values: the mask's shape."""
        return (tuple(self.mask.shape),)
