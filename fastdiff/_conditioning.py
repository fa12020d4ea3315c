"""How ``fastdiff.sample`` talks to the model: its config, its call, its conditioning.

* reading the model: ``config`` values, learned variance (2C output channels);
* calling it: the prediction from its return value, the learned-variance channels dropped for
  samplers without them;
* conditioning: ``cond`` / ``uncond`` as model kwargs (a tensor goes in as ``class_labels`` or
  ``encoder_hidden_states``), and classifier-free guidance's one batched model call over
  ``[uncond, cond]`` (Ho & Salimans 2022, arXiv:2207.12598): the conditioning halves
  concatenated along the batch, every other batched kwarg repeated for both halves. The sampler
  op combines the two halves as u + s (c - u), s = ``guidance_scale``: the paper's eq. 6,
  (1 + w) c - w u, with s = 1 + w (``fastdiff.samplers.ddim._combine_cfg``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff.samplers import Sampler
from fastdiff.samplers.base import check_model_output


# ------------------------------------------------------------------------------- the model
def _cfg_get(model: Any, name: str) -> Any:
    """``model.config.<name>`` / ``model.config[name]``, else ``model.<name>``, else None."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        v = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if v is not None:
            return v
    v = getattr(model, name, None)
    return None if callable(v) else v


def _learned_variance(model: Any) -> bool:
    lv = getattr(model, "learned_variance", None)
    if isinstance(lv, bool):
        return lv
    out_c, in_c = _cfg_get(model, "out_channels"), _cfg_get(model, "in_channels")
    return isinstance(out_c, int) and isinstance(in_c, int) and out_c == 2 * in_c


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


def _prepare_output(out: Tensor, x: Tensor, smp: Sampler, gs: float | None, model: Any) -> Tensor:
    """Check the model output's shape; drop learned-variance channels for samplers without it."""
    lv = bool(getattr(smp, "learned_variance", False))
    if (
        not lv
        and x.ndim > 1
        and out.ndim == x.ndim
        and out.shape[1] == 2 * x.shape[1]
        and (_learned_variance(model) or getattr(smp, "drop_variance_channels", False))
    ):
        out = out[:, : x.shape[1]]  # the variance channels only matter to DDPM learned_range
    check_model_output(out, x, gs, lv)
    return out


def _rescaled_guidance(out: Tensor, gs: float, rescale: float) -> Tensor:
    """Classifier-free guidance with the rescale of Lin et al. 2023 ("Common Diffusion Noise
    Schedules and Sample Steps are Flawed", arXiv:2305.08891, Sec. 3.4), as diffusers'
    ``rescale_noise_cfg``: ``out`` is the model's ``[uncond, cond]`` output ``[2N x ...]``;

        cfg = u + w (c - u),   cfg_r = cfg * std(c) / std(cfg),   phi cfg_r + (1 - phi) cfg

    with w = ``gs`` (Lin et al.'s w is diffusers' guidance_scale, Ho & Salimans' 1 + w), phi =
    ``rescale`` and the (unbiased) standard deviations per sample over every other dimension.
    The result ``[N x ...]`` goes to the sampler op without guidance. Computed in fp32
    (diffusers: in the model's dtype), rounded once to ``out.dtype``; no host sync."""
    u, c = out.float().chunk(2)
    cfg = u + gs * (c - u)
    dims = list(range(1, out.ndim))
    rescaled = cfg * (c.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    return (rescale * rescaled + (1.0 - rescale) * cfg).to(out.dtype)


def _guidance_rescale(phi: Any, gs: float | None, smp: Sampler) -> float:
    """``guidance_rescale`` checked up front: a real in [0, 1] (or a one-element real tensor,
    as ``guidance_scale`` takes), only with guidance."""
    if isinstance(phi, Tensor) and phi.numel() == 1 and phi.is_floating_point():
        phi = float(phi)  # before the loop: no sync inside it
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real):
        raise TypeError(f"guidance_rescale: expected a real number in [0, 1], got {phi!r}")
    phi = float(phi)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale: expected a number in [0, 1], got {phi}")
    if phi > 0.0 and gs is None:
        raise ValueError(
            f"guidance_rescale: rescales classifier-free guidance, but guidance_scale is None "
            f"(got guidance_rescale={phi}); pass guidance_scale, or guidance_rescale=0"
        )
    if phi > 0.0 and getattr(smp, "learned_variance", False):
        raise ValueError(
            "guidance_rescale: not supported with a learned-variance sampler (variance_type "
            f"'learned_range' / 'learned'), got guidance_rescale={phi}"
        )
    return phi


# ------------------------------------------------------------------------ conditioning kwargs
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


def _as_kwargs(name: str, v: Any, key: str, n: int, device: torch.device) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return {k: _batched_tree(f"{name}[{k!r}]", x, n, device) for k, x in v.items()}
    if isinstance(v, (Tensor, int)) and not isinstance(v, bool):
        return {key: _batched(name, v, n, device)}
    raise TypeError(f"{name}: expected a tensor or a dict of model kwargs, got {type(v).__name__}")


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


# -------------------------------------------------------------- classifier-free guidance
def _guidance(scale: Any) -> float:
    """``guidance_scale`` as a finite float, checked before anything runs (a NaN or a string
    failed only inside the first sampler step, after a model call). It is the s of
    u + s (c - u), Ho & Salimans' 1 + w: 1 is the conditional model alone."""
    is_num = isinstance(scale, numbers.Real) or (isinstance(scale, Tensor) and scale.numel() == 1)
    if isinstance(scale, bool) or not is_num or (isinstance(scale, Tensor) and scale.is_complex()):
        got = f"shape {tuple(scale.shape)}" if isinstance(scale, Tensor) else repr(scale)
        raise TypeError(f"guidance_scale: expected a real number, got {got}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {scale}")
    return scale


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


def _uncond_kwargs(model: Any, uncond: Any, cond_kw: dict[str, Any], key: str, n: int,
                   device: torch.device) -> dict[str, Any]:  # fmt: skip
    """``uncond`` as model kwargs; by default the model's ``null_cond`` / ``null_class``."""
    if uncond is not None:
        return _as_kwargs("uncond", uncond, key, n, device)
    like = next(iter(cond_kw.values())) if len(cond_kw) == 1 else None
    null = None
    if isinstance(like, Tensor):
        null = _null_cond(model, next(iter(cond_kw)), like, n)
    if null is None:
        raise ValueError(
            "uncond: guidance_scale needs the unconditional input; pass uncond= (the model "
            "has no null_cond / null_class attribute)"
        )
    return {next(iter(cond_kw)): null}


def model_kwargs_for(
    model: Any,
    cond: Any,
    uncond: Any,
    guidance_scale: float | None,
    model_kwargs: Mapping[str, Any] | None,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The kwargs of every model call: ``model_kwargs`` and ``cond`` with batch n, or with
    guidance the ``[uncond, cond]`` kwargs of batch 2n (the others repeated for both halves)."""
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
        unc_kw = _uncond_kwargs(model, uncond, cond_kw, key, n, device)
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
    return kwargs
