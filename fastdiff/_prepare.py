"""Preparing a ``fastdiff.sample`` run: the model, and where and what x_T is.

* the model: a callable (not a diffusers pipeline), run in eval mode during sampling;
* x_T: its device, dtype, batch size and per-sample shape, from the arguments, ``noise``, the
  model's parameters and config;
* the memory layout: channels_last for the model's convolutions where that is faster (oneDNN
  on CPU), the samples handed back in x_T's layout.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fastdiff._conditioning import _cfg_get


# ------------------------------------------------------------------------------- the model
def check_model(model: Any, channels_last: Any) -> None:
    """A callable model (a diffusers pipeline is not one: its UNet is) and a bool or None
    ``channels_last``."""
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


def is_diffusers_model(model: Any) -> bool:
    """Whether ``model`` is a diffusers ``ModelMixin`` (a UNet / transformer; also under
    ``torch.compile``), without importing diffusers."""
    mod = sys.modules.get("diffusers")
    mixin = getattr(mod, "ModelMixin", None)
    model = getattr(model, "_orig_mod", model)
    return isinstance(mixin, type) and isinstance(model, mixin)


def diffusers_timestep_options(model: Any, sampler: Any, smp: Any, options: dict) -> dict:
    """``options`` plus ``fractional_timesteps=True`` where diffusers' pipelines call a model at
    fractional timesteps and ``model`` is a diffusers model, so ``sample`` gives their result
    (Euler / Heun / DPM2 / LMS under ``linspace`` spacing or on a sigma grid); ``options``
    unchanged when the user chose (the option given, or a ``Sampler`` instance passed)."""
    if "fractional_timesteps" in options or not isinstance(sampler, (str, type(None))):
        return options
    if "fractional_timesteps" not in inspect.signature(type(smp).__init__).parameters:
        return options
    if not is_diffusers_model(model):
        return options
    return {**options, "fractional_timesteps": True}


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put an ``nn.Module`` model's submodules that are in training mode into eval mode (no
    dropout: a model sampled mid-training, or ``UNet.from_preset`` with ``dropout > 0``), and
    give them their training mode back afterwards."""
    training = []
    if isinstance(model, torch.nn.Module):
        training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True  # only those that were (not m.train(): it recurses)


def _model_param(model: Any) -> Tensor | None:
    params = getattr(model, "parameters", None)
    if params is None or not callable(params):
        return None
    try:
        return next(iter(params()))
    except (StopIteration, TypeError):
        return None


def _as_batch_size(batch_size: Any) -> int:
    """An int >= 1 (numpy integers too); bool and non-integers are a ValueError."""
    if not isinstance(batch_size, bool):
        try:
            n = operator.index(batch_size)
        except TypeError:
            n = 0
        if n >= 1:
            return n
    raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


def _as_shape(shape: Any) -> tuple[int, ...]:
    """A per-sample shape as a tuple of ints (numpy integers too; not floats or bools)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(
            f"shape: expected the per-sample shape as a sequence of ints, e.g. (3, 64, 64), got "
            f"{type(shape).__name__} {shape!r}"
        )
    out = []
    for s in shape:
        try:
            out.append(operator.index(s) if not isinstance(s, bool) else None)
        except TypeError:
            out.append(None)
    if None in out:
        raise TypeError(f"shape: expected a sequence of ints, e.g. (3, 64, 64), got {shape!r}")
    return tuple(out)


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


# ------------------------------------------------------------------------------------- x_T
def resolve_x(
    model: Any,
    noise: Tensor | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    batch_size: int | None,
    shape: Sequence[int] | None,
    generator: Any,
) -> tuple[torch.device, torch.dtype, tuple[int, ...]]:
    """x_T's device, dtype and shape ``(N, *shape)``: as given, else from ``noise``, the model's
    parameters and config; checked against each other and ``generator``."""
    param = _model_param(model)
    batch_size = None if batch_size is None else _as_batch_size(batch_size)
    shape = None if shape is None else _as_shape(shape)
    if noise is not None and not isinstance(noise, Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if device is None:
        device = (
            param.device if param is not None else (noise.device if noise is not None else "cpu")
        )
    device = _resolve_device(device)
    source = ""
    if dtype is None:
        if param is not None and param.is_floating_point():
            dtype = param.dtype
            source = " (the model's parameters; pass dtype= or convert the model)"
        else:
            dtype = noise.dtype if noise is not None else torch.float32
            source = " (noise's dtype; pass dtype=)" if noise is not None else ""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}{source}"
        )
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
            raise ValueError(
                f"noise: expected x_T of shape [N x ...], got shape {tuple(noise.shape)}"
            )
        if batch_size is not None and batch_size != noise.shape[0]:
            raise ValueError(
                f"batch_size: expected noise's batch {noise.shape[0]} (or None), got {batch_size}"
            )
        if shape is not None and tuple(shape) != tuple(noise.shape[1:]):
            raise ValueError(
                f"shape: expected noise's per-sample shape {tuple(noise.shape[1:])} (or None), "
                f"got {tuple(shape)}"
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
    shape = tuple(shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape: expected positive sizes, got {shape}")
    _check_generator(generator, batch_size)
    return device, dtype, (batch_size, *shape)


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


# ---------------------------------------------------------------------------- channels_last
def to_sampling_layout(
    x: Tensor, model: Any, channels_last: bool | None, device: torch.device
) -> tuple[Tensor, bool]:
    """x in the layout the model runs in, converting an ``nn.Module``'s weights in place for
    channels_last; and whether the samples go back to contiguous (x_T's layout) afterwards."""
    if not _use_channels_last(channels_last, model, device, x):
        return x, False
    back_to_contiguous = x.is_contiguous()
    if isinstance(model, torch.nn.Module):
        # in place and kept: putting the original tensors back after each call cost 28% of
        # a 10-step digits run on CPU (fresh converted weights in every call; measured)
        _model_to_channels_last(model)
    return x.contiguous(memory_format=torch.channels_last), back_to_contiguous


def contiguous_result(res: Any, return_trajectory: bool) -> Any:
    """The samples (and the trajectory's tensors) back in x_T's contiguous layout."""
    if return_trajectory:
        out, traj = res
        return out.contiguous(), {k: v.contiguous() for k, v in traj.items()}
    return res.contiguous()


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
    """:func:`channels_last_4d` (``model.to(memory_format=torch.channels_last)`` for the 4-D
    tensors) unless its 4-D weights already are channels_last.

    ``.to`` restrides every 4-D tensor, also those whose layout is ambiguous (1x1 convs,
    1-input-channel convs), which ``.contiguous(memory_format=...)`` would leave as they are:
    a 1x1 conv weight with NCHW strides makes oneDNN return an NCHW output, and the next
    channels_last op copies it (5 activation copies per digits forward, 15-20% of a step)."""
    fmt = torch.channels_last
    if any(p.ndim == 4 and not p.is_contiguous(memory_format=fmt) for p in model.parameters()):
        channels_last_4d(model)


def channels_last_4d(model: torch.nn.Module) -> None:
    """Convert ``model``'s 4-D parameters and buffers to ``torch.channels_last`` in place,
    restriding each as ``model.to(memory_format=torch.channels_last)`` does (``t.to``); the
    other ranks stay as they are, where ``model.to`` raises "required rank 4 tensor to use
    channels_last format" on a 5-D one (a Conv3d, e.g. UNet3DConditionModel's temporal convs)."""
    model._apply(_channels_last_4d)


def _channels_last_4d(t: Tensor) -> Tensor:
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t
