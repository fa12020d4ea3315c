"""From ``fastdiff.sample``'s arguments to a sampler: schedule, steps and options.

``schedule`` may be a diffusers scheduler (or its saved config): its betas become the
:class:`~fastdiff.NoiseSchedule`, its sampling settings that the sampler takes
(``prediction_type``, ``timestep_spacing``, ...) the sampler's defaults, and the settings of the
sampler's own diffusers scheduler that fastdiff does not implement (Karras sigmas, another solver
order, ...) a ValueError, rather than samples that silently differ from diffusers'. A config
without ``_class_name`` (an in-memory ``scheduler.config``) means its object when its keys tell
its class (:mod:`fastdiff._config_class`); otherwise no key of it is dropped silently.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from fastdiff._conditioning import _cfg_get, _learned_variance
from fastdiff._config_class import _and, check_config_read, classes_of_keys, named_config
from fastdiff._scheduler_table import _OWN_GRID, _SCHEDULER_OF, _UNSUPPORTED_SETTINGS
from fastdiff.samplers import SAMPLERS, Sampler, make_sampler
from fastdiff.schedules import NoiseSchedule


def resolve_sampler(
    model: Any,
    sampler: str | Sampler | None,
    steps: int | None,
    schedule: Any,
    eta: float | None,
    guidance_scale: float | None,
    sampler_options: Mapping[str, Any],
) -> Sampler:
    """The sampler object ``sample`` runs: ``sampler`` itself, or the one it names, built on
    the schedule with ``steps`` steps and its options; None: the one :func:`infer_sampler`
    picks for ``schedule``."""
    schedule = named_config(schedule, sampler if isinstance(sampler, str) else None)
    if sampler is None:
        sampler = infer_sampler(schedule)
    if isinstance(sampler, Sampler):
        # a multi-stage sampler (Heun: 2N - 1 model calls) was built for N steps
        built = getattr(sampler, "num_inference_steps", sampler.steps)
        if steps is not None and steps != built:
            raise ValueError(f"steps: got {steps} but the sampler object was built for {built}")
        if sampler_options or eta is not None or schedule is not None:
            extra = sorted([*sampler_options, *(["eta"] if eta is not None else []),
                            *(["schedule"] if schedule is not None else [])])  # fmt: skip
            raise ValueError(
                f"sampler: options {extra} cannot be applied to a sampler object; "
                "build the sampler with them"
            )
        return sampler
    names = ", ".join(repr(k) for k in sorted(set(SAMPLERS) - {"dpmsolver++", "dpm-solver++"}))
    if not isinstance(sampler, str):
        raise TypeError(
            f"sampler: expected a name ({names}) or a fastdiff sampler object, got "
            f"{type(sampler).__name__}"
        )
    if sampler.lower() not in SAMPLERS:
        raise ValueError(f"sampler: expected {names} or a fastdiff sampler object, got {sampler!r}")
    if SAMPLERS[sampler.lower()] in (
        SAMPLERS["flow_euler"],
        SAMPLERS["flow_euler_inverse"],
        SAMPLERS["flow_heun"],
    ):
        return _resolve_flow(sampler.lower(), steps, schedule, eta, sampler_options)
    if sampler.lower() in ("edm_euler", "edm_dpm++", "cm", "consistency", *_OWN_GRID):
        return _resolve_edm(sampler.lower(), steps, schedule, eta, sampler_options)
    sched = _resolve_schedule(model, schedule)
    n_steps = _default_steps(sampler.lower(), steps, sampler_options, "timesteps")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(n_steps).__name__}")
    n_steps = int(n_steps)  # a numpy integer (np.arange sweeps) as a Python int
    if not 1 <= n_steps <= sched.num_train_timesteps:
        raise ValueError(
            f"steps: expected 1 <= steps <= num_train_timesteps = "
            f"{sched.num_train_timesteps}, got {n_steps}"
        )
    name = sampler.lower()
    # a diffusers scheduler's own settings (e.g. prediction_type="v_prediction") are the
    # defaults; options passed here win
    _check_scheduler_settings(schedule, name)
    opts = {**_scheduler_options(schedule, name), **sampler_options}
    if eta is not None:
        # TCD: eta is gamma; DPM++ SDE: k-diffusion's ancestral eta
        if SAMPLERS[name] not in (SAMPLERS["ddim"], SAMPLERS["tcd"], SAMPLERS["dpm++_sde"]):
            raise ValueError(
                f"eta: only the 'ddim' and 'tcd' samplers take eta (and 'dpm++_sde', "
                f"k-diffusion's ancestral eta), got sampler={sampler!r}"
            )
        opts["eta"] = eta
    if "prediction_type" not in opts:
        pt = _cfg_get(model, "prediction_type")
        if isinstance(pt, str):
            opts["prediction_type"] = pt
    if (
        SAMPLERS[name] is SAMPLERS["ddim"]
        and guidance_scale not in (None, 1, 1.0)
        and "use_clipped_model_output" not in opts
    ):
        # Under guidance the combined eps drives x0 far outside the clip range; stepping with
        # the clipped x0 but the unclipped eps then smears noise into the sample (measured on
        # the digits model: 12.5% recognised at w=3 vs 100% with this). Re-derive eps from
        # the clipped x0 unless the caller chose otherwise.
        opts["use_clipped_model_output"] = True
    if name == "ddpm" and "variance_type" not in opts and _learned_variance(model):
        opts["variance_type"] = "learned_range"
    _check_sampler_options(name, opts)
    smp = make_sampler(name, sched, n_steps, **opts)
    cfg = _scheduler_config(schedule)
    if cfg is not None and cfg.get("variance_type") in ("learned", "learned_range"):
        # diffusers' DPMSolverMultistepScheduler (and others) keep the first C channels of a
        # learned-variance output, also of a model whose config does not say it has 2C
        smp.drop_variance_channels = not getattr(smp, "learned_variance", False)
    return smp


def _default_steps(name: str, steps: Any, options: Mapping[str, Any], custom: str) -> Any:
    """``steps``, else the length of a custom grid option (``timesteps=`` of LCM / TCD / DPM++
    / Euler / Heun / DDPM, flow ``sigmas=``, edm_euler's ramp ``sigmas=``, as diffusers'
    ``set_timesteps`` takes it; Euler's VP ``sigmas=`` end with the final noise level: one fewer
    step), else the sampler's default."""
    if steps is not None:
        return steps

    def _len(grid: Any) -> int | None:
        ok = grid is not None and hasattr(grid, "__len__") and not isinstance(grid, (str, bytes))
        return len(grid) if ok else None

    n = _len(options.get(custom))
    if n is not None:
        return n
    if SAMPLERS[name] is SAMPLERS["unipc"] and _len(options.get("sigmas")) is not None:
        return _len(options.get("sigmas"))  # UniPC's flow sigmas: one per step, as diffusers
    n = _len(options.get("sigmas")) if custom == "timesteps" else None
    if n is not None:
        return max(n - 1, 1)  # (a 1-entry list: the sampler's own error names sigmas)
    return SAMPLERS[name].default_steps


def _resolve_flow(
    name: str, steps: int | None, schedule: Any, eta: float | None, options: Mapping[str, Any]
) -> Sampler:
    """A flow-matching sampler: its grid comes from ``schedule`` (None: diffusers' defaults,
    shift 1 and T = 1000; a ``FlowMatchEulerDiscreteScheduler`` or its config: its settings,
    ``options`` winning), never from a VP :class:`~fastdiff.NoiseSchedule`."""
    if schedule is not None and not _is_flow_scheduler(schedule):
        raise ValueError(
            f"schedule: sampler {name!r} needs None or a diffusers FlowMatch scheduler (or its "
            f"config), got {type(schedule).__name__}: a flow model has no VP noise schedule"
        )
    if eta is not None:
        raise ValueError(f"eta: only the 'ddim' and 'tcd' samplers take eta, got sampler={name!r}")
    n_steps = _default_steps(name, steps, options, "sigmas")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(n_steps).__name__}")
    _check_scheduler_settings(schedule, name)
    opts = {**_scheduler_options(schedule, name), **options}
    _check_sampler_options(name, opts)
    return make_sampler(name, None, int(n_steps), **opts)


def _resolve_edm(
    name: str, steps: int | None, schedule: Any, eta: float | None, options: Mapping[str, Any]
) -> Sampler:
    """An EDM sampler: its sigma grid and preconditioning come from ``schedule`` (None:
    diffusers' defaults, sigma_min 0.002, sigma_max 80, sigma_data 0.5, rho 7; an
    ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler`` or its config: its settings,
    ``options`` winning), never from a VP :class:`~fastdiff.NoiseSchedule`."""
    if SAMPLERS[name] is SAMPLERS["cm"]:  # a consistency model: a CM scheduler or None
        if schedule is not None and not _is_cm_scheduler(schedule):
            raise ValueError(
                f"schedule: sampler {name!r} needs None or diffusers' "
                f"CMStochasticIterativeScheduler (or its config), got {type(schedule).__name__}:"
                " a consistency model has no VP noise schedule"
            )
    elif name in _OWN_GRID:  # its own diffusers scheduler or None
        own = next(k for k in _SCHEDULER_OF if SAMPLERS[k] is SAMPLERS[name])
        cfg = _scheduler_config(schedule)
        if schedule is not None and (cfg is None or _scheduler_class(schedule, cfg)
                                     != _SCHEDULER_OF[own]):  # fmt: skip
            raise ValueError(
                f"schedule: sampler {name!r} needs None or diffusers' {_SCHEDULER_OF[own]} (or "
                f"its config), got {type(schedule).__name__}: its noise levels are its own grid, "
                "not a VP noise schedule"
            )
    elif schedule is not None and not _is_edm_scheduler(schedule):
        raise ValueError(
            f"schedule: sampler {name!r} needs None or a diffusers EDM scheduler (or its "
            f"config), got {type(schedule).__name__}: an EDM model has no VP noise schedule"
        )
    if eta is not None:
        raise ValueError(f"eta: only the 'ddim' and 'tcd' samplers take eta, got sampler={name!r}")
    # edm_euler's sigmas= is diffusers' EDM ramp, one entry per step (not Euler's noise levels)
    custom = "sigmas" if SAMPLERS[name] is SAMPLERS["edm_euler"] else "timesteps"
    n_steps = _default_steps(name, steps, options, custom)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(n_steps).__name__}")
    _check_scheduler_settings(schedule, name)
    opts = {**_scheduler_options(schedule, name), **options}
    _check_sampler_options(name, opts)
    return make_sampler(name, None, int(n_steps), **opts)


def _is_edm_scheduler(schedule: Any) -> bool:
    """Whether ``schedule`` is diffusers' ``EDMEulerScheduler`` or
    ``EDMDPMSolverMultistepScheduler`` (or its config): no betas, an EDM sigma grid."""
    cfg = _scheduler_config(schedule)
    cls = _scheduler_class(schedule, cfg) if cfg is not None else None
    return cls in (_SCHEDULER_OF["edm_euler"], _SCHEDULER_OF["edm_dpm++"])


def _is_cm_scheduler(schedule: Any) -> bool:
    """Whether ``schedule`` is diffusers' ``CMStochasticIterativeScheduler`` (or its config)."""
    cfg = _scheduler_config(schedule)
    cls = _scheduler_class(schedule, cfg) if cfg is not None else None
    return cls == _SCHEDULER_OF["cm"]


def _is_flow_scheduler(schedule: Any) -> bool:
    """Whether ``schedule`` is a diffusers flow-matching scheduler (or its config): it has no
    betas, so it cannot become a :class:`~fastdiff.NoiseSchedule`."""
    cfg = _scheduler_config(schedule)
    cls = _scheduler_class(schedule, cfg) if cfg is not None else None
    return isinstance(cls, str) and cls.startswith("FlowMatch")


def _resolve_schedule(model: Any, schedule: Any) -> NoiseSchedule:
    if schedule is None:
        own = getattr(model, "schedule", None)
        if isinstance(own, str):  # a model's schedule name, as fastdiff's UNet accepts
            return NoiseSchedule(own)
        return own if isinstance(own, NoiseSchedule) else NoiseSchedule("linear")
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, str):  # "linear", "scaled_linear", "cosine"
        return NoiseSchedule(schedule)
    if _is_flow_scheduler(schedule):
        raise ValueError(
            "schedule: a flow-matching scheduler (FlowMatch...) has no VP noise schedule; use "
            "sampler='flow_euler' or 'flow_heun' (the defaults for FlowMatchEulerDiscreteScheduler "
            "and FlowMatchHeunDiscreteScheduler)"
        )
    if _is_edm_scheduler(schedule):
        raise ValueError(
            "schedule: an EDM scheduler has no VP noise schedule; use sampler='edm_euler' or "
            "'edm_dpm++' (the defaults for EDMEulerScheduler and EDMDPMSolverMultistepScheduler)"
        )
    if _is_cm_scheduler(schedule):
        raise ValueError(
            "schedule: CMStochasticIterativeScheduler has no VP noise schedule; use sampler='cm' "
            "(its default)"
        )
    if hasattr(schedule, "config") or isinstance(schedule, Mapping):
        cfg = _scheduler_config(schedule)
        params = _diffusers_params(schedule, cfg) if cfg is not None else None
        zsnr = "rescale_betas_zero_snr"
        if params is not None and zsnr not in params and cfg.get(zsnr):
            # a leftover of another config (KDPM2DiscreteScheduler.from_config(zero_snr.config)):
            # diffusers' class does not rescale its betas
            schedule = {k: v for k, v in cfg.items() if k != zsnr}
        return NoiseSchedule.from_diffusers(schedule, _argname="schedule")
    raise TypeError(
        "schedule: expected a fastdiff.NoiseSchedule, a schedule name ('linear', "
        f"'scaled_linear', 'cosine') or a diffusers scheduler/config, got {type(schedule).__name__}"
    )


def _scheduler_config(schedule: Any) -> Mapping[str, Any] | None:
    """The config of a diffusers scheduler (or the saved config itself) passed as ``schedule``;
    None for a ``NoiseSchedule``, a schedule name or None."""
    if isinstance(schedule, (NoiseSchedule, str)) or schedule is None:
        return None
    cfg = getattr(schedule, "config", schedule)
    return cfg if isinstance(cfg, Mapping) else None


def _scheduler_options(schedule: Any, name: str) -> dict[str, Any]:
    """The sampling settings of a diffusers scheduler (or config) passed as ``schedule`` that
    sampler ``name`` takes: ``prediction_type``, ``timestep_spacing``, ``steps_offset``,
    ``clip_sample``, ``thresholding``, ``set_alpha_to_one``, ``variance_type``, ... A value that
    is its class's default (listed in diffusers' ``_use_default_values``) is skipped: fastdiff's
    samplers have diffusers' defaults for their own type, and a DDPM default must not override a
    DDIM one. A listed key whose value differs from that default was set afterwards (a
    hand-edited config dict) and is kept; when the class cannot be told (no ``_class_name`` and
    keys not all of sampler ``name``'s diffusers class, or diffusers missing) every listed key is
    skipped. ``None`` values are skipped."""
    cfg = _scheduler_config(schedule)
    if cfg is None:
        return {}
    params = inspect.signature(SAMPLERS[name].__init__).parameters
    listed = set(cfg.get("_use_default_values", ()))
    class_defaults = _class_defaults(schedule, cfg, name) if listed else None
    own = _own_class_params(schedule, cfg, name)

    def _default(k: str, v: Any) -> bool:
        if k not in listed:
            return False
        if class_defaults is None or k not in class_defaults:
            return True  # the class is unknown: trust the list
        return _same(v, class_defaults[k])

    return {
        k: v
        for k, v in cfg.items()
        if k in params and k not in ("self", "schedule", "steps", "eta")
        and v is not None and not _default(k, v) and (own is None or k in own)
    }  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """``a == b`` as one bool (an array or an odd type comparing elementwise: not the same)."""
    try:
        eq = a == b
    except Exception:  # noqa: BLE001 - any comparison failure means "not the default"
        return False
    return bool(eq) if isinstance(eq, (bool, np.bool_)) else False


def _class_defaults(schedule: Any, cfg: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The ``__init__`` defaults of the diffusers class whose ``_use_default_values`` ``cfg``
    carries: ``schedule``'s class (an object, or a saved config's ``_class_name``); for a plain
    dict without a class name (``dict(scheduler.config)``), the class sampler ``name``
    reproduces when every key of ``cfg`` is one of its parameters. None: not known."""
    cls = _diffusers_class(schedule, cfg)
    if cls is None and _scheduler_class(schedule, cfg) is None:
        own = next(k for k in _SCHEDULER_OF if SAMPLERS[k] is SAMPLERS[name])  # "dpm-solver++"
        cand = _diffusers_class(None, {"_class_name": _SCHEDULER_OF[own]})
        keys = {k for k in cfg if not k.startswith("_")}
        if cand is not None and keys <= set(inspect.signature(cand.__init__).parameters):
            cls = cand
    if cls is None:
        return None
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not p.empty
    }


def _own_class_params(schedule: Any, cfg: Mapping[str, Any], name: str) -> frozenset[str] | None:
    """The ``__init__`` parameters of ``schedule``'s diffusers class when it is the one sampler
    ``name`` reproduces (None otherwise, or when that class cannot be found). A key of its
    config outside them is a leftover of another scheduler's config, which ``from_config``
    keeps and diffusers ignores (DDPM's ``clip_sample=True`` in
    ``DPMSolverMultistepScheduler.from_config(ddpm.config)``): not a setting to apply."""
    own = next(k for k in _SCHEDULER_OF if SAMPLERS[k] is SAMPLERS[name])  # "dpm-solver++"
    if _scheduler_class(schedule, cfg) != _SCHEDULER_OF[own]:
        return None
    return _diffusers_params(schedule, cfg)


def _diffusers_params(schedule: Any, cfg: Mapping[str, Any]) -> frozenset[str] | None:
    """The config keys ``schedule``'s diffusers class uses (None: class unknown / not found)."""
    cls = _diffusers_class(schedule, cfg)
    if cls is None:
        return None
    # diffusers' sigma-grid conversions also read these from the config when present, whether
    # or not the class takes them (a leftover EulerDiscreteScheduler sigma_min is used)
    return frozenset(inspect.signature(cls.__init__).parameters) | {"sigma_min", "sigma_max"}


def _diffusers_class(schedule: Any, cfg: Mapping[str, Any]) -> type | None:
    """``schedule``'s diffusers scheduler class: its type, or for a saved config the diffusers
    class its ``_class_name`` names (None: no class name, diffusers missing, not a class)."""
    cls_name = _scheduler_class(schedule, cfg)
    if cls_name is None:
        return None
    cls = type(schedule) if type(schedule).__name__ == cls_name else None
    if cls is None:  # a saved config: its class, if diffusers is installed
        try:
            import diffusers
        except ImportError:
            return None
        cls = getattr(diffusers, cls_name, None)
    # diffusers' stand-in for a class whose backend is missing (CosineDPMSolverMultistepScheduler
    # without torchsde: metaclass DummyObject, __init__(*args, **kwargs)) tells no parameters
    if type(cls).__name__ == "DummyObject":
        return None
    return cls if isinstance(cls, type) else None


def infer_sampler(schedule: Any) -> str:
    """The sampler ``sample(sampler=None)`` runs: the one that reproduces ``schedule``'s
    diffusers scheduler class (``DPMSolverMultistepScheduler`` -> ``"dpm++"``, ...; its settings
    then apply as for an explicit name), else ``"ddim"``. A diffusers scheduler class fastdiff
    has no sampler for (e.g. ``UnCLIPScheduler``) warns: its noise schedule is used,
    sampled with DDIM.

    A config mapping without ``_class_name`` (``scheduler.config``, ``dict(scheduler.config)``:
    diffusers writes the class name only when it saves the config) is its class's when its keys
    are exactly that class's parameters (:func:`named_config`). Keys of several classes alike
    (``KDPM2DiscreteScheduler`` / ``LMSDiscreteScheduler``, ...) are a ValueError, and so is a
    mapping of no class with keys that neither the noise schedule nor ``"ddim"`` reads
    (``{"use_karras_sigmas": True}``): they would be dropped silently."""
    schedule = named_config(schedule, None)
    cfg = _scheduler_config(schedule)
    if cfg is None:
        return "ddim"
    cls = _scheduler_class(schedule, cfg)
    name = next((k for k, v in _SCHEDULER_OF.items() if v == cls), None)
    if name is not None:
        return name
    if _is_flow_scheduler(schedule):  # no betas: DDIM cannot run it
        raise ValueError(
            f"schedule: fastdiff has no sampler for {cls}; flow-matching models can run "
            "sampler='flow_euler' or 'flow_heun' (the scheduler's shift settings apply)"
        )
    found = classes_of_keys(cfg) if cls is None else []
    if cls is None and any(c in _SCHEDULER_OF.values() for c in found):
        of = {v: k for k, v in reversed(_SCHEDULER_OF.items())}  # the forward one first
        which = [f"{c} ({of[c]!r})" if c in of else f"{c} (no fastdiff sampler)" for c in found]
        raise ValueError(
            f"schedule: a config without '_class_name' whose keys are those of {_and(which)} "
            "alike; sampler=None cannot tell which to reproduce: pass sampler=, the scheduler "
            "object, or its config with '_class_name' (as scheduler.save_config writes it)"
        )
    if cls is None and found:  # classes fastdiff has no sampler for, as an object of them
        cls = " / ".join(found)
    if cls is not None:
        known = ", ".join(f"{v} -> {k!r}" for k, v in _SCHEDULER_OF.items())
        warnings.warn(
            f"schedule: fastdiff has no sampler for {cls}; sampling its noise schedule with "
            f"DDIM. Pass sampler= to choose one (samplers reproduce {known})",
            UserWarning,
            stacklevel=5,  # infer_sampler < resolve_sampler < sample < no_grad wrapper < caller
        )
        return "ddim"
    check_config_read(schedule, "ddim", "sample(sampler=None)")
    return "ddim"


def _scheduler_class(schedule: Any, cfg: Mapping[str, Any]) -> str | None:
    """The diffusers scheduler class name of ``schedule`` (an object, or a saved config with
    ``_class_name``); None for a plain mapping without one."""
    cls = cfg.get("_class_name")
    if isinstance(cls, str):
        return cls
    return type(schedule).__name__ if hasattr(schedule, "config") else None


def _check_scheduler_settings(schedule: Any, name: str) -> None:
    """``schedule`` is the sampler's own diffusers scheduler (or its saved config) with a
    setting the sampler cannot reproduce (Karras sigmas, another solver order, ...): a
    ValueError naming it, instead of samples that silently differ from diffusers'."""
    cfg = _scheduler_config(schedule)
    if cfg is None:
        return
    name = next(k for k in _SCHEDULER_OF if SAMPLERS[k] is SAMPLERS[name])  # "dpm-solver++"
    if _scheduler_class(schedule, cfg) != _SCHEDULER_OF[name]:
        return
    takes = inspect.signature(SAMPLERS[name].__init__).parameters  # a setting it gains is fine
    bad = {
        k: cfg[k]
        for k, neutral in _UNSUPPORTED_SETTINGS.get(name, {}).items()
        if k in cfg and k not in takes and cfg[k] != neutral
    }
    if bad:
        setting = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ValueError(
            f"schedule: {_SCHEDULER_OF[name]} sets {setting}, which fastdiff's {name!r} sampler "
            "does not implement (its samples would differ from diffusers'); use the "
            "scheduler's default for it, or run diffusers' own loop"
        )


def _check_sampler_options(name: str, opts: Mapping[str, Any]) -> None:
    """Unknown sampler options are a TypeError naming them and the valid ones."""
    params = inspect.signature(SAMPLERS[name].__init__).parameters
    valid = sorted(k for k, p in params.items() if k not in ("self", "schedule", "steps")
                   and p.kind is not p.VAR_KEYWORD)  # fmt: skip
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise TypeError(
            f"sample: unknown option(s) {unknown} for sampler {name!r}; its options are {valid}"
        )
