"""Pictures of diffusion: sample grids, the forward process, the schedules, the reverse process.

Grids and strips are drawn with Pillow only; :func:`schedules_figure` needs matplotlib (the
``plot`` extra: ``pip install 'fastdiff[plot]'``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "to_uint8",
    "make_grid",
    "save_png",
    "forward_strip",
    "reverse_figure",
    "schedules_figure",
    "stack_images",
]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space images ``[N x C x H x W]`` in [-1, 1] -> uint8 ``[N x C x H x W]``.

    uint8 input is taken as pixels already (returned on the CPU unchanged); other integer and
    bool tensors are a TypeError (their range is ambiguous).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.detach().cpu()
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"x: expected floating-point images in [-1, 1] or uint8 pixels, got dtype {x.dtype}"
        )
    return ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def make_grid(
    x: torch.Tensor, nrow: int | None = None, scale: int = 4, pad: int = 2, pad_value: int = 255
):
    """A ``PIL.Image`` grid of ``[N x C x H x W]`` images in [-1, 1] (C = 1 -> mode "L", 3 ->
    "RGB"; uint8 tensors are taken as pixels 0..255; one ``[C x H x W]`` image is a grid of
    one), ``nrow`` images per row (default ceil(sqrt(N))), each upscaled ``scale`` times with
    nearest-neighbour, ``pad`` pixels of ``pad_value`` (0..255) between and around them.

    Size: ``(ncol * H * scale + (ncol + 1) * pad) x (nrows * ...)``.
    """
    from PIL import Image

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected [N x 1|3 x H x W] or [1|3 x H x W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one image, got an empty batch")
    for name, v, lo in (("scale", scale, 1), ("pad", pad, 0)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, Integral) or nrow < 1):
        raise ValueError(f"nrow: expected a positive int or None, got {nrow!r}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value: expected a pixel value in 0..255, got {pad_value!r}")
    n, c, h, w = x.shape
    ncol = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncol)
    u8 = to_uint8(x)
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    hs, ws = h * scale, w * scale
    grid = torch.full(
        (c, nrows * hs + (nrows + 1) * pad, ncol * ws + (ncol + 1) * pad),
        pad_value,
        dtype=torch.uint8,
    )
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = pad + r * (hs + pad), pad + q * (ws + pad)
        grid[:, y0 : y0 + hs, x0 : x0 + ws] = u8[i]
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")


def check_writable(path: str | os.PathLike) -> Path:
    """Raise a clear error if ``path`` cannot be written (before any work is done)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--out {p} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"cannot write {p}: permission denied")
    return p


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (a temporary beside ``path``, then rename).

    ``image`` may also be a tensor of images, drawn with :func:`make_grid`'s defaults.
    """
    if isinstance(image, torch.Tensor):
        image = make_grid(image)
    if not callable(getattr(image, "save", None)):
        raise TypeError(
            f"image: expected a PIL image or a tensor of images, got {type(image).__name__}"
        )
    p = check_writable(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def _label_row(labels: Sequence[str], cell: int, pad: int, height: int = 14):
    from PIL import Image, ImageDraw

    width = len(labels) * cell + (len(labels) + 1) * pad
    im = Image.new("L", (width, height), 255)
    d = ImageDraw.Draw(im)
    for i, s in enumerate(labels):
        x0 = pad + i * (cell + pad)
        tw = d.textlength(s)
        d.text((x0 + (cell - tw) / 2, 1), s, fill=0)
    return im


def stack_images(images: list, gap: int = 0):
    """Stack PIL images (mode L) vertically on white, ``gap`` pixels apart."""
    from PIL import Image

    w = max(im.width for im in images)
    h = sum(im.height for im in images) + gap * (len(images) - 1)
    out = Image.new("L", (w, h), 255)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def _titled(title: str, body):
    from PIL import Image, ImageDraw

    head = Image.new("L", (body.width, 16), 255)
    ImageDraw.Draw(head).text((4, 2), title, fill=0)
    return stack_images([head, body])


def forward_strip(
    x0: torch.Tensor,
    schedule: Any,
    num_frames: int = 11,
    seed: int = 0,
    scale: int = 4,
):
    """One image noised by q(x_t | x_0) (DDPM eq. 4) at ``num_frames`` evenly spaced t.

    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with one fixed eps for all frames, so the
    strip shows the signal fading into the same noise. Returns a PIL image with t labels.
    """
    if x0.ndim == 3:
        x0 = x0.unsqueeze(0)
    if x0.ndim != 4 or x0.shape[0] != 1:
        raise ValueError(f"x0: expected one image [C x H x W] or [1 x C x H x W], got "
                         f"{tuple(x0.shape)}")  # fmt: skip
    if isinstance(num_frames, bool) or not isinstance(num_frames, Integral) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    T = schedule.num_train_timesteps
    ts = torch.linspace(0, T - 1, num_frames).round().long()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).expand(num_frames, *x0.shape[1:])
    xt = schedule.q_sample(x0.expand(num_frames, *x0.shape[1:]).float(), ts, noise.float())
    pad = 2
    grid = make_grid(xt, nrow=num_frames, scale=scale, pad=pad)
    labels = _label_row([f"t={int(t)}" for t in ts], x0.shape[-1] * scale, pad)
    name = getattr(schedule, "beta_schedule", "")
    return _titled(f"forward process q(x_t | x_0), {name} schedule", stack_images([grid, labels]))


def reverse_figure(xs: torch.Tensor, x0s: torch.Tensor, timesteps: Sequence[int], scale: int = 4):
    """Two rows: x_t (top) and the model's x0 prediction (bottom) at the given sampling steps.

    ``xs`` and ``x0s`` are ``[K x C x H x W]`` (one image per selected step), ``timesteps`` the
    K model timesteps.
    """
    if xs.shape != x0s.shape or xs.ndim != 4 or len(timesteps) != xs.shape[0]:
        raise ValueError(
            f"xs, x0s, timesteps: expected two [K x C x H x W] stacks of one shape and K "
            f"timesteps, got {tuple(xs.shape)}, {tuple(x0s.shape)} and {len(timesteps)}"
        )
    pad = 2
    k = xs.shape[0]
    cell = xs.shape[-1] * scale
    top = make_grid(xs, nrow=k, scale=scale, pad=pad)
    bottom = make_grid(x0s, nrow=k, scale=scale, pad=pad)
    labels = _label_row([f"t={int(t)}" for t in timesteps], cell, pad)
    return stack_images(
        [
            _titled("reverse process: x_t", top),
            _titled("prediction of x_0 at that step", bottom),
            labels,
        ]
    )


def schedules_figure(schedules: dict[str, Any]):
    """A matplotlib figure: abar_t and log SNR(t) = log(abar_t / (1 - abar_t)) per schedule.

    Raises ImportError with the install hint when matplotlib is missing.
    """
    try:  # a bare Figure: no pyplot, so the caller's matplotlib backend is left alone
        import matplotlib  # noqa: F401  (the package itself: the check the hint is for)
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "this picture needs matplotlib: pip install 'fastdiff[plot]' (or pip install "
            "matplotlib)"
        ) from exc
    fig = Figure(figsize=(8, 3), dpi=100)
    a1, a2 = fig.subplots(1, 2)
    for name, s in schedules.items():
        ab = s.alphas_cumprod.double()
        t = torch.arange(ab.numel())
        a1.plot(t.numpy(), ab.numpy(), label=name)
        a2.plot(t.numpy(), (ab / (1 - ab)).log().numpy(), label=name)
    a1.set_title(r"$\bar\alpha_t$ (signal kept)")
    a2.set_title(r"log SNR $= \log \bar\alpha_t / (1-\bar\alpha_t)$")
    for a in (a1, a2):
        a.set_xlabel("t")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    return fig
