"""A diffusers scheduler config without ``_class_name`` (``scheduler.config``,
``dict(scheduler.config)``: diffusers writes the class name only when it saves a config) passed
as ``schedule``: its class told from its keys, so that it means what the scheduler object
means; else, under a default sampler, no key silently dropped (for :mod:`fastdiff._sampler_setup`
and :func:`fastdiff.invert`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from fastdiff._scheduler_table import _SCHEDULER_OF
from fastdiff.samplers import SAMPLERS


def _and(items: list[str], word: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


#: the config keys :meth:`NoiseSchedule.from_diffusers` reads (or checks)
_SCHEDULE_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                            "trained_betas", "rescale_betas_zero_snr", "snr_shift_scale",
                            "shift"})  # fmt: skip
# the Parallel schedulers are DDIM / DDPM with a batched step: their configs are those classes'
_TWINS = {"DDIMParallelScheduler": "DDIMScheduler", "DDPMParallelScheduler": "DDPMScheduler"}


@functools.lru_cache(maxsize=1)
def _diffusers_signatures() -> dict[str, frozenset[str]]:
    """{diffusers scheduler class name: the keys of its config (its ``__init__`` parameters)};
    empty without diffusers. Classes whose backend is missing (``DPMSolverSDEScheduler``
    without torchsde: a DummyObject) are left out."""
    try:
        import diffusers.schedulers as mod
    except ImportError:
        return {}
    out = {}
    for n in dir(mod):
        if not n.endswith("Scheduler") or n.startswith("Flax"):
            continue
        try:
            cls = getattr(mod, n)
        except Exception:  # noqa: BLE001 - a deprecated name whose module is gone
            continue
        if not isinstance(cls, type) or type(cls).__name__ == "DummyObject":
            continue
        ps = inspect.signature(cls.__init__).parameters.values()
        out[n] = frozenset(p.name for p in ps if p.name != "self"
                           and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))  # fmt: skip
    return out


def classes_of_keys(cfg: Mapping[str, Any]) -> list[str]:
    """The diffusers scheduler classes whose parameters are exactly ``cfg``'s keys (those not
    starting with ``_``), sorted: the classes a config without ``_class_name`` can be. Several
    classes share their parameters (``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``
    and ``LMSDiscreteScheduler``; ``LCMScheduler`` and ``TCDScheduler``, ...); a config made
    with ``from_config`` of another class's keeps that one's keys too and fits none.
    ``{"num_train_timesteps": T, "trained_betas": betas}`` (IPNDMScheduler's keys) with betas
    given is what it says, a noise schedule of those betas: no class."""
    keys = frozenset(k for k in cfg if isinstance(k, str) and not k.startswith("_"))
    if keys <= _SCHEDULE_KEYS and cfg.get("trained_betas") is not None:
        return []  # user betas: a bare noise schedule (IPNDMScheduler's keys, not its grid)
    found = [n for n, ps in sorted(_diffusers_signatures().items()) if ps == keys]
    return [n for n in found if _TWINS.get(n) not in found]


def named_config(schedule: Any, sampler: str | None) -> Any:
    """``schedule``, or for a config mapping without ``_class_name`` whose class
    :func:`classes_of_keys` tells, a copy with that ``_class_name``: it then means what the
    scheduler object means (its sampler under ``sampler=None``, its settings, its checks).
    Several classes fit: the one ``sampler`` reproduces when it is one of them, else none."""
    if not isinstance(schedule, Mapping) or hasattr(schedule, "config"):
        return schedule
    if isinstance(schedule.get("_class_name"), str):
        return schedule
    found = classes_of_keys(schedule)
    if isinstance(sampler, str) and sampler.lower() in SAMPLERS:
        cls = SAMPLERS[sampler.lower()]
        own = _SCHEDULER_OF[next(k for k in _SCHEDULER_OF if SAMPLERS[k] is cls)]
        found = [own] if own in found else found
    return {**schedule, "_class_name": found[0]} if len(found) == 1 else schedule


def check_config_read(schedule: Any, name: str, call: str) -> None:
    """``schedule`` is a config mapping of no known class (no ``_class_name``, keys of no
    diffusers class) that ``call`` samples with its default sampler ``name``: a key that
    neither its noise schedule nor that sampler reads (``use_karras_sigmas``, ``solver_order``
    under DDIM, ...; None values aside) is a ValueError naming ``schedule``, the keys, and the
    samplers that read them all, rather than silently dropped. Other ``schedule`` values pass."""
    if not isinstance(schedule, Mapping) or hasattr(schedule, "config"):
        return
    if isinstance(schedule.get("_class_name"), str) or classes_of_keys(schedule):
        return
    drop = {"self", "schedule", "steps", "eta"}
    takes = set(inspect.signature(SAMPLERS[name].__init__).parameters) - drop
    unread = {k: v for k, v in schedule.items() if isinstance(k, str) and not k.startswith("_")
              and v is not None and k not in _SCHEDULE_KEYS | takes}  # fmt: skip
    if not unread:
        return
    inverse = SAMPLERS[name].inverts
    readers = [
        k
        for k in sorted(_SCHEDULER_OF)
        if SAMPLERS[k].inverts == inverse
        and set(unread) <= set(inspect.signature(SAMPLERS[k].__init__).parameters)
    ]
    hint = (f"e.g. sampler={_and([repr(k) for k in readers[:6]], 'or')}" if readers
            else "no fastdiff sampler reads all of them")  # fmt: skip
    raise ValueError(
        f"schedule: a config without '_class_name' and of no diffusers scheduler class (its "
        f"keys are no class's parameters) is read as a noise schedule, and {call} runs "
        f"{name!r}, which does not read {', '.join(f'{k}={v!r}' for k, v in unread.items())}; "
        f"pass sampler= ({hint}), the scheduler object, or its config with '_class_name' (as "
        "scheduler.save_config writes it)"
    )
