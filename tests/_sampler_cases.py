"""Shared pieces of the sampler contract (tests/test_sampler_contract.py): the stand-in models,
the error measure, diffusers' pipeline loop, and the per-sampler settings each shared check runs
with (the settings the per-sampler test files used when each had its own copy of the check)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, PARITY_SHAPE, record_sample_calls

import fastdiff
from fastdiff import NoiseSchedule

SHAPE = PARITY_SHAPE

# diffusers' sigma grids (its use_*_sigmas options) and their test ids
SIGMA_GRIDS = [{}, *({f"use_{g}_sigmas": True} for g in ("karras", "exponential", "beta"))]
SIGMA_GRID_IDS = ["plain", "karras", "exponential", "beta"]

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


def vp_schedule(sched: str = "scaled_linear") -> NoiseSchedule:
    """fastdiff's schedule of diffusers' beta schedule ``sched`` (:data:`DIFFUSERS_BETAS`)."""
    return NoiseSchedule.from_diffusers(DIFFUSERS_BETAS[sched])


def threshold64(x0: torch.Tensor, ratio: float, top: float) -> torch.Tensor:
    """diffusers' dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3) in the dtype of
    ``x0`` (the float64 restatements): s = the ``ratio`` quantile of |x0| per sample, clamped to
    [1, ``top``]; x0 clipped to [-s, s] and divided by s. ``x0``: [N x ...]."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, top)[:, None]
    return (flat.clamp(-s, s) / s).reshape(x0.shape)


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


def assert_scheduler_run(sch, steps: int, other: str, float64_loop=None) -> None:
    """sample(schedule=sch) (the sampler inferred without a warning, at diffusers' timesteps)
    lands where diffusers' own loop does: within PARITY_RTOL of it, or, with a float64
    restatement of the whole run (``float64_loop(z)``), within PARITY_RTOL of that and within
    PARITY_RTOL plus diffusers' own fp32 error of diffusers' loop; and not where sampler
    ``other`` lands on the same schedule (so the check can fail)."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = diffusers_loop(sch, steps, z)
    got = sample_through_scheduler(sch, steps, z)  # sample() scales z as init_noise_sigma
    bound = PARITY_RTOL
    if float64_loop is not None:
        ref64 = float64_loop(z)
        assert rel(got, ref64) <= PARITY_RTOL
        bound += rel(ref, ref64)  # plus diffusers' own fp32 error
    err = rel(got, ref)
    assert 0.0 < err <= bound, f"whole-run rel err {err:.2e} > {bound:.2e}"
    theirs = fastdiff.sample(toy, steps=steps, sampler=other, schedule=sch, noise=z)
    assert rel(theirs, ref) > 1e-3, f"{other}'s samples"


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


def check_graph_loop(case: GraphCase, captured: list, monkeypatch) -> None:
    """sample(cuda_graph=True)'s loop with the fake graph (``captured``: the conftest fixture
    fake_cuda_graphs) equals the eager loop, samples and x0 trajectory, for each of
    ``case.runs`` (guided), with ``case.captures`` captures, the first with ``case.hist``
    history buffers; then the checks ``case.history_is_input`` / ``noisy`` / ``then`` ask for
    (see :class:`GraphCase`)."""
    from fastdiff import api

    eager_loop, graphed_loop = api._sample_eager, api._sample_graphed
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)

    def run(graphed, r, **extra):
        loop = graphed_loop if graphed else eager_loop
        return graph_sample(monkeypatch, loop, case, r, cond, uncond, **extra)

    for r in case.runs:
        eager, etraj = run(False, r)
        out, traj = run(True, r)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
    assert len(captured) == case.captures  # captured once, replayed for the next calls
    if case.hist is not None:  # the UniPC-style history buffers: last, m_{i-1}, m_{i-2}, ...
        assert len(captured[0].hist) == case.hist
    if case.history_is_input:
        # the history lives in a static buffer, filled with each step's input x; with the x0
        # prediction there instead the run is another sampler's
        g = captured[0]
        assert g.x0_prev is not None and g.history_is_input
        g.history_is_input = False
        wrong, _ = run(True, case.runs[-1])
        assert (wrong - eager).abs().max() > 1e-3 and rel(wrong, eager) > 1e-3
        g.history_is_input = True
        torch.testing.assert_close(run(True, case.runs[-1])[0], eager, rtol=1e-6, atol=1e-6)
    if case.noisy:
        assert not torch.allclose(out, run(False, case.runs[0])[0])
    if case.then is not None:
        opts, hist = case.then
        eager, _ = run(False, case.runs[0], **opts)
        out, _ = run(True, case.runs[0], **opts)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        assert len(captured) == case.captures + 1
        if hist is not None:
            assert len(captured[-1].hist) == hist


def check_cli_karras_solver_order(tmp_path, monkeypatch, name: str) -> None:
    """fastdiff sample --sampler ``name`` [--karras] [--solver-order 3] reaches sample() as
    ``name`` with those options; --sde stays dpm++ only (exit 2, sample() not called)."""
    from fastdiff.cli import main

    seen = record_sample_calls(monkeypatch)
    out = tmp_path / "out.png"
    args = ["sample", "--steps", "3", "--n", "2", "--sampler", name, "--quiet", "--out", str(out)]
    assert main(args) == 0 and out.is_file()
    assert seen[-1]["sampler"] == name and "use_karras_sigmas" not in seen[-1]
    assert main([*args, "--karras", "--solver-order", "3"]) == 0
    assert seen[-1]["use_karras_sigmas"] is True and seen[-1]["solver_order"] == 3
    assert main([*args, "--sde"]) == 2 and len(seen) == 2
