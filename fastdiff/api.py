"""``fastdiff.sample``: the drop-in sampling loop, and ``fastdiff.to_images``.

    >>> x = fastdiff.sample(unet, steps=50)                              # doctest: +SKIP
    >>> imgs = fastdiff.to_images(x)          # uint8 [N x H x W x C]    # doctest: +SKIP

Every step is one model call and one fused sampler-op call. Per-step scalars come from the
sampler's device-resident coefficient table, so the loop never synchronises with the device;
with ``cuda_graph=True`` the whole step (model + update) is captured once and replayed.

``sample`` is the outline; its parts live in small private modules: :mod:`fastdiff._sampler_setup`
(schedule, sampler, a diffusers scheduler's settings), :mod:`fastdiff._prepare` (model, device,
dtype, shape, memory layout), :mod:`fastdiff._conditioning` (model calls, ``cond`` / ``uncond``
and the ``[uncond, cond]`` batch of guidance), :mod:`fastdiff._loop` (the reverse process) and
:mod:`fastdiff._graph` (the same loop as CUDA-graph replays).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiff._conditioning import _guidance, _guidance_rescale, model_kwargs_for
from fastdiff._graph import _param_signature as _param_signature  # re-exported (tests)
from fastdiff._graph import _StepGraph as _StepGraph  # re-exported (tests patch it here)
from fastdiff._graph import sample_graphed
from fastdiff._img2img import check_image, check_strength, img2img_sampler, noised_image
from fastdiff._inpaint import DEFAULT_STRENGTH, Inpaint, check_mask
from fastdiff._loop import _sample_eager
from fastdiff._prepare import (
    _model_param,
    check_model,
    contiguous_result,
    diffusers_timestep_options,
    eval_mode,
    resolve_x,
    to_sampling_layout,
)
from fastdiff._prepare import _weights_channels_last as _weights_channels_last  # (tests)
from fastdiff._sampler_setup import _scheduler_options as _scheduler_options  # (tests)
from fastdiff._sampler_setup import resolve_sampler
from fastdiff.samplers import Sampler
from fastdiff.samplers.base import randn_like_with
from fastdiff.schedules import NoiseSchedule

__all__ = ["sample", "to_images", "to_pil"]

Generator = torch.Generator | Sequence[torch.Generator]


@torch.no_grad()
def sample(
    model: Callable[..., Any],
    steps: int | None = None,
    *,
    sampler: str | Sampler | None = None,
    schedule: NoiseSchedule | Any | None = None,
    batch_size: int | None = None,
    shape: Sequence[int] | None = None,
    generator: Generator | None = None,
    noise: Tensor | None = None,
    image: Tensor | None = None,
    mask: Tensor | None = None,
    strength: float | None = None,
    eta: float | None = None,
    cond: Tensor | Mapping[str, Any] | None = None,
    uncond: Tensor | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callable[[int, int, Tensor], Any] | None = None,
    return_trajectory: bool = False,
    cuda_graph: bool = False,
    channels_last: bool | None = None,
    **sampler_options: Any,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Draw samples from a diffusion model: x_T ~ N(0, I), then ``steps`` reverse steps.

    Runs under ``torch.no_grad()``, as diffusers' pipelines do: without it a model whose
    parameters require grad would record an autograd graph through every step (memory growing
    with the steps, the fused kernels bypassed for autograd) for samples nothing can backprop.
    An ``nn.Module`` model in training mode runs in eval mode (no dropout) and gets its modes
    back afterwards.

    Args:
        model: any callable ``model(x, t, **kwargs)`` with x ``[N x ...]`` and t an ``(N,)``
            int64 tensor (float32 for ``"flow_euler"``, the EDM samplers, ``"cosine_dpm++"``,
            ``"cm"`` and ``"ipndm"``) on the
            model's device, returning a tensor, an object with ``.sample`` (diffusers) or a
            tuple.
        steps: number of sampling steps (1 .. num_train_timesteps; default 50, 4 for ``"lcm"``
            as diffusers' LatentConsistencyModelPipeline, 1 for ``"cm"`` as its
            ConsistencyModelPipeline; with a custom grid its length: the ``timesteps=`` of dpm++
            / euler / heun / ddpm / lcm / tcd / cm, the ``sigmas=`` of flow
            samplers, euler's ``sigmas=`` minus one, as diffusers' ``set_timesteps``).
        sampler: ``"ddim"``, ``"ddpm"``, ``"deis"``, ``"dpm++"``, ``"dpm++_single"``,
            ``"dpm++_sde"`` ("DPM++ SDE": 2 steps - 1 model calls), ``"euler"``, ``"euler_a"``,
            ``"heun"``, ``"dpm2"``, ``"dpm2_a"``, ``"pndm"`` (alias ``"plms"``), ``"lms"``,
            ``"sa_solver"``, ``"unipc"``, ``"lcm"``, ``"tcd"``, ``"flow_euler"`` /
            ``"flow_heun"`` (rectified-flow models: ``schedule`` None or a diffusers FlowMatch
            scheduler), ``"edm_euler"`` /
            ``"edm_dpm++"`` (EDM models: ``schedule`` None or an ``EDMEulerScheduler`` /
            ``EDMDPMSolverMultistepScheduler``; the model sees c_in x at c_noise, x_T is scaled
            to diffusers' init_noise_sigma z), ``"cosine_dpm++"`` (Stable Audio's EDM model:
            ``schedule`` None or a ``CosineDPMSolverMultistepScheduler``), ``"cm"`` (alias
            ``"consistency"``: consistency models, ``schedule`` None or a
            ``CMStochasticIterativeScheduler``), ``"ipndm"`` (iPNDM for v-prediction models of
            continuous time t in [0, 1]: ``schedule`` None or an ``IPNDMScheduler``), the
            inverse samplers ``"ddim_inverse"`` / ``"dpm++_inverse"`` / ``"flow_euler_inverse"``
            (x_0 -> x_T, ``noise`` is the image; :func:`fastdiff.invert` is their entry),
            or a sampler object from :mod:`fastdiff.samplers` (its own steps and schedule are
            used). Default:
            the sampler that reproduces ``schedule``'s diffusers scheduler class
            (``DPMSolverMultistepScheduler`` -> ``"dpm++"`` with its Karras / SDE settings,
            ``UniPCMultistepScheduler`` -> ``"unipc"``, ``PNDMScheduler`` -> ``"pndm"``, ...),
            else ``"ddim"`` (a diffusers scheduler class without a fastdiff sampler, e.g.
            ``UnCLIPScheduler``, warns).
        schedule: the training noise schedule. Default: ``model.schedule`` when it is a
            :class:`~fastdiff.NoiseSchedule` or a schedule name, else linear DDPM; a diffusers
            scheduler (or its config) is converted with :meth:`NoiseSchedule.from_diffusers`,
            and the settings it sets that the sampler takes (``prediction_type``,
            ``timestep_spacing``, ``steps_offset``, ``clip_sample``, ``set_alpha_to_one``, ...)
            become the sampler's defaults (``sampler_options`` win).
        batch_size: number of samples (default: from ``noise``, a generator list, or 1).
        shape: per-sample shape, e.g. ``(3, 64, 64)``; inferred from diffusers'
            ``config.sample_size`` / ``in_channels`` or a fastdiff UNet's attributes.
        generator: a ``torch.Generator``, or a list with one per sample (then sample k of a
            batch equals the single-sample run with generator k).
        noise: the N(0, I) draw z ``[N x ...]`` of x_T (batch size, shape, dtype and device
            follow it by default); x_T = ``sampler.init_noise_scale`` z, as diffusers'
            pipelines start from ``init_noise_sigma`` z (1 for VP samplers; Euler-family
            samplers under linspace / trailing spacing sigma_0 / sqrt(sigma_0^2 + 1)); with
            ``image``, the noise added to the image (as diffusers' img2img pipelines).
        image: img2img / SDEdit (Meng et al. 2022, arXiv:2108.01073): x_0 ``[N x ...]`` in model
            space (latents for a latent model), noised to the sampler's state at model call s
            (:meth:`~fastdiff.samplers.Sampler.add_noise`: sqrt(ab) x_0 + sqrt(1 - ab) z on
            its own grid, (1 - sigma) x_0 + sigma z for flow samplers, ...) with ``noise`` or
            a draw as x_T's; the calls s .. end then run, as diffusers' img2img pipelines
            (``get_timesteps``, ``set_begin_index``, ``add_noise`` / ``scale_noise``). Batch
            size, shape, dtype and device follow it as they follow ``noise``.
        mask: inpainting with an ordinary model (needs ``image``): ``[N or 1 x 1 or C x ...]``
            broadcastable to the image, floating, values in [0, 1]: 1 = repaint, 0 = keep
            (diffusers' white = repaint; soft values blend). After every model call the kept
            region is replaced by the image noised to the next call's level with the start's
            noise, ``x = (1 - mask) add_noise(image, z, i + 1) + mask x``, and by the image
            after the last call (RePaint's replacement, Lugmayr et al. 2022, Sec. 3; diffusers'
            inpaint pipelines with a 4-channel UNet); default ``strength`` 1.0, a start from
            pure noise (x_T as without an image). The callback and the trajectory's x rows see
            the blended samples. Checked before anything runs (one host read of a CUDA mask).
        strength: img2img strength in (0, 1] (default with ``image``: 0.8, 0.6 for
            ``"flow_euler"`` / ``"flow_heun"`` as the SD3 / Flux pipelines): the fraction of
            the grid that runs, s = (N - min(int(N strength), N)) x calls per step (Heun,
            DPM2, flow Heun: 2; flow Heun rounds as SD3's pipeline, int(N - N strength)); an
            error when no step remains. ``"lcm"``, ``"tcd"`` and ``"flow_euler"`` take it as
            their grid's option (diffusers' ``set_timesteps(strength=...)`` / SD3's
            shortened sigmas: their whole shortened grid runs, also without ``image``);
            other samplers refuse it without ``image``.
        eta: DDIM's stochasticity (``"ddim"``), TCD's gamma (``"tcd"``; default 0.3 as
            diffusers' ``TCDScheduler.step``) or k-diffusion's ancestral eta (``"dpm++_sde"``;
            default 1, diffusers' only value); other samplers refuse it.
        cond, uncond: conditioning, a dict of model kwargs or a tensor passed as
            ``class_labels`` (class-conditional models, diffusers ``UNet2DModel``) or
            ``encoder_hidden_states`` (``UNet2DConditionModel``). ``uncond`` defaults to the
            model's ``null_cond`` / ``null_class`` when it has one.
        guidance_scale: classifier-free guidance (Ho & Salimans 2022, eq. 6 with
            w = 1 + w_paper, the diffusers convention): ``eps = eps_u + w (eps_c - eps_u)``;
            w = 1 is the plain conditional model; one batched model call over
            ``[uncond, cond]``, the combine fused into the sampler op.
        guidance_rescale: phi of Lin et al. 2023 (arXiv:2305.08891, Sec. 3.4; diffusers'
            pipelines' ``guidance_rescale``, e.g. 0.7 for zero-terminal-SNR v-prediction
            models): the guided output is rescaled to the conditional output's per-sample
            standard deviation, blended by phi. 0 (default) is plain guidance; > 0 needs
            ``guidance_scale`` and combines the halves before the op (a few more kernels).
        model_kwargs: extra kwargs for every model call.
        dtype, device: of x (default: the model's parameters, else ``noise``, else fp32 / CPU).
        progress: show a tqdm progress bar.
        callback: ``callback(i, t, x)`` after each step (x = the new sample); i counts the run's
            model calls from 0 (img2img: as diffusers' pipelines enumerate the sliced
            timesteps), t is that call's timestep.
        return_trajectory: also return ``{"timesteps", "x", "x0"}``: x_t before the first step
            and after each step ``[steps + 1 x N x ...]``, and the x0 prediction of every step
            ``[steps x N x ...]`` (on the sample's device); for an img2img run from call s,
            the timesteps of the calls run (``timesteps[s:]``), x_s (the noised image) and
            the ``steps - s`` steps' results.
        cuda_graph: capture one whole step (model call + update) as a CUDA graph, once per
            (model, sampler structure, shape, dtype, device, conditioning), and replay it; the
            per-step scalars, timesteps and noise are copied into static device buffers before
            each replay. CUDA only.
        channels_last: run the model on x in ``torch.channels_last`` (4-D samples), converting an
            ``nn.Module`` model's weights in place, as ``fastdiff.optimize(model,
            channels_last=True)`` does (their memory layout only: values, Parameter objects and
            ``state_dict`` keys are unchanged; the ``state_dict`` tensors are then channels_last, so
            ``safetensors.torch.save_file`` wants ``{k: v.contiguous()}``, which fastdiff's own
            savers do). ``None`` (default) means ``True`` on CPU for a fastdiff
            :class:`~fastdiff.models.UNet` and for a model whose conv weights are already
            channels_last (``fastdiff.optimize`` on CPU), where oneDNN's convolutions are faster in
            that layout, else ``False``. The returned samples are in x_T's layout (contiguous unless
            ``noise`` or ``image`` was channels_last); ``callback`` sees x in the sampling
            layout.
        **sampler_options: passed to the sampler, e.g. ``prediction_type``,
            ``timestep_spacing``, ``clip_sample``, ``variance_type``, ``thresholding``. With
            ``guidance_scale`` != 1 the DDIM sampler defaults to ``use_clipped_model_output=True``
            (eps re-derived from the clipped x0); pass it explicitly to override. The
            Euler-family samplers (euler, euler_a, heun, dpm2, dpm2_a, lms) call a diffusers
            model (``ModelMixin``) at diffusers' float32 timesteps, fractional under
            ``linspace`` spacing and on sigma grids, as its pipelines do, and any other model
            at those rounded to int64: ``fractional_timesteps=True`` / ``False`` overrides.

    Returns:
        The samples in model space ``[N x ...]`` (see :func:`to_images`), and the trajectory
        dict with ``return_trajectory``.
    """
    check_model(model, channels_last)
    _check_flags(callback, cuda_graph, progress, return_trajectory)
    if guidance_scale is not None:
        guidance_scale = _guidance(guidance_scale)
    strength = check_strength(strength)
    if image is not None:
        check_image(image, noise, batch_size, shape)
    if mask is not None:
        check_mask(mask, image)

    # the sampler: timesteps and per-step coefficients, on the model's noise schedule; an
    # img2img run starts at its model call `start`
    smp = resolve_sampler(model, sampler, steps, schedule, eta, guidance_scale, sampler_options)
    opts = diffusers_timestep_options(model, sampler, smp, sampler_options)
    if opts is not sampler_options:  # a diffusers model: diffusers' fractional timesteps
        sampler_options = opts
        smp = resolve_sampler(model, sampler, steps, schedule, eta, guidance_scale, opts)
    if mask is not None and getattr(smp, "no_inpaint", None):
        raise ValueError(f"mask: {smp.no_inpaint}")
    if mask is not None and smp.inverts:
        raise ValueError(
            f"mask: {type(smp).__name__} runs x_0 -> x_T (an inversion); inpainting needs a "
            "sampler of the reverse process"
        )
    if mask is not None and strength is None:  # diffusers' inpainting default: pure noise
        given = isinstance(sampler, Sampler) and smp.strength_option
        strength = smp.strength if given else DEFAULT_STRENGTH
    smp, start = img2img_sampler(
        smp, isinstance(sampler, Sampler), image, strength,
        lambda opts: resolve_sampler(model, sampler, steps, schedule, eta, guidance_scale,
                                     {**sampler_options, **opts}),
    )  # fmt: skip
    if smp.inverts and noise is None:
        raise ValueError(
            f"noise: {type(smp).__name__} runs the ODE upwards, image x_0 -> noise x_T; pass "
            "the image as noise= or call fastdiff.invert(model, image, ...) (without it, it "
            "would invert a random draw)"
        )
    rescale = _guidance_rescale(guidance_rescale, guidance_scale, smp)

    # x_T's device, dtype and shape [N x ...], and the model kwargs of every call: with
    # guidance, one batched call over [uncond, cond]
    if image is not None and noise is None and _model_param(model) is None:
        device = image.device if device is None else device  # as noise's would
        if dtype is None and image.dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = image.dtype
    if image is not None:
        batch_size, shape = image.shape[0], tuple(image.shape[1:])
    device, dtype, full = resolve_x(model, noise, device, dtype, batch_size, shape, generator)
    n = full[0]
    kwargs = model_kwargs_for(model, cond, uncond, guidance_scale, model_kwargs, n, device, dtype)

    # inpainting at strength 1 starts from pure noise (diffusers' is_strength_max), and its
    # blend reuses the start's noise z
    pure = image is None or (mask is not None and strength == 1.0)
    z = None
    if noise is not None:
        z = noise.to(device=device, dtype=dtype)
    elif mask is not None or image is None:
        z = randn_like_with(torch.empty(full, device=device, dtype=dtype), generator)
    if not pure:  # img2img: x_s = the image noised to call start's state
        x = noised_image(smp, image, z, start, device, dtype, generator)
    else:  # x_T ~ N(0, I)
        x = z
    # diffusers' pipelines start from x_T = init_noise_sigma z: init_noise_scale z in the
    # sampler's units (one scale of the N(0, I) draw, or of the noise given): sigma_0 /
    # sqrt(sigma_0^2 + 1) for Euler-family samplers under linspace / trailing spacing, the EDM
    # samplers keep x in model-input units
    x_scale = smp.init_noise_scale
    if x_scale != 1.0 and pure:
        x = x * x_scale
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph: CUDA graphs need CUDA tensors, but sampling runs on {device}; "
            "use cuda_graph=False on CPU"
        )
    # after every check: channels_last converts the model's weights in place
    x, back_to_contiguous = to_sampling_layout(x, model, channels_last, device)
    inpaint = None if mask is None else Inpaint(smp, image, mask, z, x)

    # the reverse process x_T -> x_0, in eval mode: eager, or replays of a captured step
    loop = _sample_graphed if cuda_graph else _sample_eager
    with eval_mode(model):
        res = loop(model, smp, x, kwargs, guidance_scale, generator, progress, callback,
                   return_trajectory, rescale, start=start, inpaint=inpaint)  # fmt: skip
    return contiguous_result(res, return_trajectory) if back_to_contiguous else res


def _check_flags(callback: Any, cuda_graph: Any, progress: Any, return_trajectory: Any) -> None:
    """Up front, before any work: a bad callback would fail only at the first step."""
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback: expected a callable(i, t, x) or None, got {type(callback).__name__}"
        )
    for name, v in (("cuda_graph", cuda_graph), ("progress", progress),
                    ("return_trajectory", return_trajectory)):  # fmt: skip
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")


# CUDA graphs captured by sample(cuda_graph=True): model -> {key: _StepGraph, "params": ...}
_GRAPHS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _sample_graphed(model, smp, x, kwargs, gs, generator, progress, callback, return_trajectory,
                    rescale=0.0, start=0, inpaint=None):  # fmt: skip
    """:func:`fastdiff._graph.sample_graphed` with this module's capture cache."""
    return sample_graphed(_GRAPHS, model, smp, x, kwargs, gs, generator, progress, callback,
                          return_trajectory, rescale, start, inpaint)  # fmt: skip


# ----------------------------------------------------------------------------------- images
def to_images(x: Tensor) -> Tensor:
    """Samples in model space ([-1, 1]) -> uint8 images ``[N x H x W x C]`` (CPU).

    ``(x / 2 + 0.5).clamp(0, 1) * 255``, rounded, channels last (as diffusers' pipelines).
    Accepts ``[N x C x H x W]`` or a single ``[C x H x W]``; NaN becomes 0 (black).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"x: expected floating samples in model space [-1, 1], got dtype {x.dtype} (already "
            "images?)"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"x: expected [N x C x H x W] or [C x H x W], got shape {tuple(x.shape)}")
    img = ((x.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().cpu()


def to_pil(x: Tensor) -> list[Any]:
    """Samples in model space -> a list of ``PIL.Image`` (needs Pillow)."""
    from PIL import Image

    imgs = to_images(x).numpy()
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in imgs]
