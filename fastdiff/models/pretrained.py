"""Single-file model weights: ``<name>.safetensors`` plus a ``<name>.json`` config beside it.

The JSON (also embedded in the safetensors metadata under ``"fastdiff"``, so the weights file
alone is enough) holds the ``UNetConfig``, the training ``NoiseSchedule`` and how it was trained.
Loading is safetensors-only: no pickle anywhere.

    >>> from fastdiff.models import load_pretrained
    >>> model = load_pretrained("digits")                  # the model shipped in the package
    >>> x = fastdiff.sample(model, steps=50, batch_size=16, cond=torch.arange(16) % 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import torch

PRETRAINED: dict[str, str] = {"digits": "digits.safetensors"}
META_KEY = "fastdiff"


def weights_path(name: str) -> Path:
    """Path of the packaged weights file for ``name`` (found through importlib.resources)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    res = importlib.resources.files("fastdiff") / "weights" / PRETRAINED[name]
    path = Path(str(res))
    if not path.is_file():
        raise FileNotFoundError(f"packaged weights for {name!r} are missing: {path}")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's ``UNetConfig`` as a JSON-ready dict."""
    cfg = model.config
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=_json_default))


def schedule_config(schedule: Any) -> dict[str, Any]:
    """The arguments that rebuild ``schedule`` (a ``NoiseSchedule`` or a schedule name)."""
    if schedule is None:
        return {}
    if isinstance(schedule, str):
        from fastdiff.schedules import NoiseSchedule

        schedule = NoiseSchedule(schedule)
    if not hasattr(schedule, "to_config") and not hasattr(schedule, "beta_schedule"):
        raise TypeError(
            f"schedule: expected a fastdiff.NoiseSchedule or a schedule name, got "
            f"{type(schedule).__name__}"
        )
    if hasattr(schedule, "to_config"):
        return dict(schedule.to_config())
    cfg: dict[str, Any] = {
        "beta_schedule": schedule.beta_schedule,
        "num_train_timesteps": int(schedule.num_train_timesteps),
    }
    for k in ("beta_start", "beta_end", "rescale_betas_zero_snr"):
        v = getattr(schedule, k, None)
        if v is not None:
            cfg[k] = v
    if cfg["beta_schedule"] == "custom":
        cfg["betas"] = schedule.betas.tolist()
    return cfg


def build_schedule(cfg: dict[str, Any]):
    """``NoiseSchedule`` from :func:`schedule_config`'s dict."""
    from fastdiff.schedules import NoiseSchedule

    if hasattr(NoiseSchedule, "from_config"):
        return NoiseSchedule.from_config(cfg)
    cfg = dict(cfg)
    name = cfg.pop("beta_schedule")
    if name == "custom":
        cfg.pop("num_train_timesteps", None)
        return NoiseSchedule(**cfg)
    return NoiseSchedule(name, **cfg)


def default_mode(path: str | os.PathLike) -> None:
    """Give a file written through a private temporary (safetensors writes mode 0600) the mode
    a plain ``open(path, "w")`` would: 0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_model_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if weights can be written there: not a ``.json`` name (the config is
    written beside it as ``<stem>.json``: the two files would be one) and in a writable
    directory. ValueError otherwise, before anything is written."""
    from fastdiff.viz import check_writable

    p = Path(path)
    if p.suffix.lower() == ".json":
        raise ValueError(
            f"{p}: the weights need their own file name (the config is written beside them as "
            f"{p.name}); use {p.with_suffix('.safetensors')}"
        )
    if p.with_suffix(".json").is_dir():
        raise ValueError(
            f"{p}: its config is written beside it as {p.with_suffix('.json')}, which is a "
            "directory; use another file name"
        )
    return check_writable(p)


def safetensors_state(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``state`` as safetensors' ``save_file`` takes it: detached, on the CPU, contiguous,
    floating tensors in ``dtype`` when given, and no two tensors sharing memory (tied weights,
    e.g. one ``nn.Parameter`` in two modules, are written once per key, as copies; loading
    fills each key, so the tie's modules get the same values back)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def save_model_file(
    model: torch.nn.Module,
    path: str | os.PathLike,
    schedule: Any = None,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Write ``model``'s weights to ``path`` (.safetensors) and its config to ``path``'s .json.

    ``dtype`` stores floating tensors in that dtype (e.g. float16 to halve the file); they are
    loaded back as float32. Both files are written to temporaries and renamed, so an interrupted
    save never leaves a half-written file. Returns the config dict.
    """
    from safetensors.torch import save_file

    from fastdiff.models.unet import UNet

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the UNet's own keys
    if not isinstance(model, UNet):
        raise TypeError(
            f"save_model_file: model must be a fastdiff.models.UNet (load_model_file rebuilds "
            f"one from the saved UNetConfig), got {type(model).__name__}; a diffusers model "
            f"saves with its own save_pretrained"
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"save_model_file: dtype must be a torch.dtype, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"save_model_file: dtype must be a floating-point dtype (e.g. torch.float16), got "
            f"{dtype}: the weights would be truncated"
        )
    path = check_model_path(path)
    meta = {
        "format": "fastdiff-model-v1",
        "model": f"{type(model).__module__}.{type(model).__name__}",
        "config": model_config(model),
        "schedule": schedule_config(
            schedule if schedule is not None else getattr(model, "schedule", None)
        ),
        "training": training or {},
    }
    tensors = safetensors_state(model.state_dict(), dtype)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    default_mode(tmp)
    jpath = path.with_suffix(".json")
    jtmp = jpath.with_name(jpath.name + ".tmp")
    jtmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    os.replace(jtmp, jpath)
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The config of a model file: the .json beside it, else the safetensors metadata."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; expected a .safetensors weights file (a directory written "
            "by UNet.save_pretrained loads with fastdiff.models.UNet.from_pretrained(directory))"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix.lower() == ".json":
        raise ValueError(
            f"{path}: expected the .safetensors weights file, got its .json config; pass "
            f"{path.with_suffix('.safetensors')}"
        )
    jpath = path.with_suffix(".json")
    if jpath.is_file():
        try:
            meta, where = json.loads(jpath.read_text()), jpath
        except json.JSONDecodeError as exc:
            raise ValueError(f"{jpath}: the model's config is not valid JSON ({exc})") from None
    else:
        with _safetensors_errors(path), safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        if META_KEY not in md:
            hint = ""
            if (path.parent / "config.json").is_file():
                hint = (
                    f"; if {path.parent} was written by UNet.save_pretrained, load it with "
                    "fastdiff.models.UNet.from_pretrained(directory)"
                )
            raise ValueError(
                f"{path} has no fastdiff config (no {jpath.name} and no metadata){hint}"
            )
        meta, where = json.loads(md[META_KEY]), path
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(
            f"{where} is not a fastdiff model config (no 'config' entry; files written by "
            "fastdiff.train / save_model_file have one)"
        )
    return meta


@contextlib.contextmanager
def _safetensors_errors(path: Path):
    """Turn safetensors' parse errors into a ValueError that names the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable .safetensors file: {exc}") from exc


def load_model_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A ``UNet`` from a file written by :func:`save_model_file`, in eval mode, with
    ``.schedule`` set to its training schedule, and frozen (``requires_grad`` off: to fine-tune,
    ``model.train().requires_grad_(True)``)."""
    from safetensors.torch import load_file

    from fastdiff.models.unet import UNet, UNetConfig

    meta = read_meta(path)
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()}
    unknown = set(cfg) - fields
    if unknown:
        raise ValueError(f"{path}: unknown UNetConfig fields {sorted(unknown)}")
    model = UNet(UNetConfig(**cfg))
    with _safetensors_errors(Path(path)):
        state = load_file(str(path), device="cpu")
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    if meta.get("schedule"):
        model.schedule = build_schedule(meta["schedule"])
    model.training_info = meta.get("training", {})
    return model.to(device).eval().requires_grad_(False)


def load_pretrained(name: str = "digits", device: torch.device | str = "cpu") -> torch.nn.Module:
    """A pretrained model shipped with fastdiff, ready for ``fastdiff.sample``.

    ``"digits"``: a class-conditional 16x16 UNet trained on scikit-learn's handwritten digits
    (labels 0-9; the null class for classifier-free guidance is ``model.null_class``). How it was
    trained is in ``fastdiff/weights/TRAINING.md`` and ``model.training_info``. Frozen and in
    eval mode, as :func:`load_model_file` returns it.
    """
    return load_model_file(weights_path(name), device=device)
