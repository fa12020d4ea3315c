"""Training a class-conditional diffusion model: DDPM Algorithm 1 with the simple loss.

Ho et al. (2020), Algorithm 1, repeated until done:

    x0 ~ q(x0),  t ~ Uniform({1..T}),  eps ~ N(0, I)
    take a gradient step on  || eps - eps_theta( sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ) ||^2

i.e. L_simple, eq. (14). For classifier-free guidance (Ho & Salimans, 2022) the class label is
replaced by the null class with probability ``label_dropout``, so one network learns both
eps(x_t, t, c) and eps(x_t, t). The weights returned (and written) are an exponential moving
average of the trained weights, which sample markedly better than the raw ones.

    >>> import fastdiff
    >>> model = fastdiff.train(steps=4000, out="digits.safetensors")     # doctest: +SKIP

Checkpoints (``checkpoint="run/ckpt"``) are ``ckpt.safetensors`` (weights, EMA weights, AdamW
moments, RNG states; no pickle) plus ``ckpt.json`` (step, elapsed time, hyperparameters). Calling
``train`` again with the same checkpoint path resumes where it stopped, and the resumed run
is bit-identical to an uninterrupted one on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import operator
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["train", "TrainConfig"]

DEFAULTS: dict[str, Any] = {
    "preset": "digits",
    "steps": 2000,
    "batch_size": 128,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup": 200,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "label_dropout": 0.15,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "seed": 0,
}
TrainConfig = dict  # the hyperparameters are a plain dict, recorded in checkpoints and outputs


def _lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    ema_p = list(ema.parameters())
    p = [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def _ckpt_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(checkpoint)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _check_checkpoint_path(checkpoint: str | os.PathLike) -> None:
    """ValueError unless the checkpoint files can be written (their directory is created when
    missing): checked before training, not at the first checkpoint after the work."""
    for p in _ckpt_paths(checkpoint):
        if p.is_dir():
            raise ValueError(f"checkpoint: {p} is a directory; use another checkpoint stem")
    parent = _ckpt_paths(checkpoint)[0].parent.absolute()
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"checkpoint: cannot create directory {parent}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"checkpoint: cannot write in {existing}: permission denied")


def _save_checkpoint(path, model, ema, opt, gen, step, elapsed, hparams) -> None:
    from safetensors.torch import save_file

    from fastdiff.models.pretrained import default_mode

    st_path, js_path = _ckpt_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.generator"] = gen.get_state().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "elapsed_s": elapsed, "hparams": hparams}
    tmp = st_path.with_name(st_path.name + ".tmp")
    save_file(tensors, str(tmp))
    default_mode(tmp)
    jtmp = js_path.with_name(js_path.name + ".tmp")
    jtmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, st_path)
    os.replace(jtmp, js_path)


def _load_checkpoint(path, model, ema, opt, gen) -> dict[str, Any]:
    from safetensors.torch import load_file

    st_path, js_path = _ckpt_paths(path)
    meta = json.loads(js_path.read_text())
    tensors = load_file(str(st_path))
    dev = next(model.parameters()).device
    model.load_state_dict(
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
    )
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(dev)
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def _positive_int(name: str, v: Any) -> int:
    """``v`` as an int >= 1 (numpy ints too), else a ValueError naming ``name``."""
    if isinstance(v, bool) or not hasattr(v, "__index__") or operator.index(v) < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return operator.index(v)


def _real(name: str, v: Any) -> float:
    """``v`` as a Python float (numpy scalars too: the hyperparameters are written as JSON),
    else a TypeError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    return float(v)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available here")
    return dev


def train(
    model: torch.nn.Module | None = None,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    grad_clip: float | None = DEFAULTS["grad_clip"],
    ema_decay: float = DEFAULTS["ema_decay"],
    label_dropout: float = DEFAULTS["label_dropout"],
    beta_schedule: str = DEFAULTS["beta_schedule"],
    num_train_timesteps: int = DEFAULTS["num_train_timesteps"],
    seed: int = DEFAULTS["seed"],
    device: torch.device | str | None = "cpu",
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: str | os.PathLike | None = None,
    out_dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log_every: int = 0,
    backend: str | None = None,
) -> torch.nn.Module:
    """Train a class-conditional eps-prediction UNet with DDPM Algorithm 1; return the EMA model.

    Args:
        model: a ``fastdiff.models.UNet`` with ``num_classes`` set; default
            ``UNet.from_preset("digits")``.
        steps: total optimisation steps (batches). With ``data`` omitted, the digits dataset.
        batch_size, lr, weight_decay: AdamW (Loshchilov & Hutter) with ``warmup`` linear warm-up
            steps and cosine decay to 10% of ``lr``; gradients clipped to norm ``grad_clip``.
        ema_decay: EMA of the weights, with decay ``min(ema_decay, (1 + s) / (10 + s))``.
        label_dropout: probability of replacing a label by ``model.null_class`` (CFG training).
        beta_schedule, num_train_timesteps: the ``NoiseSchedule`` trained with; it is attached
            to the returned model as ``.schedule`` and saved with it.
        seed: seeds model init (when ``model`` is None), batches, t, noise and label dropout.
        device: "cpu" or "cuda" (a clear RuntimeError when CUDA is absent).
        data: ``([N x C x H x W] in [-1, 1], [N] labels)``; default ``fastdiff.data.load_digits()``.
        out: write the EMA weights to this .safetensors (config to the .json beside it).
        out_dtype: store the output weights in this dtype (e.g. torch.float16).
        checkpoint: checkpoint path stem; saved every ``checkpoint_every`` steps and at the end.
        resume: continue from ``checkpoint`` when it exists.
        stop_after: stop (after checkpointing) once this many steps are done in total, without
            finishing; used to test resuming and to split long runs.
        progress: show a tqdm bar. ``log_every`` > 0 also prints a line every that many steps.
        backend: force a fastdiff backend for the fused ops during training (e.g. "torch";
            "sdpa" applies to attention only).

    Returns:
        The EMA model in eval mode with ``.schedule`` set.
    """
    steps, batch_size = _positive_int("steps", steps), _positive_int("batch_size", batch_size)
    # plain Python numbers: numpy ones failed at the first checkpoint (JSON), after the work
    num_train_timesteps = _positive_int("num_train_timesteps", num_train_timesteps)
    lr, weight_decay = _real("lr", lr), _real("weight_decay", weight_decay)
    ema_decay, label_dropout = _real("ema_decay", ema_decay), _real("label_dropout", label_dropout)
    grad_clip = None if grad_clip is None else _real("grad_clip", grad_clip)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an int, got {seed!r}")
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in -2**63 .. 2**64-1 (torch's seed range), got {seed}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for name, v in (("log_every", log_every), ("stop_after", stop_after)):
        if v is not None and (isinstance(v, bool) or not hasattr(v, "__index__") or v < 0):
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if not 0.0 <= v < math.inf:  # inf trained to NaN weights and wrote them
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if grad_clip is not None and not 0.0 <= grad_clip < math.inf:
        # a negative max norm turned clip_grad_norm_'s scale negative: gradient ascent
        raise ValueError(f"grad_clip must be None, 0 (off) or a positive norm, got {grad_clip}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if out_dtype is not None and (
        not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point
    ):  # checked by save_model_file too, but only after the whole training
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    if checkpoint is not None:
        _check_checkpoint_path(checkpoint)
    if out is not None:
        from fastdiff.models.pretrained import check_model_path
        from fastdiff.models.unet import UNet

        check_model_path(out)  # before the training, not after it
        if model is not None and not isinstance(getattr(model, "_orig_mod", model), UNet):
            raise TypeError(
                f"out: save_model_file writes fastdiff.models.UNet models, got model of type "
                f"{type(model).__name__}; train with out=None and save it yourself"
            )
        if checkpoint is not None:
            mine = {Path(out).resolve(), Path(out).with_suffix(".json").resolve()}
            if mine & {p.resolve() for p in _ckpt_paths(checkpoint)}:
                raise ValueError(
                    f"checkpoint: {checkpoint} names the same files as out={out} (the output "
                    "would overwrite the checkpoint); use another stem, e.g. "
                    f"{Path(out).with_suffix('')}-ckpt"
                )
    if model is not None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no trainable parameters (fastdiff.models.load_pretrained returns a "
            "frozen eval-mode model); call model.requires_grad_(True) to fine-tune it"
        )
    dev = _resolve_device(device)
    # seeds and dropout use torch's global RNG: fork it, so the caller's RNG stream is untouched
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if (
        dev.type == "cuda") else []  # fmt: skip
    with torch.random.fork_rng(devices=devices):
        return _train(
            model, steps, batch_size, lr, weight_decay, warmup, grad_clip, ema_decay,
            label_dropout, beta_schedule, num_train_timesteps, seed, dev, data, out, out_dtype,
            checkpoint, checkpoint_every, resume, stop_after, progress, log_every, backend,
        )  # fmt: skip


def _train(
    model, steps, batch_size, lr, weight_decay, warmup, grad_clip, ema_decay, label_dropout,
    beta_schedule, num_train_timesteps, seed, dev, data, out, out_dtype, checkpoint,
    checkpoint_every, resume, stop_after, progress, log_every, backend,
):  # fmt: skip
    """The body of :func:`train`, run inside a fork of torch's global RNG."""
    from tqdm.auto import tqdm

    from fastdiff.schedules import NoiseSchedule

    torch.manual_seed(seed)
    if model is None:
        from fastdiff.models.unet import UNet

        model = UNet.from_preset(DEFAULTS["preset"])
    null_class = getattr(model, "null_class", None)
    if null_class is None:
        raise ValueError("model must be class-conditional (UNetConfig.num_classes set)")
    model = model.to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)

    if data is None:
        from fastdiff.data import load_digits

        data = load_digits()
    x_all, y_all = (torch.as_tensor(t) for t in data)
    if x_all.ndim != 4 or y_all.shape != (x_all.shape[0],):
        raise ValueError(f"data must be ([N,C,H,W], [N]); got {tuple(x_all.shape)}, {y_all.shape}")
    if x_all.shape[0] == 0:
        raise ValueError("data: expected at least one training image, got an empty set")
    if not x_all.dtype.is_floating_point:
        raise TypeError(f"data: expected floating-point images in [-1, 1], got {x_all.dtype}")
    if y_all.dtype.is_floating_point or y_all.dtype.is_complex or y_all.dtype == torch.bool:
        raise TypeError(f"data: expected integer class labels, got dtype {y_all.dtype}")
    if y_all.numel() and not 0 <= int(y_all.min()) <= int(y_all.max()) < null_class:
        # label null_class silently trained as the unconditional (CFG) class
        raise ValueError(
            f"data: expected class labels in 0..{null_class - 1} (the model's classes; "
            f"{null_class} is its null class), got {int(y_all.min())}..{int(y_all.max())}"
        )
    # images in the model's dtype (float64 arrays failed deep in the first conv)
    x_all = x_all.to(dev, next(model.parameters()).dtype)
    y_all = y_all.to(dev)
    n = x_all.shape[0]

    schedule = NoiseSchedule(beta_schedule, num_train_timesteps=num_train_timesteps)
    T = num_train_timesteps
    hparams = dict(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
        grad_clip=grad_clip, ema_decay=ema_decay, label_dropout=label_dropout,
        beta_schedule=beta_schedule, num_train_timesteps=T, seed=seed,
    )  # fmt: skip

    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {})
    )
    gen = torch.Generator(device=dev).manual_seed(seed)

    start, elapsed = 0, 0.0
    if checkpoint is not None and resume and _ckpt_paths(checkpoint)[1].is_file():
        # settings first: a mismatch must not leave the checkpoint's weights in ``model``
        js = _ckpt_paths(checkpoint)[1]
        try:
            meta = json.loads(js.read_text())
            start, elapsed = int(meta["step"]), float(meta["elapsed_s"])
        except (ValueError, KeyError, TypeError) as exc:  # json's errors named no file
            raise ValueError(
                f"checkpoint: {js} is not a fastdiff checkpoint record ({type(exc).__name__}: "
                f"{exc}); resume=False (--no-resume) starts over"
            ) from None
        saved = meta.get("hparams", {})
        diff = sorted(k for k in hparams if k in saved and saved[k] != hparams[k])
        if diff:
            got = ", ".join(f"{k}={hparams[k]!r} (checkpoint: {saved[k]!r})" for k in diff)
            raise ValueError(
                f"checkpoint {checkpoint} was trained with other settings: {got}; pass the "
                "same settings to resume, or resume=False (--no-resume) or another checkpoint to "
                "start over"
            )
        if start > steps:
            raise ValueError(f"checkpoint {checkpoint} is at step {start} > steps={steps}")
        _load_checkpoint(checkpoint, model, ema, opt, gen)
    # a checkpoint already past stop_after: nothing to do, and the record says where it is
    end = steps if stop_after is None else max(start, min(steps, stop_after))

    ctx = contextlib.nullcontext()
    if backend is not None:
        from fastdiff import use_backend

        # sdpa exists for attention only (as in ``fastdiff sample --backend sdpa``)
        ctx = use_backend("sdpa", op="attention") if backend == "sdpa" else use_backend(backend)

    bar = tqdm(
        total=steps, initial=start, disable=not progress, desc="train", unit="step",
        dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    t0 = time.perf_counter()
    loss_avg = None
    step = start
    with ctx:
        for step in range(start, end):
            # Algorithm 1: x0 ~ q(x0), t ~ U{0..T-1}, eps ~ N(0, I)
            idx = torch.randint(0, n, (batch_size,), device=dev, generator=gen)
            x0, y = x_all[idx], y_all[idx]
            t = torch.randint(0, T, (batch_size,), device=dev, generator=gen)
            noise = torch.randn(x0.shape, device=dev, generator=gen)
            drop = torch.rand(batch_size, device=dev, generator=gen) < label_dropout
            y = torch.where(drop, torch.full_like(y, null_class), y)
            x_t = schedule.q_sample(x0, t, noise)
            eps = model(x_t, t, class_labels=y)
            if eps.shape != noise.shape:
                raise ValueError(
                    f"model output {tuple(eps.shape)} must match the images {tuple(noise.shape)} "
                    "(an eps-prediction model with out_channels == in_channels)"
                )
            loss = F.mse_loss(eps, noise)  # L_simple, eq. (14)

            for g in opt.param_groups:
                g["lr"] = _lr_at(step, lr, warmup, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))

            done = step + 1
            if progress or log_every:
                li = loss.item()
                loss_avg = li if loss_avg is None else 0.98 * loss_avg + 0.02 * li
                bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
                bar.update(1)
                if log_every and done % log_every == 0:
                    rate = (done - start) / (time.perf_counter() - t0)
                    bar.write(f"step {done}/{steps} loss {loss_avg:.4f} {rate:.2f} step/s")
            if checkpoint is not None and (done % checkpoint_every == 0 or done == end):
                now = elapsed + time.perf_counter() - t0
                _save_checkpoint(checkpoint, model, ema, opt, gen, done, now, hparams)
    bar.close()
    elapsed += time.perf_counter() - t0

    ema.schedule = schedule
    ema.training_info = {
        **hparams,
        "steps_done": end,
        "elapsed_s": round(elapsed, 1),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    if out is not None and end == steps:
        from fastdiff.models.pretrained import save_model_file

        save_model_file(ema, out, schedule=schedule, training=ema.training_info, dtype=out_dtype)
    return ema
