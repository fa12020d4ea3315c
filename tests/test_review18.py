"""Review of session 17's features (review18): the mutants its tests left alive, and a user's
paths its tests did not take.

* Euler-family ``init_noise_scale`` under ``leading`` spacing (diffusers' init_noise_sigma is
  sqrt(sigma_max^2 + 1) there: x_T = z in VP units) and ``trailing`` (sigma_max);
* the fractional-timestep auto mode with a real ``torch.compile``'d diffusers model, and a plain
  callable wrapping a diffusers model (int64 timesteps, as sample()'s docstring says);
* the diffusers idiom ``Scheduler.from_config(pipe.scheduler.config)`` on Stable Diffusion 1.5's
  PNDM config, passed as ``schedule``, for session 17's samplers;
* the new samplers' defaults are diffusers' (a default changed in fastdiff alone survived every
  test that builds the sampler from a scheduler config, which spells every option out).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from _sampler_cases import toy as _toy
from helpers import import_without_torchsde
from test_fractional_timesteps import _Recorder  # the timesteps a module is called at

import fastdiff
from fastdiff.samplers import SAMPLERS, CosineDPMSolverSampler, SASolverSampler
from fastdiff.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import ModelMixin  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class _Smooth(ModelMixin, ConfigMixin):
    """A diffusers model with a smooth, strongly t-dependent output (a rounded timestep or a
    0.3% different start moves a run by far more than fp32 rounding)."""

    @register_to_config
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        u = 0.5 * x / (1 + x * x).sqrt() * torch.sin(t / 97.0)
        return self.w * (u + 0.2 * torch.cos(t / 41.0 + x))


NOISE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _pipeline_loop(model, sched, steps: int, seed: int = 11) -> torch.Tensor:
    """diffusers' pipeline loop: x_T = init_noise_sigma z, scale_model_input, step (with a
    generator where the scheduler draws noise)."""
    sched.set_timesteps(steps)
    x = NOISE * sched.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        out = getattr(out, "sample", out)
        x = sched.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
    return x


# ------------------------------------------------------------------ init_noise_scale
EULER_FAMILY = [
    ("euler", "EulerDiscreteScheduler"),
    ("euler_a", "EulerAncestralDiscreteScheduler"),
    ("lms", "LMSDiscreteScheduler"),
    ("heun", "HeunDiscreteScheduler"),
    ("dpm2", "KDPM2DiscreteScheduler"),
]
SPACINGS = {
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "leading-karras": {"timestep_spacing": "leading", "use_karras_sigmas": True},
}


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("name,cls", EULER_FAMILY)
def test_euler_family_start_follows_init_noise_sigma_for_every_spacing(name, cls, spacing):
    """x_T = init_noise_scale z: diffusers starts from init_noise_sigma z, sigma_max z under
    trailing spacing but sqrt(sigma_max^2 + 1) z under leading (then z in VP units, scale 1):
    session 17's tests only ran linspace, where a wrong leading scale survived. The whole run
    with a diffusers model equals diffusers' pipeline loop to fp32 rounding."""
    kw = SPACINGS[spacing]
    if "karras" in spacing and name in ("euler_a",):
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler has no Karras sigmas")
    sched_cls = getattr(diffusers, cls)
    model = _Smooth().eval()
    ref = _pipeline_loop(model, sched_cls(**kw), 6)
    got = fastdiff.sample(model, steps=6, schedule=sched_cls(**kw), noise=NOISE,
                          generator=torch.Generator().manual_seed(11))  # fmt: skip
    assert _rel(got, ref) <= 5e-6
    smp = fastdiff.samplers.SAMPLERS[name](NoiseSchedule.from_diffusers(sched_cls(**kw)), 6, **kw)
    theirs = sched_cls(**kw)
    theirs.set_timesteps(6)
    sigma_max = float(theirs.sigmas.max())
    want = 1.0 if kw["timestep_spacing"] == "leading" else sigma_max / math.hypot(sigma_max, 1)
    assert smp.init_noise_scale == pytest.approx(want, rel=1e-7)
    assert float(theirs.init_noise_sigma) == pytest.approx(
        sigma_max if kw["timestep_spacing"] == "trailing" else math.hypot(sigma_max, 1), rel=1e-6
    )


# ------------------------------------------------------------------ fractional timesteps
def test_torch_compiled_diffusers_model_gets_fractional_timesteps():
    """A real ``torch.compile``'d diffusers model (an OptimizedModule, not a ModelMixin) is
    recognised: it is called at diffusers' float32 timesteps and the run is diffusers' loop."""
    model = _Smooth().eval()
    compiled = torch.compile(model, backend="eager")
    assert not isinstance(compiled, ModelMixin)
    sched = diffusers.EulerDiscreteScheduler()
    ref = _pipeline_loop(model, diffusers.EulerDiscreteScheduler(), 5)
    rec = _Recorder(model)
    try:
        got = fastdiff.sample(compiled, steps=5, schedule=sched, noise=NOISE)
    finally:
        rec.close()
    assert _rel(got, ref) <= 3e-6
    sched.set_timesteps(5)
    assert [t.reshape(-1)[0].item() for t in rec.ts] == sched.timesteps.tolist()
    assert all(t.dtype == torch.float32 for t in rec.ts)


def test_plain_callable_wrapping_a_diffusers_model_keeps_int64():
    """The auto mode is by model type: a lambda around a diffusers model is a plain callable
    (int64 timesteps, as sample()'s docstring says, ~1e-5 off diffusers' run here);
    ``fractional_timesteps=True`` makes it diffusers' run."""
    model = _Smooth().eval()
    seen: list[torch.Tensor] = []

    def wrapped(x, t):
        seen.append(t)
        return model(x, t)

    ref = _pipeline_loop(model, diffusers.EulerDiscreteScheduler(), 5)
    rounded = fastdiff.sample(wrapped, steps=5, schedule=diffusers.EulerDiscreteScheduler(),
                              noise=NOISE)  # fmt: skip
    assert all(t.dtype == torch.int64 for t in seen)
    assert _rel(rounded, ref) > 1e-5
    seen.clear()
    exact = fastdiff.sample(wrapped, steps=5, schedule=diffusers.EulerDiscreteScheduler(),
                            noise=NOISE, fractional_timesteps=True)  # fmt: skip
    assert all(t.dtype == torch.float32 for t in seen)
    assert _rel(exact, ref) <= 3e-6
    assert "any other model at those rounded to int64" in " ".join(fastdiff.sample.__doc__.split())


# ------------------------------------------------------------------ from_config idiom
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}  # fmt: skip


@pytest.mark.parametrize(
    "cls,extra",
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("KDPM2DiscreteScheduler", {}),
        ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("DEISMultistepScheduler", {}),
        ("SASolverScheduler", {}),
    ],
    ids=lambda v: str(v)[:40],
)
@pytest.mark.parametrize("as_dict", [False, True])
def test_from_config_of_sd15_pndm_config_runs_diffusers_loop(cls, extra, as_dict):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` on SD 1.5's PNDM config (its
    leading spacing, steps_offset 1, keys the new class lacks or defaults), passed as
    ``schedule`` (object or plain dict) with a diffusers model: diffusers' pipeline loop, the
    same generator for the stochastic samplers."""
    base = diffusers.PNDMScheduler.from_config(SD15)
    sched_cls = getattr(diffusers, cls)
    model = _Smooth().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPMSolverSinglestep's lower_order_final notices
        ref = _pipeline_loop(model, sched_cls.from_config(base.config, **extra), 7)
        sched = sched_cls.from_config(base.config, **extra)
        got = fastdiff.sample(model, steps=7, schedule=dict(sched.config) if as_dict else sched,
                              noise=NOISE, generator=torch.Generator().manual_seed(11))  # fmt: skip
    assert _rel(got, ref) <= 5e-6


# ------------------------------------------------------------------ defaults
def _cosine_class():
    """diffusers' real CosineDPMSolverMultistepScheduler (it imports torchsde, absent here: a
    placeholder module, as tests/test_cosine_dpm.py does)."""
    return import_without_torchsde("diffusers.schedulers.scheduling_cosine_dpmsolver_multistep",
                                   "CosineDPMSolverMultistepScheduler")  # fmt: skip


def _defaults(fn) -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (CosineDPMSolverSampler, _cosine_class),
        (SASolverSampler, lambda: diffusers.SASolverScheduler),
    ],
    ids=["cosine_dpm++", "sa_solver"],
)
def test_new_samplers_defaults_are_diffusers(ours, theirs):
    """Every option the sampler shares with its diffusers scheduler defaults to diffusers' value
    (the tests build these samplers from scheduler configs, which spell every option out:
    fastdiff's rho / lower_order_final / euler_at_final defaults could change unnoticed)."""
    mine, want = _defaults(ours.__init__), _defaults(theirs().__init__)
    shared = sorted(set(mine) & set(want))
    assert len(shared) >= 10
    for k in shared:
        if k == "timestep_spacing":  # None: the sampler's own default, diffusers' linspace
            continue
        assert mine[k] == want[k], k
    if "timestep_spacing" in shared:
        smp = ours(NoiseSchedule.from_diffusers(diffusers.DDIMScheduler()), 4)
        assert smp.timestep_spacing == want["timestep_spacing"]


def test_cosine_dpm_c_noise_is_the_model_timestep():
    """``CosineDPMSolverSampler.c_noise`` (float64) is the timestep the model gets (float32
    atan(sigma) 2 / pi, diffusers' precondition_noise)."""
    smp = CosineDPMSolverSampler(None, 9)
    assert smp.name == "cosine_dpm++" and CosineDPMSolverSampler().steps == 50
    got = torch.tensor([smp.c_noise(float(s)) for s in smp.sigmas[:-1]], dtype=torch.float64)
    assert torch.allclose(got, smp.timesteps.double(), rtol=1e-6, atol=0)
    assert smp.c_noise(1.0) == 0.5 and smp.c_noise(0.0) == 0.0
    sch = _cosine_class()()
    sch.set_timesteps(9)
    assert torch.equal(smp.timesteps, sch.timesteps)


# ------------------------------------------------------------------ SA-Solver tau_func
SL = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@torch.no_grad()
def _sa_loop(sched, steps: int, z: torch.Tensor, seed: int) -> torch.Tensor:
    sched.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(seed), z
    for t in sched.timesteps:
        x = sched.step(_toy(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    return x


def test_sa_solver_tau_func_gets_the_timestep_as_diffusers_passes_it():
    """diffusers' SASolverScheduler calls tau_func with the step's timestep, an element of its
    int64 timesteps tensor: a tau_func using torch ops on it (here a clamp) ran in diffusers
    and was a TypeError of torch inside fastdiff (which passed a Python int). Now the same
    t, and the run is diffusers'; the value may be a tensor, a bool or a numpy scalar."""
    seen: list = []

    def tau(t):
        seen.append(t)
        return torch.clamp((t - 300) / 400, 0, 1)

    z = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    ref = _sa_loop(diffusers.SASolverScheduler(**SL, tau_func=tau), 7, z, 5)
    theirs = [type(t) for t in seen] + [t.dtype for t in seen]
    seen.clear()
    got = fastdiff.sample(_toy, steps=7, schedule=diffusers.SASolverScheduler(**SL, tau_func=tau),
                          noise=z, generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert _rel(got, ref) <= 1e-5
    assert sorted({str(v) for v in theirs}) == sorted(
        {str(v) for v in [type(t) for t in seen] + [t.dtype for t in seen]}
    )
    sched = NoiseSchedule.from_diffusers(diffusers.SASolverScheduler(**SL))
    smp = SASolverSampler(sched, 5, tau_func=lambda t: 200 <= t <= 800)  # a bool, as diffusers'
    assert smp.taus() == [float(200 <= int(t) <= 800) for t in smp.timesteps]
    import numpy as np

    assert SASolverSampler(sched, 3, tau_func=lambda t: np.float32(0.5)).taus() == [0.5] * 3


@pytest.mark.parametrize(
    "value,exc,match",
    [
        (float("nan"), ValueError, "tau_func: expected a finite tau, got nan at t = 999"),
        (math.inf, ValueError, "tau_func: expected a finite tau, got inf"),
        ("1", TypeError, "tau_func: expected a real number tau, got str at t = 999"),
        (None, TypeError, "tau_func: expected a real number tau, got NoneType"),
        (torch.ones(2), TypeError, r"got a tensor of shape \(2,\)"),
        (1j, TypeError, "got complex"),
    ],
    ids=["nan", "inf", "str", "None", "tensor2", "complex"],
)
def test_sa_solver_bad_tau_values_are_named(value, exc, match):
    """A tau_func value that is not a finite real number is refused when the sampler is built,
    naming tau_func and the timestep (NaN / inf made every sample NaN; a str "1" was read as
    1.0), and sample() then runs nothing."""
    sched = NoiseSchedule.from_diffusers(diffusers.SASolverScheduler(**SL))
    with pytest.raises(exc, match=match):
        SASolverSampler(sched, 4, tau_func=lambda t: value)
    calls: list = []

    def model(x, t):
        calls.append(t)
        return x

    with pytest.raises(exc, match="tau_func"):
        fastdiff.sample(model, steps=4, sampler="sa_solver", schedule=sched, shape=(3, 4, 4),
                        batch_size=1, tau_func=lambda t: value)  # fmt: skip
    assert calls == []


# ------------------------------------------------------------------ float32 alpha_bar
def test_train_alphas_cumprod32_of_user_betas_is_diffusers():
    """User betas (``trained_betas``, no rescale): diffusers' float32 alpha_bar bit for bit, and
    the Karras grid's timesteps / sigmas built on it (session 17's zero-SNR tests ran the
    named beta schedules only: this branch could go unnoticed), a value of 0 as 2^-24."""
    import numpy as np

    from fastdiff.samplers.sigmas import train_alphas_cumprod32

    betas = (np.linspace(1e-4, 0.03, 1000) ** 1.1).tolist()
    theirs = diffusers.EulerDiscreteScheduler(trained_betas=betas, use_karras_sigmas=True)
    sched = NoiseSchedule.from_diffusers(theirs)
    assert torch.equal(train_alphas_cumprod32(sched), theirs.alphas_cumprod)
    smp = SAMPLERS["euler"](sched, 8, use_karras_sigmas=True, fractional_timesteps=True)
    theirs.set_timesteps(8)
    assert torch.equal(smp.timesteps, theirs.timesteps)
    assert torch.equal(torch.from_numpy(smp.sigmas()).float(), theirs.sigmas)
    to_one = [*betas[:-1], 1.0]  # a zero-SNR schedule given as betas: alpha_bar_T = 0
    ab = train_alphas_cumprod32(NoiseSchedule.from_diffusers(diffusers.DDIMScheduler(
        trained_betas=to_one)))  # fmt: skip
    want = torch.cumprod(1.0 - torch.tensor(to_one, dtype=torch.float32), 0)
    assert want[-1] == 0 and ab[-1] == 2.0**-24
    assert torch.equal(ab[:-1], want[:-1])


# ------------------------------------------------------------------ SA-Solver img2img
@pytest.mark.parametrize(
    "opts",
    [
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True, "algorithm_type": "noise_prediction"},
        {"use_beta_sigmas": True, "predictor_order": 1, "corrector_order": 1},
        {},
    ],
    ids=["karras", "exponential-noise", "beta-p1c1", "linspace"],
)
@pytest.mark.parametrize("strength", [1.0, 0.67, 0.3])
def test_sa_solver_img2img_on_sigma_grids_is_diffusers_pipeline(opts, strength):
    """diffusers' SASolverScheduler.add_noise is DDPM's: sqrt(ab_t) x0 + sqrt(1 - ab_t) z at the
    start's integer timestep t, also on a Karras / exponential / beta grid, whose sigma there is
    not the training sigma of t. fastdiff noised to the grid's sigma (DPM-Solver's add_noise,
    inherited): 2e-4 .. 1e-3 off diffusers' img2img pipeline on those grids (1e-7 at linspace
    spacing, the only case tested). The pipeline loop: get_timesteps, set_begin_index,
    add_noise(image, z, t_start), step with the generator."""
    n = 10
    image = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(100))
    z = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    sch = diffusers.SASolverScheduler(**SL, **opts)
    sch.set_timesteps(n)
    s = n - min(int(n * strength), n)
    timesteps = sch.timesteps[s:]
    sch.set_begin_index(s)
    x = sch.add_noise(image, z, timesteps[:1].repeat(2))
    g = torch.Generator().manual_seed(5)
    for t in timesteps:
        x = sch.step(_toy(x, t.expand(2)), t, x, generator=g).prev_sample
    got = fastdiff.sample(_toy, n, schedule=diffusers.SASolverScheduler(**SL, **opts),
                          image=image, strength=strength, noise=z,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert _rel(got, x) <= 1e-5


def test_clipped_end_boundary_is_lambda_at_t0():
    """sigmas.clipped_end: lambda_min_clipped equal to diffusers' float32 lambda at t = 0 keeps
    one training timestep (diffusers' timesteps are then all 0); one float32 step above is
    refused, naming the option (the boundary was untested: last < 1 vs <= 1 both survived)."""
    import numpy as np

    from fastdiff.samplers.sigmas import clipped_end, train_alphas_cumprod32

    sched = NoiseSchedule.from_diffusers(
        diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    )
    ab = train_alphas_cumprod32(sched)
    lam = torch.log(torch.sqrt(ab)) - torch.log(torch.sqrt(1 - ab))
    assert clipped_end(sched, float(lam[0])) == 1
    assert clipped_end(sched, float(lam[1])) == 2
    assert clipped_end(sched, -math.inf) == clipped_end(sched, -1e30) == 1000
    above = float(np.nextafter(lam[0].numpy(), np.float32(np.inf)))
    with pytest.raises(ValueError, match=r"lambda_min_clipped: expected <= lambda at t = 0"):
        clipped_end(sched, above)
    theirs = diffusers.DPMSolverSinglestepScheduler(
        beta_schedule="squaredcos_cap_v2", lambda_min_clipped=float(lam[0])
    )
    theirs.set_timesteps(1)
    smp = SAMPLERS["dpm++_single"](sched, 1, lambda_min_clipped=float(lam[0]))
    assert smp.timesteps.tolist() == theirs.timesteps.tolist() == [0]


# ------------------------------------------------------------------ iPNDM odds and ends
def test_ipndm_attributes_and_direct_history_call_checks():
    """iPNDM's class / instance attributes other code reads (the mutants that survived
    test_ipndm): deterministic on every step (no noise drawn: a True made the loop draw and
    discard a normal per step), 50 default steps, multistep with 4 history buffers, config /
    repr, and step_with_history (the CUDA-graph loop's entry) checks its arguments by name."""
    smp = SAMPLERS["ipndm"](None, 6)
    assert not any(smp.needs_noise(i) for i in range(6))
    assert SAMPLERS["ipndm"].default_steps == 50 and SAMPLERS["ipndm"]().steps == 50
    assert smp.is_multistep and smp.solver_order == 4 and smp.name == "ipndm"
    assert smp.prediction_type == "v_prediction" and smp.schedule is None
    assert smp.config() == {"cls": "IPNDMSampler", "prediction_type": "v_prediction"}
    x = torch.randn(1, 3, 4, 4)
    coef = smp.coef_table("cpu")[0]
    with pytest.raises(ValueError, match=r"i: expected a step index in \[0, 6\), got 6"):
        smp.step_with_history(x.clone(), 6, x, coef, None, None, None)
    with pytest.raises(ValueError, match="model_output"):
        smp.step_with_history(x[:, :2].clone(), 0, x, coef, None, None, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sa_solver_half_precision_draws_are_diffusers(dtype, monkeypatch):
    """diffusers' SASolverScheduler draws its per-step noise with randn_tensor in the model
    output's dtype: under fp16 / bf16 those are other values than a rounded float32 draw
    (fastdiff drew float32, inheriting DPM-Solver++'s SDE draw: the same generator gave runs
    0.44 apart). Now the same values: vs diffusers' loop run in float64 on the same low-precision
    draws, ours is within 2x diffusers' own low-precision error (the FA rule)."""
    import diffusers.schedulers.scheduling_sasolver as M

    def model(x, t):
        return _toy(x.float(), t).to(x.dtype)

    z = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)).to(dtype)

    def loop(x):
        sch = diffusers.SASolverScheduler(**SL)
        sch.set_timesteps(8)
        g = torch.Generator().manual_seed(5)
        for t in sch.timesteps:
            x = sch.step(model(x, t.expand(2)), t, x, generator=g).prev_sample
        return x

    theirs = loop(z)
    orig = M.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None):  # the low-precision values
        return orig(shape, generator=generator, device=device, dtype=z.dtype).to(dtype)

    monkeypatch.setattr(M, "randn_tensor", draw)
    ref = loop(z.double())
    monkeypatch.undo()
    got = fastdiff.sample(model, 8, schedule=diffusers.SASolverScheduler(**SL), noise=z,
                          generator=torch.Generator().manual_seed(5), dtype=dtype)  # fmt: skip
    assert got.dtype == dtype
    err, theirs_err = _rel(got.double(), ref), _rel(theirs.double(), ref)
    assert err <= 2 * theirs_err + 1e-3, (err, theirs_err)


def test_sa_solver_caller_history_return_x0_is_the_op_m():
    """SASolverSampler.step with a caller-managed history (x0_prev given, even alone, even None)
    and noise_prediction returns the op's m, the noise estimate (as documented; the
    CUDA-graph loop keeps that as history); with the sampler's own history, the x0 prediction
    (x - sigma m) / alpha. A survived mutant treated x0_prev alone as the sampler's own."""
    sched = NoiseSchedule.from_diffusers(diffusers.SASolverScheduler(**SL))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = _toy(x, 999)
    own = SASolverSampler(sched, 5, algorithm_type="noise_prediction")
    ext = SASolverSampler(sched, 5, algorithm_type="noise_prediction")
    x1, x0 = own.step(out, 0, x, z, return_x0=True)
    y1, m = ext.step(out, 0, x, z, x0_prev=None, return_x0=True)
    assert torch.equal(x1, y1)
    torch.testing.assert_close(ext.x0_of(m, 0, x), x0, rtol=0, atol=0)
    assert not torch.allclose(m, x0)


def test_dpm_single_flow_reports_flow_prediction():
    """dpm++_single on the flow grid: ``prediction_type`` reads 'flow_prediction' (what the user
    passed, and what config() / repr report), though the fused op gets 'epsilon' slots."""
    sched = NoiseSchedule.from_diffusers(diffusers.DDIMScheduler())
    smp = SAMPLERS["dpm++_single"](sched, 4, use_flow_sigmas=True,
                                   prediction_type="flow_prediction")  # fmt: skip
    assert smp.prediction_type == "flow_prediction"
    assert "flow_prediction" in repr(smp)
