"""The DDPM / ADM UNet, built only from fastdiff.nn (fused GroupNorm+SiLU, fused-QKV attention).

The network predicts the noise (or v, or x0) from a noisy image x_t and its timestep t
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B), with the ADM options of
Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", sec. 3): scale-shift
norm, ResBlock up/down-sampling, class conditioning and learned variance.

The U: ``conv_in``, then the *down* path (per level ``num_res_blocks`` ResBlocks, with attention
at ``attention_resolutions``, then a 2x downsample), the *mid* bottleneck (ResBlock, attention,
ResBlock) and the *up* path (per level ``num_res_blocks + 1`` ResBlocks, then a 2x upsample).
Every output of ``conv_in`` and the down path is saved and concatenated onto the input of one
up-path ResBlock, last in first out. ``print(UNet.from_preset("ddpm-cifar10").summary())`` shows
the whole table.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import Attention, Downsample, GroupNormSiLU, ResBlock, TimestepEmbedding, Upsample
from fastdiff.nn._checks import check_nchw
from fastdiff.nn.stacked import stacked_linear


@dataclass
class UNetConfig:
    """Hyperparameters of :class:`UNet`. Validated on construction (``ValueError``; a
    ``TypeError`` for a non-sequence ``channel_mult`` / ``attention_resolutions`` or a
    non-numeric ``dropout``), and again by ``UNet(config)``, which keeps its own copy."""

    in_channels: int = 3
    out_channels: int | None = None  # None -> in_channels; 2 * in_channels = learned variance
    base_channels: int = 128  # channels at full resolution; the time embedding has 4x
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # per level; len - 1 downsamplings
    num_res_blocks: int = 2  # per level on the down path (the up path has one more)
    attention_resolutions: tuple[int, ...] = (16,)  # image sizes (pixels) with self-attention
    num_heads: int | None = None  # give one of num_heads / head_dim; neither -> 1 head
    head_dim: int | None = None
    dropout: float = 0.0
    num_classes: int | None = None  # class-conditional; label num_classes is the null class
    use_scale_shift_norm: bool = False  # ADM adaptive GroupNorm instead of the DDPM add
    resblock_updown: bool = False  # resample with ResBlocks (ADM) instead of convs (DDPM)
    num_groups: int = 32  # GroupNorm groups
    sample_size: int = 32  # input height = width
    mid_attention: bool = True  # self-attention in the bottleneck

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:  # numpy ints as python ints (as in channel_mult), for JSON
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                setattr(self, name, int(v))
        if isinstance(self.dropout, numbers.Real) and not isinstance(self.dropout, bool):
            self.dropout = float(self.dropout)
        self.channel_mult = _int_tuple("channel_mult", self.channel_mult)
        self.attention_resolutions = _int_tuple("attention_resolutions", self.attention_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.validate()

    @property
    def resolutions(self) -> list[int]:
        """Image size at each level: [sample_size, sample_size / 2, ...]."""
        return [self.sample_size // 2**i for i in range(len(self.channel_mult))]

    def level_channels(self, level: int) -> int:
        """Channels at ``level``: ``base_channels * channel_mult[level]``."""
        return self.base_channels * self.channel_mult[level]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for an inconsistent config (sizes, groups
        dividing channels, heads dividing attention channels, attention resolutions that
        never occur)."""

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")

        sizes = ("in_channels", "out_channels", "base_channels", "num_res_blocks", "num_groups",
                 "sample_size")  # fmt: skip
        for name in sizes:
            positive(name)
        for name in ("num_heads", "head_dim"):
            if getattr(self, name) is not None:
                positive(name)
        for name in ("use_scale_shift_norm", "resblock_updown", "mid_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"UNetConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"UNetConfig.channel_mult must be non-empty positive ints, got {self.channel_mult}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"UNetConfig.dropout must be a float, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.base_channels < 4 or self.base_channels % 2:
            raise ValueError(
                f"UNetConfig.base_channels must be even and >= 4 (it is also the width of the "
                f"sinusoidal timestep embedding), got {self.base_channels}"
            )
        if self.num_classes is not None:
            positive("num_classes")
        levels = len(self.channel_mult)
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(
                f"UNetConfig.sample_size={self.sample_size} must be divisible by "
                f"2**{levels - 1}={2 ** (levels - 1)} (channel_mult has {levels} levels)"
            )
        if self.base_channels % self.num_groups:  # then every level's channels divide too
            raise ValueError(
                f"UNetConfig: base_channels={self.base_channels} is not divisible by "
                f"num_groups={self.num_groups}; GroupNorm needs whole groups, and every level "
                f"has base_channels x channel_mult[i] channels"
            )
        res = self.resolutions
        for r in self.attention_resolutions:
            if r not in res:
                raise ValueError(
                    f"UNetConfig.attention_resolutions: resolution {r} never occurs; with "
                    f"sample_size={self.sample_size} and {levels} levels the UNet runs at {res}"
                )
        if self.num_heads is not None and self.head_dim is not None:
            raise ValueError(
                f"UNetConfig: give num_heads or head_dim, not both (got num_heads="
                f"{self.num_heads}, head_dim={self.head_dim})"
            )
        attn_levels = [i for i, r in enumerate(res) if r in self.attention_resolutions]
        if self.mid_attention:
            attn_levels.append(levels - 1)
        for level in attn_levels:
            c = self.level_channels(level)
            if self.num_heads is not None and (self.num_heads < 1 or c % self.num_heads):
                raise ValueError(
                    f"UNetConfig.num_heads={self.num_heads} does not divide the {c} channels "
                    f"of the attention at resolution {res[level]}"
                )
            if self.head_dim is not None and (self.head_dim < 1 or c % self.head_dim):
                raise ValueError(
                    f"UNetConfig.head_dim={self.head_dim} does not divide the {c} channels "
                    f"of the attention at resolution {res[level]}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown fields are a ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {unknown}")
        return cls(**d)


_INT_FIELDS = ("in_channels", "out_channels", "base_channels", "num_res_blocks", "num_heads",
               "head_dim", "num_classes", "num_groups", "sample_size")  # fmt: skip


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    """``values`` (a sequence of integers, numpy ints included) as a tuple of python ints:
    TypeError naming the field for a non-sequence, ValueError for a non-integer element (a
    float such as 1.5 must not be truncated)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"UNetConfig.{name} must be a sequence of ints, got {type(values).__name__} {values!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"UNetConfig.{name} must hold ints, got {v!r} in {tuple(values)!r}")
        out.append(int(v))
    return tuple(out)


def _is_res(block: UNetBlock) -> bool:
    return isinstance(block.layer, ResBlock)


class UNetBlock(nn.Module):
    """One row of the U: a ResBlock (optionally followed by attention) or a resampler.

    ``skip_channels`` > 0 marks an up-path block whose input is ``concat(h, skip)``.
    """

    def __init__(
        self,
        path: str,
        resolution: int,
        layer: nn.Module,
        attn: nn.Module | None = None,
        skip_channels: int = 0,
    ) -> None:
        super().__init__()
        self.path = path  # "down", "mid" or "up"
        self.resolution = resolution  # of the block's input
        self.layer = layer
        self.attn = attn
        self.skip_channels = skip_channels

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, proj: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``proj``: the ResBlock's embedding projection, when the UNet computed it."""
        x = self.layer(x, emb, proj) if isinstance(self.layer, ResBlock) else self.layer(x)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """DDPM / ADM UNet: ``forward(x [N x C x H x W], t [N], class_labels [N] | None)``.

    Returns [N x out_channels x H x W]: the prediction, with the learned-variance channels
    appended when ``out_channels == 2 * in_channels``. For a class-conditional model,
    ``class_labels=None`` (or label ``null_class``) is the unconditional branch of
    classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(
                f"UNet: config must be a UNetConfig (UNetConfig(**d) or UNetConfig.from_dict(d) "
                f"for a dict), got {type(config).__name__}"
            )
        # a copy (normalised and validated by __post_init__): a caller's later edit of its
        # config (a sweep) must not change this model's
        self.config = config = dataclasses.replace(config)
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.sample_size = config.sample_size
        self.num_classes = config.num_classes
        self.null_class = config.num_classes  # index of the extra "no class" embedding row
        self.learned_variance = config.out_channels == 2 * config.in_channels
        self.schedule = None  # the training NoiseSchedule; fastdiff.sample uses it when set
        # all ResBlocks' embedding projections in one GEMM: None = on CUDA (_emb_projections)
        self.batch_emb_proj: bool | None = None

        ch, emb_dim, g = config.base_channels, 4 * config.base_channels, config.num_groups
        self.time_embed = TimestepEmbedding(ch, emb_dim)
        self.class_embed = None
        if config.num_classes is not None:
            self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)

        def res_block(c_in: int, c_out: int, **kw: bool) -> ResBlock:
            return ResBlock(
                c_in,
                c_out,
                emb_dim,
                dropout=config.dropout,
                use_scale_shift_norm=config.use_scale_shift_norm,
                num_groups=g,
                **kw,
            )

        def attention(c: int) -> Attention:  # neither num_heads nor head_dim: one head
            return Attention(c, num_heads=config.num_heads, head_dim=config.head_dim, num_groups=g)

        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        levels = len(config.channel_mult)
        res = config.resolutions
        skips = [ch]  # channels of every tensor the down path hands to the up path
        self.down = nn.ModuleList()
        for level in range(levels):
            c_out = config.level_channels(level)
            use_attn = res[level] in config.attention_resolutions
            for _ in range(config.num_res_blocks):
                attn = attention(c_out) if use_attn else None
                self.down.append(UNetBlock("down", res[level], res_block(ch, c_out), attn))
                ch = c_out
                skips.append(ch)
            if level != levels - 1:
                if config.resblock_updown:
                    layer = res_block(ch, ch, down=True)
                else:
                    layer = Downsample(ch, use_conv=True)
                self.down.append(UNetBlock("down", res[level], layer))
                skips.append(ch)

        mid_attn = attention(ch) if config.mid_attention else None
        self.mid = nn.ModuleList(
            [
                UNetBlock("mid", res[-1], res_block(ch, ch), mid_attn),
                UNetBlock("mid", res[-1], res_block(ch, ch)),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            c_out = config.level_channels(level)
            use_attn = res[level] in config.attention_resolutions
            for _ in range(config.num_res_blocks + 1):
                skip = skips.pop()
                attn = attention(c_out) if use_attn else None
                block = UNetBlock("up", res[level], res_block(ch + skip, c_out), attn, skip)
                self.up.append(block)
                ch = c_out
            if level != 0:
                if config.resblock_updown:
                    layer = res_block(ch, ch, up=True)
                else:
                    layer = Upsample(ch, use_conv=True)
                self.up.append(UNetBlock("up", res[level], layer))
        assert not skips

        self.norm_out = GroupNormSiLU(g, ch)
        self.conv_out = nn.Conv2d(ch, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained model predicts 0 (ADM)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def schedule(self) -> Any:
        """The training ``fastdiff.NoiseSchedule`` (or None): ``fastdiff.sample`` uses it, and
        ``save_pretrained`` / ``save_model_file`` save it. A name (``"cosine"``) set here
        becomes ``NoiseSchedule(name)``; anything else but None is a ``TypeError``."""
        d = self.__dict__
        return d.get("_schedule", d.get("schedule"))  # "schedule": a pickle from before

    @schedule.setter
    def schedule(self, value: Any) -> None:
        from fastdiff.schedules import NoiseSchedule

        if isinstance(value, str):
            value = NoiseSchedule(value)
        if value is not None and not isinstance(value, NoiseSchedule):
            raise TypeError(
                f"UNet.schedule must be a fastdiff.NoiseSchedule, a schedule name or None, got "
                f"{type(value).__name__} (a diffusers scheduler: "
                f"NoiseSchedule.from_diffusers(scheduler), or fastdiff.sample(schedule=...))"
            )
        self.__dict__["_schedule"] = value

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [N x C x H x W] (NCHW or channels_last), t [N] or scalar -> [N x C_out x H x W].

        The output is contiguous for a contiguous x even when the weights are channels_last
        (``fastdiff.sample`` converts them on CPU), so callers' ``.view`` keeps working; a
        channels_last x gives a channels_last output."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet.forward: x must be a torch.Tensor, got {type(x).__name__}")
        check_nchw("UNet.forward", x, self.in_channels)
        n = x.shape[0]
        down = 2 ** (len(self.config.channel_mult) - 1)  # the U halves the map this many times
        if n == 0 or x.shape[2] % down or x.shape[3] % down:
            raise ValueError(
                f"UNet.forward: x must be [N >= 1 x C x H x W] with H and W multiples of {down} "
                f"(the U halves them {len(self.config.channel_mult) - 1}x), "
                f"got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"UNet.forward: t must be integer or float timesteps, got {t.dtype}")
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(n)
        if t.shape != (n,):
            raise ValueError(f"UNet.forward: t must be a scalar or [{n}], got {tuple(t.shape)}")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device)
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise TypeError(
                    f"UNet.forward: class_labels must be integers, got dtype {class_labels.dtype}"
                )
            if class_labels.numel() == 1:
                class_labels = class_labels.reshape(1).expand(n)
            if class_labels.shape != (n,):
                raise ValueError(
                    f"UNet.forward: class_labels must be a scalar or [{n}], got "
                    f"{tuple(class_labels.shape)}"
                )
            cpu = class_labels.device.type == "cpu" and not torch.compiler.is_compiling()
            if self.num_classes is not None and cpu:
                lo, hi = int(class_labels.min()), int(class_labels.max())
                if lo < 0 or hi > self.null_class:  # checked where it costs no device sync
                    raise ValueError(
                        f"UNet.forward: class labels must be in 0..{self.null_class} (the last "
                        f"one the null class), got {lo if lo < 0 else hi}"
                    )

        emb = self.time_embed(t)  # [N x 4C]
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((n,), self.null_class, device=x.device)
            emb = emb + self.class_embed(class_labels.reshape(n).long())  # [N x 4C]
        elif class_labels is not None:
            raise ValueError("UNet.forward: class_labels given to a model with num_classes=None")
        emb = F.silu(emb)  # once here instead of inside every ResBlock's projection
        projs = self._emb_projections(emb)  # each ResBlock's W_i emb + b_i, or None

        h = self.conv_in(x)  # [N x C x H x W]
        skips = [h]
        for block in self.down:
            h = block(h, emb, projs.pop() if projs and _is_res(block) else None)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, projs.pop() if projs else None)  # bottleneck, lowest resolution
        for block in self.up:
            if block.skip_channels:
                h = torch.cat([h, skips.pop()], dim=1)  # [N x (C_h + C_skip) x h x w]
            h = block(h, emb, projs.pop() if projs and _is_res(block) else None)
        out = self.conv_out(self.norm_out(h))  # [N x out_channels x H x W]
        if x.is_contiguous() and not out.is_contiguous():
            out = out.contiguous()  # channels_last weights, NCHW caller
        return out

    def _emb_projections(self, emb: torch.Tensor) -> list[torch.Tensor] | None:
        """Every ResBlock's embedding projection ``W_i emb + b_i`` [N x C_i] from one GEMM over
        the stacked weights (then split into views), in *reverse* forward order (``pop()``).

        One GEMM kernel (plus two small weight concatenations) instead of one per ResBlock
        (22 in ``ddpm-cifar10``): at small batch each of those GEMMs is a launch-bound kernel.
        The weights are stacked on every call (no cache that an in-place ``.data`` update could
        make stale), which costs a copy of them: worth it on a GPU, not on CPU, so
        ``batch_emb_proj=None`` (default) means "on CUDA". None (each block projects itself)
        when off, or when a projection is not a plain ``nn.Linear`` with a bias and no hooks
        (e.g. LoRA-wrapped), so such modules still run as modules. Gradients flow through the
        concatenation, so training works either way."""
        use = self.batch_emb_proj
        if not (emb.is_cuda if use is None else use):
            return None
        lins = [b.layer.emb_proj for b in (*self.down, *self.mid, *self.up) if _is_res(b)]
        projs = stacked_linear(lins, emb)  # [N x C_i] each, or None
        if projs is not None:
            projs.reverse()
        return projs

    # ---- construction, persistence, inspection -------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UNet:
        """Build a named architecture (see ``fastdiff.models.presets``), with random weights.

        ``overrides`` replace config fields; an ``in_channels`` without ``out_channels`` keeps
        the preset's ratio (``out_channels = in_channels``, or ``2 * in_channels`` for a
        learned-variance preset such as ``adm-64``), and a ``num_heads`` (``head_dim``) without
        the other replaces the preset's ``head_dim`` (``num_heads``)."""
        from fastdiff.models.presets import PRESETS

        if not isinstance(name, str) or name not in PRESETS:  # a list: not "unhashable type"
            exc = ValueError if isinstance(name, str) else TypeError
            raise exc(f"unknown UNet preset {name!r}; valid presets are {sorted(PRESETS)}")
        preset = PRESETS[name]
        if "in_channels" in overrides and "out_channels" not in overrides:
            # out_channels follows in_channels as in the preset: C, or 2C (learned variance)
            ratio = 2 if preset.out_channels == 2 * preset.in_channels else 1
            in_channels = overrides["in_channels"]
            if isinstance(in_channels, numbers.Integral) and not isinstance(in_channels, bool):
                overrides["out_channels"] = ratio * int(in_channels)
        for given, other in (("num_heads", "head_dim"), ("head_dim", "num_heads")):
            if overrides.get(given) is not None and other not in overrides:
                overrides[other] = None  # the preset's other head field would clash
        return cls(dataclasses.replace(preset, **overrides))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``path/model.safetensors`` (weights), ``path/config.json`` (UNetConfig) and,
        when the model carries a schedule, ``path/schedule.json``."""
        from safetensors.torch import save_file

        from fastdiff.models.pretrained import default_mode, safetensors_state, schedule_config

        schedule = schedule_config(self.schedule) if self.schedule is not None else None
        os.makedirs(path, exist_ok=True)
        weights = os.path.join(path, "model.safetensors")
        tmp = weights + ".tmp"
        save_file(safetensors_state(self.state_dict()), tmp, metadata={"format": "pt"})
        default_mode(tmp)  # safetensors writes 0600; config.json gets open()'s mode
        os.replace(tmp, weights)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        if schedule is not None:
            with open(os.path.join(path, "schedule.json"), "w") as f:
                json.dump(schedule, f, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> UNet:
        """Load a model written by :meth:`save_pretrained` (safetensors only, never pickle),
        in eval mode with ``requires_grad`` on (unlike ``fastdiff.models.load_model_file``, which
        freezes); call ``.train()`` to fine-tune."""
        from safetensors.torch import load_file

        if os.path.isfile(path):
            raise ValueError(
                f"UNet.from_pretrained: {path} is a file; it takes the directory written by "
                "save_pretrained (a .safetensors written by save_model_file or `fastdiff train` "
                "loads with fastdiff.models.pretrained.load_model_file)"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"UNet.from_pretrained: no config.json in {path} (a directory written by "
                "UNet.save_pretrained holds config.json and model.safetensors)"
            )
        with open(os.path.join(path, "config.json")) as f:
            config = UNetConfig.from_dict(json.load(f))
        model = cls(config)
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
        schedule_path = os.path.join(path, "schedule.json")
        if os.path.exists(schedule_path):
            from fastdiff.models.pretrained import build_schedule

            with open(schedule_path) as f:
                model.schedule = build_schedule(json.load(f))
        return model.to(device=device, dtype=dtype).eval()

    def summary(self) -> str:
        """The architecture as a table: the U of blocks with resolution, channels, attention,
        skip connections and parameter counts.

        Rows are indented by depth, so the down path, the bottleneck and the up path draw the U.
        ``save sK`` marks the tensor kept as skip connection K; the up-path block marked ``cat sK``
        concatenates it onto its input (channels read ``h+skip``).
        """

        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        def depth(res: int) -> int:
            return (self.sample_size // res).bit_length() - 1

        s, n_skip = self.sample_size, 0
        rows: list[tuple[str, ...]] = [("block", "res", "channels", "attn", "skip", "params")]
        emb = self.time_embed.linear2.out_features
        rows.append(("time_embed", "", f"t -> {emb}", "", "", f"{count(self.time_embed):,}"))
        if self.class_embed is not None:
            label = f"label ({self.num_classes} + null) -> {emb}"
            rows.append(("class_embed", "", label, "", "", f"{count(self.class_embed):,}"))
        conv_in = f"{self.in_channels} -> {self.conv_in.out_channels}"
        rows.append(("conv_in", f"{s}x{s}", conv_in, "", "save s0", f"{count(self.conv_in):,}"))
        skips = [0]
        for path in ("down", "mid", "up"):
            for i, block in enumerate(getattr(self, path)):
                layer, r = block.layer, block.resolution
                kind, res = type(layer).__name__, f"{r}x{r}"
                resample = layer.resample if isinstance(layer, ResBlock) else layer
                if isinstance(resample, (Downsample, Upsample)):
                    r2 = r // 2 if isinstance(resample, Downsample) else r * 2
                    kind += "" if resample is layer else f" {type(resample).__name__.lower()}"
                    res = f"{r}->{r2}"
                if isinstance(layer, ResBlock):
                    c_in, c_out = layer.in_channels, layer.out_channels
                else:
                    c_in = c_out = layer.channels
                chans = f"{c_in} -> {c_out}"
                skip = ""
                if path == "down":
                    n_skip += 1
                    skips.append(n_skip)
                    skip = f"save s{n_skip}"
                elif block.skip_channels:
                    chans = f"{c_in - block.skip_channels}+{block.skip_channels} -> {c_out}"
                    skip = f"cat s{skips.pop()}"
                d = len(self.config.channel_mult) if path == "mid" else depth(r)
                name = "  " * d + f"{path}.{i} {kind}"
                attn = "yes" if block.attn is not None else ""
                rows.append((name, res, chans, attn, skip, f"{count(block):,}"))
        head = f"{self.conv_out.in_channels} -> {self.out_channels}"
        n_out = count(self.norm_out) + count(self.conv_out)
        rows.append(("norm_out+conv_out", f"{s}x{s}", head, "", "", f"{n_out:,}"))
        total = ("total", "", "", "", "", f"{count(self):,}")

        widths = [max(len(r[i]) for r in [*rows, total]) for i in range(len(total))]

        def fmt(r: tuple[str, ...]) -> str:
            last = len(r) - 1
            cells = [
                c.rjust(w) if i == last else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(rows[0]))
        return "\n".join([fmt(rows[0]), rule, *map(fmt, rows[1:]), rule, fmt(total)])

    def num_parameters(self) -> int:
        """Total parameter count (``ddpm-cifar10``: 35.7M)."""
        return sum(p.numel() for p in self.parameters())
