"""Session 18 leftovers: the user-facing gaps of sessions 15-17 (error names, option types, the
LCM / TCD inpainting grid, RePaint's trajectory)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

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
    ({"num_train_timesteps": 1000, "shift": 3.0}, ValueError, "dict has no beta schedule"),
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
