"""Session 19 (cfg19): a diffusers scheduler config without ``_class_name`` (an in-memory
``scheduler.config``, ``dict(scheduler.config)``, a hand-written dict) passed as ``schedule``
means what the scheduler object means when its keys tell its class, and is never sampled with
its sampler settings silently dropped; ``fastdiff.sample`` and ``fastdiff.invert`` alike."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch

import fastdiff
from fastdiff._config_class import classes_of_keys
from fastdiff._sampler_setup import _SCHEDULER_OF, infer_sampler

diffusers = pytest.importorskip("diffusers")


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent stand-in for an eps model (no weights)."""
    return torch.tanh(x) * (0.5 + t.to(x.dtype)[:, None, None, None] / 2000.0)


def _run(**kw: object) -> torch.Tensor:
    noise = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    kw.setdefault("steps", 6)
    return fastdiff.sample(_model, noise=noise, generator=torch.Generator().manual_seed(7), **kw)


def _image() -> torch.Tensor:
    return torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _classless(sched, how: str):
    """The scheduler's in-memory config (a FrozenDict without _class_name) or a dict of it."""
    cfg = sched.config
    assert "_class_name" not in cfg  # diffusers adds it only when it saves the config
    return cfg if how == "frozen" else dict(cfg)


# ------------------------------------------------------------------ the premise, vs diffusers
@pytest.mark.parametrize("cls", sorted(set(_SCHEDULER_OF.values())))
def test_a_config_holds_exactly_its_class_parameters(cls):
    """The class of a config without _class_name is told by its keys: diffusers' config of
    each class fastdiff reproduces holds exactly its __init__ parameters (plus _-keys)."""
    klass = getattr(diffusers, cls)
    if type(klass).__name__ == "DummyObject":  # torchsde missing: no parameters to read
        pytest.skip(f"{cls} needs torchsde")
    keys = {k for k in klass().config if not k.startswith("_")}
    params = inspect.signature(klass.__init__).parameters.values()
    want = {p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}
    assert keys == want
    assert cls in classes_of_keys(klass().config)


# ------------------------------------------------------------------ sample(sampler=None)
CASES = [
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3}, "dpm++"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpm++"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, "dpm++"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler_a"),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}, "unipc"),
    ("DEISMultistepScheduler", {"use_karras_sigmas": True}, "deis"),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}, "dpm++_single"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun"),
    ("PNDMScheduler", {"skip_prk_steps": True}, "pndm"),
    ("DDPMScheduler", {"variance_type": "fixed_large"}, "ddpm"),
    ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "ddim"),
    ("SASolverScheduler", {"use_karras_sigmas": True}, "sa_solver"),
]


@pytest.mark.parametrize("how", ["frozen", "dict"])
@pytest.mark.parametrize("cls,settings,name", CASES, ids=lambda v: str(v))
def test_classless_config_samples_as_the_object(cls, settings, name, how):
    """sample(schedule=scheduler.config) infers the scheduler's sampler with its settings:
    bit for bit the object's run (before: DDIM, its Karras / order / SDE settings dropped)."""
    sched = getattr(diffusers, cls)(beta_schedule="scaled_linear", **settings)
    arg = _classless(sched, how)
    assert infer_sampler(arg) == name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(schedule=arg)
    torch.testing.assert_close(got, _run(schedule=sched), rtol=0, atol=0)
    # the settings count (the check can fail): without them the run is another
    plain = getattr(diffusers, cls)(beta_schedule="scaled_linear")
    assert not torch.equal(got, _run(schedule=plain))


@pytest.mark.parametrize("cls,names", [
    ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler ('dpm2_a'), "
     "KDPM2DiscreteScheduler ('dpm2') and LMSDiscreteScheduler ('lms')"),
    ("LCMScheduler", "LCMScheduler ('lcm') and TCDScheduler ('tcd')"),
    ("FlowMatchHeunDiscreteScheduler", "FlowMapEulerDiscreteScheduler (no fastdiff sampler) "
     "and FlowMatchHeunDiscreteScheduler ('flow_heun')"),
])  # fmt: skip
def test_keys_of_several_classes_are_refused_without_sampler(cls, names):
    """Classes with the same parameters: sampler=None cannot tell which one the config is;
    a ValueError naming them (and the way out), no model call."""
    calls = []
    cfg = dict(getattr(diffusers, cls)().config)
    with pytest.raises(ValueError) as e:
        fastdiff.sample(lambda x, t: calls.append(t) or x, steps=4, schedule=cfg,
                        noise=torch.zeros(1, 3, 4, 4))  # fmt: skip
    msg = str(e.value)
    assert msg.startswith("schedule: a config without '_class_name' whose keys are those of ")
    assert names in msg and "pass sampler=, the scheduler object" in msg
    assert calls == []


@pytest.mark.parametrize("cls,name,settings", [
    ("KDPM2DiscreteScheduler", "dpm2", {"use_karras_sigmas": True}),
    ("KDPM2AncestralDiscreteScheduler", "dpm2_a", {"prediction_type": "v_prediction"}),
    ("LMSDiscreteScheduler", "lms", {"use_karras_sigmas": True}),
    ("TCDScheduler", "tcd", {"prediction_type": "v_prediction"}),
    ("FlowMatchHeunDiscreteScheduler", "flow_heun", {"shift": 3.0}),  # needs its class
])  # fmt: skip
def test_the_named_sampler_picks_its_class_among_several(cls, name, settings):
    """With sampler= naming one of the classes the keys fit, the config is that class's: its
    settings apply (and its unsupported-setting checks), as for the object."""
    sched = getattr(diffusers, cls)(**settings)
    kw = {"steps": 4} if name == "tcd" else {}
    got = _run(schedule=dict(sched.config), sampler=name, **kw)
    torch.testing.assert_close(got, _run(schedule=sched, sampler=name, **kw), rtol=0, atol=0)
    assert not torch.equal(got, _run(schedule=getattr(diffusers, cls)(), sampler=name, **kw))


def test_flow_match_config_samples_as_the_object():
    """A FlowMatchEulerDiscreteScheduler's in-memory config infers "flow_euler" with its shift
    (before: no class, read as a beta schedule, which it has not: an error)."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for arg in (sched.config, dict(sched.config)):
        assert infer_sampler(arg) == "flow_euler"
        torch.testing.assert_close(_run(schedule=arg), _run(schedule=sched), rtol=0, atol=0)
        got = _run(schedule=arg, sampler="flow_euler")
        torch.testing.assert_close(got, _run(schedule=sched), rtol=0, atol=0)
    assert not torch.equal(got, _run(sampler="flow_euler"))


def test_ipndm_config_vs_a_bare_trained_betas_schedule():
    """dict(IPNDMScheduler().config) is {num_train_timesteps, trained_betas=None}: "ipndm", as
    its object; the same keys with betas given are a bare noise schedule (DDIM on those betas,
    as before), not an IPNDM config (whose trained_betas fastdiff refuses)."""
    sched = diffusers.IPNDMScheduler()
    assert infer_sampler(dict(sched.config)) == "ipndm"
    torch.testing.assert_close(_run(schedule=dict(sched.config)), _run(schedule=sched),
                               rtol=0, atol=0)  # fmt: skip
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).tolist()
    cfg = {"num_train_timesteps": 1000, "trained_betas": betas}
    assert infer_sampler(cfg) == "ddim"
    want = _run(schedule=fastdiff.NoiseSchedule(betas=torch.tensor(betas)), sampler="ddim")
    torch.testing.assert_close(_run(schedule=cfg), want, rtol=0, atol=0)


def test_own_class_checks_apply_to_a_classless_config():
    """An unsupported setting of the sampler's own class is refused in a classless config
    too (before: EulerDiscreteScheduler's timestep_type='continuous' was dropped)."""
    sched = diffusers.EulerDiscreteScheduler(timestep_type="continuous")
    for arg in (sched, sched.config, dict(sched.config)):
        with pytest.raises(ValueError, match="timestep_type='continuous'"):
            _run(schedule=arg, sampler="euler")
        with pytest.raises(ValueError, match="timestep_type='continuous'"):
            _run(schedule=arg)


@pytest.mark.parametrize("cfg,unread,readers", [
    ({"beta_schedule": "scaled_linear", "use_karras_sigmas": True},
     "use_karras_sigmas=True", "e.g. sampler='deis', 'dpm++', 'dpm++_sde', 'dpm++_single', "
     "'dpm2' or 'dpm2_a'"),
    ({"solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
     "solver_order=3, algorithm_type='sde-dpmsolver++'", "e.g. sampler='deis', 'dpm++', "
     "'dpm++_single' or 'edm_dpm++'"),
    ({"beta_end": 0.012, "interpolation_type": "log_linear", "solver_order": 2},
     "interpolation_type='log_linear', solver_order=2", "no fastdiff sampler reads all of them"),
])  # fmt: skip
def test_keys_no_default_sampler_reads_are_refused(cfg, unread, readers):
    """A hand-written config of no class, sampled with sampler=None (DDIM): keys that neither
    the noise schedule nor DDIM reads are a ValueError naming schedule, them, and the samplers
    that read them; nothing runs."""
    calls = []
    with pytest.raises(ValueError) as e:
        fastdiff.sample(lambda x, t: calls.append(t) or x, steps=4, schedule=cfg,
                        noise=torch.zeros(1, 3, 4, 4))  # fmt: skip
    msg = str(e.value)
    assert msg.startswith("schedule: a config without '_class_name' and of no diffusers")
    assert f"sample(sampler=None) runs 'ddim', which does not read {unread};" in msg
    assert f"pass sampler= ({readers})" in msg
    assert calls == []


def test_keys_the_schedule_or_ddim_read_still_run_as_ddim():
    """Schedule keys and DDIM's own settings (None values aside) are read: DDIM, silently."""
    cfg = {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_end": 0.012,
           "prediction_type": "v_prediction", "clip_sample": False, "trained_betas": None,
           "timestep_spacing": "trailing", "use_karras_sigmas": None}  # fmt: skip
    assert infer_sampler(cfg) == "ddim"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(schedule=cfg)
    want = _run(
        schedule=fastdiff.NoiseSchedule.from_diffusers(cfg),
        sampler="ddim",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_from_config_keeps_leftovers_only_with_a_class_name():
    """The premise of telling a class by its keys, vs diffusers: from_config of a config
    without _class_name keeps none of the other class's keys (exactly its own: inferred), and
    the config of a saved one carries _class_name with the leftovers (never guessed from)."""
    ddim = diffusers.DDIMScheduler()
    sched = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config, use_karras_sigmas=True)
    assert "_class_name" not in sched.config and "clip_sample" not in sched.config
    assert classes_of_keys(sched.config) == ["DPMSolverMultistepScheduler"]
    got = _run(schedule=sched.config)
    torch.testing.assert_close(got, _run(schedule=sched), rtol=0, atol=0)
    saved = json.loads(ddim.to_json_string())
    sched = diffusers.DPMSolverMultistepScheduler.from_config(saved, use_karras_sigmas=True)
    assert sched.config["_class_name"] == "DPMSolverMultistepScheduler"
    assert "clip_sample" in sched.config and classes_of_keys(sched.config) == []
    torch.testing.assert_close(_run(schedule=sched.config), got, rtol=0, atol=0)


def test_unmapped_class_config_warns_as_the_object():
    """A classless config of a class without a fastdiff sampler warns (DDIM) as its object."""
    sched = diffusers.UnCLIPScheduler()
    with pytest.warns(UserWarning, match=r"no sampler for UnCLIPScheduler.*DDIM") as rec:
        got = _run(schedule=dict(sched.config))
    assert rec[0].filename == __file__
    with pytest.warns(UserWarning):
        torch.testing.assert_close(got, _run(schedule=sched), rtol=0, atol=0)


def test_saved_config_still_names_its_class():
    """A saved config (with _class_name) is not second-guessed from its keys."""
    sched = diffusers.KDPM2DiscreteScheduler(use_karras_sigmas=True)
    saved = json.loads(sched.to_json_string())
    assert infer_sampler(saved) == "dpm2"
    torch.testing.assert_close(_run(schedule=saved), _run(schedule=sched), rtol=0, atol=0)


# ------------------------------------------------------------------ invert(sampler=None)
INVERT_CASES = [
    ("DPMSolverMultistepInverseScheduler", {"use_karras_sigmas": True, "solver_order": 3}),
    ("DPMSolverMultistepInverseScheduler", {}),
    ("DDIMInverseScheduler", {"set_alpha_to_one": False}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}),  # -> ddim_inverse
    ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("KDPM2DiscreteScheduler", {}),  # keys of three classes: none is an inverse one
]


@pytest.mark.parametrize("how", ["frozen", "dict"])
@pytest.mark.parametrize("cls,settings", INVERT_CASES, ids=lambda v: str(v))
def test_invert_classless_config_as_the_object(cls, settings, how):
    """invert(schedule=<config without class name>) picks the object's inverse sampler with
    its settings, bit for bit the object's inversion."""
    sched = getattr(diffusers, cls)(beta_schedule="scaled_linear", **settings)
    got = fastdiff.invert(_model, _image(), 5, schedule=_classless(sched, how))
    torch.testing.assert_close(got, fastdiff.invert(_model, _image(), 5, schedule=sched),
                               rtol=0, atol=0)  # fmt: skip


def test_invert_flow_match_scheduler_defaults_to_flow_euler_inverse():
    """A FlowMatchEulerDiscreteScheduler (object, saved or in-memory config) inverts with
    "flow_euler_inverse" on its grid (before: "ddim_inverse", a no-betas error)."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    want = fastdiff.invert(_model, _image(), 4, sampler="flow_euler_inverse", shift=3.0)
    for arg in (sched, sched.config, json.loads(sched.to_json_string())):
        got = fastdiff.invert(_model, _image(), 4, schedule=arg)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want, fastdiff.invert(_model, _image(), 4, sampler="flow_euler_inverse"))


def test_invert_refuses_keys_ddim_inverse_does_not_read():
    """A hand-written config of no class that is not the DPM-Solver++ inverse's either: keys
    DDIM inversion would drop are a ValueError naming them (as sample's); the inverse's own
    keys alone still pick "dpm++_inverse" (b698c60)."""
    cfg = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "final_sigmas_type": "zero"}
    with pytest.raises(ValueError) as e:
        fastdiff.invert(_model, _image(), 4, schedule=cfg)
    assert ("invert(sampler=None) runs 'ddim_inverse', which does not read use_karras_sigmas=True, "
            "final_sigmas_type='zero'; pass sampler= (no fastdiff sampler reads all of them)"
            in str(e.value))  # fmt: skip
    cfg = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}
    got = fastdiff.invert(_model, _image(), 4, schedule=cfg)
    want = fastdiff.invert(_model, _image(), 4, sampler="dpm++_inverse", use_karras_sigmas=True,
                           schedule=fastdiff.NoiseSchedule.from_diffusers(cfg))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------ the CLI's bad input
@pytest.mark.parametrize("argv,msg", [
    (["--guidance", "nan", "--label", "1"], "argument --guidance: expected a finite number, got "
                                            "nan"),
    (["--guidance", "inf", "--label", "1"], "argument --guidance: expected a finite number"),
    (["--eta", "-1"], "argument --eta: expected a finite number >= 0, got -1"),
    (["--eta", "nan"], "argument --eta: expected a finite number >= 0, got nan"),
    (["--strength", "0", "--init-image", "{d}/a.png"], "argument --strength: expected a number "
                                                       "in (0, 1], got 0"),
    (["--strength", "1.5", "--init-image", "{d}/a.png"], "argument --strength: expected"),
    (["--scale", "1000"], "--scale 1000 with --n 64 and 8 images per row (--nrow) makes a "
                          "128018 x 128018 PNG"),
    (["--n", "400", "--nrow", "400", "--scale", "64"], "use a smaller --scale, --n or --nrow"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--backend", "bogus"], "--backend: unknown backend 'bogus'"),
    (["--model", "{d}/missing.safetensors"], "--model: model file not found"),
    (["--out", "{d}/no/dir/x.png"], "--out: cannot write"),
    (["--out", "{d}"], "--out: the file is written as png"),
    (["--karras"], "--karras: for --sampler deis, dpm++"),
    (["--eta", "2"], "eta: 2.0 makes sigma^2 > 1 - alpha_bar_prev"),  # a library ValueError
])  # fmt: skip
def test_cli_sample_bad_input_is_one_line_exit_2(argv, msg, tmp_path, capsys, monkeypatch):
    """Bad input to `fastdiff sample`: one error line naming the option on stderr, exit status
    2 as argparse's usage errors (also the library's ValueErrors of a user's value), nothing
    sampled beyond the check, nothing written."""
    from PIL import Image

    from fastdiff.cli import main

    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    if "--eta" not in argv or argv[-1] != "2":
        monkeypatch.setattr(fastdiff, "sample", lambda *a, **k: pytest.fail("sampled"))
    out = tmp_path / "out.png"
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(["sample", "--steps", "2", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_failure_while_running_is_exit_1(tmp_path, capsys, monkeypatch):
    """A failure that is not the user's input (here a RuntimeError inside sampling) stays exit
    status 1, one line."""
    from fastdiff.cli import main

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(fastdiff, "sample", boom)
    out = tmp_path / "out.png"
    assert main(["sample", "--steps", "2", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "fastdiff sample: error: CUDA out of memory" and not out.exists()


def test_cli_invert_bad_guidance_is_argparse_error(tmp_path, capsys):
    from PIL import Image

    from fastdiff.cli import main

    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    out = tmp_path / "x.safetensors"
    argv = ["invert", "--init-image", str(tmp_path / "a.png"), "--label", "3", "--guidance",
            "nan", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --guidance: expected a finite number, got nan" in err and not out.exists()
