"""Review 11b of the UniPC sampler and its fused op: each test is a regression test of a bug the
review found (the docstring says what was wrong)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_unipc import _loop, _pair, _rel, _row, _schedule

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops.unipc_step import unipc_step
from fastdiff.samplers import UniPCSampler

diffusers = pytest.importorskip("diffusers")


def _model(w: torch.Tensor):
    def model(x, t):
        return torch.tanh(0.3 * x) + 0.1 * w * t.float()[:, None, None, None] / 1000.0

    return model


@pytest.mark.parametrize("name", ["midpoint", "heun", "logrho"])
def test_dpm_solver_type_names_mean_bh2_as_in_diffusers(name):
    """A saved UniPCMultistepScheduler config with solver_type "midpoint", "heun" or "logrho"
    (DPM-Solver's names, which diffusers' UniPC __init__ maps to "bh2") raised ValueError, both
    as UniPCSampler(solver_type=...) and as sample(schedule=<config dict>)."""
    sch, cfg = _schedule("linear")
    assert UniPCSampler(sch, 6, solver_type=name).solver_type == "bh2"
    np.testing.assert_array_equal(
        UniPCSampler(sch, 6, solver_type=name).coef64, UniPCSampler(sch, 6).coef64
    )
    config = {"_class_name": "UniPCMultistepScheduler", **cfg, "solver_type": name}
    theirs = diffusers.UniPCMultistepScheduler.from_config(config)
    assert theirs.config.solver_type == "bh2"
    theirs.set_timesteps(6)
    g = torch.Generator().manual_seed(1)
    model = _model(torch.randn(2, 3, 6, 6, generator=g))
    x_t = torch.randn(2, 3, 6, 6, generator=g)
    y = x_t.clone()
    for t in theirs.timesteps:
        y = theirs.step(model(y, t.expand(2)), t, y).prev_sample
    x = fastdiff.sample(model, steps=6, schedule=config, noise=x_t)
    assert _rel(x, y) <= 2e-5


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_repeated_timesteps_error_names_unipc(spacing):
    """1000 linspace / leading steps over 1000 training steps repeat a timestep (h = 0; diffusers
    returns NaN): the ValueError named DPM-Solver++ (inherited from DPMSolverPPSampler)."""
    with pytest.raises(ValueError, match="repeat timesteps") as e:
        UniPCSampler(NoiseSchedule("linear"), 1000, timestep_spacing=spacing)
    assert "UniPC" in str(e.value) and "DPM" not in str(e.value)
    assert UniPCSampler(NoiseSchedule("linear"), 1000, timestep_spacing="trailing").steps == 1000


@pytest.mark.parametrize(
    "steps,opts,begin",
    [
        (1, {}, 0),
        (2, {}, 0),
        (10, {}, 0),
        (10, dict(solver_type="bh1", final_sigmas_type="sigma_min"), 0),
        (10, dict(lower_order_final=False), 0),
        (10, dict(use_karras_sigmas=True, prediction_type="v_prediction"), 4),
        (10, dict(disable_corrector=[2, 3], thresholding=True), 0),
    ],
)
def test_solver_order_1_matches_diffusers(steps, opts, begin):
    """solver_order=1 (UniP-1 with the UniC-1 corrector, a valid diffusers setting) was refused
    with ValueError "only 2 is implemented"; the rows already had every order-1 case."""
    ours, theirs = _pair(steps, solver_order=1, **opts)
    _loop(ours, theirs, begin=begin)


def test_solver_order_1_from_a_scheduler_and_unsupported_orders_refused():
    """schedule=UniPCMultistepScheduler(solver_order=1) runs UniPC-1 (was a ValueError);
    solver_order=4 and predict_x0=False in a saved config are still clear errors (3 runs
    since session 12: tests/test_unipc3.py)."""
    sch, cfg = _schedule("linear")
    theirs = diffusers.UniPCMultistepScheduler(**cfg, solver_order=1)
    theirs.set_timesteps(5)
    g = torch.Generator().manual_seed(2)
    model = _model(torch.randn(2, 3, 6, 6, generator=g))
    x_t = torch.randn(2, 3, 6, 6, generator=g)
    y = x_t.clone()
    for t in theirs.timesteps:
        y = theirs.step(model(y, t.expand(2)), t, y).prev_sample
    assert _rel(fastdiff.sample(model, steps=5, schedule=theirs, noise=x_t), y) <= 2e-5
    for bad, match in ((dict(solver_order=4), "solver_order"), (dict(predict_x0=False),
                                                                "predict_x0")):  # fmt: skip
        config = {"_class_name": "UniPCMultistepScheduler", **cfg, **bad}
        with pytest.raises(ValueError, match=match):
            fastdiff.sample(model, steps=5, schedule=config, noise=x_t)


@pytest.mark.parametrize("value", ["12", [1.5], [True], ["1"], [torch.tensor(1.0)]])
def test_disable_corrector_refuses_what_is_not_a_list_of_step_indices(value):
    """disable_corrector="12" was read as steps [1, 2] and [1.5] / [True] as step 1 (int()
    of each entry); diffusers tests ``step - 1 in disable_corrector``, so a string fails there
    and 1.5 matches no step: silently other samples. Now a TypeError naming it."""
    with pytest.raises(TypeError, match="disable_corrector"):
        UniPCSampler(NoiseSchedule("linear"), 8, disable_corrector=value)
    ok = UniPCSampler(NoiseSchedule("linear"), 8, disable_corrector=(np.int64(3), 2.0, 3))
    assert ok.disable_corrector == [2, 3]


def test_op_coef_of_the_wrong_rank_names_ten_coefficients():
    """unipc_step with a 2-D coef said "coef must have >= 8 elements" (the other sampler ops'
    row width); a UniPC row has 12 (10 before solver_order 3)."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"unipc_step: coef must have >= 12 elements"):
        unipc_step(x, torch.randn_like(x), _row()[None])
