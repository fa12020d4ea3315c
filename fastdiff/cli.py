"""The ``fastdiff`` command.

    fastdiff sample --steps 50 --sampler ddim --n 64 --out samples.png [--label 3 --guidance 2]
    fastdiff sample --init-image digit.png --strength 0.6 --out edits.png     (img2img, SDEdit)
    fastdiff sample --init-image digit.png --mask mask.png --out fills.png    (inpainting)
    fastdiff repaint --init-image digit.png --mask mask.png --out fills.png   (RePaint)
    fastdiff invert --init-image digit.png --out x.safetensors   (then sample --noise x.safetensors)
    fastdiff train --out model.safetensors [--steps 2000] [--device cuda]
    fastdiff bench [--json]
    fastdiff info [--json]
    fastdiff show unet [--preset digits]
    fastdiff show forward --out forward.png
    fastdiff show schedules --out schedules.png        (needs matplotlib: fastdiff[plot])
    fastdiff show reverse --out reverse.png

Bad input is a one-line ``fastdiff: error: ...`` on stderr and exit status 2 (as argparse's), a
failure while running exit status 1, before any output file is written (``FASTDIFF_DEBUG=1``: the
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdiff._cli_args import (
    _finite,
    _finite_nonneg,
    _label,
    _nonneg_int,
    _positive_int,
    _seed,
    _strength,
    check_grid,
)

SAMPLERS = ("ddim", "ddpm", "deis", "dpm++", "dpm++_sde", "dpm++_single", "dpm2", "dpm2_a",
            "euler", "euler_a", "heun", "lcm", "lms", "pndm", "plms", "tcd", "unipc")  # fmt: skip
DEFAULT_GUIDANCE = 2.0  # classifier-free guidance scale for --label without --guidance


def sampler_options(sampler: str, guidance: float | None) -> dict[str, Any]:
    """Sampler options the command uses. DDIM with x0 clipping (its default) under guidance
    re-derives eps from the clipped x0 (``use_clipped_model_output``): the guided eps is much
    larger than any eps the model was trained to output, and stepping with it while x0 is
    clipped fills the image with noise (at scale 3 most digits become unreadable)."""
    if sampler == "ddim" and guidance is not None and guidance != 1.0:
        return {"use_clipped_model_output": True}
    return {}


class CLIError(Exception):
    """A user error: reported as one line, exit status 2 (as argparse's usage errors)."""


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help, also to options without help text
    (argparse's ArgumentDefaultsHelpFormatter skips those), but not ``None`` / ``False``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS)
        if action.option_strings and shown and "default:" not in text:
            text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # --help shows every option's default
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- shared helpers
def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device: unsupported device {name!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} was asked for but CUDA is not available on this machine")
    return dev


def _check_backend(backend: str | None, dev: torch.device) -> None:
    if backend is None:
        return
    from fastdiff import _dispatch

    if backend not in _dispatch.BACKENDS:
        raise CLIError(f"--backend: unknown backend {backend!r}; valid: {list(_dispatch.BACKENDS)}")
    if backend == "sdpa":
        return
    ok, why = _dispatch.backend_available(backend, dev)
    if not ok:
        raise CLIError(f"--backend: backend {backend!r} cannot run on {dev.type}: {why}")


def _backend_ctx(backend: str | None):
    import contextlib

    from fastdiff import use_backend

    if backend is None:
        return contextlib.nullcontext()
    if backend == "sdpa":  # an attention-only backend
        return use_backend("sdpa", op="attention")
    return use_backend(backend)


def _load_model(path: str | None, dev: torch.device):
    from fastdiff.models.pretrained import load_model_file, load_pretrained

    if path is None:
        return load_pretrained("digits", device=dev)
    p = Path(path)
    if not p.is_file() and not p.is_dir():  # a directory: load_model_file says what it expects
        raise CLIError(f"--model: model file not found: {p}")
    return load_model_file(p, device=dev)


def _check_out(path: str, suffix: str = ".png") -> Path:
    from fastdiff.viz import check_writable

    if Path(path).suffix.lower() != suffix:
        raise CLIError(f"--out: the file is written as {suffix[1:]}, so its name must end in "
                       f"{suffix}, got {path}")  # fmt: skip
    try:
        return check_writable(path)
    except ValueError as exc:
        raise CLIError(str(exc) if str(exc).startswith("--out") else f"--out: {exc}") from None


def _labels(
    model, label: int | str | None, n: int, dev, what: str = "--label"
) -> torch.Tensor | None:
    if label is None:
        return None
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if not num_classes:
        raise CLIError(f"{what} needs a class-conditional model; this one has no classes")
    if label == "all":
        return torch.arange(n, device=dev) % num_classes
    if not 0 <= label < num_classes:
        raise CLIError(f"{what} must be in 0..{num_classes - 1} (or 'all'), got {label}")
    return torch.full((n,), label, dtype=torch.long, device=dev)


def _init_image(path: str, model: Any, n: int, dev: torch.device) -> torch.Tensor:
    """``--init-image``: a picture file as x_0 in model space ``[n x C x H x W]``: converted to
    the model's channels (1: grayscale, 3: RGB), resized to its sample size, pixels / 127.5 - 1
    (``fastdiff.to_images`` inverted), the same image for each of the n samples."""
    from fastdiff._prepare import _infer_shape

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--init-image: file not found: {p}")
    shape = _infer_shape(model)
    if shape is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise CLIError(f"--init-image: needs a 1- or 3-channel image model, got shape {shape}")
    c, h, w = shape
    x = _picture("--init-image", p, "L" if c == 1 else "RGB", (w, h)) / 127.5 - 1.0
    x = x[None] if c == 1 else x.permute(2, 0, 1)
    return x[None].expand(n, c, h, w).contiguous().to(dev)


def _mask(path: str, image: torch.Tensor) -> torch.Tensor:
    """``--mask``: a picture file as the inpainting mask ``[n x 1 x H x W]`` (white = repaint):
    grayscale, resized to the image's size, / 255, binarized at 0.5 (diffusers' inpainting
    ``mask_processor``)."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--mask: file not found: {p}")
    n, _, h, w = image.shape
    m = (_picture("--mask", p, "L", (w, h)) / 255.0 >= 0.5).float()
    return m[None, None].expand(n, 1, h, w).contiguous().to(image.device)


def _picture(flag: str, p: Path, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """The picture file ``p`` in ``mode``, bilinearly resized to ``size`` (w, h), as float32
    pixels ``[H x W (x 3)]`` in 0 .. 255."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            img = img.convert(mode).resize(size, Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise CLIError(f"{flag}: cannot read {p} as an image ({exc})") from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy())


def _save(image, out: Path) -> None:
    from fastdiff.viz import save_png

    save_png(image, out)
    print(f"wrote {out} ({image.width}x{image.height})", file=sys.stderr)


# --------------------------------------------------------------------------------- commands
def cmd_sample(a: argparse.Namespace) -> None:
    import fastdiff
    from fastdiff._cli_invert import noise_for, read_noise
    from fastdiff._prepare import _infer_shape
    from fastdiff.viz import make_grid

    dev = _device(a.device)
    _check_backend(a.backend, dev)
    out = _check_out(a.out)
    noise = read_noise(a)  # --noise: x_T of `fastdiff invert`; fills --steps / --sampler / --n
    if a.guidance is not None and a.label is None:
        raise CLIError("--guidance needs --label (classifier-free guidance towards a class)")
    if a.strength is not None and a.init_image is None:
        raise CLIError("--strength needs --init-image (img2img: the image to start from)")
    if a.mask is not None and a.init_image is None:
        raise CLIError("--mask needs --init-image (inpainting: the image to repaint)")
    model = _load_model(a.model, dev)
    image = None if a.init_image is None else _init_image(a.init_image, model, a.n, dev)
    mask = None if a.mask is None else _mask(a.mask, image)
    x_T, nrow = noise_for(noise, model, dev), a.nrow or (10 if a.label == "all" else None)
    check_grid(a.n, nrow, a.scale, _infer_shape(model))
    T = model.schedule.num_train_timesteps if model.schedule is not None else 1000
    if a.steps > T:
        raise CLIError(f"--steps must be <= {T} (the model's training timesteps), got {a.steps}")
    if dev.type == "cpu":  # oneDNN's convolutions are faster in NHWC (README, Performance)
        fastdiff.optimize(model, channels_last=True)
    labels = _labels(model, a.label, a.n, dev, getattr(a, "label_from", "--label"))
    guidance = None
    if labels is not None:
        g = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
        guidance = None if g == 1.0 else g
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    opts = {**sampler_options(a.sampler, guidance), **(noise or {}).get("options", {})}
    if a.eta is not None:
        opts["eta"] = a.eta
    if a.karras:
        if a.sampler not in ("deis", "dpm++", "dpm++_sde", "dpm++_single", "dpm2", "dpm2_a",
                             "euler", "euler_a", "heun", "lms", "unipc"):  # fmt: skip
            raise CLIError(
                "--karras: for --sampler deis, dpm++, dpm++_sde, dpm++_single, dpm2, dpm2_a, "
                f"euler, euler_a, heun, lms or unipc, got --sampler {a.sampler}"
            )
        opts["use_karras_sigmas"] = True
    if a.sde:
        if a.sampler != "dpm++":
            raise CLIError(f"--sde: for --sampler dpm++, got --sampler {a.sampler}")
        opts["algorithm_type"] = "sde-dpmsolver++"
    if a.solver_order is not None:
        if a.sampler not in ("deis", "dpm++", "dpm++_single", "unipc"):
            raise CLIError(
                "--solver-order: for --sampler deis, dpm++, dpm++_single or unipc, got --sampler "
                f"{a.sampler}"
            )
        opts["solver_order"] = a.solver_order
    with _backend_ctx(a.backend), torch.no_grad():
        x = fastdiff.sample(
            model, steps=a.steps, sampler=a.sampler, batch_size=a.n, cond=labels,
            guidance_scale=guidance, generator=gen, device=dev, progress=not a.quiet,
            image=image, mask=mask, strength=a.strength, noise=x_T, **opts,
        )  # fmt: skip
    _save(make_grid(x, nrow=nrow, scale=a.scale), out)


def cmd_train(a: argparse.Namespace) -> None:
    import fastdiff

    dev = _device(a.device)
    _check_backend(a.backend, dev)
    out = _check_out(a.out, ".safetensors")
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = a.checkpoint or str(out.with_name(out.stem + "-ckpt"))
    t0 = time.perf_counter()
    fastdiff.train(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=dev,
        backend=a.backend, out=out, out_dtype=torch.float16 if a.fp16 else None,
        checkpoint=ckpt, checkpoint_every=a.checkpoint_every, resume=not a.no_resume,
        progress=not a.quiet, log_every=a.log_every,
    )  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip


def cmd_bench(a: argparse.Namespace) -> None:
    from fastdiff._cli_bench import run_bench

    run_bench(a, _device(a.device or ("cuda" if torch.cuda.is_available() else "cpu")))


def cmd_info(a: argparse.Namespace) -> None:
    import fastdiff

    info = fastdiff.build_info()
    info["fastdiff"] = fastdiff.__version__
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["threads"] = torch.get_num_threads()
    env = os.environ.get("FASTDIFF_BACKEND")
    if env is not None:
        from fastdiff import _dispatch

        try:
            _dispatch._parse_env(env)
            info["FASTDIFF_BACKEND"] = env
        except ValueError as exc:
            info["FASTDIFF_BACKEND"] = f"{env!r} is invalid: {exc}"
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for k in (
        "fastdiff",
        "torch",
        "torch_cuda",
        "triton",
        "python",
        "device",
        "threads",
        "native",
        "cuda_compiled",
        "cuda_archs",
        "cuda_compiler",
        "cxx_compiler",
        "openmp",
        "FASTDIFF_BACKEND",
    ):
        if k != "FASTDIFF_BACKEND" or k in info:
            print(f"{k:14s} {info.get(k)}")  # fmt: skip
    if info.get("native_error"):
        print(f"{'native_error':14s} {info['native_error']}")
    for dev, ops in info["backends"].items():
        for op, bs in ops.items():
            print(f"backends[{dev}] {op:20s} {', '.join(bs)}")


def cmd_show_unet(a: argparse.Namespace) -> None:
    from fastdiff.models import PRESETS, UNet

    if a.preset not in PRESETS:
        raise CLIError(f"unknown preset {a.preset!r}; available: {', '.join(sorted(PRESETS))}")
    with torch.device("meta"):  # shapes only: adm-256 took 2.5 GB and 12 s to print a table
        model = UNet.from_preset(a.preset)
    print(f"UNet preset {a.preset!r}")
    print(model.summary())


def cmd_show_forward(a: argparse.Namespace) -> None:
    from fastdiff.data import load_digits
    from fastdiff.schedules import NoiseSchedule
    from fastdiff.viz import forward_strip, stack_images

    out = _check_out(a.out)
    if a.frames < 2:
        raise CLIError(f"--frames must be >= 2, got {a.frames}")
    if not 0 <= a.digit <= 9:
        raise CLIError(f"--digit must be in 0..9, got {a.digit}")
    x, y = load_digits()
    x0 = x[(y == a.digit).nonzero()[a.index % int((y == a.digit).sum())]]
    names = ("linear", "cosine") if a.schedule == "both" else (a.schedule,)
    strips = [forward_strip(x0, NoiseSchedule(n), num_frames=a.frames, seed=a.seed) for n in names]
    _save(stack_images(strips, gap=6), out)


def cmd_show_schedules(a: argparse.Namespace) -> None:
    from fastdiff.schedules import NoiseSchedule
    from fastdiff.viz import check_writable, schedules_figure

    out = _check_out(a.out)
    try:
        fig = schedules_figure({n: NoiseSchedule(n) for n in ("linear", "cosine")})
    except ImportError as exc:
        raise CLIError(str(exc) if str(exc).startswith("--out") else f"--out: {exc}") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, check_writable(out))
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {out}", file=sys.stderr)


def cmd_show_reverse(a: argparse.Namespace) -> None:
    import fastdiff
    from fastdiff.viz import reverse_figure

    dev = _device(a.device)
    out = _check_out(a.out)
    if a.label == "all":
        raise CLIError("--label all asks for several images; show reverse follows one (0-9)")
    model = _load_model(a.model, dev)
    label = _labels(model, a.label, 1, dev)
    if a.frames < 2:
        raise CLIError(f"--frames must be >= 2, got {a.frames}")
    gs = None if label is None or a.guidance == 1.0 else a.guidance
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    with torch.no_grad():
        _, traj = fastdiff.sample(
            model, steps=a.steps, sampler=a.sampler, batch_size=1, cond=label, generator=gen,
            guidance_scale=gs, device=dev, return_trajectory=True, progress=not a.quiet,
            **sampler_options(a.sampler, gs),
        )  # fmt: skip
    steps = traj["x0"].shape[0]
    k = min(a.frames, steps)
    idx = torch.linspace(0, steps - 1, k).round().long()
    xs = traj["x"][idx][:, 0]  # x_t fed to step i  [K x C x H x W]
    x0s = traj["x0"][idx][:, 0]
    ts = [int(traj["timesteps"][i]) for i in idx]
    _save(reverse_figure(xs, x0s, ts), out)


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The ``fastdiff`` command's argument parser (sample, repaint, train, bench, info, show)."""
    from fastdiff._cli_invert import add_invert_parser
    from fastdiff._cli_repaint import add_repaint_parser

    p = _Parser(prog="fastdiff", description="diffusion sampling on fused kernels")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="generate a PNG grid with the embedded digits model")
    s.add_argument("--steps", type=_positive_int, help="sampling steps (50; --noise: the file's)")
    s.add_argument("--sampler", choices=SAMPLERS, help="sampler (ddim; --noise: the inverse's)")
    s.add_argument("--n", type=_positive_int, help="number of images (64; --noise: the file's)")
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.add_argument("--label", type=_label, default=None, help="digit 0-9, or 'all' (0,1,..,9,0..)")
    s.add_argument("--guidance", type=_finite, default=None, help="classifier-free guidance scale")
    eta = "DDIM eta; TCD gamma; dpm++_sde: k-diffusion's ancestral eta"
    s.add_argument("--eta", type=_finite_nonneg, default=None, help=eta)
    karras = (
        'Karras sigma grid: dpm++ ("DPM++ 2M Karras"), euler, euler_a ("Euler a Karras"), heun'
        ' ("Heun Karras"), dpm2, dpm2_a ("DPM2 a Karras"), lms ("LMS Karras"), unipc, deis,'
        ' dpm++_single, dpm++_sde ("DPM++ SDE Karras")'
    )
    s.add_argument("--karras", action="store_true", help=karras)
    sde = 'dpm++ only: the SDE variant, "DPM++ 2M SDE" (fresh noise each step; --seed fixes it)'
    s.add_argument("--sde", action="store_true", help=sde)
    s.add_argument("--solver-order", type=int, choices=(1, 2, 3), default=None,
                   help='dpm++ (3 is "DPM++ 3M", default 2), unipc, deis or dpm++_single (default '
                        "2; 3 is diffusers' choice for unconditional sampling)")  # fmt: skip
    s.add_argument("--seed", type=_seed, default=0, help="random seed")
    s.add_argument("--init-image", default=None,
                   help="img2img (SDEdit): start from this picture (PNG, JPEG, ...), noised; "
                        "resized to the model's size")  # fmt: skip
    s.add_argument("--strength", type=_strength, default=None,
                   help="with --init-image: the fraction of the steps run, in (0, 1] (default "
                        "0.8, 1.0 with --mask; small keeps the picture)")  # fmt: skip
    s.add_argument("--mask", default=None,
                   help="with --init-image: inpaint, repainting the picture's white region "
                        "(resized, binarized at 50%%) and keeping the black")  # fmt: skip
    s.add_argument("--noise", help="start from this x_T (.safetensors by `fastdiff invert`)")
    s.add_argument("--model", default=None, help="a .safetensors written by `fastdiff train`")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    s.add_argument("--backend", default=None, help="force a backend: torch|cpu|cuda|triton|sdpa")
    s.add_argument("--nrow", type=_positive_int, default=None, help="images per row")
    s.add_argument("--scale", type=_positive_int, default=4, help="pixel upscale factor")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)
    add_repaint_parser(sub)
    add_invert_parser(sub)

    t = sub.add_parser("train", help="train the digits model (DDPM Algorithm 1, CFG, EMA)")
    t.add_argument("--out", required=True, help="output .safetensors (config .json beside it)")
    t.add_argument("--steps", type=_positive_int, default=2000, help="optimisation steps")
    t.add_argument("--batch-size", type=_positive_int, default=128, help="images per step")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    t.add_argument("--seed", type=_seed, default=0, help="random seed")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    t.add_argument("--backend", default=None, help="force a backend: torch|cpu|cuda|triton|sdpa")
    t.add_argument("--checkpoint", default=None, help="checkpoint stem, <out>-ckpt if not given")
    t.add_argument("--checkpoint-every", type=_positive_int, default=100,
                   help="steps between checkpoints")  # fmt: skip
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--fp16", action="store_true", help="store the output weights in float16")
    t.add_argument("--log-every", type=_nonneg_int, default=0,
                   help="also print a line every N steps (0: never)")  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="fused vs eager, per op and end to end")
    b.add_argument("--json", action="store_true", help="print the table as JSON")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--repeat", type=_positive_int, default=10, help="timed runs per case (median)")
    b.add_argument("--ops-only", action="store_true", help="skip the end-to-end sampling run")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="build info, backends, device, versions")
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    i.set_defaults(func=cmd_info)

    sh = sub.add_parser("show", help="pictures and tables that explain diffusion")
    ssub = sh.add_subparsers(dest="what", required=True, parser_class=_Parser)
    u = ssub.add_parser("unet", help="the UNet summary table")
    u.add_argument("--preset", default="digits", help="digits, tiny, ddpm-cifar10, adm-64, adm-256")
    u.set_defaults(func=cmd_show_unet)
    f = ssub.add_parser("forward", help="one digit noised at evenly spaced t")
    f.add_argument("--out", default="forward.png", help="PNG to write")
    f.add_argument("--schedule", choices=("both", "linear", "cosine"), default="both",
                   help="noise schedule(s) to show")  # fmt: skip
    f.add_argument("--digit", type=int, default=3, help="which digit, 0-9")
    f.add_argument("--index", type=int, default=0, help="which example of that digit")
    f.add_argument("--frames", type=int, default=11, help="noise levels shown (>= 2)")
    f.add_argument("--seed", type=_seed, default=0, help="seed of the noise draw")
    f.set_defaults(func=cmd_show_forward)
    sc = ssub.add_parser("schedules", help="abar_t and SNR: linear vs cosine (matplotlib)")
    sc.add_argument("--out", default="schedules.png", help="PNG to write")
    sc.set_defaults(func=cmd_show_schedules)
    r = ssub.add_parser("reverse", help="x_t and the x0 prediction along one sampling run")
    r.add_argument("--out", default="reverse.png", help="PNG to write")
    r.add_argument("--steps", type=_positive_int, default=50, help="sampling steps")
    r.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    r.add_argument("--label", type=_label, default=3, help="digit 0-9 to draw")
    r.add_argument("--guidance", type=_finite, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (1: none)")  # fmt: skip
    r.add_argument("--frames", type=int, default=10, help="sampling steps shown (>= 2)")
    r.add_argument("--seed", type=_seed, default=0, help="random seed")
    r.add_argument("--model", default=None, help="a .safetensors written by `fastdiff train`")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_show_reverse)
    return p


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    # dispatch errors start with "fastdiff: "; the line already says "fastdiff <cmd>: error:"
    return msg.removeprefix("fastdiff: ")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (status 2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        args.func(args)
    except BrokenPipeError:  # `fastdiff bench | head`: the reader left; no error line
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 141
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is reported as one line
        if os.environ.get("FASTDIFF_DEBUG") == "1":
            raise
        known = (CLIError, ValueError, TypeError, RuntimeError, OSError, ImportError)
        msg = _one_line(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
        print(f"fastdiff {args.cmd}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2 if isinstance(exc, (CLIError, ValueError, TypeError)) else 1  # bad input: 2
    return 0


if __name__ == "__main__":  # `python -m fastdiff.cli`: run the importable module's main, so
    from fastdiff.cli import main as _main  # _cli_repaint's CLIError is the one main catches

    sys.exit(_main())
