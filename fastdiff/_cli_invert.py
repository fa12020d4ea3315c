"""``fastdiff invert``: a picture -> the noise x_T (:func:`fastdiff.invert`) that ``fastdiff sample
--noise`` brings back to it, with the embedded digits model (or a model from ``fastdiff train``).

    fastdiff invert --init-image digit.png --steps 50 --out noise.safetensors
    fastdiff sample --noise noise.safetensors --out back.png        (the picture again)
    fastdiff sample --noise noise.safetensors --label 8 --out edit.png

The noise file holds one tensor, ``"x_T"`` ``[1 x C x H x W]`` (float32), and metadata (strings):
``sampler``, ``steps``, ``sample_shape`` (the model's ``CxHxW``), ``label`` / ``guidance`` (empty
without ``--label``), ``options`` (JSON: the inverse sampler's options, which the forward sampler
repeats) and ``image``. ``sample --noise`` takes its ``--sampler`` (``ddim`` for ``ddim_inverse``,
``dpm++`` for ``dpm++_inverse``), ``--steps``, ``--n``, ``--label`` and ``--guidance`` from there
unless they are given, and with the matching forward sampler the options (``dpm++_inverse``'s
``--karras`` / ``--solver-order``: ``use_karras_sigmas`` / ``solver_order``; given again to
``sample``, ``--karras`` / ``--solver-order`` win).

DDIM inversion runs without x0 clipping (``clip_sample=False`` both ways): with the sampler's
default clipping the round trip of a digit at 50 steps was off by up to 1.75 (of the [-1, 1]
range), without it by 0.09.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fastdiff._cli_args import _finite
from fastdiff.cli import (
    CLIError,
    _backend_ctx,
    _check_backend,
    _check_out,
    _device,
    _init_image,
    _label,
    _labels,
    _load_model,
    _positive_int,
)

#: inverse sampler -> the forward sampler that undoes it
FORWARD = {"ddim_inverse": "ddim", "dpm++_inverse": "dpm++"}
#: options of the inverse sampler (and of its forward sampler, which repeats them)
_OPTIONS: dict[str, dict[str, Any]] = {"ddim_inverse": {"clip_sample": False}, "dpm++_inverse": {}}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SAMPLE_DEFAULTS = {"steps": 50, "sampler": "ddim", "n": 64}


def _shape_str(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape)


def cmd_invert(a: argparse.Namespace) -> None:
    """Invert ``--init-image`` with :func:`fastdiff.invert` and write x_T as safetensors."""
    import fastdiff
    from fastdiff._prepare import _infer_shape

    dev = _device(a.device)
    _check_backend(a.backend, dev)
    out = _check_out(a.out, ".safetensors")
    if a.guidance is not None and a.label is None:
        raise CLIError("--guidance needs --label (classifier-free guidance towards a class)")
    if a.label == "all":
        raise CLIError("--label all asks for several classes; invert takes one picture (0-9)")
    opts = {**_OPTIONS[a.sampler], **_solver_options(a)}
    model = _load_model(a.model, dev)
    image = _init_image(a.init_image, model, 1, dev)
    T = model.schedule.num_train_timesteps if model.schedule is not None else 1000
    if a.steps > T:
        raise CLIError(f"--steps must be <= {T} (the model's training timesteps), got {a.steps}")
    if dev.type == "cpu":  # as `fastdiff sample`, so its round trip runs the same convolutions
        fastdiff.optimize(model, channels_last=True)
    labels = _labels(model, a.label, 1, dev)
    g = None if labels is None else (1.0 if a.guidance is None else a.guidance)
    with _backend_ctx(a.backend), torch.no_grad():
        x_T = fastdiff.invert(
            model, image, a.steps, sampler=a.sampler, cond=labels,
            guidance_scale=None if g == 1.0 else g, progress=not a.quiet, **opts,
        )  # fmt: skip
    meta = {
        "sampler": a.sampler,
        "steps": str(a.steps),
        "sample_shape": _shape_str(_infer_shape(model)),
        "label": "" if a.label is None else str(a.label),
        "guidance": "" if g is None else repr(float(g)),
        "options": json.dumps(opts),
        "image": Path(a.init_image).name,
    }
    _write_noise(x_T, meta, out)
    print(f"wrote {out} (x_T {_shape_str(x_T.shape)}, {a.sampler}, {a.steps} steps; "
          f"`fastdiff sample --noise` gives the picture back)", file=sys.stderr)  # fmt: skip


def _solver_options(a: argparse.Namespace) -> dict[str, Any]:
    """``--karras`` / ``--solver-order``: options of ``dpm++_inverse`` (stored in the file, so
    that ``sample --noise`` runs ``dpm++`` with them: the same grid and order both ways)."""
    opts: dict[str, Any] = {}
    for flag, key, value in (("--karras", "use_karras_sigmas", a.karras or None),
                             ("--solver-order", "solver_order", a.solver_order)):  # fmt: skip
        if value is None:
            continue
        if a.sampler != "dpm++_inverse":
            raise CLIError(f"{flag}: for --sampler dpm++_inverse (DDIM inversion has no "
                           f"{'sigma grid' if key != 'solver_order' else 'solver order'}), got "
                           f"--sampler {a.sampler}")  # fmt: skip
        opts[key] = value
    return opts


def _write_noise(x_T: torch.Tensor, meta: dict[str, str], out: Path) -> None:
    """Save ``{"x_T": x_T}`` with ``meta`` atomically (a temporary beside ``out``, renamed)."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({"x_T": x_T.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_noise(a: argparse.Namespace) -> dict[str, Any] | None:
    """``sample --noise``: read and check the file (key ``"x_T"``, a floating ``[N x C x H x W]``
    tensor, finite) and fill ``--steps`` / ``--sampler`` / ``--n`` / ``--label`` / ``--guidance``
    left out from its metadata (plain sample defaults without ``--noise``). Returns ``{"x":
    x_T, "options": the forward sampler's options}`` or None. Before the model is loaded."""
    if a.noise is None:
        for k, v in _SAMPLE_DEFAULTS.items():
            setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
        return None
    if a.init_image is not None:
        raise CLIError("--noise and --init-image both give the start; use one")
    x, meta = _load_noise(Path(a.noise))
    inverse = meta.get("sampler")
    a.sampler = a.sampler or FORWARD.get(inverse, "ddim")
    a.steps = a.steps or _meta_int(meta, "steps") or _SAMPLE_DEFAULTS["steps"]
    if a.n is not None and a.n != x.shape[0]:
        raise CLIError(f"--n {a.n} does not match the --noise file's batch of {x.shape[0]} x_T "
                       f"(leave --n out to sample them all)")  # fmt: skip
    a.n = x.shape[0]
    if a.label is None and meta.get("label"):
        a.label_from = f"--noise {a.noise}: its 'label' metadata"
        try:
            a.label = _label(meta["label"])
            if a.guidance is None and meta.get("guidance"):
                a.guidance = float(meta["guidance"])
        except (ValueError, argparse.ArgumentTypeError):
            bad = {k: meta.get(k) for k in ("label", "guidance") if k in meta}
            raise CLIError(f"--noise: {a.noise}: bad label / guidance metadata {bad}") from None
    opts = {}
    if inverse in FORWARD and FORWARD[inverse] == a.sampler:
        try:
            opts = dict(json.loads(meta.get("options") or "{}"))
        except (ValueError, TypeError):
            raise CLIError(f"--noise: {a.noise}: its 'options' metadata is not JSON") from None
    return {"x": x, "options": opts, "path": a.noise}


def noise_for(noise: dict[str, Any] | None, model: Any, dev: torch.device):
    """The x_T of :func:`read_noise` on ``dev``, its shape checked against the model's."""
    from fastdiff._prepare import _infer_shape

    if noise is None:
        return None
    x, want = noise["x"], _infer_shape(model)
    if want is not None and tuple(x.shape[1:]) != tuple(want):
        raise CLIError(f"--noise: {noise['path']} holds x_T of shape {tuple(x.shape)}, but the "
                       f"model samples [N x {' x '.join(map(str, want))}]")  # fmt: skip
    return x.to(dev)


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    try:
        return int(meta[key]) if meta.get(key) else None
    except ValueError:
        return None


def _load_noise(p: Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    if not p.is_file():
        raise CLIError(f"--noise: file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
            x = f.get_tensor("x_T") if "x_T" in keys else None
    except Exception as exc:  # safetensors' SafetensorError is no OSError
        raise CLIError(f"--noise: cannot read {p} as safetensors ({exc})") from None
    if x is None:
        raise CLIError(f"--noise: {p} has no tensor 'x_T' (written by `fastdiff invert`), "
                       f"got keys {keys}")  # fmt: skip
    if x.dtype not in _DTYPES:
        raise CLIError(f"--noise: {p}: x_T must be a floating-point tensor (float32, float16, "
                       f"bfloat16 or float64), got {x.dtype}")  # fmt: skip
    if x.ndim != 4 or x.numel() == 0:
        raise CLIError(f"--noise: {p}: x_T must be a non-empty [N x C x H x W] batch, got shape "
                       f"{tuple(x.shape)}")  # fmt: skip
    if not torch.isfinite(x).all():
        raise CLIError(f"--noise: {p}: x_T has NaN or inf values")
    return x.float(), meta


def add_invert_parser(sub: Any) -> None:
    """The ``invert`` subcommand on the ``fastdiff`` parser's subparsers ``sub``."""
    r = sub.add_parser("invert", help="a picture -> the noise x_T that sample --noise turns back")
    r.add_argument("--init-image", required=True,
                   help="the picture (PNG, JPEG, ...), resized to the model's size")  # fmt: skip
    r.add_argument("--steps", type=_positive_int, default=50, help="inversion steps")
    r.add_argument("--sampler", choices=tuple(FORWARD), default="ddim_inverse",
                   help="ddim_inverse (sample --sampler ddim undoes it) or dpm++_inverse (dpm++; "
                        "a closer round trip at the same steps)")  # fmt: skip
    r.add_argument("--karras", action="store_true",
                   help='dpm++_inverse: the Karras sigma grid ("DPM++ 2M Karras" run upwards; '
                        "sample --noise repeats it)")  # fmt: skip
    r.add_argument("--solver-order", type=int, choices=(1, 2, 3), default=None,
                   help="dpm++_inverse: 1, 2 (default) or 3 (sample --noise repeats "
                        "it)")  # fmt: skip
    r.add_argument("--out", default="noise.safetensors", help="x_T as .safetensors")
    r.add_argument("--label", type=_label, default=None, help="digit 0-9 to invert towards")
    r.add_argument("--guidance", type=_finite, default=None,
                   help="classifier-free guidance scale with --label (default 1: none, as "
                        "editing methods invert)")  # fmt: skip
    r.add_argument("--model", default=None, help="a .safetensors written by `fastdiff train`")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    r.add_argument("--backend", default=None, help="force a backend: torch|cpu|cuda|triton|sdpa")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_invert)
