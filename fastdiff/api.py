"""``fastdiff.sample``: the drop-in sampling loop, and ``fastdiff.to_images``.

    >>> x = fastdiff.sample(unet, steps=50)                              # doctest: +SKIP
    >>> imgs = fastdiff.to_images(x)          # uint8 [N x H x W x C]    # doctest: +SKIP

Every step is one model call and one fused sampler-op call. Per-step scalars come from the
sampler's device-resident coefficient table, so the loop never synchronises with the device;
with ``cuda_graph=True`` the whole step (model + update) is captured once and replayed.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiff.samplers import SAMPLERS, DPMSolverPPSampler, Sampler, make_sampler
from fastdiff.samplers.base import check_model_output, randn_like_with
from fastdiff.schedules import NoiseSchedule

__all__ = ["sample", "to_images", "to_pil"]

Generator = torch.Generator | Sequence[torch.Generator]


# ---------------------------------------------------------------------------------- helpers
def _cfg_get(model: Any, name: str) -> Any:
    """``model.config.<name>`` / ``model.config[name]``, else ``model.<name>``, else None."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        v = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if v is not None:
            return v
    v = getattr(model, name, None)
    return None if callable(v) else v


def _model_param(model: Any) -> Tensor | None:
    params = getattr(model, "parameters", None)
    if params is None or not callable(params):
        return None
    try:
        return next(iter(params()))
    except (StopIteration, TypeError):
        return None


def _infer_shape(model: Any) -> tuple[int, ...] | None:
    size = _cfg_get(model, "sample_size")
    if size is None:
        size = _cfg_get(model, "image_size")
    ch = _cfg_get(model, "in_channels")
    if size is None or ch is None:
        return None
    if isinstance(size, int):
        return (int(ch), size, size)
    return (int(ch), *(int(s) for s in size))


def _unwrap(out: Any) -> Tensor:
    """The prediction from a model's return value: a tensor, ``.sample``, or a tuple's first."""
    if isinstance(out, Tensor):
        return out
    s = getattr(out, "sample", None)
    if isinstance(s, Tensor):
        return s
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        "model: expected the model to return a tensor, an object with .sample or a tuple, "
        f"got {type(out).__name__}"
    )


def _cond_key(model: Any) -> str:
    """Keyword a tensor ``cond`` is passed as: encoder_hidden_states or class_labels."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule: the model
    if type(model).__name__ in ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel"):
        return "encoder_hidden_states"
    fwd = getattr(model, "forward", model)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return "class_labels"
    if "class_labels" in params:
        return "class_labels"
    if "encoder_hidden_states" in params:
        return "encoder_hidden_states"
    return "class_labels"


def _null_cond(model: Any, key: str, like: Tensor, n: int) -> Tensor | None:
    null = getattr(model, "null_cond", None)
    if isinstance(null, Tensor):
        null = null.to(device=like.device, dtype=like.dtype)
        return null.expand(n, *null.shape[1:]) if null.shape[0] == 1 else null
    null_class = getattr(model, "null_class", None)
    if key == "class_labels" and null_class is not None:
        return torch.full((n,), int(null_class), dtype=like.dtype, device=like.device)
    return None


def _batched(name: str, v: Any, n: int, device: torch.device) -> Any:
    """A conditioning value with batch n: ints/scalars broadcast, batch-1 tensors expand."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = torch.full((n,), v, device=device)
    if isinstance(v, Tensor):
        v = v.to(device)
        if v.ndim == 0:
            v = v.reshape(1)
        if v.shape[0] == 1 and n > 1:
            v = v.expand(n, *v.shape[1:])
        if v.shape[0] != n:
            raise ValueError(f"{name}: expected batch {n} (or 1), got shape {tuple(v.shape)}")
    return v


def _batched_tree(name: str, v: Any, n: int, device: torch.device) -> Any:
    """:func:`_batched` on a value, and on the tensors inside a dict value (e.g. diffusers'
    ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``); other nested values as given."""
    if isinstance(v, Mapping):
        return {k: _batched_tree(f"{name}[{k!r}]", x, n, device) if isinstance(x, (Tensor, Mapping))
                else x for k, x in v.items()}  # fmt: skip
    return _batched(name, v, n, device)


def _uncond_cond(name: str, u: Any, c: Any) -> Any:
    """One kwarg of the batched guidance call: ``[uncond, cond]`` along the batch, into dicts."""
    if isinstance(c, Tensor):
        if not isinstance(u, Tensor) or u.shape[1:] != c.shape[1:]:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(
                f"uncond: {name} must match cond's per-sample shape {tuple(c.shape[1:])} "
                f"(one batched model call over [uncond, cond]), got {got}"
            )
        return torch.cat([u.to(c.dtype), c])  # [uncond, cond]
    if isinstance(c, Mapping):
        if not isinstance(u, Mapping) or set(u) != set(c):
            got = sorted(u) if isinstance(u, Mapping) else type(u).__name__
            raise ValueError(f"uncond: {name} must have cond's keys {sorted(c)}, got {got}")
        return {k: _uncond_cond(f"{name}[{k!r}]", u[k], x) for k, x in c.items()}
    return c


def _doubled(v: Any, n: int) -> Any:
    """A model kwarg with batch n, repeated for the batched ``[uncond, cond]`` call (also the
    tensors inside a dict value)."""
    if isinstance(v, Tensor) and v.ndim and v.shape[0] == n:
        return torch.cat([v, v])
    if isinstance(v, Mapping):
        return {k: _doubled(x, n) for k, x in v.items()}
    return v


def _as_kwargs(name: str, v: Any, key: str, n: int, device: torch.device) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {k: _batched_tree(f"{name}[{k!r}]", x, n, device) for k, x in v.items()}
    if isinstance(v, (Tensor, int)) and not isinstance(v, bool):
        return {key: _batched(name, v, n, device)}
    raise TypeError(f"{name}: expected a tensor or a dict of model kwargs, got {type(v).__name__}")


def _resolve_schedule(model: Any, schedule: Any) -> NoiseSchedule:
    if schedule is None:
        own = getattr(model, "schedule", None)
        return own if isinstance(own, NoiseSchedule) else NoiseSchedule("linear")
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, str):  # "linear", "scaled_linear", "cosine"
        return NoiseSchedule(schedule)
    if hasattr(schedule, "config") or isinstance(schedule, Mapping):
        return NoiseSchedule.from_diffusers(schedule)
    raise TypeError(
        "schedule: expected a fastdiff.NoiseSchedule, a schedule name ('linear', "
        f"'scaled_linear', 'cosine') or a diffusers scheduler/config, got {type(schedule).__name__}"
    )


def _scheduler_options(schedule: Any, name: str) -> dict[str, Any]:
    """The sampling settings of a diffusers scheduler (or config) passed as ``schedule`` that
    sampler ``name`` takes: ``prediction_type``, ``timestep_spacing``, ``steps_offset``,
    ``clip_sample``, ``thresholding``, ``set_alpha_to_one``, ``variance_type``, ... A scheduler
    object's values that are its class defaults (diffusers' ``_use_default_values``) are
    skipped: fastdiff's samplers have diffusers' defaults for their own type, and a DDPM
    default must not override a DDIM one. ``None`` values are skipped."""
    if isinstance(schedule, (NoiseSchedule, str)) or schedule is None:
        return {}
    cfg = getattr(schedule, "config", schedule)
    if not isinstance(cfg, Mapping):
        return {}
    params = inspect.signature(SAMPLERS[name].__init__).parameters
    defaults = set(cfg.get("_use_default_values", ()))
    return {
        k: v
        for k, v in cfg.items()
        if k in params and k not in ("self", "schedule", "steps", "eta")
        and k not in defaults and v is not None
    }  # fmt: skip


# The diffusers scheduler each sampler reproduces, and the settings of that scheduler that change
# its method (not its betas) which the sampler does not implement: {key: neutral value}. A
# non-neutral one there would be silently dropped, the samples no longer diffusers'.
_SCHEDULER_OF = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
_SIGMAS_NEUTRAL = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False}  # fmt: skip
_UNSUPPORTED_SETTINGS: dict[str, dict[str, Any]] = {
    "dpm++": {
        **_SIGMAS_NEUTRAL,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "lambda_min_clipped": -float("inf"),
    },
    "euler": {
        **_SIGMAS_NEUTRAL,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },  # sigma_min / sigma_max: only read by the Karras / exponential / beta sigmas above
}


def _check_scheduler_settings(schedule: Any, name: str) -> None:
    """``schedule`` is the sampler's own diffusers scheduler (or its saved config) with a
    setting the sampler cannot reproduce (Karras sigmas, another solver order, ...): a
    ValueError naming it, instead of samples that silently differ from diffusers'."""
    if isinstance(schedule, (NoiseSchedule, str)) or schedule is None:
        return
    cfg = getattr(schedule, "config", schedule)
    if not isinstance(cfg, Mapping):
        return
    cls = cfg.get("_class_name") if isinstance(cfg.get("_class_name"), str) else None
    name = next(k for k in _SCHEDULER_OF if SAMPLERS[k] is SAMPLERS[name])  # "dpm-solver++"
    if (cls or type(schedule).__name__) != _SCHEDULER_OF[name]:
        return
    takes = inspect.signature(SAMPLERS[name].__init__).parameters  # a setting it gains is fine
    bad = {
        k: cfg[k]
        for k, neutral in _UNSUPPORTED_SETTINGS.get(name, {}).items()
        if k in cfg and k not in takes and cfg[k] != neutral
    }
    if bad:
        setting = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ValueError(
            f"schedule: {_SCHEDULER_OF[name]} sets {setting}, which fastdiff's {name!r} sampler "
            "does not implement (its samples would differ from diffusers'); use the "
            "scheduler's default for it, or run diffusers' own loop"
        )


def _check_sampler_options(name: str, opts: Mapping[str, Any]) -> None:
    """Unknown sampler options are a TypeError naming them and the valid ones."""
    params = inspect.signature(SAMPLERS[name].__init__).parameters
    valid = sorted(k for k, p in params.items() if k not in ("self", "schedule", "steps")
                   and p.kind is not p.VAR_KEYWORD)  # fmt: skip
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TypeError(
            f"sample: unknown option(s) {unknown} for sampler {name!r}; its options are {valid}"
        )


def _resolve_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} asked for CUDA, but torch.cuda.is_available() is False (a CPU "
            f"build of torch {torch.__version__}, or no GPU visible)"
        )
    return dev


def _num_class_labels(model: Any) -> int | None:
    """How many class labels the model's embedding takes (its null class included), if known."""
    null_class = getattr(model, "null_class", None)
    if isinstance(getattr(model, "num_classes", None), int) and isinstance(null_class, int):
        return null_class + 1  # fastdiff UNet: labels 0..num_classes-1 and the null class
    cfg = getattr(model, "config", None)  # diffusers: config only (the attribute is deprecated)
    n = cfg.get("num_class_embeds") if isinstance(cfg, Mapping) else None
    return n if isinstance(n, int) else None


def _check_class_labels(model: Any, kwargs: Mapping[str, Any]) -> None:
    """Labels outside the model's class embedding give a ValueError before sampling (one check
    on the host before the loop, instead of an IndexError deep inside the first model call)."""
    labels = kwargs.get("class_labels")
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model
    # diffusers UNets without a class embedding ignore class_labels without a word:
    # conditioning (and guidance over it) would silently do nothing
    if labels is not None and getattr(inner, "class_embedding", 0) is None:
        raise ValueError(
            f"cond: class labels given, but this {type(inner).__name__} has no class "
            "embedding (config num_class_embeds / class_embed_type are None) and would "
            "ignore them; pass the conditioning the model takes, e.g. encoder_hidden_states"
        )
    n = _num_class_labels(model)
    if n is None or not isinstance(labels, Tensor) or labels.is_floating_point():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"cond: class label {bad} is outside the model's {n} class embeddings (0..{n - 1}"
            + (", the last one the null class)" if hasattr(model, "null_class") else ")")
        )


def _guidance(w: Any) -> float:
    """``guidance_scale`` as a finite float, checked before anything runs (a NaN or a string
    failed only inside the first sampler step, after a model call)."""
    is_num = isinstance(w, (int, float)) or (isinstance(w, Tensor) and w.numel() == 1)
    if isinstance(w, bool) or not is_num or (isinstance(w, Tensor) and w.is_complex()):
        got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else repr(w)
        raise TypeError(f"guidance_scale: expected a real number, got {got}")
    w = float(w)
    if not math.isfinite(w):
        raise ValueError(f"guidance_scale: expected a finite number, got {w}")
    return w


def _check_generator(generator: Any, n: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != n:
            raise ValueError(
                f"generator: a list of generators needs one per sample (batch {n}), "
                f"got {len(generator)}"
            )
        return
    raise TypeError(
        f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}"
    )


# --------------------------------------------------------------------------------- the loop
@torch.no_grad()
def sample(
    model: Callable[..., Any],
    steps: int | None = None,
    *,
    sampler: str | Sampler = "ddim",
    schedule: NoiseSchedule | Any | None = None,
    batch_size: int | None = None,
    shape: Sequence[int] | None = None,
    generator: Generator | None = None,
    noise: Tensor | None = None,
    eta: float | None = None,
    cond: Tensor | Mapping[str, Any] | None = None,
    uncond: Tensor | Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
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
            int64 tensor on the model's device, returning a tensor, an object with ``.sample``
            (diffusers) or a tuple.
        steps: number of sampling steps (default 50; 1 .. num_train_timesteps).
        sampler: ``"ddim"`` (default), ``"ddpm"``, ``"dpm++"``, ``"euler"``, or a sampler object
            from :mod:`fastdiff.samplers` (its own steps and schedule are used).
        schedule: the training noise schedule. Default: ``model.schedule`` when it is a
            :class:`~fastdiff.NoiseSchedule`, else linear DDPM; a diffusers scheduler (or its
            config) is converted with :meth:`NoiseSchedule.from_diffusers`, and the settings it
            sets that the sampler takes (``prediction_type``, ``timestep_spacing``,
            ``steps_offset``, ``clip_sample``, ``set_alpha_to_one``, ...) become the sampler's
            defaults (``sampler_options`` win).
        batch_size: number of samples (default: from ``noise``, a generator list, or 1).
        shape: per-sample shape, e.g. ``(3, 64, 64)``; inferred from diffusers'
            ``config.sample_size`` / ``in_channels`` or a fastdiff UNet's attributes.
        generator: a ``torch.Generator``, or a list with one per sample (then sample k of a
            batch equals the single-sample run with generator k).
        noise: x_T ``[N x ...]`` (batch size, shape, dtype and device follow it by default).
        eta: DDIM's stochasticity (``"ddim"`` only).
        cond, uncond: conditioning, a dict of model kwargs or a tensor passed as
            ``class_labels`` (class-conditional models, diffusers ``UNet2DModel``) or
            ``encoder_hidden_states`` (``UNet2DConditionModel``). ``uncond`` defaults to the
            model's ``null_cond`` / ``null_class`` when it has one.
        guidance_scale: classifier-free guidance (Ho & Salimans 2022, eq. 6 with
            w = 1 + w_paper, the diffusers convention): ``eps = eps_u + w (eps_c - eps_u)``;
            w = 1 is the plain conditional model; one batched model call over
            ``[uncond, cond]``, the combine fused into the sampler op.
        model_kwargs: extra kwargs for every model call.
        dtype, device: of x (default: the model's parameters, else ``noise``, else fp32 / CPU).
        progress: show a tqdm progress bar.
        callback: ``callback(i, t, x)`` after each step (x = the new sample).
        return_trajectory: also return ``{"timesteps", "x", "x0"}``: x_t before the first step
            and after each step ``[steps + 1 x N x ...]``, and the x0 prediction of every step
            ``[steps x N x ...]`` (on the sample's device).
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
            ``noise`` was channels_last); ``callback`` sees x in the sampling layout.
        **sampler_options: passed to the sampler, e.g. ``prediction_type``,
            ``timestep_spacing``, ``clip_sample``, ``variance_type``, ``thresholding``. With
            ``guidance_scale`` != 1 the DDIM sampler defaults to ``use_clipped_model_output=True``
            (eps re-derived from the clipped x0); pass it explicitly to override.

    Returns:
        The samples in model space ``[N x ...]`` (see :func:`to_images`), and the trajectory
        dict with ``return_trajectory``.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
    if isinstance(getattr(model, "unet", None), torch.nn.Module) and hasattr(model, "scheduler"):
        raise TypeError(
            f"model: got a {type(model).__name__} (a diffusers pipeline); pass its UNet and "
            "scheduler: fastdiff.sample(pipe.unet, schedule=pipe.scheduler, ...)"
        )
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(
            f"channels_last: expected True, False or None, got {type(channels_last).__name__}"
        )
    if guidance_scale is not None:
        guidance_scale = _guidance(guidance_scale)
    param = _model_param(model)

    # ---- sampler and schedule
    if isinstance(sampler, Sampler):
        if steps is not None and steps != sampler.steps:
            raise ValueError(
                f"steps: got {steps} but the sampler object was built for {sampler.steps}"
            )
        if sampler_options or eta is not None or schedule is not None:
            extra = sorted([*sampler_options, *(["eta"] if eta is not None else []),
                            *(["schedule"] if schedule is not None else [])])  # fmt: skip
            raise ValueError(
                f"sampler: options {extra} cannot be applied to a sampler object; "
                "build the sampler with them"
            )
        smp = sampler
    elif isinstance(sampler, str):
        if sampler.lower() not in SAMPLERS:
            raise ValueError(
                f"sampler: expected 'ddim', 'ddpm', 'dpm++', 'euler' or a fastdiff sampler object, "
                f"got {sampler!r}"
            )
        sched = _resolve_schedule(model, schedule)
        n_steps = 50 if steps is None else steps
        if isinstance(n_steps, bool) or not isinstance(n_steps, int):
            raise TypeError(f"steps: expected an int, got {type(n_steps).__name__}")
        if not 1 <= n_steps <= sched.num_train_timesteps:
            raise ValueError(
                f"steps: expected 1 <= steps <= num_train_timesteps = "
                f"{sched.num_train_timesteps}, got {n_steps}"
            )
        name = sampler.lower()
        # a diffusers scheduler's own settings (e.g. prediction_type="v_prediction") are the
        # defaults; options passed here win
        _check_scheduler_settings(schedule, name)
        opts = {**_scheduler_options(schedule, name), **sampler_options}
        if eta is not None:
            if SAMPLERS[name] is not SAMPLERS["ddim"]:
                raise ValueError(f"eta: only the 'ddim' sampler takes eta, got sampler={sampler!r}")
            opts["eta"] = eta
        if "prediction_type" not in opts:
            pt = _cfg_get(model, "prediction_type")
            if isinstance(pt, str):
                opts["prediction_type"] = pt
        if (
            SAMPLERS[name] is SAMPLERS["ddim"]
            and guidance_scale not in (None, 1, 1.0)
            and "use_clipped_model_output" not in opts
        ):
            # Under guidance the combined eps drives x0 far outside the clip range; stepping with
            # the clipped x0 but the unclipped eps then smears noise into the sample (measured on
            # the digits model: 12.5% recognised at w=3 vs 100% with this). Re-derive eps from
            # the clipped x0 unless the caller chose otherwise.
            opts["use_clipped_model_output"] = True
        if name == "ddpm" and "variance_type" not in opts and _learned_variance(model):
            opts["variance_type"] = "learned_range"
        _check_sampler_options(name, opts)
        smp = make_sampler(name, sched, n_steps, **opts)
    else:
        raise TypeError(
            "sampler: expected a name ('ddim', 'ddpm', 'dpm++', 'euler') or a fastdiff sampler "
            f"object, got {type(sampler).__name__}"
        )

    # ---- device, dtype, batch, shape
    if noise is not None and not isinstance(noise, Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if device is None:
        device = (
            param.device if param is not None else (noise.device if noise is not None else "cpu")
        )
    device = _resolve_device(device)
    if dtype is None:
        if param is not None and param.is_floating_point():
            dtype = param.dtype
        else:
            dtype = noise.dtype if noise is not None else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    if (
        param is not None
        and param.is_floating_point()
        and param.dtype != dtype
        and not torch.is_autocast_enabled(device.type)
    ):
        raise ValueError(
            f"dtype: samples in {dtype} but the model's parameters are {param.dtype}; convert the "
            f"model (e.g. model.to({dtype})), run under torch.autocast, or leave dtype=None"
        )
    if noise is not None:
        if noise.ndim < 1:
            raise ValueError("noise: expected x_T of shape [N x ...]")
        if batch_size is not None and batch_size != noise.shape[0]:
            raise ValueError(f"batch_size: {batch_size} != noise batch {noise.shape[0]}")
        if shape is not None and tuple(shape) != tuple(noise.shape[1:]):
            raise ValueError(
                f"shape: {tuple(shape)} != noise per-sample shape {tuple(noise.shape[1:])}"
            )
        batch_size, shape = noise.shape[0], tuple(noise.shape[1:])
    if batch_size is None:
        if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
            batch_size = len(generator)
        else:
            batch_size = 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if shape is None:
        shape = _infer_shape(model)
        if shape is None:
            raise ValueError(
                "shape: not given and cannot be inferred from the model (no config.sample_size /"
                " in_channels); pass the per-sample shape, e.g. shape=(3, 64, 64), or noise=x_T"
            )
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape: expected positive sizes, got {shape}")
    _check_generator(generator, batch_size)
    n = batch_size
    full = (n, *shape)

    # ---- conditioning
    key = _cond_key(model)
    kwargs: dict[str, Any] = {}
    if model_kwargs is not None:
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs: expected a dict, got {type(model_kwargs).__name__}")
        kwargs.update(model_kwargs)
    cond_kw = _as_kwargs("cond", cond, key, n, device)
    if guidance_scale is not None:
        if cond is None:
            raise ValueError(
                "guidance_scale: classifier-free guidance needs cond= (the conditioning to guide "
                "towards); got cond=None"
            )
        if uncond is None:
            like = next(iter(cond_kw.values())) if len(cond_kw) == 1 else None
            null = None
            if isinstance(like, Tensor):
                null = _null_cond(model, next(iter(cond_kw)), like, n)
            if null is None:
                raise ValueError(
                    "uncond: guidance_scale needs the unconditional input; pass uncond= (the model "
                    "has no null_cond / null_class attribute)"
                )
            unc_kw = {next(iter(cond_kw)): null}
        else:
            unc_kw = _as_kwargs("uncond", uncond, key, n, device)
        if set(unc_kw) != set(cond_kw):
            raise ValueError(
                f"uncond: expected the same kwargs as cond {sorted(cond_kw)}, got {sorted(unc_kw)}"
            )
        for k in cond_kw:
            kwargs[k] = _uncond_cond(repr(k), unc_kw[k], cond_kw[k])
        for k, v in list(kwargs.items()):
            if k not in cond_kw:
                kwargs[k] = _doubled(v, n)
    else:
        if uncond is not None:
            raise ValueError("uncond: only used with guidance_scale; got guidance_scale=None")
        kwargs.update(cond_kw)
    _check_class_labels(model, kwargs)
    ehs = kwargs.get("encoder_hidden_states")
    if isinstance(ehs, Tensor) and ehs.is_floating_point():
        kwargs["encoder_hidden_states"] = ehs.to(device=device, dtype=dtype)  # the model's dtype

    # ---- x_T
    if noise is not None:
        x = noise.to(device=device, dtype=dtype)
    else:
        x = randn_like_with(torch.empty(full, device=device, dtype=dtype), generator)
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            f"cuda_graph: CUDA graphs need CUDA tensors, but sampling runs on {device}; "
            "use cuda_graph=False on CPU"
        )
    fmt = torch.preserve_format
    if _use_channels_last(channels_last, model, device, x):  # after every check: it writes
        fmt = torch.contiguous_format if x.is_contiguous() else torch.preserve_format
        if isinstance(model, torch.nn.Module):
            # in place and kept: putting the original tensors back after each call cost 28% of
            # a 10-step digits run on CPU (fresh converted weights in every call; measured)
            _model_to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)

    loop = _sample_graphed if cuda_graph else _sample_eager
    training = _switch_to_eval(model)
    try:
        res = loop(model, smp, x, kwargs, guidance_scale, generator, progress, callback,
                   return_trajectory)  # fmt: skip
    finally:
        for m in training:
            m.training = True  # only those that were (not m.train(): it recurses)
    if fmt is torch.preserve_format:
        return res
    if return_trajectory:  # back to x_T's (contiguous) layout
        out, traj = res
        return out.contiguous(), {k: v.contiguous() for k, v in traj.items()}
    return res.contiguous()


def _switch_to_eval(model: Any) -> list[torch.nn.Module]:
    """Put an ``nn.Module`` model's submodules that are in training mode into eval mode (no
    dropout: a model sampled mid-training, or ``UNet.from_preset`` with ``dropout > 0``);
    returns them, so the caller restores their mode afterwards."""
    if not isinstance(model, torch.nn.Module):
        return []
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    return training


def _use_channels_last(
    channels_last: bool | None, model: Any, device: torch.device, x: Tensor
) -> bool:
    if x.ndim != 4:
        return False
    if channels_last is None:
        from fastdiff.models.unet import UNet

        if device.type != "cpu" or not isinstance(model, torch.nn.Module):
            return False
        return isinstance(model, UNet) or _weights_channels_last(model)
    return channels_last


def _weights_channels_last(model: torch.nn.Module) -> bool:
    """Its first conv weight whose layout is unambiguous (more than one input channel and
    tap) is channels_last, e.g. after ``fastdiff.optimize`` on CPU."""
    fmt = torch.channels_last
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=fmt) and not p.is_contiguous()
    return False


def _model_to_channels_last(model: torch.nn.Module) -> None:
    """``model.to(memory_format=torch.channels_last)`` unless its 4-D weights already are.

    ``.to`` restrides every 4-D tensor, also those whose layout is ambiguous (1x1 convs,
    1-input-channel convs), which ``.contiguous(memory_format=...)`` would leave as they are:
    a 1x1 conv weight with NCHW strides makes oneDNN return an NCHW output, and the next
    channels_last op copies it (5 activation copies per digits forward, 15-20% of a step)."""
    fmt = torch.channels_last
    if any(p.ndim == 4 and not p.is_contiguous(memory_format=fmt) for p in model.parameters()):
        model.to(memory_format=fmt)


def _learned_variance(model: Any) -> bool:
    lv = getattr(model, "learned_variance", None)
    if isinstance(lv, bool):
        return lv
    out_c, in_c = _cfg_get(model, "out_channels"), _cfg_get(model, "in_channels")
    return isinstance(out_c, int) and isinstance(in_c, int) and out_c == 2 * in_c


def _prepare_output(out: Tensor, x: Tensor, smp: Sampler, gs: float | None, model: Any) -> Tensor:
    """Check the model output's shape; drop learned-variance channels for samplers without it."""
    lv = bool(getattr(smp, "learned_variance", False))
    if (
        not lv
        and x.ndim > 1
        and out.ndim == x.ndim
        and out.shape[1] == 2 * x.shape[1]
        and _learned_variance(model)
    ):
        out = out[:, : x.shape[1]]  # the variance channels only matter to DDPM learned_range
    check_model_output(out, x, gs, lv)
    return out


def _progress(it, enabled: bool, total: int):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total)


def _sample_eager(model, smp, x, kwargs, gs, generator, progress, callback, return_trajectory):
    n = x.shape[0]
    dev = x.device
    rows = 2 * n if gs is not None else n
    t_all = smp.timesteps_on(dev)[:, None].expand(smp.steps, rows).contiguous()  # [steps x B]
    ts_host = smp.timesteps.tolist()
    smp.reset()
    gen_state = _philox_state(smp, generator, dev)
    skw = {"generator_state": gen_state} if gen_state is not None else {}
    traj_x, traj_x0 = ([x], []) if return_trajectory else (None, None)
    for i in _progress(range(smp.steps), progress, smp.steps):
        x_in = torch.cat([x, x]) if gs is not None else x
        out = _prepare_output(_unwrap(model(x_in, t_all[i], **kwargs)), x, smp, gs, model)
        noise = None
        if smp.needs_noise(i) and gen_state is None:
            noise = randn_like_with(x, generator)
        res = smp.step(
            out, i, x, noise=noise, guidance_scale=gs, return_x0=return_trajectory, **skw
        )
        if return_trajectory:
            x, x0 = res
            traj_x.append(x)
            traj_x0.append(x0)
        else:
            x = res
        if callback is not None:
            callback(i, ts_host[i], x)
    if return_trajectory:
        return x, _trajectory(smp, traj_x, traj_x0)
    return x


def _philox_state(smp: Sampler, generator: Any, device: torch.device) -> Tensor | None:
    """int64 ``[2]`` = (seed, 0) on ``device`` for in-kernel Philox noise, when the sampler adds
    noise and no generator was given (the seed comes from torch's default CPU generator, so
    ``torch.manual_seed`` makes runs reproducible; no device sync)."""
    if generator is not None or not any(smp.needs_noise(i) for i in range(smp.steps)):
        return None
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def _trajectory(smp: Sampler, xs: list[Tensor], x0s: list[Tensor]) -> dict[str, Tensor]:
    return {"timesteps": smp.timesteps, "x": torch.stack(xs), "x0": torch.stack(x0s)}


# ------------------------------------------------------------------------------ CUDA graphs
# model -> {graph key: _StepGraph, "params": _param_signature(model) the graphs were captured on}
_GRAPHS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _param_signature(model: Any) -> tuple:
    """Where the model's weights live: a captured graph reads them at these addresses, so a
    ``model.to(...)`` that reallocates them (dtype, device, memory format) must recapture."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def _kw_signature(kwargs: Mapping[str, Any]) -> tuple:
    """The graph-cache key of the model kwargs: tensors (also inside dicts) by shape, dtype and
    device (their values are copied into the capture's buffers), other values by repr."""
    sig = []
    for k in sorted(kwargs, key=repr):
        v = kwargs[k]
        if isinstance(v, Tensor):
            sig.append((k, "T", tuple(v.shape), v.dtype, str(v.device)))
        elif isinstance(v, Mapping):
            sig.append((k, "D", _kw_signature(v)))
        else:
            sig.append((k, "V", repr(v)))
    return tuple(sig)


def _clone_tree(v: Any) -> Any:
    """Static copies of the tensors of a kwarg value (into dicts); other values as they are."""
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, Mapping):
        return {k: _clone_tree(x) for k, x in v.items()}
    return v


def _copy_tree(dst: Any, src: Any) -> None:
    """Refresh the static tensors ``dst`` (from :func:`_clone_tree`) with ``src``'s values."""
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, Mapping):
        for k, x in dst.items():
            _copy_tree(x, src[k])


class _StepGraph:
    """One captured step: ``out = model(x, t, **kw)``, fused update, ``x <- x_prev`` in place.

    Static device buffers: x (the state), t, coef (the sampler's row for the step), noise,
    the DPM-Solver history x0_prev (read by the update, then overwritten at the end of the
    graph with the new x0, so a replay never reads a buffer it has already overwritten), and
    the tensor kwargs (conditioning), all refreshed with device copies before each replay.
    """

    def __init__(
        self, model, smp: Sampler, x: Tensor, kwargs, gs, t_row: Tensor, gen_state: Tensor | None
    ) -> None:
        self.model, self.gs = model, gs
        self.multistep = isinstance(smp, DPMSolverPPSampler)
        self.x = x.clone()
        self.t = t_row.clone()
        self.coef = smp.coef_table(x.device)[0].clone()
        self.has_noise = any(smp.needs_noise(i) for i in range(smp.steps))
        self.i_cap = next((i for i in range(smp.steps) if smp.needs_noise(i)), 0)
        self.gen_state = gen_state.clone() if gen_state is not None else None
        self.noise = torch.zeros_like(x) if self.has_noise and gen_state is None else None
        self.x0_prev = torch.zeros_like(x) if self.multistep else None
        self.kwargs = _clone_tree(dict(kwargs))
        self.smp = smp
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up: cuDNN / Triton autotuning happens outside capture
                self._body()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x0 = self._body()
        self.model = None  # the graph holds what it needs; let the cache's weak key die

    def _body(self) -> Tensor:
        smp, gs = self.smp, self.gs
        x_in = torch.cat([self.x, self.x]) if gs is not None else self.x
        out = _prepare_output(_unwrap(self.model(x_in, self.t, **self.kwargs)), self.x, smp, gs,
                              self.model)  # fmt: skip
        if self.multistep:
            x_new, x0 = smp.step(out, 0, self.x, coef=self.coef, x0_prev=self.x0_prev,
                                 guidance_scale=gs, return_x0=True)  # fmt: skip
            self.x0_prev.copy_(x0)
        else:
            skw = {"generator_state": self.gen_state} if self.gen_state is not None else {}
            x_new, x0 = smp.step(out, self.i_cap, self.x, noise=self.noise, coef=self.coef,
                                 guidance_scale=gs, return_x0=True, **skw)  # fmt: skip
        self.x.copy_(x_new)
        return x0

    def load(self, x: Tensor, kwargs, gen_state: Tensor | None) -> None:
        self.x.copy_(x)
        if gen_state is not None:
            self.gen_state.copy_(gen_state)
        if self.x0_prev is not None:
            self.x0_prev.zero_()
        _copy_tree(self.kwargs, kwargs)

    def replay(self, smp: Sampler, i: int, t_row: Tensor, noise: Tensor | None) -> None:
        self.coef.copy_(smp.coef_table(self.x.device)[i])
        self.t.copy_(t_row)
        if noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()


def _sample_graphed(model, smp, x, kwargs, gs, generator, progress, callback, return_trajectory):
    n = x.shape[0]
    rows = 2 * n if gs is not None else n
    t_all = smp.timesteps_on(x.device)[:, None].expand(smp.steps, rows).contiguous()
    gen_state = _philox_state(smp, generator, x.device)
    key = (
        gen_state is not None,
        smp.__class__.__name__,
        tuple(sorted(smp.config().items())),
        tuple(x.shape),
        x.dtype,
        str(x.device),
        gs,
        _kw_signature(kwargs),
    )
    try:
        per_model = _GRAPHS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: cache on nothing, capture every call
        per_model = {}
    params = _param_signature(model)
    if per_model.get("params", params) != params:
        per_model.clear()  # the weights moved (model.to(...), a new layout): the graphs read them
    per_model["params"] = params
    g = per_model.get(key)
    if g is None:
        g = _StepGraph(model, smp, x, kwargs, gs, t_all[0], gen_state)
        per_model[key] = g
    g.smp = smp
    g.load(x, kwargs, gen_state)
    ts_host = smp.timesteps.tolist()
    traj_x, traj_x0 = ([x.clone()], []) if return_trajectory else (None, None)
    for i in _progress(range(smp.steps), progress, smp.steps):
        noise = None
        if smp.needs_noise(i) and gen_state is None:
            noise = randn_like_with(x, generator)
        g.replay(smp, i, t_all[i], noise)
        if return_trajectory:
            traj_x.append(g.x.clone())
            traj_x0.append(g.x0.clone())
        if callback is not None:  # its own copy: the next replay overwrites the static g.x
            callback(i, ts_host[i], g.x.clone())
    out = g.x.clone()
    if return_trajectory:
        return out, {
            "timesteps": smp.timesteps,
            "x": torch.stack(traj_x),
            "x0": torch.stack(traj_x0),
        }
    return out


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
