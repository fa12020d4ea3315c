"""``fastdiff.invert``: DDIM / DPM-Solver++ / flow-matching inversion, an image x_0 -> the noise
x_T that the matching sampler (``"ddim"``, ``"dpm++"``, ``"flow_euler"``) brings back to it.

    >>> x_T = fastdiff.invert(unet, image, steps=50)                       # doctest: +SKIP
    >>> x_0 = fastdiff.sample(unet, steps=50, noise=x_T)  # ~ image         # doctest: +SKIP

The first step of real-image editing (prompt-to-prompt, null-text inversion, DiffEdit,
pix2pix-zero): the deterministic DDIM ODE (Song et al. 2021, arXiv:2010.02502, Sec. 4.3, eq. 13)
integrated from the image upwards, one model call and one fused ``sampler_step`` per step (see
:class:`~fastdiff.samplers.DDIMInverseSampler`); multistep DPM-Solver++ run upwards
(``sampler="dpm++_inverse"``, diffusers' ``DPMSolverMultistepInverseScheduler``, see
:class:`~fastdiff.samplers.DPMSolverPPInverseSampler`); for rectified-flow models (SD3, Flux) the
velocity ODE's Euler steps from sigma 0 up to 1 (``sampler="flow_euler_inverse"``, see
:class:`~fastdiff.samplers.FlowMatchEulerInverseSampler`). The loop is :func:`fastdiff.sample`'s,
started at x = image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff._config_class import check_config_read, classes_of_keys, named_config
from fastdiff._prepare import _infer_shape, _model_param
from fastdiff.samplers import (
    DDIMInverseSampler,
    DPMSolverPPInverseSampler,
    FlowMatchEulerInverseSampler,
    Sampler,
)

__all__ = ["invert"]

_RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: sampler names ``invert`` runs, and the class each builds
INVERSE_SAMPLERS: dict[str, type[Sampler]] = {
    "ddim_inverse": DDIMInverseSampler,
    "dpm++_inverse": DPMSolverPPInverseSampler,
    "flow_euler_inverse": FlowMatchEulerInverseSampler,
}
_OBJECTS = " / ".join(cls.__name__ for cls in INVERSE_SAMPLERS.values())


def invert(
    model: Callable[..., Any],
    image: Tensor,
    steps: int | None = None,
    *,
    sampler: str | Sampler | None = None,
    schedule: Any = None,
    cond: Tensor | Mapping[str, Any] | None = None,
    uncond: Tensor | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    callback: Callable[[int, int, Tensor], Any] | None = None,
    return_trajectory: bool = False,
    cuda_graph: bool = False,
    **sampler_options: Any,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Invert ``image`` to its noise x_T with deterministic DDIM run upwards (DDIM inversion;
    DPM-Solver++ or flow-matching Euler with ``sampler=``).

    Step i calls the model at the upper timestep t_i on x at the lower level s_i and moves x up
    (DDIM eq. 12 with eta = 0 read from s to t; ab = alpha_bar, ab_s = 1 at the image)::

        x0      = (x_s - sqrt(1 - ab_s) eps(x_s, t)) / sqrt(ab_s)
        x_t     = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps(x_s, t)

    matching diffusers' ``DDIMInverseScheduler`` loop step for step. Sampling the result with
    ``sampler="ddim"``, ``eta=0`` on the same schedule, steps and settings gives the image back
    up to the discretisation error of both runs (it falls as ``steps`` grows).

    Args:
        model: as for :func:`fastdiff.sample`: ``model(x, t, **kwargs)``, the timesteps int64.
        image: x_0 in model space ``[N x C x ...]`` (images in [-1, 1], or a VAE's scaled
            latents), floating point; its dtype and device follow the model's parameters, as
            ``noise`` does in :func:`fastdiff.sample`. Not modified.
        steps: inversion steps (1 .. num_train_timesteps; default 50, or the sampler object's).
        sampler: ``"ddim_inverse"`` or a :class:`~fastdiff.samplers.DDIMInverseSampler` (its own
            schedule, steps and options); ``"dpm++_inverse"`` (or a
            :class:`~fastdiff.samplers.DPMSolverPPInverseSampler`): multistep DPM-Solver++
            (orders 1 - 3) from the image's noise level at t = 0 up, the model called at the
            lower level of each step, step for step diffusers'
            ``DPMSolverMultistepInverseScheduler``, which ``sample(noise=x_T, sampler="dpm++")``
            with the same settings undoes (second order: a closer round trip than DDIM's at
            the same steps); ``"flow_euler_inverse"`` (or a
            :class:`~fastdiff.samplers.FlowMatchEulerInverseSampler`) for rectified-flow models:
            Euler steps of dx / dsigma = v from sigma 0 up on ``"flow_euler"``'s grid (the
            model called at the lower sigma of each step, ``timestep = sigma T``), which
            ``sample(noise=x_T, sampler="flow_euler")`` with the same grid options undoes;
            ``schedule`` None or a ``FlowMatchEulerDiscreteScheduler`` (its shift settings).
            None (default): ``"dpm++_inverse"`` when ``schedule`` is a
            ``DPMSolverMultistepInverseScheduler`` (or its config), ``"flow_euler_inverse"``
            for a ``FlowMatchEulerDiscreteScheduler`` (or its config), else ``"ddim_inverse"``
            (a config without ``_class_name``: its class told from its keys, as for
            :func:`fastdiff.sample`; one of no class whose keys ``"ddim_inverse"`` does not
            read is a ValueError).
        schedule: the model's training schedule, as for :func:`fastdiff.sample` (a name, a
            :class:`~fastdiff.NoiseSchedule`, or a diffusers scheduler / config: a
            ``DDIMInverseScheduler``, or the pipeline's own ``DDIMScheduler``, whose
            ``prediction_type``, ``timestep_spacing``, ``steps_offset``, ``clip_sample``,
            ``set_alpha_to_one`` it then uses, as ``DDIMInverseScheduler.from_config`` would;
            a ``DPMSolverMultistepInverseScheduler`` or the pipeline's
            ``DPMSolverMultistepScheduler`` for ``"dpm++_inverse"``, as DiffEdit builds it).
        cond, uncond, guidance_scale, model_kwargs: conditioning and classifier-free guidance,
            as for :func:`fastdiff.sample` (``eps = eps_u + w (eps_c - eps_u)``; editing
            methods usually invert with w = 1 or no guidance).
        progress, callback, return_trajectory, cuda_graph: as for :func:`fastdiff.sample`:
            the trajectory's ``"x"`` runs from the image (first) to x_T (last), its
            ``"timesteps"`` ascend.
        **sampler_options: :class:`~fastdiff.samplers.DDIMInverseSampler`'s options:
            ``prediction_type``, ``timestep_spacing`` (``"leading"`` / ``"trailing"``),
            ``steps_offset``, ``clip_sample``, ``clip_sample_range``, ``set_alpha_to_one``,
            ``prev_timestep``; ``"dpm++_inverse"``: ``prediction_type``, ``timestep_spacing``
            (``"linspace"`` / ``"leading"`` / ``"trailing"``), ``steps_offset``,
            ``solver_order``, ``solver_type``, ``lower_order_final``, ``euler_at_final``,
            ``lambda_min_clipped``, ``thresholding`` (with its ratio / max value),
            ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``;
            ``"flow_euler_inverse"``: ``"flow_euler"``'s grid options
            (``shift``, ``use_dynamic_shifting`` with ``mu`` / ``image_seq_len``, ``sigmas``,
            ...), not ``stochastic_sampling`` nor ``strength``.

    Returns:
        x_T ``[N x C x ...]`` (and the trajectory dict with ``return_trajectory``).
    """
    from fastdiff.api import sample

    _check_image(model, image)
    if sampler is None:
        sampler = _default_sampler(schedule)
    if isinstance(sampler, str):
        if sampler.lower() not in INVERSE_SAMPLERS:
            raise ValueError(
                f"sampler: expected one of {sorted(INVERSE_SAMPLERS)} or a {_OBJECTS} object, "
                f"got {sampler!r}"
            )
        _check_options(INVERSE_SAMPLERS[sampler.lower()], sampler_options)
    elif isinstance(sampler, tuple(INVERSE_SAMPLERS.values())):
        _check_options(type(sampler), sampler_options)  # sample() refuses the valid ones
    else:
        raise TypeError(
            f"sampler: expected one of {sorted(INVERSE_SAMPLERS)} or a {_OBJECTS} object, got "
            f"{type(sampler).__name__}"
        )
    return sample(
        model,
        steps,
        sampler=sampler,
        schedule=schedule,
        noise=image,
        cond=cond,
        uncond=uncond,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        progress=progress,
        callback=callback,
        return_trajectory=return_trajectory,
        cuda_graph=cuda_graph,
        **sampler_options,
    )


def _default_sampler(schedule: Any) -> str:
    """``"dpm++_inverse"`` for diffusers' ``DPMSolverMultistepInverseScheduler`` passed as
    ``schedule``, ``"flow_euler_inverse"`` for a ``FlowMatchEulerDiscreteScheduler``: the
    object, its saved config (``_class_name``) or its ``.config`` / a dict of it (no class
    name: the class its keys tell, as for :func:`fastdiff.sample`; keys of no class: for the
    DPM-Solver++ inverse :func:`_is_dpm_inverse_config`); else ``"ddim_inverse"`` (keys of
    several classes, e.g. ``KDPM2DiscreteScheduler``'s, none of them an inverse one, too). A
    config of no class with keys ``"ddim_inverse"`` does not read (``{"use_karras_sigmas":
    True, "final_sigmas_type": ...}``) is a ValueError, as under ``sample(sampler=None)``."""
    schedule = named_config(schedule, None)
    cfg = getattr(schedule, "config", schedule)
    if not isinstance(cfg, Mapping):
        return "ddim_inverse"
    cls = cfg.get("_class_name")
    if not isinstance(cls, str):
        cls = type(schedule).__name__ if hasattr(schedule, "config") else None
    if cls is None and not classes_of_keys(cfg) and _is_dpm_inverse_config(cfg):
        cls = "DPMSolverMultistepInverseScheduler"
    if cls == "DPMSolverMultistepInverseScheduler":
        return "dpm++_inverse"
    if cls == "FlowMatchEulerDiscreteScheduler":
        return "flow_euler_inverse"
    check_config_read(schedule, "ddim_inverse", "invert(sampler=None)")
    return "ddim_inverse"


def _is_dpm_inverse_config(cfg: Mapping[str, Any]) -> bool:
    """A config without ``_class_name`` (``scheduler.config``, ``dict(scheduler.config)``) is a
    ``DPMSolverMultistepInverseScheduler``'s when every key is one of that class's parameters
    and some key is not ``DDIMInverseScheduler``'s (``solver_order``, ...). A forward
    ``DPMSolverMultistepScheduler``'s config has keys the inverse lacks (``final_sigmas_type``):
    ``"ddim_inverse"``, as for the object."""
    try:
        from diffusers import DDIMInverseScheduler, DPMSolverMultistepInverseScheduler
    except ImportError:
        return False
    keys = {k for k in cfg if isinstance(k, str) and not k.startswith("_")}
    inv = set(inspect.signature(DPMSolverMultistepInverseScheduler.__init__).parameters)
    ddim = set(inspect.signature(DDIMInverseScheduler.__init__).parameters)
    return keys <= inv and not keys <= ddim


def _check_image(model: Any, image: Any) -> None:
    """A floating ``[N x C x ...]`` tensor whose channels (and rank) fit the model's config."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(
            f"image: expected a floating-point tensor in model space (e.g. images in [-1, 1]: "
            f"x.float() / 127.5 - 1), got dtype {image.dtype}"
        )
    param = _model_param(model)
    if (param is None or not param.is_floating_point()) and image.dtype not in _RUN_DTYPES:
        raise TypeError(
            f"image: expected torch.float32, torch.float16 or torch.bfloat16 (a model without "
            f"floating parameters runs in the image's dtype), got {image.dtype}; use image.float()"
        )
    if image.ndim < 2 or image.numel() == 0:
        raise ValueError(
            f"image: expected a non-empty batch [N x C x ...], got shape {tuple(image.shape)}"
        )
    want = _infer_shape(model)  # (C, H, W) from config.sample_size / in_channels
    if want is not None and (image.ndim != len(want) + 1 or image.shape[1] != want[0]):
        raise ValueError(
            f"image: expected a {len(want) + 1}-D batch [N x C x ...] with C = {want[0]} (the "
            f"model's in_channels), got shape {tuple(image.shape)}"
            + (" (a single image? use image[None])" if image.ndim == len(want) else "")
        )


def _check_options(cls: type[Sampler], options: Mapping[str, Any]) -> None:
    """Options the inverse sampler does not take (``eta``, ``noise``, a forward sampler's
    ``thresholding``, ...): a TypeError naming them and the valid ones."""
    params = inspect.signature(cls.__init__).parameters
    valid = sorted(k for k in params if k not in ("self", "schedule", "steps"))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"invert: unknown option(s) {unknown} for {cls.__name__}; its options are {valid}"
        )
