"""``fastdiff.unoptimize``: undo :func:`fastdiff.optimize` on a diffusers model or pipeline.

    unet = fastdiff.optimize(unet)      # fused kernels
    ...
    unet = fastdiff.unoptimize(unet)    # diffusers' own modules and forwards again

Each patch ``optimize`` makes is reverted in place, at the same call sites: the swapped classes
(``FusedResnetBlock2D`` -> ``ResnetBlock2D``, ``FoldedUpsample2D`` -> ``Upsample2D``), the
attention processors (the one each ``Attention`` had, recorded by ``optimize``), the fused
GroupNorms (an ``nn.GroupNorm`` sharing the same parameter tensors again, and ``conv_act``
an ``nn.SiLU`` again), the grouped time projections, and the channels_last weights when
``optimize`` converted them. Parameters are the same tensors throughout (never copied), so
an optimizer or a state dict taken before still refers to the model's weights.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from fastdiff.nn.group_norm import GroupNormSiLU

__all__ = ["unoptimize"]


def _group_norm(fused: GroupNormSiLU) -> nn.GroupNorm:
    """An ``nn.GroupNorm`` sharing ``fused``'s parameters (the inverse of
    :meth:`GroupNormSiLU.from_group_norm`)."""
    w = fused.weight
    gn = nn.GroupNorm(
        fused.num_groups,
        fused.num_channels,
        fused.eps,
        fused.affine,
        device=w.device if w is not None else None,
        dtype=w.dtype if w is not None else None,
    )
    if fused.affine:
        gn.weight = fused.weight
        gn.bias = fused.bias
    gn.train(fused.training)
    _keep_hooks(fused, gn)
    return gn


def _keep_hooks(old: nn.Module, new: nn.Module) -> None:
    """Hooks registered on ``old`` (after ``optimize``) carry over to its replacement: the same
    hook dicts, so their handles still remove them."""
    for key, value in old.__dict__.items():
        if "hook" in key:  # _forward_hooks, _forward_pre_hooks, _backward_hooks, ... (+ flags)
            new.__dict__[key] = value


def _unfuse_norm(parent: nn.Module, attr: str, activation: str | None) -> bool:
    norm = getattr(parent, attr, None)
    if type(norm) is not GroupNormSiLU or norm.activation != activation:
        return False
    setattr(parent, attr, _group_norm(norm))
    return True


def _restore_out_norm(model: nn.Module) -> None:
    """``conv_norm_out -> conv_act`` back to ``nn.GroupNorm -> nn.SiLU``."""
    if type(getattr(model, "conv_act", None)) is nn.Identity and _unfuse_norm(
        model, "conv_norm_out", "silu"
    ):
        act = nn.SiLU().train(model.conv_norm_out.training)  # eval() stays eval
        _keep_hooks(model.conv_act, act)
        model.conv_act = act


def _unoptimize_diffusers(model: nn.Module) -> None:
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.attention_processor import (
        AttnAddedKVProcessor2_0,
        AttnProcessor2_0,
    )

    from fastdiff.integrations.attn_processor import FastAttnProcessor
    from fastdiff.integrations.diffusers import (
        _folded_upsample_class,
        _fused_resnet_class,
        _vae_coders,
    )

    fused_resnet, folded_up = _fused_resnet_class(), _folded_upsample_class()
    coders = _vae_coders()
    for name, m in list(model.named_modules()):
        if type(m) is fused_resnet:
            m.__class__ = fused_resnet.__bases__[0]
        elif type(m) is folded_up:
            m.__class__ = folded_up.__bases__[0]
        m.__dict__.pop("_fastdiff_time_group", None)
        if isinstance(m, DiffusersAttention):
            orig = m.__dict__.pop("_fastdiff_processor", None)
            if isinstance(m.processor, FastAttnProcessor):
                if orig is None:  # optimized by a fastdiff that did not record it: the default
                    added_kv = getattr(m, "added_kv_proj_dim", None) is not None
                    orig = AttnAddedKVProcessor2_0() if added_kv else AttnProcessor2_0()
                m.set_processor(orig)
            _unfuse_norm(m, "group_norm", None)
        elif type(m).__name__ == "Transformer2DModel":
            _unfuse_norm(m, "norm", None)
        elif type(m) in coders and name:
            _restore_out_norm(m)
    _restore_out_norm(model)


def _contiguous_4d(t: torch.Tensor) -> torch.Tensor:
    """NCHW strides for a 4-D tensor (a [C x C x 1 x 1] weight counts as contiguous in both
    layouts, so ``.contiguous()`` would keep its channels_last strides)."""
    if t.dim() != 4 or t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def unoptimize(model: Any) -> Any:
    """Undo :func:`fastdiff.optimize` on ``model`` in place and return it.

    ``model`` is what ``optimize`` took: a diffusers model (a ``torch.compile`` wrapper too), a
    fastdiff ``UNet`` or a diffusers pipeline (each component ``optimize`` patched). Afterwards
    every module has its diffusers class, forward, attention processor and ``nn.GroupNorm`` /
    ``nn.SiLU`` again, sharing the same parameter tensors, so its outputs are diffusers' own
    (bitwise, in the layout it had before ``optimize``). Weights ``optimize`` converted to
    channels_last (its report says ``channels_last=True``) go back to NCHW, which is where a
    model ``optimize`` found already in channels_last also ends. ``model.fastdiff_report`` is
    removed. A model ``optimize`` never saw is returned unchanged; calling it twice is a no-op.
    """
    from fastdiff.integrations.pipeline import _pipeline_components

    if not isinstance(model, nn.Module):
        comps = _pipeline_components(model)
        if not comps:
            raise TypeError(
                "unoptimize: model must be a torch.nn.Module or a diffusers pipeline, got "
                f"{type(model).__name__}"
            )
        for comp in comps.values():
            if isinstance(getattr(comp, "_orig_mod", comp), nn.Module):
                unoptimize(comp)
        model.__dict__.pop("fastdiff_report", None)
        return model

    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model inside
    reports = [
        m.__dict__.pop("fastdiff_report", None)
        for m in {id(model): model, id(inner): inner}.values()
    ]
    from fastdiff.models.unet import UNet

    if not isinstance(inner, UNet) and importlib.util.find_spec("diffusers") is not None:
        _unoptimize_diffusers(inner)
    if any(getattr(r, "channels_last", False) for r in reports):
        inner._apply(_contiguous_4d)
    return model
