"""``fastdiff.optimize``: run a diffusers UNet (or a fastdiff UNet) on fastdiff's fused kernels.

    unet = fastdiff.optimize(UNet2DModel.from_pretrained("google/ddpm-cifar10-32"))
    print(unet.fastdiff_report)
    image = DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).__call__(num_inference_steps=50)

What is patched, in place (parameters and state-dict keys never change):

* every ``ResnetBlock2D`` whose nonlinearity is SiLU: its class is swapped for
  :class:`FusedResnetBlock2D`, whose forward is diffusers' step for step except that
  ``norm1 -> SiLU`` and ``(+temb) -> norm2 -> SiLU`` (or ``norm2 -> scale/shift -> SiLU`` for
  ``time_embedding_norm="scale_shift"``) are each one fused ``group_norm_silu`` call;
* the UNet's final ``conv_norm_out -> conv_act`` pair (and an ``AutoencoderKL``'s encoder and
  decoder ones): a :class:`GroupNormSiLU` sharing the GroupNorm's parameters, and ``conv_act``
  becomes ``nn.Identity``;
* every ``Attention`` on the default processor (``AttnProcessor2_0``/``AttnProcessor``, or
  ``AttnAddedKVProcessor(2_0)`` for the added-KV attention of SimpleCrossAttn blocks, with the
  standard ``1/sqrt(d)`` scale): :class:`FastAttnProcessor`, and its ``group_norm`` (if any) runs
  on the fused GroupNorm kernel (``activation=None``);
* every ``Transformer2DModel`` input GroupNorm: the fused GroupNorm kernel;
* the fused ResnetBlock2Ds' time projections ``time_emb_proj(silu(temb))``: on CUDA one SiLU
  and one GEMM over the stacked weights for all blocks (:class:`TimeProjections`) instead of a
  SiLU and a GEMM per block;
* every plain ``Upsample2D`` (nearest 2x, then a 3x3 conv): class swapped for
  :class:`FoldedUpsample2D`, which on CPU runs the pair as one stride-2 transposed conv with the
  folded 4x4 kernel (:func:`fastdiff.nn.sampling.fold_upsample_conv`: 0.44x the FLOPs) when the
  input is large enough for that to pay (:func:`fastdiff.nn.sampling.fold_pays`); on GPU, on
  small maps, in fp16 or with an explicit ``output_size``, it runs diffusers' forward as is.

Everything else is left alone and listed in the report with the reason, including a block whose
norm / activation has hooks (forward or pre-forward hooks, a forward replaced on the instance):
the fused code would never call those modules, so their hooks would silently not run. Hooks
added later (e.g. accelerate's offload, after ``optimize``) on a fused ResnetBlock2D's norm1 /
norm2 / nonlinearity make it run diffusers' own forward while they are there (not under
``torch.compile``, which sees the modules as they were when it traced). Calling it again changes
nothing (the report then lists the patches as already applied).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdiff._prepare import channels_last_4d
from fastdiff.integrations.attn_processor import FastAttnProcessor
from fastdiff.integrations.pipeline import PipelineReport, _optimize_pipeline, _pipeline_components
from fastdiff.nn.group_norm import GroupNormSiLU
from fastdiff.nn.sampling import (
    fold_pays,
    foldable_conv,
    global_hooks,
    has_hooks,
    own_hooks,
    upsample_conv,
)
from fastdiff.nn.stacked import stacked_linear
from fastdiff.ops.group_norm_silu import group_norm_silu

__all__ = ["FastAttnProcessor", "OptimizeReport", "PipelineReport", "TimeProjections", "optimize"]


@dataclass
class OptimizeReport:
    """What :func:`optimize` did: (module name, what or why) for each module it looked at."""

    model: str
    channels_last: bool = False
    replaced: list[tuple[str, str]] = field(default_factory=list)  # patched by this call
    already: list[tuple[str, str]] = field(default_factory=list)  # patched by an earlier call
    left: list[tuple[str, str]] = field(default_factory=list)  # not understood: left alone

    def counts(self, entries: list[tuple[str, str]]) -> dict[str, int]:
        """How many entries share each description, e.g. ``report.counts(report.replaced)``."""
        out: dict[str, int] = {}
        for _, what in entries:
            out[what] = out.get(what, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [
            f"fastdiff.optimize({self.model}): {len(self.replaced)} replaced, "
            f"{len(self.already)} already optimized, {len(self.left)} left alone"
            + (", channels_last" if self.channels_last else "")
        ]
        for title, entries in (("replaced", self.replaced), ("already", self.already)):
            for what, n in self.counts(entries).items():
                lines.append(f"  {title:8s} {n:4d} x {what}")
        for name, why in self.left:
            lines.append(f"  left          {name or '<model>'}: {why}")
        return "\n".join(lines)

    __repr__ = __str__


# ---- ResnetBlock2D ------------------------------------------------------------------------


def _gn_silu(norm: nn.GroupNorm, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, **kw)


def _bypassed_hooks(block: nn.Module) -> bool:
    """Hooks (or a forward replaced on the instance, as accelerate's offload does) on the
    modules the fused forward never calls, added after :func:`optimize` looked. Reads the
    instance dicts directly (~1 us; nn.Module attribute access would be ~4 us)."""
    mods = block._modules
    return any(own_hooks(mods[n]) for n in ("norm1", "norm2", "nonlinearity")) or global_hooks()


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *a, **k):
    """diffusers ``ResnetBlock2D.forward`` with its two GroupNorm->SiLU pairs fused; diffusers'
    own forward while norm1 / norm2 / nonlinearity carry hooks (they must run)."""
    if (self.time_emb_proj is None and temb is not None) or (
        not torch.compiler.is_compiling() and _bypassed_hooks(self)
    ):
        # the base class's forward called directly: torch.compile (dynamo) cannot trace the
        # two-argument super() of a class built at run time
        return _fused_resnet_class().__bases__[0].forward(self, input_tensor, temb, *a, **k)

    hidden_states = _gn_silu(self.norm1, input_tensor)  # silu(GN(x))     [N x Cin x H x W]
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc and big batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)  #                         [N x Cout x H x W]

    cond: dict[str, torch.Tensor] = {}
    if self.time_emb_proj is not None:
        group = self.__dict__.get("_fastdiff_time_group")  # TimeProjections, or None
        proj = group.projection(self, temb) if group is not None else None
        if proj is not None:  # silu(temb) @ W^T + b of all blocks, from one GEMM
            temb = proj
        else:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)  #                           [N x Cout] or [N x 2Cout]
        n = hidden_states.shape[0]
        if temb.shape[0] != n:
            temb = temb.expand(n, -1)
        temb = temb.to(hidden_states.dtype)
        if self.time_embedding_norm == "default":
            cond["add"] = temb  # silu(GN(h + temb))
        else:  # "scale_shift": silu(GN(h) * (1 + scale) + shift)
            cond["scale"], cond["shift"] = temb.chunk(2, dim=1)
    elif self.time_embedding_norm == "scale_shift":
        raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
    hidden_states = _gn_silu(self.norm2, hidden_states, **cond)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + hidden_states
    if self.output_scale_factor != 1.0:  # x / 1 == x exactly: skip that kernel
        out = out / self.output_scale_factor
    return out


@functools.cache
def _fused_resnet_class() -> type:
    """``FusedResnetBlock2D``: a ResnetBlock2D subclass with the fused forward (built lazily, so
    importing fastdiff does not import diffusers)."""
    from diffusers.models.resnet import ResnetBlock2D

    cls = type(
        "FusedResnetBlock2D",
        (ResnetBlock2D,),
        {"forward": _fused_resnet_forward, "__module__": __name__, "__doc__": _DOC},
    )
    return cls


_DOC = "diffusers ResnetBlock2D whose GroupNorm->SiLU pairs run as fused fastdiff kernels."


def __getattr__(name: str) -> Any:  # makes the patched classes importable (and picklable)
    if name == "FusedResnetBlock2D":
        return _fused_resnet_class()
    if name == "FoldedUpsample2D":
        return _folded_upsample_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _patch_resnet(name: str, block: nn.Module, report: OptimizeReport) -> None:
    fused_cls = _fused_resnet_class()
    if type(block) is fused_cls:
        report.already.append((name, "ResnetBlock2D: fused GroupNorm+SiLU"))
        return
    if type(block) is not fused_cls.__bases__[0]:
        report.left.append((name, f"{type(block).__name__}: a ResnetBlock2D subclass"))
        return
    if not isinstance(block.nonlinearity, nn.SiLU):
        act = type(block.nonlinearity).__name__
        report.left.append((name, f"ResnetBlock2D with {act}, not SiLU: nothing to fuse"))
        return
    if type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm:
        report.left.append((name, "ResnetBlock2D whose norms are not nn.GroupNorm"))
        return
    hooked = [a for a in ("norm1", "norm2", "nonlinearity") if has_hooks(getattr(block, a))]
    if hooked:  # the fused forward never calls these modules: their hooks would not run
        report.left.append((name, f"ResnetBlock2D whose {'/'.join(hooked)} has hooks"))
        return
    block.__class__ = fused_cls
    report.replaced.append((name, "ResnetBlock2D: fused GroupNorm+SiLU"))


class TimeProjections:
    """The time-embedding projections ``time_emb_proj(silu(temb))`` of the fused ResnetBlock2Ds
    of one UNet, from one SiLU and one GEMM over their stacked weights.

    diffusers runs a SiLU and a small GEMM per ResnetBlock2D on the same ``temb`` (22 of each in
    the ddpm-cifar10 UNet2DModel), each a launch-bound kernel at small batch. In a forward
    without autograd (sampling), the first block that needs its projection computes them all for
    that ``temb`` object (the UNet hands the same tensor to every block) and the others take
    their ``[N x C_i]`` slice. The weights are stacked on every forward, never cached (an
    in-place ``.data`` update cannot make them stale); that copy is worth it on a GPU, not on
    CPU, so ``enabled=None`` (default) means "for CUDA tensors". Per block (diffusers' own path)
    with grad enabled (a cache that outlives a forward and gradient checkpointing's recompute do
    not mix), under ``torch.compile``, and whenever the projections are not plain
    ``nn.Linear`` s with a bias and no hooks, of one input width, dtype and device.
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks
        self.enabled: bool | None = None
        self._cache: tuple[Any, dict[int, torch.Tensor]] = (None, {})  # (temb, {id(block): proj})

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: not the last forward's cache
        return {**self.__dict__, "_cache": (None, {})}

    def projection(self, block: nn.Module, temb: torch.Tensor) -> torch.Tensor | None:
        """``block``'s projection of ``temb``, or None: then the block projects itself."""
        use = self.enabled
        if not (temb.is_cuda if use is None else use) or torch.is_grad_enabled():
            return None
        if torch.compiler.is_compiling():
            return None
        cache = self._cache  # one read: a consistent (temb, projections) pair across threads
        if cache[0] is not temb:
            lins = [b.time_emb_proj for b in self.blocks]
            parts = stacked_linear(lins, nn.functional.silu(temb))  # [N x C_i] each, or None
            # not eligible (a hooked or wrapped projection): remember that for this temb too
            got = {} if parts is None else dict(zip(map(id, self.blocks), parts, strict=True))
            cache = (temb, got)
            self._cache = cache
        return cache[1].get(id(block))


def _unet_owner(name: str, mods: dict[str, nn.Module]) -> str | None:
    """Name of the nearest module enclosing ``name`` that has a ``time_embedding`` (its UNet)."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:k])
        if hasattr(mods.get(prefix), "time_embedding"):
            return prefix
    return None


def _group_time_projections(model: nn.Module, report: OptimizeReport) -> None:
    """One :class:`TimeProjections` per UNet (the nearest enclosing module with a
    ``time_embedding``, so a container of several UNets gets one group each) over its fused
    ResnetBlock2Ds that have a time projection."""
    fused_cls = _fused_resnet_class()
    mods = dict(model.named_modules())
    owners: dict[str, list[nn.Module]] = {}
    for name, m in mods.items():
        if type(m) is not fused_cls or m.time_emb_proj is None or m.skip_time_act:
            continue
        owner = _unet_owner(name, mods)
        if owner is not None:
            owners.setdefault(owner, []).append(m)
    for owner, blocks in owners.items():
        if len(blocks) < 2:
            continue
        what = (
            f"ResnetBlock2D time_emb_proj x{len(blocks)}: one SiLU + one GEMM for CUDA tensors "
            "(per block on CPU, where stacking the weights costs more than it saves)"
        )
        old = blocks[0].__dict__.get("_fastdiff_time_group")
        if (
            old is not None
            and old.blocks == blocks
            and all(b.__dict__.get("_fastdiff_time_group") is old for b in blocks)
        ):
            report.already.append((owner, what))
            continue
        group = TimeProjections(blocks)
        for b in blocks:
            b.__dict__["_fastdiff_time_group"] = group
        report.replaced.append((owner, what))


# ---- Upsample2D ----------------------------------------------------------------------------


def _folded_upsample_forward(self, hidden_states: torch.Tensor, output_size=None, *a, **k):
    """diffusers ``Upsample2D.forward``; on CPU, nearest 2x + 3x3 conv as one folded stride-2
    transposed conv (same result up to fp rounding)."""
    conv = self.conv if self.name == "conv" else getattr(self, "Conv2d_0", None)
    if (
        hidden_states.device.type != "cpu"
        or output_size is not None
        or a
        or k
        or self.norm is not None
        or self.use_conv_transpose
        or not (self.interpolate and self.use_conv)
        or not fold_pays(hidden_states)
        or foldable_conv(conv, hidden_states.shape[1]) is not None
    ):
        # not super(): see _fused_resnet_forward; type(self), not the functools.cache'd
        # _folded_upsample_class(): dynamo warns on a cached call inside a compiled forward
        base = type(self).__bases__[0]
        return base.forward(self, hidden_states, output_size, *a, **k)
    return upsample_conv(hidden_states, conv)


@functools.cache
def _folded_upsample_class() -> type:
    from diffusers.models.upsampling import Upsample2D

    doc = "diffusers Upsample2D running nearest 2x + 3x3 conv as one folded transposed conv on CPU."
    attrs = {"forward": _folded_upsample_forward, "__module__": __name__, "__doc__": doc}
    return type("FoldedUpsample2D", (Upsample2D,), attrs)


def _foldable_upsample(up: nn.Module) -> str | None:
    """None when ``up`` is nearest 2x followed by a plain 3x3/pad-1 conv; else why not."""
    if up.norm is not None or up.use_conv_transpose or not up.interpolate or not up.use_conv:
        return "Upsample2D with a norm, a transposed conv, no interpolation or no conv"
    conv = up.conv if up.name == "conv" else getattr(up, "Conv2d_0", None)
    why = foldable_conv(conv, up.channels)
    return None if why is None else f"Upsample2D: {why}"


def _patch_upsample(name: str, up: nn.Module, report: OptimizeReport) -> None:
    folded_cls = _folded_upsample_class()
    what = "Upsample2D: folded transposed conv on CPU"
    if type(up) is folded_cls:
        report.already.append((name, what))
        return
    why = "an Upsample2D subclass" if type(up) is not folded_cls.__bases__[0] else None
    why = why or _foldable_upsample(up)
    if why is not None:
        report.left.append((name, why))
        return
    up.__class__ = folded_cls
    report.replaced.append((name, what))


# ---- attention, other GroupNorms ------------------------------------------------------------


def _standard_attention(attn: nn.Module) -> str | None:
    """None when ``attn`` runs the default attention math FastAttnProcessor mirrors; else why."""
    from diffusers.models.attention_processor import (
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        AttnProcessor,
        AttnProcessor2_0,
    )

    proc = attn.processor
    added_kv = getattr(attn, "added_kv_proj_dim", None) is not None
    defaults = (AttnAddedKVProcessor, AttnAddedKVProcessor2_0)
    if not added_kv:
        defaults = (AttnProcessor, AttnProcessor2_0)
    if type(proc) not in defaults:
        return f"Attention with processor {type(proc).__name__} (only the default is replaced)"
    head_dim = attn.inner_dim // attn.heads
    if abs(attn.scale - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
        return f"Attention with scale {attn.scale} instead of 1/sqrt({head_dim})"
    return None


def _fuse_norm(parent: nn.Module, attr: str, activation: str | None) -> bool:
    """Replace ``parent.<attr>`` (an nn.GroupNorm, affine or not, without hooks, which the new
    module would not run) by a GroupNormSiLU sharing its parameters."""
    gn = getattr(parent, attr)
    if type(gn) is not nn.GroupNorm or has_hooks(gn):
        return False
    setattr(parent, attr, GroupNormSiLU.from_group_norm(gn, activation=activation))
    return True


def _patch_attention(name: str, attn: nn.Module, proc: Any, report: OptimizeReport) -> None:
    if isinstance(attn.processor, FastAttnProcessor):
        report.already.append((name, "Attention: FastAttnProcessor"))
        return
    why = _standard_attention(attn)
    if why is not None:
        report.left.append((name, why))
        return
    attn.__dict__["_fastdiff_processor"] = attn.processor  # what unoptimize() puts back
    attn.set_processor(proc)
    norm = getattr(attn, "group_norm", None)
    fresh = norm is not None and not isinstance(norm, GroupNormSiLU)
    if fresh and not _fuse_norm(attn, "group_norm", None):
        report.left.append((f"{name}.group_norm", _NORM_LEFT))
    report.replaced.append((name, "Attention: FastAttnProcessor"))


_NORM_LEFT = "GroupNorm with hooks (or not a plain nn.GroupNorm): run as a module"


def _patch_out_norm(model: nn.Module, report: OptimizeReport, prefix: str = "") -> None:
    """A ``conv_norm_out -> conv_act`` pair that ``model.forward`` runs back to back: the UNet's
    (UNet2DModel, UNet2DConditionModel) and the VAE Encoder's / Decoder's (``prefix``: the
    module's name and a dot, for the report)."""
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    what = "conv_norm_out+conv_act: fused GroupNorm+SiLU"
    where = f"{prefix}conv_norm_out"
    if isinstance(norm, GroupNormSiLU) and isinstance(act, nn.Identity):
        report.already.append((where, what))
    elif norm is not None and (has_hooks(norm) or (act is not None and has_hooks(act))):
        report.left.append((where, "conv_norm_out or conv_act has hooks"))
    elif type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU):
        _fuse_norm(model, "conv_norm_out", "silu")
        model.conv_act = nn.Identity().train(act.training)  # an eval() model stays in eval
        report.replaced.append((where, what))
    elif norm is not None:
        report.left.append((where, f"{type(norm).__name__} -> {type(act).__name__}"))


def _vae_coders() -> tuple[type, ...]:
    """diffusers' VAE ``Encoder`` / ``Decoder``: forward ends ``conv_norm_out -> conv_act ->
    conv_out`` (the Decoder's ``conv_norm_out`` is a SpatialNorm for MoVQ: left, by type)."""
    try:
        from diffusers.models.autoencoders.vae import Decoder, Encoder
    except ImportError:  # an older layout: nothing to fuse there
        return ()
    return (Encoder, Decoder)


# ---- entry point ----------------------------------------------------------------------------


def optimize(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """Patch ``model`` in place to run on fastdiff's fused kernels and return it.

    ``model`` is a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or any module holding
    diffusers ResnetBlock2D / Attention blocks), or a fastdiff ``UNet`` (already fused: only
    ``channels_last`` applies). Outputs equal the unpatched model's within the dtype's
    tolerance; parameters, state-dict keys and the model's class are unchanged, so diffusers
    pipelines (``DDIMPipeline(unet=model, ...)``), ``save_pretrained`` and ``fastdiff.sample``
    work as before. Idempotent; :func:`fastdiff.unoptimize` undoes it.

    ``channels_last=True`` also converts the weights to ``torch.channels_last``, so the convs
    (and the fused kernels, natively) run NHWC. ``None`` (default) does that when the model is
    on CPU, where oneDNN's convolutions are faster in that layout (a small UNet2DModel, 10
    steps, paired runs: 1.00-1.12x eager in NCHW, 1.21-1.23x in channels_last); on a GPU the
    layout is left as it is (channels_last there has not been measured with fastdiff's
    kernels). Its outputs are then channels_last tensors (same values: ``.view`` on them needs
    ``.contiguous()``). A model optimized on CPU and then moved to a GPU keeps channels_last
    weights; pass ``channels_last=False`` when optimizing on CPU (or optimize after moving it)
    to keep NCHW there. ``False`` converts nothing, back to NCHW included.

    The report of what was replaced, what was already, and what was left alone and why, is
    attached as ``model.fastdiff_report`` (printable).

    A diffusers pipeline (anything with a ``components`` dict, e.g. ``DDIMPipeline`` or
    ``StableDiffusionPipeline``) has each of its diffusers models (``unet``, ``vae``, ...)
    optimized in place and is returned; ``pipe.fastdiff_report`` maps each component name to its
    report, and lists the components left alone (text encoders, schedulers: not diffusers
    models).

    Deviation from issue 6's ``optimize(model, *, channels_last=False)``: the default is ``None``
    (channels_last on CPU only, as measured above; ``False`` on a GPU, as the issue asks), and
    the model is returned (so ``pipe.unet = fastdiff.optimize(pipe.unet)`` reads naturally) with
    the report beside it as ``model.fastdiff_report``.
    """
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(
            f"optimize: channels_last must be True, False or None, got {channels_last!r}"
        )
    if not isinstance(model, nn.Module):
        if _pipeline_components(model):
            return _optimize_pipeline(model, channels_last)
        raise TypeError(
            "optimize: model must be a torch.nn.Module or a diffusers pipeline, got "
            f"{type(model).__name__}"
        )
    if channels_last is None:
        param = next(model.parameters(), None)
        channels_last = param is not None and param.device.type == "cpu"
    report = OptimizeReport(model=type(model).__name__, channels_last=channels_last)
    # an earlier optimize(channels_last=True) left the weights channels_last: the report keeps
    # saying so, for unoptimize() to restore NCHW (channels_last=False converts nothing back)
    if getattr(getattr(model, "fastdiff_report", None), "channels_last", False):
        report.channels_last = True

    from fastdiff.models.unet import UNet

    if isinstance(getattr(model, "_orig_mod", model), UNet):  # torch.compile'd too
        report.already.append(("", "fastdiff UNet: built on fused modules"))
    else:
        _optimize_diffusers(model, report)
    if channels_last:
        # the 4-D tensors only: model.to(memory_format=channels_last) raises on a 5-D weight
        # (a Conv3d, e.g. UNet3DConditionModel's temporal convs)
        channels_last_4d(model)
    model.fastdiff_report = report
    return model


def _optimize_diffusers(model: nn.Module, report: OptimizeReport) -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise TypeError(
            f"optimize: {type(model).__name__} is not a fastdiff UNet and diffusers is not "
            f"importable ({exc}); install diffusers to optimize diffusers models"
        ) from exc
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    handled: set[int] = set()  # ids of GroupNorms handled or intentionally kept
    proc = FastAttnProcessor()
    coders = _vae_coders()
    for name, m in list(model.named_modules()):
        if type(m) in coders and name:  # exact classes: a subclass may run its pair otherwise
            handled.add(id(getattr(m, "conv_norm_out", None)))
            _patch_out_norm(m, report, prefix=f"{name}.")
        elif isinstance(m, ResnetBlock2D):
            _patch_resnet(name, m, report)
            handled.update({id(m.norm1), id(m.norm2)})
        elif isinstance(m, DiffusersAttention):
            _patch_attention(name, m, proc, report)
            if getattr(m, "group_norm", None) is not None:
                handled.add(id(m.group_norm))
        elif isinstance(m, Upsample2D):
            _patch_upsample(name, m, report)
        elif type(m).__name__ == "Transformer2DModel" and hasattr(m, "norm"):
            what = "Transformer2DModel.norm: fused GroupNorm"
            if isinstance(m.norm, GroupNormSiLU):
                report.already.append((f"{name}.norm", what))
            elif _fuse_norm(m, "norm", None):
                report.replaced.append((f"{name}.norm", what))
            elif type(m.norm) is nn.GroupNorm:
                report.left.append((f"{name}.norm", _NORM_LEFT))
            handled.add(id(m.norm))
    _patch_out_norm(model, report)
    handled.add(id(getattr(model, "conv_norm_out", None)))
    _group_time_projections(model, report)

    for name, m in model.named_modules():
        if type(m) is nn.GroupNorm and id(m) not in handled:
            report.left.append((name, "GroupNorm at a call site fastdiff does not know"))
        elif "Resnet" in type(m).__name__ and not any(  # not ResnetDownsampleBlock2D either
            isinstance(c, ResnetBlock2D) for c in m.modules()
        ):
            report.left.append((name, f"{type(m).__name__}: only ResnetBlock2D is fused"))
