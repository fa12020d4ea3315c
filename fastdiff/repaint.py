"""``fastdiff.repaint``: RePaint inpainting (Lugmayr et al. 2022, arXiv:2201.09865) with an
ordinary unconditional DDPM, matching diffusers' ``RePaintPipeline`` step for step.

    >>> x = fastdiff.repaint(unet, image, mask, steps=250)     # doctest: +SKIP

**Mask convention: 1 = repaint (generate), 0 = keep the image**, as everywhere in fastdiff
(``fastdiff.sample(image=, mask=)``, diffusers' Stable Diffusion inpainting pipelines).
diffusers' ``RePaintPipeline`` / ``RePaintScheduler`` use the opposite (1 = keep): pass them
``1 - mask``.

The math (time list, coefficients) is :class:`~fastdiff.samplers.repaint.RePaintSampler`; this
module is the loop of Algorithm 1: per reverse step one model call, one fused ``sampler_step``
for the unknown part and three elementwise kernels for the known part and the blend; per
forward jump one ``sampler_step`` (as ``x' = c_x x + c_noise z``) per training step jumped.
Every coefficient is a row of a device-resident fp32 table computed on the host in float64
before the loop: no host sync inside it. With ``cuda_graph=True`` the reverse step is a replayed
CUDA graph (:mod:`fastdiff._repaint_graph`).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiff._conditioning import _guidance, _prepare_output, _unwrap, model_kwargs_for
from fastdiff._inpaint import check_mask
from fastdiff._prepare import _check_generator, _model_param, _resolve_device, eval_mode
from fastdiff._sampler_setup import _resolve_schedule, _scheduler_config
from fastdiff.api import _check_flags
from fastdiff.samplers.base import _ops, randn_like_with
from fastdiff.samplers.repaint import RePaintSampler

__all__ = ["repaint"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def repaint(
    model: Callable[..., Any],
    image: Tensor,
    mask: Tensor,
    steps: int = 250,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    eta: float = 0.0,
    schedule: Any = None,
    clip_sample: bool | None = None,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cond: Tensor | Mapping[str, Any] | None = None,
    uncond: Tensor | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    callback: Callable[[int, int, Tensor], Any] | None = None,
    return_trajectory: bool = False,
    cuda_graph: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Inpaint ``image`` where ``mask`` is 1 with RePaint (Algorithm 1 of Lugmayr et al. 2022).

    **mask: 1 = repaint, 0 = keep** (diffusers' RePaint: the opposite; it gets ``1 - mask``).

    Starting from x_T ~ N(0, I), for each entry t of the time list
    (:func:`~fastdiff.samplers.repaint.repaint_timesteps`), ab = alpha_bar, ab_prev that of the
    next level (1 after t = 0), z ~ N(0, I) fresh each time:

    * t below the previous entry, a reverse step (one model call eps = eps(x, t))::

          x0      = clip((x - sqrt(1 - ab) eps) / sqrt(ab))                (DDPM eq. 15)
          unknown = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z   (DDIM eq. 12)
          known   = sqrt(ab_prev) image + sqrt(1 - ab_prev) z               (RePaint eq. 8a)
          x       = mask * unknown + (1 - mask) * known                     (RePaint eq. 8c)

      with sigma = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)) (DDIM eq. 16);
    * t above it, a forward jump from the previous entry t' over the ``T // steps`` training
      steps s = t' .. t' + T // steps - 1: ``x = sqrt(1 - beta_s) x + sqrt(beta_s) z``
      (Algorithm 1 line 10, each with its own z).

    The last step has ab_prev = 1, so where mask is 0 the result is exactly the image.

    Noise is drawn in diffusers' order (x_T first, then one z per reverse step and one per
    jumped training step) with ``torch.randn`` on ``generator``'s device (the default
    generator when None), so with the same seeded generator the result equals diffusers'
    ``RePaintPipeline`` (up to rounding). A list of generators draws every z per sample.

    Args:
        model: ``model(x, t, **kwargs)`` predicting eps (or ``prediction_type``), t an int64
            ``(N,)`` tensor, as for :func:`fastdiff.sample`.
        image: x_0 ``[N x C x ...]`` in model space (images in [-1, 1]), floating.
        mask: floating, values in [0, 1] (1 = repaint, 0 = keep; a soft mask blends),
            broadcastable to ``image`` (e.g. ``[N or 1 x 1 x H x W]``), on image's device.
        steps: reverse levels (1 .. num_train_timesteps; default 250 as the paper); the model
            is called more often: see :attr:`RePaintSampler.model_calls`.
        jump_length: levels per resampling jump (the paper's j, default 10).
        jump_n_sample: passes over each jump (the paper's r, default 10; 1: no resampling).
        eta: DDIM's noise weight for the unknown part, in [0, 1] (diffusers' default 0).
        schedule: the training schedule, as for :func:`fastdiff.sample` (a name, a
            :class:`~fastdiff.NoiseSchedule`, a diffusers scheduler such as
            ``RePaintScheduler`` or its config; default: the model's, else ``"linear"``).
        clip_sample: clip x0 to [-1, 1]; None: the scheduler config's ``clip_sample``, else on.
        prediction_type: ``"epsilon"`` (diffusers' RePaint), ``"v_prediction"``, ``"sample"``.
        noise: x_T (default: drawn with ``generator``), image's shape.
        generator: a ``torch.Generator`` or one per sample.
        cond, uncond, guidance_scale, model_kwargs: conditioning and classifier-free guidance
            as for :func:`fastdiff.sample` (diffusers' RePaint has none).
        device, dtype: where and in which dtype to sample (default: the model's parameters',
            else image's); image and mask are converted.
        progress: a tqdm bar over the time list.
        callback: ``callback(i, t, x)`` after each entry i of the time list (a reverse step
            or a forward jump), t = ``timesteps[i]``, x = the new sample (after a reverse step
            the blended one), as :func:`fastdiff.sample`'s callback after each step.
        return_trajectory: also return ``{"timesteps", "x", "x0", "reverse"}``, as
            :func:`fastdiff.sample`'s trajectory with one row per entry of the time list (L
            entries): ``timesteps`` int64 ``[L]`` (the time list), ``x`` ``[L + 1 x N x ...]``
            (x_T, then the x the callback sees after each entry), ``x0`` ``[L x N x ...]`` (the
            x0 prediction of a reverse step, clipped with ``clip_sample``, as diffusers'
            ``pred_original_sample``; a forward jump calls no model and makes no prediction,
            so its row repeats the last reverse step's, the newest estimate of x0 at that
            point, never NaN) and ``reverse`` bool ``[L]`` (the reverse steps: ``x0[reverse]``
            are the model calls' predictions in order, one each). On the sampling device; the
            time list on the CPU.
        cuda_graph: capture the reverse step (model call, ``sampler_step``, known part and
            blend) as a CUDA graph, once per (model, shape, dtype, device, mask shape,
            conditioning), and replay it for every reverse step; the rows, timesteps and z are
            copied into static device buffers before each replay, the forward jumps run
            eagerly on the graph's state. The same noise draws as the eager loop (the same
            result up to kernel rounding). CUDA only.

    Returns:
        The inpainted x_0, image's shape, on ``device`` in ``dtype`` (and the trajectory dict
        with ``return_trajectory``).
    """
    _check_model(model)
    _check_flags(callback, cuda_graph, progress, return_trajectory)  # sample()'s checks
    _check_image(image)
    check_mask(mask, image)  # the same check (and messages) as sample(mask=)
    schedule_obj = _resolve_schedule(model, schedule)
    if clip_sample is None:
        cfg = _scheduler_config(schedule)
        clip_sample = bool(cfg.get("clip_sample", True)) if cfg is not None else True
    smp = RePaintSampler(
        schedule_obj,
        steps,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        eta=eta,
        clip_sample=clip_sample,
        prediction_type=prediction_type,
    )
    device, dtype = _device_dtype(model, image, device, dtype)
    n = image.shape[0]
    _check_generator(generator, n)
    if noise is not None:
        _check_noise(noise, image)
    gs = None if guidance_scale is None else _guidance(guidance_scale)
    kwargs = model_kwargs_for(model, cond, uncond, gs, model_kwargs, n, device, dtype)
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph: CUDA graphs need CUDA tensors, but sampling runs on {device}; "
            "use cuda_graph=False on CPU"
        )
    image = image.to(device=device, dtype=dtype)
    mask = mask.to(device=device, dtype=dtype)
    loop = _repaint_graphed if cuda_graph else _repaint_loop
    with eval_mode(model):
        return loop(model, smp, image, mask, noise, generator, kwargs, gs, progress, callback,
                    return_trajectory)  # fmt: skip


def _x_T(image: Tensor, noise: Tensor | None, generator: Any) -> Tensor:
    """x_T: ``noise`` (copied), else diffusers' first draw."""
    if noise is None:
        return randn_like_with(image, generator)
    return noise.to(device=image.device, dtype=image.dtype, copy=True)


def _repaint_graphed(model, smp, image, mask, noise, generator, kwargs, gs, progress, callback,
                     return_trajectory=False):  # fmt: skip
    """:func:`_repaint_loop` with each reverse step a CUDA-graph replay
    (:func:`fastdiff._repaint_graph.repaint_graphed`)."""
    from fastdiff._repaint_graph import repaint_graphed

    x = _x_T(image, noise, generator)
    return repaint_graphed(model, smp, image, mask, x, generator, kwargs, gs, progress, callback,
                           return_trajectory)  # fmt: skip


def _repaint_loop(model, smp, image, mask, noise, generator, kwargs, gs, progress, callback,
                  return_trajectory=False):  # fmt: skip
    """Algorithm 1's loop over the time list (see :func:`repaint`); no host sync inside."""
    ops = _ops()
    dev = image.device
    x = _x_T(image, noise, generator)
    step_tab, known_tab, undo_tab = smp.tables(dev)
    rows = 2 * image.shape[0] if gs is not None else image.shape[0]
    t_all = smp.timesteps.to(dev)[:, None].expand(-1, rows).contiguous()
    ts_host = smp.timesteps.tolist()
    clip = 1.0 if smp.clip_sample else None
    plan = smp.plan()
    entries = enumerate(plan)
    traj_x, traj_x0 = ([x], []) if return_trajectory else (None, None)
    x0 = None
    if progress:
        from tqdm.auto import tqdm

        entries = tqdm(entries, total=len(ts_host))
    for i, (reverse, k) in entries:
        if reverse:
            x_in = torch.cat([x, x]) if gs is not None else x
            out = _prepare_output(_unwrap(model(x_in, t_all[i], **kwargs)), x, smp, gs, model)
            z = randn_like_with(x, generator)
            res = ops.sampler_step(
                x,
                out,
                step_tab[k],
                prediction_type=smp.prediction_type,
                clip_range=clip,
                guidance_scale=gs,
                noise=z,
                return_x0=return_trajectory,
            )
            unknown, x0 = res if return_trajectory else (res, None)
            known = image * known_tab[k, 0]
            known.addcmul_(z, known_tab[k, 1])
            x = known.lerp_(unknown, mask)  # mask 1: the generated part
        else:
            for row in undo_tab[k]:
                z = randn_like_with(x, generator)
                x = ops.sampler_step(x, x, row, prediction_type="sample", noise=z)
            # a jump calls no model: its x0 row carries the last reverse step's prediction
        if return_trajectory:
            traj_x.append(x)
            traj_x0.append(x0)
        if callback is not None:
            callback(i, ts_host[i], x)
    if return_trajectory:
        reverse = torch.tensor([r for r, _ in plan], dtype=torch.bool)
        traj = {"timesteps": smp.timesteps.clone(), "x": torch.stack(traj_x),
                "x0": torch.stack(traj_x0), "reverse": reverse}  # fmt: skip
        return x, traj
    return x


def _check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")


def _check_image(image: Any) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(
            f"image: expected a floating-point tensor in model space (images in [-1, 1]), got "
            f"dtype {image.dtype}"
        )
    if image.ndim < 2 or image.numel() == 0:
        raise ValueError(
            f"image: expected a non-empty batch [N x C x ...], got shape {tuple(image.shape)}"
        )


def _check_noise(noise: Any, image: Tensor) -> None:
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating tensor, got dtype {noise.dtype}")
    if tuple(noise.shape) != tuple(image.shape):
        raise ValueError(
            f"noise: expected image's shape {tuple(image.shape)}, got {tuple(noise.shape)}"
        )


def _device_dtype(
    model: Any, image: Tensor, device: Any, dtype: Any
) -> tuple[torch.device, torch.dtype]:
    """Sampling device and dtype: as given, else the model's parameters', else image's."""
    param = _model_param(model)
    if device is None:
        device = param.device if param is not None else image.device
    device = _resolve_device(device)
    if dtype is None:
        floating = param is not None and param.is_floating_point()
        if not floating and image.dtype not in _DTYPES:  # name the image, not dtype=
            raise TypeError(
                "image: expected torch.float32, torch.float16 or torch.bfloat16 (a model without "
                f"floating parameters runs in the image's dtype), got {image.dtype}; use "
                "image.float() or pass dtype="
            )
        dtype = param.dtype if floating else image.dtype
    if dtype not in _DTYPES:
        raise TypeError(
            f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    return device, dtype


class _CallableModule(types.ModuleType):
    """This module's type. Importing it (``import fastdiff.repaint``, ``from fastdiff.repaint
    import repaint``) makes Python bind the package attribute ``fastdiff.repaint`` to the module,
    shadowing the lazily exported function of the same name; calling the module calls the
    function, so ``fastdiff.repaint(...)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return repaint(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(repaint)  # inspect.signature(fastdiff.repaint) either way
