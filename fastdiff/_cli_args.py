"""Argument types and up-front checks of the ``fastdiff`` command (:mod:`fastdiff.cli`): a bad
value is argparse's one-line usage error naming the option (exit status 2), before the model
loads or anything is written."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: the most pixels a PNG grid of ``fastdiff sample`` may have (a 16384 x 16384 picture)
MAX_GRID_PIXELS = 2**28


def _int_at_least(lo: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo`` (``what`` names the expectation in the error)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _seed(s: str) -> int:
    """An argparse type: a seed torch.Generator.manual_seed takes (-2**63 .. 2**64 - 1)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not -(2**63) <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in -2**63 .. 2**64-1, got {v}")
    return v


def _label(s: str) -> int | str:
    if s == "all":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a digit or 'all', got {s!r}") from None


def _float_in(what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which ``ok`` holds (``what`` names the expectation)."""

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return v

    return parse


#: ``--guidance``: any finite scale (negative ones push away from the label, as in diffusers)
_finite = _float_in("a finite number", math.isfinite)
#: ``--eta``: DDIM's eta, TCD's gamma, k-diffusion's ancestral eta
_finite_nonneg = _float_in("a finite number >= 0", lambda v: 0.0 <= v < math.inf)
#: ``--strength``: the fraction of the steps img2img runs
_strength = _float_in("a number in (0, 1]", lambda v: 0.0 < v <= 1.0)


def check_grid(n: int, nrow: int | None, scale: int, shape: tuple[int, ...] | None) -> None:
    """The PNG grid of ``n`` samples of ``shape`` (C, H, W), ``nrow`` per row (default
    ceil(sqrt(n)), as :func:`fastdiff.viz.make_grid`), each ``scale`` times upscaled, has at
    most :data:`MAX_GRID_PIXELS` pixels: else a CLIError naming ``--scale`` / ``--n`` /
    ``--nrow`` before anything is sampled (a typo such as ``--scale 1000`` asked for tens of
    GB of memory after the whole run)."""
    from fastdiff.cli import CLIError

    if shape is None or len(shape) != 3:
        return
    h, w = shape[1] * scale, shape[2] * scale
    ncol = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / ncol)
    gw, gh = ncol * w + (ncol + 1) * 2, rows * h + (rows + 1) * 2  # make_grid's pad of 2
    if gw * gh > MAX_GRID_PIXELS:
        raise CLIError(
            f"--scale {scale} with --n {n} and {ncol} images per row (--nrow) makes a {gw} x "
            f"{gh} PNG ({gw * gh / 1e6:.0f}M pixels); at most {MAX_GRID_PIXELS / 1e6:.0f}M: use "
            "a smaller --scale, --n or --nrow"
        )
