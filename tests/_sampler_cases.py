"""Shared pieces of the sampler contract (tests/test_sampler_contract.py): the stand-in models,
the error measure, diffusers' pipeline loop, and the per-sampler settings each shared check runs
with (the settings the per-sampler test files used when each had its own copy of the check)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE

import fastdiff

SHAPE = PARITY_SHAPE

# the diffusers scheduler each sampler reproduces
SCHEDULER_CLASS = {
    "deis": "DEISMultistepScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PNDMScheduler",
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def toy(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic stand-in network of x and t."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(tt / 150.0) + 0.05 * x


def assert_step_parity(got, ref, ref64, what: str, cmp=None) -> tuple[float, float]:
    """One call's parity with diffusers (the per-step tests of the sampler files): ``got`` is
    ours, float32 and finite; it (or ``cmp``, its image in diffusers' units) is within
    PARITY_RTOL of the float64 reference ``ref64`` and within PARITY_RTOL plus diffusers' own
    fp32 error of the stock scheduler's ``ref``. Returns (ours vs float64, diffusers' own)."""
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    cmp = got if cmp is None else cmp
    err64, err, own = rel(cmp, ref64), rel(cmp, ref), rel(ref, ref64)
    assert err64 <= PARITY_RTOL, f"{what}: rel err vs float64 {err64:.2e}"
    bound = PARITY_RTOL + own  # plus diffusers' own fp32 error
    assert err <= bound, f"{what}: rel err {err:.2e} > {bound:.2e}"
    return err64, own


def cond_toy(x: torch.Tensor, t, encoder_hidden_states: torch.Tensor | None = None):
    """:func:`toy` plus a per-sample bias from the conditioning (cond / uncond differ)."""
    return toy(x, t) + encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)


def scheduler(name: str, sched: str = "scaled_linear", **opts):
    """diffusers' scheduler for sampler ``name`` (its deprecation warnings silenced)."""
    import diffusers

    if name in ("pndm", "plms"):  # diffusers' PNDM runs PLMS with skip_prk_steps=True
        opts = {"skip_prk_steps": name == "plms", **opts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPMSolverSinglestep: algorithm_type="dpmsolver"
        return getattr(diffusers, SCHEDULER_CLASS[name])(**DIFFUSERS_BETAS[sched], **opts)


def diffusers_loop(sch, steps: int, z: torch.Tensor, model=toy) -> torch.Tensor:
    """diffusers' pipeline loop: x_T = z * init_noise_sigma, scale_model_input, step; the model
    sees the rounded timestep, as fastdiff calls it (LMS's timesteps are fractional)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPMSolverSinglestep's deprecation warnings
        sch.set_timesteps(steps)
    x = z * sch.init_noise_sigma
    for t in sch.timesteps:
        out = model(sch.scale_model_input(x, t), t.round().expand(x.shape[0]))
        x = sch.step(out, t, x).prev_sample
    return x


def sample_through_scheduler(sch, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """``fastdiff.sample(toy, schedule=sch)`` with warnings as errors (the sampler is inferred
    from the scheduler without one); the model must be called at diffusers' (rounded)
    timesteps. Returns the samples."""
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return toy(x, t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastdiff.sample(model, steps=steps, schedule=sch, noise=noise)
    assert calls == sch.timesteps.round().to(torch.int64).tolist()
    return got


def vp_noise(z: torch.Tensor, sch) -> torch.Tensor:
    """fastdiff's x_T for diffusers' sigma-space x_T = z * init_noise_sigma (LMS): the VP sample
    x = x_sigma / sqrt(1 + sigma_0^2)."""
    return z * sch.init_noise_sigma / (sch.sigmas[0] ** 2 + 1) ** 0.5


# ------------------------------------------------------------------------- per-sampler settings
# test_no_host_sync: (sampler, steps, options)
NO_SYNC = [
    ("deis", 6, {"solver_order": 3}),
    ("dpm++_single", 7, {"solver_order": 3}),
    ("lms", 6, {}),
    ("pndm", 6, {}),
    ("plms", 6, {}),
    ("heun", 4, {"guidance_scale": None}),
    ("dpm2", 4, {}),
    ("dpm2_a", 4, {}),
    ("lcm", 4, {}),
    ("cm", 4, {}),
    ("ipndm", 6, {}),
    ("cosine_dpm++", 6, {}),
    ("sa_solver", 6, {}),
]


def _NO_TAU(t: float) -> float:  # noqa: N802 - a constant function
    """SA-Solver's tau = 0 on every step (its ODE)."""
    return 0.0


# test_guidance_equals_manual_cfg: (sampler, steps, guidance scale, options, tolerance); the
# tolerance is on rel(); PLMS / Heun as assert_close(rtol=atol=tol) (Heun's last correction
# has outputs ~70)
CFG = [
    ("deis", 6, 3.0, {"solver_order": 3}, ("rel", 1e-6)),
    ("dpm++_single", 7, 3.0, {"solver_order": 3}, ("rel", 1e-6)),
    ("lms", 6, 3.0, {}, ("rel", 1e-6)),
    ("plms", 6, 3.0, {}, ("close", 1e-5)),
    ("heun", 5, 2.5, {}, ("close", 1e-4)),
    # tau = 0: the step's noise has weight 0 (sample's Philox draws and the manual loop's differ)
    ("sa_solver", 6, 3.0, {"tau_func": _NO_TAU}, ("rel", 1e-6)),
]

# test_saved_config_and_channels_last: (sampler, options of both the scheduler and the saved
# config, x_T is the VP sample of diffusers' sigma-space one)
SAVED = [
    ("deis", dict(prediction_type="v_prediction", use_karras_sigmas=True, solver_order=3), False),
    ("dpm++_single", dict(prediction_type="v_prediction", use_karras_sigmas=True, solver_order=3),
     False),
    ("lms", dict(prediction_type="v_prediction", use_karras_sigmas=True), True),
]  # fmt: skip

# test_history_reset_and_reuse: (sampler, steps, options, the options of a fresh sampler whose
# step 2 a step 2 out of order equals: first order for DEIS / DPM-Solver; LMS's own, whose
# restart keeps its step's order-min(i + 1, 4) weights (diffusers' set_begin_index), not order 1)
HISTORY = [
    ("deis", 5, {"solver_order": 3}, {"solver_order": 1}),
    ("dpm++_single", 6, {"solver_order": 3}, {"solver_order": 1}),
    ("lms", 5, {}, {}),
    # SA-Solver: a run from step 2 has no corrector and a first-order predictor, whatever the
    # orders (tau = 0: the step's noise has weight 0)
    ("sa_solver", 5, {"tau_func": _NO_TAU}, {"tau_func": _NO_TAU, "predictor_order": 1}),
]

# test_bad_settings_through_sample: (sampler, an option it does not take)
UNKNOWN_OPTION = [("deis", "clip_sample"), ("dpm++_single", "clip_sample"), ("lms", "clip_sample"),
                  ("pndm", "clip_sample"), ("plms", "clip_sample"),
                  ("cm", "clip_sample"), ("ipndm", "clip_sample"),
                  ("cosine_dpm++", "clip_sample"), ("sa_solver", "clip_sample")]  # fmt: skip

_PREDS = ["epsilon", "v_prediction", "sample"]
_KARRAS3 = {"use_karras_sigmas": True, "solver_order": 3}

# test_every_backend_matches_diffusers (unipc_step): (id, sampler, steps, options, VP x_T)
BACKEND = [
    *((f"deis-{p}", "deis", 6, {"prediction_type": p, **_KARRAS3}, False) for p in _PREDS),
    *(
        (f"dpm++_single-{a}-{p}", "dpm++_single", 8,
         {"prediction_type": p, "algorithm_type": a, "final_sigmas_type": "sigma_min",
          "solver_type": "heun", **_KARRAS3}, False)
        for a in ("dpmsolver++", "dpmsolver") for p in _PREDS
    ),
    *((f"lms-{p}", "lms", 6, {"prediction_type": p, "use_karras_sigmas": True}, True)
      for p in _PREDS),
    *((f"{n}", n, 6, {"prediction_type": "v_prediction", "steps_offset": 1}, False)
      for n in ("plms", "pndm")),
]  # fmt: skip
# the emulated CUDA kernel: the same runs but DPM-Solver ("dpmsolver") of dpm++_single
EMULATED = [c for c in BACKEND if "-dpmsolver-" not in c[0]]


@dataclass(frozen=True)
class GraphCase:
    """test_cuda_graph_loop_equals_eager's settings for one sampler.

    ``runs``: (seed, steps, a torch.Generator for the noise, else in-kernel Philox / none);
    ``captures``: graphs captured over the runs; ``hist``: UniPC-style history buffers of the
    first capture; ``then``: (options, hist) of a run that must capture a graph of its own;
    ``history_is_input``: the x0 history buffer holds each step's input x (and the run is
    wrong without it); ``noisy``: the runs draw noise."""

    sampler: str
    opts: dict[str, Any] = field(default_factory=dict)
    runs: tuple[tuple[int, int, bool], ...] = ((1, 7, False), (2, 7, False))
    captures: int = 1
    hist: int | None = None
    then: tuple[dict[str, Any], int | None] | None = None
    history_is_input: bool = False
    noisy: bool = False


def _graph_cases() -> list[GraphCase]:
    v = {"prediction_type": "v_prediction"}
    cases = [
        GraphCase("deis", {"prediction_type": p, "thresholding": th}, hist=3,
                  then=({"solver_order": 3}, 4))
        for p, th in (("epsilon", False), ("v_prediction", True))
    ]  # fmt: skip
    cases += [
        GraphCase("dpm++_single", {**v, "algorithm_type": a, "final_sigmas_type": "sigma_min",
                                   "thresholding": th}, hist=3, then=({"solver_order": 3}, 4))
        for a, th in (("dpmsolver++", False), ("dpmsolver++", True), ("dpmsolver", False))
    ]  # fmt: skip
    cases += [GraphCase("lms", {"prediction_type": p}, hist=4, then=({"order": 2}, None))
              for p in ("epsilon", "v_prediction")]  # fmt: skip
    cases += [GraphCase(n, v, hist=4) for n in ("plms", "pndm")]
    five = ((1, 5, False), (2, 5, False))
    karras = {"use_karras_sigmas": True}
    cases.append(GraphCase("heun", karras, runs=five, history_is_input=True))
    cases += [
        GraphCase(kind, karras, runs=tuple((s, n, gen) for s, n, _ in five),
                  history_is_input=True, noisy=kind == "dpm2_a")
        for kind, gen in (("dpm2", True), ("dpm2_a", True), ("dpm2_a", False))
    ]  # fmt: skip
    # one step first: a capture without noise, which the noisy runs must not reuse; then
    # generator noise and in-kernel Philox noise, one capture each
    lcm_runs = ((3, 1, True), (1, 4, True), (2, 4, False))
    cases += [
        GraphCase(kind, {**v, **opts}, runs=lcm_runs, captures=3)
        for kind, opts in (("lcm", {}), ("lcm", {"thresholding": True}), ("tcd", {"eta": 0.3}))
    ]  # fmt: skip
    # consistency models: the same three runs (one noiseless step, then noisy ones)
    cases += [GraphCase("cm", {"clip_denoised": c}, runs=lcm_runs, captures=3)
              for c in (True, False)]  # fmt: skip
    # iPNDM: the 4 UniPC-style history buffers (last, e_{i-1}, e_{i-2}, e_{i-3})
    cases.append(GraphCase("ipndm", {}, hist=4))
    # Stable Audio's SDE-DPM-Solver++: noise every step, from a generator / in-kernel Philox
    cases += [
        GraphCase("cosine_dpm++", opts, runs=((1, 7, gen), (2, 7, gen)), noisy=True)
        for opts, gen in (({}, True), ({"solver_type": "heun", "solver_order": 1}, False))
    ]
    # SA-Solver: the history m_{i-1}, m_{i-2} in x0_prev / x0_prev2 (orders 3-4: m_{i-3},
    # m_{i-4} in x0_prev3 / x0_prev4), noise on every step
    p4c4 = {"predictor_order": 4, "corrector_order": 4}
    p3c4 = {"predictor_order": 3, "corrector_order": 4, "algorithm_type": "noise_prediction"}
    cases += [
        GraphCase("sa_solver", opts, runs=((1, 7, gen), (2, 7, gen)), noisy=True)
        for opts, gen in (({}, True), ({"corrector_order": 3, "prediction_type": "v_prediction"},
                                       False), ({"algorithm_type": "noise_prediction"}, True),
                          (p4c4, True), (p3c4, False))
    ]  # fmt: skip
    return cases


GRAPH = _graph_cases()


def graph_id(case: GraphCase) -> str:
    gen = "" if not case.noisy else "-generator" if case.runs[-1][2] else "-philox"
    opts = "-".join(f"{v}" for k, v in case.opts.items() if k != "use_karras_sigmas")
    return f"{case.sampler}{gen}" + (f"-{opts}" if opts else "")


def graph_sample(monkeypatch, loop, case: GraphCase, run: tuple[int, int, bool],
                 cond: torch.Tensor, uncond: torch.Tensor, **extra):  # fmt: skip
    """One guided sample() (with trajectory) through ``loop`` (api's graphed or eager loop)."""
    from fastdiff import api

    monkeypatch.setattr(api, "_sample_eager", loop)
    seed, steps, gen = run
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the Philox seed
    g = torch.Generator().manual_seed(seed + 10) if gen else None
    return fastdiff.sample(cond_toy, steps=steps, sampler=case.sampler, noise=z, cond=cond,
                           uncond=uncond, guidance_scale=2.0, generator=g,
                           return_trajectory=True, **case.opts, **extra)  # fmt: skip
