"""Session 18 leftovers: the user-facing gaps of sessions 15-17 (error names, option types, the
LCM / TCD inpainting grid, RePaint's trajectory)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from _sampler_cases import rel as _rel

import fastdiff
from fastdiff import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 1, 4, 4)


def _zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _call(fn: str, schedule: object) -> None:
    x = torch.zeros(SHAPE)
    with warnings.catch_warnings():  # "no sampler for RePaintScheduler": sampled with DDIM
        warnings.simplefilter("ignore", UserWarning)
        if fn == "sample":
            fastdiff.sample(_zero, 2, shape=SHAPE, schedule=schedule)
        elif fn == "invert":
            fastdiff.invert(_zero, x, 2, schedule=schedule)
        else:
            fastdiff.repaint(_zero, x, torch.ones(SHAPE), 2, schedule=schedule)


_REFUSED = [
    (diffusers.RePaintScheduler(beta_schedule="sigmoid"), ValueError,
     "beta_schedule 'sigmoid' is not supported; expected one of"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, ValueError,
     "beta_schedule 'sigmoid' is not supported"),
    ({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 1.5]}, ValueError,
     "betas: every beta must lie in (0, 1]"),
    ({"_class_name": "DDIMScheduler", "beta_start": "x"}, ValueError,
     "beta_start must be a number, got 'x'"),
    # (num_train_timesteps + shift alone are FlowMatchHeun's / FlowMapEuler's keys: a class-less
    # config of theirs is refused as ambiguous, test_cfg19)
    ({"shift": 3.0}, ValueError, "dict has no beta schedule"),
    (diffusers.DDIMScheduler, TypeError, "got the class DDIMScheduler; pass an instance"),
]  # fmt: skip


@pytest.mark.parametrize("fn", ["sample", "invert", "repaint"])
@pytest.mark.parametrize("case", range(len(_REFUSED)))
def test_refused_scheduler_names_schedule(fn, case):
    """A diffusers scheduler / config NoiseSchedule.from_diffusers refuses: the error names the
    argument the user gave it as (``schedule``), the message is from_diffusers' own."""
    schedule, exc, text = _REFUSED[case]
    with pytest.raises(exc, match="^" + re.escape("schedule: " + text)):
        _call(fn, schedule)
    # called directly, from_diffusers names its own parameter
    with pytest.raises(exc, match="^" + re.escape("scheduler_or_config: " + text)):
        NoiseSchedule.from_diffusers(schedule)


# ------------------------------------------------- flow-sigma options: a wrong type is a TypeError
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
_WRONG_TYPES = [
    ("flow_shift", {}, "3"),
    ("flow_shift", {}, None),
    ("flow_shift", {}, True),  # bool is not a number (as every fastdiff option validator)
    ("mu", {"use_dynamic_shifting": True}, "0.8"),
    ("mu", {"use_dynamic_shifting": True}, False),
    ("shift_terminal", {}, "0.1"),
    ("shift_terminal", {}, True),
]


@pytest.mark.parametrize("name", ["dpm++", "unipc", "deis", "dpm++_single"])
@pytest.mark.parametrize("case", range(len(_WRONG_TYPES)))
def test_flow_option_wrong_type_is_type_error(name, case):
    from fastdiff.samplers import make_sampler

    key, extra, v = _WRONG_TYPES[case]
    if key == "shift_terminal" and name != "unipc":
        pytest.skip("shift_terminal is UniPC's")
    got = type(v).__name__
    with pytest.raises(TypeError, match=f"^{key}: expected a finite float, got {got}$"):
        make_sampler(name, NoiseSchedule("linear"), 5, **_FLOW, **extra, **{key: v})


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_flow_option_values(name):
    """NaN / inf stay ValueErrors; numpy scalars and ints are numbers; shift_terminal 0 (falsy,
    diffusers' 'no stretch') is accepted as before."""
    from fastdiff.samplers import make_sampler

    s = NoiseSchedule("linear")
    for v in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^flow_shift: expected a finite float, got"):
            make_sampler(name, s, 5, **_FLOW, flow_shift=v)
    a = make_sampler(name, s, 5, **_FLOW, flow_shift=np.float32(3.0))
    b = make_sampler(name, s, 5, **_FLOW, flow_shift=3)
    assert a._grid.tolist() == b._grid.tolist()
    assert b._grid.tolist() != make_sampler(name, s, 5, **_FLOW, flow_shift=2)._grid.tolist()
    if name == "unipc":
        c = make_sampler(name, s, 5, **_FLOW, flow_shift=3, shift_terminal=0)
        assert c._grid.tolist() == b._grid.tolist()
        d = make_sampler(name, s, 5, **_FLOW, flow_shift=3, shift_terminal=np.float64(0.1))
        assert d._grid[-2] == pytest.approx(0.1)


# ------------------------------------------- LCM / TCD inpainting at strength < 1: the grid chosen
@pytest.mark.parametrize("name,cls", [("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
def test_lcm_tcd_inpaint_grid_is_the_img2img_pipelines(name, cls):
    """sample(image=, mask=, strength=0.6), 4 steps, calls the model at LCM img2img's grid
    (LatentConsistencyModelImg2ImgPipeline: ``set_timesteps(4, strength=0.6)``, 4 calls at 599,
    459, 299, 159), starting from the image noised to 599, as img2img without a mask does; not at
    StableDiffusionInpaintPipeline.get_timesteps' cut of the 4-step grid (2 calls at 499, 259)."""
    from test_img2img import _t_start

    sched = getattr(diffusers, cls)()
    g = torch.Generator().manual_seed(0)
    image, z = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    mask = torch.zeros(SHAPE)
    mask[..., 1:3, 1:3] = 1.0
    runs = {}
    for label, extra in (("inpaint", {"mask": mask}), ("img2img", {})):
        seen = []

        def model(x, t, seen=seen):
            seen.append((int(t[0]), x.clone()))
            return 0.1 * x

        fastdiff.sample(model, 4, sampler=name, schedule=sched, image=image, strength=0.6,
                        noise=z, **extra)  # fmt: skip
        runs[label] = seen
    ts = [t for t, _ in runs["inpaint"]]
    assert ts == [599, 459, 299, 159] == [t for t, _ in runs["img2img"]]
    sched.set_timesteps(4, strength=0.6)  # the LCM img2img pipeline's grid
    assert ts == sched.timesteps.tolist()
    ab = NoiseSchedule.from_diffusers(sched).alphas_cumprod[599]
    start = (ab.sqrt() * image.double() + (1 - ab).sqrt() * z.double()).float()
    torch.testing.assert_close(runs["inpaint"][0][1], start, rtol=1e-6, atol=1e-6)
    # the inpaint pipeline with this scheduler (get_timesteps, written out in test_img2img as
    # StableDiffusionInpaintPipeline needs transformers): the 4-step grid cut to int(4 x 0.6) = 2
    sched.set_timesteps(4)
    assert sched.timesteps[_t_start("ddim", 4, 0.6) :].tolist() == [499, 259]


# ------------------------------------------------------ RePaint: return_trajectory and callback
def _their_repaint_rows(model, image, mask, steps, jl, jn, eta, seed):
    """diffusers' RePaintPipeline loop (as test_repaint.their_repaint), recording x after each
    entry of the time list and pred_original_sample at each reverse step (None at a jump)."""
    from diffusers import RePaintScheduler
    from diffusers.utils.torch_utils import randn_tensor

    sch = RePaintScheduler()
    gen = torch.Generator().manual_seed(seed)
    x = randn_tensor(image.shape, generator=gen, dtype=image.dtype)
    sch.set_timesteps(steps, jl, jn)
    sch.eta = eta
    xs, x0s, t_last = [x], [], sch.timesteps[0] + 1
    for t in sch.timesteps:
        if t < t_last:
            o = sch.step(model(x, t.reshape(1).expand(x.shape[0])), t, x, image, 1.0 - mask, gen)
            x, x0 = o.prev_sample, o.pred_original_sample
        else:
            x, x0 = sch.undo_step(x, t_last, gen), None
        xs.append(x)
        x0s.append(x0)
        t_last = t
    return xs, x0s


def _toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.tanh(x) + 0.3 * torch.sin(3.0 * x + tt / 97.0) + 0.2 * x.roll(1, -1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_repaint_trajectory_rows_equal_diffusers(eta):
    from fastdiff.samplers.repaint import repaint_timesteps

    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 8, 8)
    image = torch.rand(shape, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    seen = []
    kw = dict(jump_length=3, jump_n_sample=3, eta=eta)
    x, traj = fastdiff.repaint(
        _toy, image, mask, 12, **kw, generator=torch.Generator().manual_seed(5),
        return_trajectory=True, callback=lambda i, t, x: seen.append((i, t, x.clone())),
    )  # fmt: skip
    plain = fastdiff.repaint(
        _toy, image, mask, 12, **kw, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(x, plain)  # the trajectory changes nothing
    ts = repaint_timesteps(12, 3, 3)
    L = len(ts)
    assert set(traj) == {"timesteps", "x", "x0", "reverse"}
    assert traj["timesteps"].dtype == torch.int64 and traj["timesteps"].tolist() == ts.tolist()
    assert traj["x"].shape == (L + 1, *shape) and traj["x0"].shape == (L, *shape)
    reverse = [t < last for last, t in zip([ts[0] + 1, *ts[:-1]], ts, strict=True)]
    assert traj["reverse"].tolist() == reverse and 0 < sum(reverse) < L
    assert torch.equal(traj["x"][-1], x)
    # the callback sees the trajectory's rows: (i, timesteps[i], x[i + 1])
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ts.tolist()))
    for i, _, xi in seen:
        assert torch.equal(xi, traj["x"][i + 1])
    xs, x0s = _their_repaint_rows(_toy, image, mask, 12, 3, 3, eta, seed=5)
    for i, want in enumerate(xs):
        assert _rel(traj["x"][i], want) <= 1e-5, i
    sqrt_ab = NoiseSchedule("linear").sqrt_alphas_cumprod
    last = None
    for i, want in enumerate(x0s):
        if want is None:  # a jump: no model call, the last reverse step's prediction carried
            assert not reverse[i] and torch.equal(traj["x0"][i], traj["x0"][last])
        else:  # x0 = (x - s eps) / a: the x rows' rounding over a (a = 0.006 at t = 999)
            tol = 1e-5 / float(sqrt_ab[ts[i]])
            assert reverse[i] and _rel(traj["x0"][i], want) <= tol, (i, _rel(traj["x0"][i], want))
            last = i
    assert torch.isfinite(traj["x0"]).all()  # never NaN (session 18's rows at jumps were)
    calls = traj["x0"][traj["reverse"]]  # the model calls' predictions, in order
    assert calls.shape[0] == sum(reverse) and torch.isfinite(calls).all()


@pytest.mark.parametrize(
    "kw,match",
    [({"return_trajectory": 1}, "return_trajectory: expected a bool, got int"),
     ({"callback": "print"}, "callback: expected a callable"),
     ({"progress": None}, "progress: expected a bool, got NoneType")],
)  # fmt: skip
def test_repaint_flags_checked_before_anything_runs(kw, match):
    calls = []

    def model(x, t):
        calls.append(t)
        return _toy(x, t)

    with pytest.raises(TypeError, match=match):
        fastdiff.repaint(model, torch.zeros(SHAPE), torch.ones(SHAPE), 4, **kw)
    assert calls == []
