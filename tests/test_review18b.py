"""Review of session 18's new code (helper review18b).

- ``fastdiff.invert``'s default sampler for every form of a ``DPMSolverMultistepInverseScheduler``
  passed as ``schedule`` (object, ``.config``, dict, saved config);
- ``fastdiff repaint`` (CLI): its grid layout, progress bar and defaults, and its --out /
  --backend checks before the model is loaded;
- flow ``shift_terminal``: a falsy non-number is a TypeError;
- dpm++_sde: eta > 1 clamps sigma_up as k-diffusion; a wrong-type option is a TypeError;
- ``sample --noise``: an error for a bad metadata value names --noise and the file;
- flow_euler / flow_heun and the EDM samplers: a wrong-type option (str, None, bool) is a
  TypeError naming it, expected and got; NaN / inf / out of range stay ValueErrors.

Each test pins a behaviour a mutant of the reviewed code changed without any test failing, or a
bug found by probing (the review log: /work/notes/s18/review18b_log.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
import fastdiff._cli_repaint as cli_repaint
from fastdiff import NoiseSchedule
from fastdiff.cli import main

diffusers = pytest.importorskip("diffusers")
Inverse = diffusers.DPMSolverMultistepInverseScheduler
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _model(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
    """A smooth, t- and label-dependent stand-in for a network (no weights)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    scale = 1.0 if class_labels is None else 1.0 + 0.5 * class_labels.to(x.dtype).view(view)
    return torch.tanh(x * scale) * (0.5 + t.to(x.dtype).view(view) / 2000.0) + 0.1 * x


def _image(seed: int = 0, shape=(2, 3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.6 * torch.rand(shape, generator=g) - 1.3


@torch.no_grad()
def test_invert_default_is_dpm_inverse_for_every_form_of_its_config(tmp_path):
    """``schedule=inverse_scheduler.config`` (a FrozenDict without ``_class_name``) or a dict of
    it picked "ddim_inverse" while the object and a saved config picked "dpm++_inverse": the
    same scheduler gave two different inversions. Every form now gives the object's result; a
    forward DPMSolverMultistepScheduler's config (its keys the inverse lacks:
    final_sigmas_type, ...), DDIMInverseScheduler's and a bare beta dict keep "ddim_inverse"."""

    def fresh():
        return Inverse(solver_order=3, prediction_type="v_prediction", **SD)

    sched, x = fresh(), _image(1)
    want = fastdiff.invert(_model, x, 7, sampler="dpm++_inverse", schedule=sched)
    plain = [fresh().config, dict(fresh().config)]  # as built: no _class_name
    assert not any("_class_name" in p for p in plain)
    saver = fresh()
    saver.save_config(tmp_path)  # (diffusers then adds _class_name to saver.config itself)
    forms = [sched, *plain, json.loads(fresh().to_json_string()), Inverse.load_config(tmp_path)]
    for form in forms:
        assert torch.equal(fastdiff.invert(_model, x, 7, schedule=form), want), type(form)
    named = fastdiff.invert(_model, x, 7, sampler="dpm++_inverse", schedule=dict(fresh().config))
    assert torch.equal(named, want)  # the plain dict's settings (order 3, v) are applied
    fwd = diffusers.DPMSolverMultistepScheduler
    others = [fwd(**SD), fwd(**SD).config, dict(fwd(**SD).config),
              diffusers.DDIMInverseScheduler(**SD).config, SD]  # fmt: skip
    for form in others:
        got = fastdiff.invert(_model, x, 7, schedule=form)
        assert torch.equal(got, fastdiff.invert(_model, x, 7, sampler="ddim_inverse",
                                                schedule=form)), type(form)  # fmt: skip
        assert not torch.equal(got, want)


def _pictures(tmp_path):
    Image.fromarray(((np.arange(256).reshape(16, 16) * 7) % 256).astype(np.uint8)).save(
        tmp_path / "in.png"
    )
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 2:10] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    img, msk = str(tmp_path / "in.png"), str(tmp_path / "mask.png")
    return ["repaint", "--init-image", img, "--mask", msk]


def test_cli_repaint_label_all_grid_and_progress(tmp_path, monkeypatch):
    """--label all lays the grid out ten per row (one row per digit cycle, as sample), --nrow
    overrides; without --quiet fastdiff.repaint gets progress=True."""
    seen = []
    monkeypatch.setattr(fastdiff, "repaint", lambda m, i, k, s, **kw: seen.append(kw) or i)
    base = [*_pictures(tmp_path), "--n", "12", "--label", "all", "--scale", "1"]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert seen[-1]["progress"] is True
    assert Image.open(tmp_path / "a.png").size == (10 * 16 + 11 * 2, 2 * 16 + 3 * 2)
    assert main([*base, "--nrow", "3", "--quiet", "--out", str(tmp_path / "b.png")]) == 0
    assert seen[-1]["progress"] is False
    assert Image.open(tmp_path / "b.png").size == (3 * 16 + 4 * 2, 4 * 16 + 5 * 2)
    assert main([*base[:-4], "--scale", "1", "--n", "12", "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (4 * 16 + 5 * 2, 3 * 16 + 4 * 2)  # ceil(sqrt)


@pytest.mark.parametrize(
    ("argv", "msg"),
    [(["--out", "{d}/x.jpg"], "--out: the file is written as png"),
     (["--out", "{d}/nodir/x.png"], "nodir does not exist"),
     (["--backend", "bogus", "--out", "{d}/o.png"], "unknown backend 'bogus'"),
     (["--backend", "cuda", "--out", "{d}/o.png"], "backend 'cuda' cannot run on cpu")],
)  # fmt: skip
def test_cli_repaint_out_and_backend_checked_before_the_model(argv, msg, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    """A bad --out or --backend is one error line before the model is loaded (not after the
    minutes of a 250-step run), and nothing is written."""
    loaded = []
    monkeypatch.setattr(cli_repaint, "_load_model", lambda *a: loaded.append(a))
    argv = [*_pictures(tmp_path), *(a.format(d=tmp_path) for a in argv), "--quiet"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_repaint_defaults_are_fastdiff_repaints():
    """The documented defaults (README, --help): 250 steps, jump 10 x 10, eta 0, 16 images,
    seed 0, the embedded model on the CPU."""
    from fastdiff.cli import build_parser

    a = build_parser().parse_args(["repaint", "--init-image", "i.png", "--mask", "m.png"])
    got = (a.steps, a.jump_length, a.jump_n_sample, a.eta, a.n, a.seed, a.model, a.device)
    assert got == (250, 10, 10, 0.0, 16, 0, None, "cpu") and a.out == "repaint.png"
    assert a.label is None and a.guidance is None and a.backend is None and not a.quiet


@pytest.mark.parametrize("v", [False, ""], ids=["False", "empty_str"])
def test_flow_shift_terminal_falsy_non_number_is_type_error(v):
    """Only None / 0 mean diffusers' "no stretch": a falsy non-number (False, "") is a wrong
    type, not read as "no stretch" (f9fcbdc's rule; its tests had only truthy wrong types)."""
    from fastdiff.samplers import make_sampler

    got = type(v).__name__
    with pytest.raises(TypeError, match=f"^shift_terminal: expected a finite float, got {got}$"):
        make_sampler("unipc", NoiseSchedule("linear"), 5, use_flow_sigmas=True,
                     prediction_type="flow_prediction", shift_terminal=v)  # fmt: skip


@pytest.mark.parametrize("key", ["eta", "s_noise"])
@pytest.mark.parametrize("v", ["1", None, True], ids=["str", "None", "bool"])
def test_dpmpp_sde_wrong_type_is_type_error(key, v):
    from fastdiff.samplers import make_sampler

    with pytest.raises(TypeError, match=f"^{key}: expected a finite float >= 0, got "):
        make_sampler("dpm++_sde", NoiseSchedule("linear"), 5, **{key: v})


@pytest.mark.parametrize("meta", [{"guidance": "x", "label": "3"}, {"label": "12"}],
                         ids=["guidance", "label"])  # fmt: skip
def test_cli_sample_noise_bad_metadata_names_the_file(meta, tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "n.safetensors"
    save_file({"x_T": torch.randn(1, 1, 16, 16)}, str(path),
              metadata={"sampler": "dpm++_inverse", "steps": "3", **meta})  # fmt: skip
    out = tmp_path / "o.png"
    assert main(["sample", "--noise", str(path), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--noise" in err and str(path) in err and not out.exists()


def test_dpmpp_sde_eta_above_one_clamps_sigma_up_as_kdiffusion():
    """eta > 1 (accepted: any finite eta >= 0): k-diffusion's get_ancestral_step clamps
    sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2) = 0 there. Without the clamp the step adds more
    noise than the level it lands on (a survivor of the mutation run: eta <= 1 never clamps)."""
    import math

    from fastdiff.samplers import make_sampler
    from fastdiff.samplers.base import vp_of_sigma

    eta = 3.0
    smp = make_sampler("dpm++_sde", NoiseSchedule("linear"), 5, eta=eta)
    rows, clamped = smp.coefficients(), 0
    for j in range(smp.num_inference_steps - 1):
        s, m = float(smp._sig[j]), float(smp._mid[j])
        up = min(m, eta * math.sqrt(m * m * (s * s - m * m) / (s * s)))
        clamped += up == m
        down = math.sqrt(m * m - up * up)
        a_s, a_m = vp_of_sigma(s)[0], vp_of_sigma(m)[0]
        assert rows[2 * j, 5] == pytest.approx(a_m * up, rel=1e-12)  # C: stage 1's noise
        assert rows[2 * j, 2] == pytest.approx(a_m * (down / s) / a_s, rel=1e-12, abs=1e-15)
    assert clamped >= 1  # the case the clamp decides is exercised


# ------------------------- flow / EDM sampler options: a wrong type is a TypeError (as f9fcbdc)
_DYN = {"use_dynamic_shifting": True}
_FLOW_WRONG = [("flow_euler", "shift", {}), ("flow_heun", "shift", {}), ("flow_euler", "mu", _DYN),
               ("flow_euler", "shift_terminal", {})]  # fmt: skip
_EDM_POS = ["sigma_min", "sigma_max", "sigma_data", "rho"]
_EDM_CHURN = ["s_churn", "s_tmin", "s_tmax", "s_noise"]


def _make(name, **opts):
    from fastdiff.samplers import make_sampler

    return make_sampler(name, None, 5, **opts)


@pytest.mark.parametrize("v", ["3", None, True], ids=["str", "None", "bool"])
@pytest.mark.parametrize(("name", "key", "extra"), _FLOW_WRONG, ids=lambda c: str(c))
def test_flow_sampler_wrong_type_is_type_error(name, key, extra, v):
    if key in ("shift_terminal", "mu") and v is None:
        pytest.skip("None is 'not given' (no stretch / no mu)")
    got = type(v).__name__
    with pytest.raises(TypeError, match=f"^{key}: expected a finite float, got {got}$"):
        _make(name, **extra, **{key: v})


def test_flow_sampler_values_stay_value_errors():
    for v in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^shift: expected a finite float, got"):
            _make("flow_euler", shift=v)
        with pytest.raises(ValueError, match="^mu: expected a finite float, got"):
            _make("flow_euler", mu=v, **_DYN)
    with pytest.raises(ValueError, match="^shift: expected a float > 0"):
        _make("flow_heun", shift=0)
    for v in (False, ""):  # falsy non-numbers are not diffusers' "no stretch"
        with pytest.raises(TypeError, match="^shift_terminal: expected a finite float, got"):
            _make("flow_euler", shift_terminal=v)
    plain = _make("flow_euler", shift=3).sigmas.tolist()
    assert _make("flow_euler", shift=np.float32(3.0)).sigmas.tolist() == plain
    for none in (None, 0, 0.0):  # "no stretch"
        assert _make("flow_euler", shift=3, shift_terminal=none).sigmas.tolist() == plain
    assert _make("flow_euler", shift=3, shift_terminal=0.1).sigmas[-2] == pytest.approx(0.1)


@pytest.mark.parametrize("v", ["1", None, True], ids=["str", "None", "bool"])
@pytest.mark.parametrize("key", _EDM_POS + _EDM_CHURN)
@pytest.mark.parametrize("name", ["edm_euler", "edm_dpm++"])
def test_edm_sampler_wrong_type_is_type_error(name, key, v):
    if key in _EDM_CHURN and name != "edm_euler":
        pytest.skip("the churn options are edm_euler's")
    want = "a finite float > 0" if key in _EDM_POS else "a float"
    got = type(v).__name__
    with pytest.raises(TypeError, match=f"^{key}: expected {want}, got {got}$"):
        _make(name, **{key: v})


def test_edm_sampler_values_stay_value_errors():
    for key in _EDM_POS:
        for v in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"^{key}: expected a finite float > 0, got"):
                _make("edm_euler", **{key: v})
    for key in _EDM_CHURN:
        with pytest.raises(ValueError, match=f"^{key}: expected a float, got nan"):
            _make("edm_euler", **{key: float("nan")})
    a = _make("edm_euler", sigma_min=np.float64(0.01), rho=7).coefficients()
    assert np.array_equal(a, _make("edm_euler", sigma_min=0.01, rho=7.0).coefficients())
    with pytest.raises(TypeError, match="^s_noise: expected a finite float > 0, got str$"):
        _make("consistency", s_noise="1")  # the consistency sampler shares EDM's check


@pytest.mark.parametrize("v,got", [(False, "bool"), ("0", "str"), (None, "NoneType")])
def test_consistency_s_noise_falsy_wrong_type_is_type_error(v, got):
    """``s_noise=False`` was read as 0 (``False != 0`` is False): a wrong type, as ``True``."""
    with pytest.raises(TypeError, match=f"^s_noise: expected a finite float > 0, got {got}$"):
        _make("consistency", s_noise=v)
    assert _make("consistency", s_noise=0).s_noise == 0.0  # 0 (int or float) still means no noise


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_repeat_refusal_names_lambda_min_clipped(spacing):
    """A lambda_min_clipped that leaves too few training timesteps for the steps repeats them;
    the refusal names the clipping (review18's note: it only named steps / timestep_spacing)."""
    from fastdiff.samplers import make_sampler

    with pytest.raises(ValueError, match=r"lambda_min_clipped=4\.0 ends the schedule at t = 1;"):
        make_sampler("dpm++", NoiseSchedule("linear"), 10, lambda_min_clipped=4.0,
                     timestep_spacing=spacing)  # fmt: skip


@pytest.mark.parametrize("eps", ["1e-5", None, True])
def test_group_norm_silu_wrong_type_eps_is_type_error(eps):
    """A str / None / bool eps is a wrong type (TypeError, as num_groups'); NaN and negative
    values stay ValueErrors (test_strict_round7)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    with pytest.raises(TypeError, match=f"eps must be a non-negative float, got {eps!r}"):
        group_norm_silu(torch.randn(2, 4, 3, 3), 2, eps=eps)
