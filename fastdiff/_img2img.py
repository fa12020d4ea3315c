"""img2img (SDEdit, Meng et al. 2022, arXiv:2108.01073) for ``fastdiff.sample(image=...,
strength=...)``: the image x_0 is noised to the sampler's state at a later model call s, and the
reverse process runs from there, as diffusers' img2img pipelines do (``get_timesteps``,
``set_begin_index``, ``add_noise`` / ``scale_noise``).

One meaning of ``strength`` for every sampler: the fraction of the sampler's grid that is run.
Most samplers run the calls ``s = t_start * order, ..., steps - 1`` of their full grid
(:meth:`~fastdiff.samplers.Sampler.img2img_start`); LCM, TCD and flow-matching Euler take the
strength as an option of their grid (their diffusers schedulers' ``set_timesteps(strength=...)``
/ the SD3 pipeline's shortened sigmas), so their run is the whole shortened grid from call 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from fastdiff.samplers import Sampler


def check_strength(strength: Any) -> float | None:
    """None, or a finite real in (0, 1] as a float (TypeError / ValueError naming it)."""
    if strength is None:
        return None
    if isinstance(strength, bool) or not isinstance(strength, Real):
        raise TypeError(
            f"strength: expected a float in (0, 1] or None, got {type(strength).__name__}"
        )
    if not math.isfinite(float(strength)) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength: expected a float in (0, 1], got {strength!r}")
    return float(strength)


def check_image(
    image: Any, noise: Tensor | None, batch_size: Any, shape: Sequence[int] | None
) -> None:
    """``image`` is a floating ``[N x ...]`` tensor agreeing with ``noise`` / ``batch_size`` /
    ``shape`` when they are given (checked before anything runs)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a torch.Tensor x_0 [N x ...], got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(
            f"image: expected a floating tensor in model space (latents for a latent model, "
            f"[-1, 1] pixels otherwise), got dtype {image.dtype}"
        )
    if image.ndim < 1:
        raise ValueError(f"image: expected x_0 of shape [N x ...], got shape {tuple(image.shape)}")
    if isinstance(noise, Tensor) and tuple(noise.shape) != tuple(image.shape):
        raise ValueError(
            f"noise: expected image's shape {tuple(image.shape)} (the noise added to it), got "
            f"{tuple(noise.shape)}"
        )
    if batch_size is not None and batch_size != image.shape[0]:
        raise ValueError(
            f"batch_size: expected image's batch {image.shape[0]} (or None), got {batch_size!r}"
            " (one image per sample: repeat it, e.g. image.expand(n, ...))"
        )
    if shape is not None:
        try:
            same = tuple(int(s) for s in shape) == tuple(image.shape[1:])
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"shape: expected image's per-sample shape {tuple(image.shape[1:])} (or None), "
                f"got {shape!r}"
            )


def img2img_sampler(
    smp: Sampler,
    given_object: bool,
    image: Tensor | None,
    strength: float | None,
    rebuild: Callable[[Mapping[str, Any]], Sampler],
) -> tuple[Sampler, int]:
    """The sampler of the run and its first model call s (0 without ``image``).

    A sampler whose grid takes the strength (``strength_option``: LCM, TCD, flow Euler) is
    rebuilt with it (``rebuild(options)``; default strength when ``image`` is given:
    the class's ``default_strength``); a sampler object must already have it. Other samplers
    take ``strength`` only with ``image``."""
    if smp.strength_option:
        if given_object:
            if strength is not None and strength != smp.strength:
                raise ValueError(
                    f"strength: the sampler object was built with strength={smp.strength}, got "
                    f"{strength}; build it with the strength (or leave strength=None)"
                )
        else:
            if strength is None and image is not None:
                strength = type(smp).default_strength
            if strength is not None and strength != smp.strength:
                smp = rebuild({"strength": strength})
        return smp, 0
    if image is None:
        if strength is not None:
            raise ValueError(
                f"strength: img2img's strength needs image= (x_0 to start from), got "
                f"strength={strength} without it (only 'lcm', 'tcd' and 'flow_euler' take a "
                "strength of their own grid)"
            )
        return smp, 0
    if getattr(smp, "no_img2img", None):  # a sampler whose diffusers scheduler has no start
        raise ValueError(f"image: {smp.no_img2img}")
    if smp.inverts:  # also at one step, where the timesteps show no direction
        raise ValueError(
            f"image: {type(smp).__name__} runs x_0 -> x_T (ascending timesteps); img2img needs "
            "a sampler of the reverse process"
        )
    st = type(smp).default_strength if strength is None else strength
    start = smp.img2img_start(st)
    if start >= smp.steps:
        n = getattr(smp, "num_inference_steps", smp.steps)
        raise ValueError(
            f"strength: {st} leaves no step of the {n}-step grid (int({n} x {st}) = "
            f"{int(n * st)}); use a larger strength or more steps"
        )
    return smp, start


def noised_image(
    smp: Sampler,
    image: Tensor,
    noise: Tensor | None,
    start: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: Any,
) -> Tensor:
    """x_s = ``smp.add_noise(image, noise, start)`` on ``device`` in ``dtype``; the noise is
    ``noise``, else drawn as x_T would be (``generator``, one per sample, or torch's)."""
    from fastdiff.samplers.base import randn_like_with

    x0 = image.to(device=device, dtype=dtype)
    if noise is not None:
        z = noise.to(device=device, dtype=dtype)
    else:
        z = randn_like_with(torch.empty(x0.shape, device=device, dtype=dtype), generator)
    return smp.add_noise(x0, z, start)
