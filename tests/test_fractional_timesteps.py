"""A diffusers model is called at diffusers' own (fractional, float32) timesteps.

diffusers' Euler-family schedulers (Euler, Euler ancestral, Heun, KDPM2, LMS) interpolate their
noise levels in t: under ``linspace`` spacing and on Karras / exponential / beta sigma grids
their timesteps are fractional (832.5, 963.3...), and pipelines call the UNet there. fastdiff's
convention for a plain callable is an int64 timestep (a model may index a table with it), so
those samplers round; for a diffusers model ``sample()`` now passes diffusers' float32 values
(``fractional_timesteps=True``), so the run is diffusers' to fp32 rounding instead of ~1e-4.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff._prepare import is_diffusers_model
from fastdiff.samplers import SAMPLERS
from fastdiff.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    ModelMixin,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402

FRACTIONAL = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms"]


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return _unet()


class _Recorder:
    """Records the timestep argument of every call of a diffusers model (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.ts: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.ts.append(torch.as_tensor(t).detach().clone())

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _diffusers_loop(unet, sched, steps: int, noise: torch.Tensor) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t)
        out = getattr(out, "sample", out)
        x = sched.step(out, t, x).prev_sample
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Deterministic diffusers schedulers (the ancestral ones draw noise in their own order).
DETERMINISTIC = [
    ("euler", EulerDiscreteScheduler, {}),  # linspace: 999, 832.5, ...
    ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("euler", EulerDiscreteScheduler, dict(use_exponential_sigmas=True)),
    ("heun", HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("dpm2", KDPM2DiscreteScheduler, {}),  # its midpoints are fractional under any spacing
    ("dpm2", KDPM2DiscreteScheduler, dict(use_karras_sigmas=True)),  # rounds the step ts only
    ("dpm2", KDPM2DiscreteScheduler, dict(use_exponential_sigmas=True)),
    ("lms", LMSDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("lms", LMSDiscreteScheduler, dict(beta_schedule="scaled_linear")),
]


class _Smooth(ModelMixin, ConfigMixin):
    """A diffusers model with a smooth, strongly t-dependent eps (a rounded t moves its output
    by ~1e-3 relative), so a whole run compares at fp32 rounding."""

    @register_to_config
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        u = 0.5 * x / (1 + x * x).sqrt() * torch.sin(t / 97.0)
        return self.w * (u + 0.2 * torch.cos(t / 41.0 + x))


@pytest.mark.parametrize("name,cls,kw", DETERMINISTIC, ids=lambda v: str(v)[:30])
def test_diffusers_model_runs_diffusers_loop_at_its_timesteps(unet, name, cls, kw):
    """fastdiff.sample(model, schedule=<diffusers scheduler>, noise=z) with a diffusers model
    is diffusers' pipeline loop (x_T = init_noise_sigma z, the model at the scheduler's float32
    timesteps) to fp32 rounding: a smooth model to 3e-6 (measured <= 1e-6; with
    ``fractional_timesteps=False`` 8e-5 .. 9e-4, so the check sees the rounding), a random UNet
    to 1e-4 with the exact timesteps seen."""
    steps = 6
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    smooth = _Smooth().eval()
    ref = _diffusers_loop(smooth, cls(**kw), steps, noise)
    got = fastdiff.sample(smooth, steps=steps, schedule=cls(**kw), noise=noise)
    assert _rel(got, ref) <= 3e-6
    rounded = fastdiff.sample(
        smooth, steps=steps, schedule=cls(**kw), noise=noise, fractional_timesteps=False
    )
    assert _rel(rounded, ref) > 2e-5

    sched = cls(**kw)
    ref = _diffusers_loop(unet, sched, steps, noise)
    theirs_t = sched.timesteps.clone()
    # float32; KDPM2 on a grid: float64 (its UNet embeds them in float32)
    assert theirs_t.is_floating_point() and (theirs_t != theirs_t.round()).any()
    rec = _Recorder(unet)
    try:
        got = fastdiff.sample(unet, steps=steps, schedule=cls(**kw), noise=noise)
    finally:
        rec.close()
    assert len(rec.ts) == len(theirs_t)
    for t_seen, t_want in zip(rec.ts, theirs_t, strict=True):
        assert t_seen.dtype == torch.float32
        assert torch.equal(t_seen, t_want.float().expand_as(t_seen))
    assert _rel(got, ref) <= 1e-4


@pytest.mark.parametrize("name,cls", [("euler_a", EulerAncestralDiscreteScheduler),
                                      ("dpm2_a", KDPM2AncestralDiscreteScheduler)])  # fmt: skip
def test_ancestral_samplers_call_a_diffusers_model_at_its_timesteps(unet, name, cls):
    """The ancestral samplers too: the model sees the scheduler's float32 timesteps."""
    sched = cls()
    sched.set_timesteps(5)
    rec = _Recorder(unet)
    try:
        fastdiff.sample(unet, steps=5, schedule=cls(), batch_size=1,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        rec.close()
    assert [t.reshape(-1)[0].item() for t in rec.ts] == sched.timesteps.tolist()
    assert all(t.dtype == torch.float32 for t in rec.ts)


def test_plain_callable_keeps_int64_timesteps():
    """A plain callable keeps fastdiff's int64 timesteps (it may index a table with them);
    ``fractional_timesteps=True`` gives it diffusers' float32 values instead."""
    seen: list[torch.Tensor] = []

    def model(x, t):
        seen.append(t)
        return 0.1 * x

    sched = EulerDiscreteScheduler(use_karras_sigmas=True)
    fastdiff.sample(model, steps=4, schedule=sched, shape=(1, 4, 4), batch_size=2)
    assert all(t.dtype == torch.int64 for t in seen)
    ints = [t[0].item() for t in seen]
    seen.clear()
    fastdiff.sample(model, steps=4, schedule=sched, shape=(1, 4, 4), batch_size=2,
                    fractional_timesteps=True)  # fmt: skip
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in seen)
    fracs = [t[0].item() for t in seen]
    assert fracs != ints and [round(f) for f in fracs] == ints
    sched.set_timesteps(4)
    assert fracs == sched.timesteps.tolist()


def test_explicit_choice_and_sampler_instance_are_kept(unet):
    """An explicit ``fractional_timesteps=False``, or a Sampler instance (built by the user with
    its own setting), is not overridden for a diffusers model."""
    rec = _Recorder(unet)
    try:
        fastdiff.sample(unet, steps=3, sampler="euler", batch_size=1, fractional_timesteps=False)
        smp = SAMPLERS["euler"](NoiseSchedule.from_diffusers(DDIMScheduler()), 3)
        fastdiff.sample(unet, steps=3, sampler=smp, batch_size=1)
    finally:
        rec.close()
    assert len(rec.ts) == 6 and all(t.dtype == torch.int64 for t in rec.ts)


def test_trajectory_and_callback_report_the_model_timesteps(unet):
    """The callback's t and the trajectory's timesteps are the values the model got."""
    got: list[float] = []
    _, traj = fastdiff.sample(unet, steps=5, sampler="euler", batch_size=1,
                              callback=lambda i, t, x: got.append(t),
                              return_trajectory=True)  # fmt: skip
    assert traj["timesteps"].dtype == torch.float32
    assert got == traj["timesteps"].tolist()
    assert any(t != round(t) for t in got)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "unipc", "ddpm"])
def test_integer_samplers_keep_int64_for_a_diffusers_model(unet, name):
    """Samplers whose diffusers scheduler has integer timesteps (DDIM, DPM++ also with Karras:
    diffusers rounds there) are unchanged, and do not take the option."""
    rec = _Recorder(unet)
    try:
        fastdiff.sample(unet, steps=3, sampler=name, batch_size=1)
    finally:
        rec.close()
    assert all(t.dtype == torch.int64 for t in rec.ts)
    with pytest.raises(TypeError, match="fractional_timesteps"):
        fastdiff.sample(unet, steps=3, sampler=name, batch_size=1, fractional_timesteps=True)


@pytest.mark.parametrize("name", FRACTIONAL)
def test_option_changes_only_the_model_timesteps(name):
    """Same sigmas and coefficient rows either way; the timesteps are diffusers' float32 values
    and their rounding; the option is part of the CUDA-graph key (``config``) because the
    graph's t buffer has the timesteps' dtype."""
    sched = NoiseSchedule.from_diffusers(EulerDiscreteScheduler(use_karras_sigmas=True))
    a = SAMPLERS[name](sched, 5, use_karras_sigmas=True, fractional_timesteps=True)
    b = SAMPLERS[name](sched, 5, use_karras_sigmas=True)
    assert a.timesteps.dtype == torch.float32 and b.timesteps.dtype == torch.int64
    assert torch.equal(a.timesteps.double().round().long(), b.timesteps)
    assert torch.equal(a.coef_table("cpu"), b.coef_table("cpu"))
    assert a.config() != b.config()


@pytest.mark.parametrize("bad", [1, "yes", None, 1.0])
def test_bad_option_named(bad):
    sched = NoiseSchedule.from_diffusers(EulerDiscreteScheduler())
    with pytest.raises(TypeError, match="fractional_timesteps: expected a bool"):
        SAMPLERS["euler"](sched, 4, fractional_timesteps=bad)


def test_is_diffusers_model_sees_through_torch_compile_wrappers(unet):
    class Wrapped:  # what torch.compile returns keeps the module as _orig_mod
        _orig_mod = unet

        def __call__(self, *a, **k):
            return unet(*a, **k)

    assert is_diffusers_model(unet) and is_diffusers_model(Wrapped())
    assert not is_diffusers_model(lambda x, t: x)
    assert not is_diffusers_model(torch.nn.Conv2d(3, 3, 1))
