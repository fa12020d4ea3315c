"""``fastdiff repaint``: RePaint inpainting (:func:`fastdiff.repaint`) of a picture with the
embedded digits model (or a model written by ``fastdiff train``).

    fastdiff repaint --init-image digit.png --mask mask.png --steps 50 --out fills.png

``fastdiff sample --init-image --mask`` inpaints by replacement only (one model call per step);
this command adds RePaint's resampling (every ``--jump-length`` levels the sample goes back up
the chain ``--jump-n-sample - 1`` times), which harmonises the repainted region with the kept
one at the price of more model calls: ``steps + (jump_n_sample - 1) * jump_length`` per jump
point (250 / 10 / 10: 2,410).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from fastdiff._cli_args import _finite, check_grid
from fastdiff.cli import (
    DEFAULT_GUIDANCE,
    CLIError,
    _backend_ctx,
    _check_backend,
    _check_out,
    _device,
    _init_image,
    _label,
    _labels,
    _load_model,
    _mask,
    _positive_int,
    _save,
    _seed,
)


def cmd_repaint(a: argparse.Namespace) -> None:
    """Run :func:`fastdiff.repaint` on ``--n`` copies of the picture and write their grid."""
    import fastdiff
    from fastdiff._prepare import _infer_shape
    from fastdiff.viz import make_grid

    dev = _device(a.device)
    _check_backend(a.backend, dev)
    out = _check_out(a.out)
    if a.guidance is not None and a.label is None:
        raise CLIError("--guidance needs --label (classifier-free guidance towards a class)")
    if not 0.0 <= a.eta <= 1.0:  # NaN fails too
        raise CLIError(f"--eta must be in [0, 1] (RePaint's DDIM eta), got {a.eta}")
    model = _load_model(a.model, dev)
    nrow = a.nrow or (10 if a.label == "all" else None)
    check_grid(a.n, nrow, a.scale, _infer_shape(model))
    image = _init_image(a.init_image, model, a.n, dev)
    mask = _mask(a.mask, image)
    labels = _labels(model, a.label, a.n, dev)
    guidance = None
    if labels is not None:
        g = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
        guidance = None if g == 1.0 else g
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    with _backend_ctx(a.backend), torch.no_grad():
        x = fastdiff.repaint(
            model, image, mask, a.steps, jump_length=a.jump_length,
            jump_n_sample=a.jump_n_sample, eta=a.eta, cond=labels, guidance_scale=guidance,
            generator=gen, device=dev, progress=not a.quiet,
        )  # fmt: skip
    _save(make_grid(x, nrow=nrow, scale=a.scale), out)


def add_repaint_parser(sub: Any) -> None:
    """The ``repaint`` subcommand on the ``fastdiff`` parser's subparsers ``sub``."""
    r = sub.add_parser(
        "repaint", help="RePaint inpainting of a picture (resampling: more model calls)"
    )
    r.add_argument("--init-image", required=True,
                   help="the picture (PNG, JPEG, ...), resized to the model's size")  # fmt: skip
    r.add_argument("--mask", required=True,
                   help="repaint the picture's white region (resized, binarized at 50%%), keep "
                        "the black")  # fmt: skip
    r.add_argument("--steps", type=_positive_int, default=250,
                   help="reverse levels; model calls: steps + (r - 1) j per jump")  # fmt: skip
    r.add_argument("--jump-length", type=_positive_int, default=10,
                   help="levels per resampling jump (the paper's j)")  # fmt: skip
    r.add_argument("--jump-n-sample", type=_positive_int, default=10,
                   help="passes over each jump (the paper's r; 1: no resampling)")  # fmt: skip
    r.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the reverse steps, [0, 1]")
    r.add_argument("--n", type=_positive_int, default=16, help="number of images")
    r.add_argument("--out", default="repaint.png", help="PNG grid to write")
    r.add_argument("--label", type=_label, default=None, help="digit 0-9, or 'all' (0,1,..,9,0..)")
    r.add_argument("--guidance", type=_finite, default=None, help="classifier-free guidance scale")
    r.add_argument("--seed", type=_seed, default=0, help="random seed")
    r.add_argument("--model", default=None, help="a .safetensors written by `fastdiff train`")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    r.add_argument("--backend", default=None, help="force a backend: torch|cpu|cuda|triton|sdpa")
    r.add_argument("--nrow", type=_positive_int, default=None, help="images per row")
    r.add_argument("--scale", type=_positive_int, default=4, help="pixel upscale factor")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_repaint)
