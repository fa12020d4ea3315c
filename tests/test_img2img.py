"""img2img / SDEdit through ``fastdiff.sample(image=..., strength=...)`` for every sampler, vs a
diffusers loop written as its img2img pipeline runs (StableDiffusionImg2ImgPipeline's
``get_timesteps`` / ``set_begin_index`` / ``add_noise``; StableDiffusion3Img2ImgPipeline's for
flow samplers, ``scale_noise``; LatentConsistencyModelImg2ImgPipeline's
``set_timesteps(strength=...)`` for LCM / TCD), with the same model, the same noise (the same
generator on both sides) and fp32: relative error <= 1e-5 (max |ours - theirs| / max |theirs|).
Also: guidance, generator lists, callback and trajectory contents, each sampler's
``add_noise`` vs diffusers' start, the CUDA-graph loop (faked on CPU) and the errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _sampler_cases import rel as _rel
from helpers import DIFFUSERS_BETAS, PARITY_RTOL, record_sample_calls

import fastdiff
from fastdiff.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = (2, 4, 8, 8), PARITY_RTOL
SL = DIFFUSERS_BETAS["scaled_linear"]
STRENGTHS = [1.0, 0.8, 0.67, 0.5, 0.3, 0.1]  # 0.67: SD / SD3 round apart; 0.1: one step

# sampler name -> (diffusers scheduler class, its config, steps): every name of SAMPLERS
CASES = {
    "cm": ("CMStochasticIterativeScheduler", {}, 10),
    "consistency": ("CMStochasticIterativeScheduler", {"num_train_timesteps": 151}, 10),
    "ddim": ("DDIMScheduler", SL, 10),
    "ddpm": ("DDPMScheduler", SL, 10),
    "deis": ("DEISMultistepScheduler", SL, 10),
    "dpm++": ("DPMSolverMultistepScheduler", SL, 10),
    "dpm++_single": ("DPMSolverSinglestepScheduler", SL, 10),
    "dpm2": ("KDPM2DiscreteScheduler", SL, 10),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", SL, 10),
    "edm_dpm++": ("EDMDPMSolverMultistepScheduler", {}, 10),
    "edm_euler": ("EDMEulerScheduler", {}, 10),
    "euler": ("EulerDiscreteScheduler", SL, 10),
    "euler_a": ("EulerAncestralDiscreteScheduler", SL, 10),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 10),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, 10),
    "heun": ("HeunDiscreteScheduler", SL, 10),
    "lcm": ("LCMScheduler", SL, 4),
    "lms": ("LMSDiscreteScheduler", SL, 10),
    "pndm": ("PNDMScheduler", SL, 10),
    "plms": ("PNDMScheduler", {**SL, "skip_prk_steps": True}, 10),
    "sa_solver": ("SASolverScheduler", SL, 10),
    "tcd": ("TCDScheduler", SL, 4),
    "unipc": ("UniPCMultistepScheduler", SL, 10),
}
# more grids / variants of the same samplers
VARIANTS = {
    "dpm++ karras": ("dpm++", {"use_karras_sigmas": True}),
    "dpm++ sde": ("dpm++", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++ 3 v": ("dpm++", {"solver_order": 3, "prediction_type": "v_prediction"}),
    "euler karras": ("euler", {"use_karras_sigmas": True}),
    "heun karras": ("heun", {"use_karras_sigmas": True}),
    "unipc 3": ("unipc", {"solver_order": 3}),
    "deis 3": ("deis", {"solver_order": 3}),
    "dpm++_single 3": ("dpm++_single", {"solver_order": 3}),
    "lms exp": ("lms", {"use_exponential_sigmas": True}),
    "ddim trailing": ("ddim", {"timestep_spacing": "trailing"}),
    "flow_euler stochastic": ("flow_euler", {"stochastic_sampling": True}),
}
SD3_ROUNDING = ("flow_euler", "flow_heun")  # StableDiffusion3Img2ImgPipeline.get_timesteps
GRID_STRENGTH = ("lcm", "tcd")  # LatentConsistencyModelImg2ImgPipeline: set_timesteps(strength)


def test_every_sampler_has_a_case():
    """A new sampler needs an img2img case here (inversions run x_0 -> x_T: refused)."""
    # (inversions and samplers with no_img2img: refused, tested in their files)
    names = {k for k, c in SAMPLERS.items() if not (c.inverts or getattr(c, "no_img2img", None))}
    # ipndm: diffusers' IPNDMScheduler has no add_noise (its start is written out in test_ipndm)
    names -= {"ipndm"}
    # cosine_dpm++, dpm++_sde: diffusers' scheduler needs torchsde (img2img, inpainting:
    # test_cosine_dpm, test_dpmpp_sde)
    names -= {"dpmsolver++", "dpm-solver++", "cosine_dpm++", "dpm++_sde"}
    assert names <= set(CASES), sorted(names - set(CASES))


def _model(x: torch.Tensor, t, encoder_hidden_states=None) -> torch.Tensor:
    """Deterministic stand-in network; reads t rounded (fastdiff calls the model at diffusers'
    fractional linspace timesteps rounded to int64)."""
    tt = torch.as_tensor(t).float().round().reshape(-1, *([1] * (x.ndim - 1)))
    out = 0.6 * torch.tanh(0.8 * x + 0.1) + 0.3 * torch.sin(tt / 150.0) + 0.05 * x
    if encoder_hidden_states is not None:
        out = out + encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)
    return out


def _scheduler(name: str, **cfg):
    cls, base, _ = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls)(**{**base, **cfg})


def _t_start(name: str, steps: int, strength: float) -> int:
    """The pipelines' get_timesteps: SD (int(N strength)) or SD3 (int(N - N strength))."""
    if name in SD3_ROUNDING:
        return int(max(steps - min(steps * strength, steps), 0))
    return max(steps - min(int(steps * strength), steps), 0)


def pipeline_timesteps(name, sch, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an img2img / inpaint pipeline runs from ``strength`` (the scheduler's
    set_timesteps(strength=) where it takes one, else get_timesteps' t_start and
    set_begin_index)."""
    if name in GRID_STRENGTH:
        sch.set_timesteps(steps, strength=strength)
        timesteps = sch.timesteps
    else:
        sch.set_timesteps(steps)
        s = _t_start(name, steps, strength) * sch.order
        timesteps = sch.timesteps[s:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(s)
    return timesteps


def _diffusers_img2img(name, sch, image, strength, steps, gen, cond=None, gs=None):
    """The img2img pipeline's loop: timesteps, the noised image, the denoising loop."""
    timesteps = pipeline_timesteps(name, sch, steps, strength)
    noise = torch.randn(image.shape, generator=gen)  # randn_tensor's draw
    t0 = timesteps[:1].repeat(image.shape[0])
    if hasattr(sch, "scale_noise"):
        x = sch.scale_noise(image, t0, noise)
    else:
        x = sch.add_noise(image, noise, t0)
    kw = {}
    for t in timesteps:
        inp = torch.cat([x, x]) if gs is not None else x
        inp = sch.scale_model_input(inp, t) if hasattr(sch, "scale_model_input") else inp
        if cond is not None:
            kw = {"encoder_hidden_states": cond}
        out = _model(inp, t, **kw)
        if gs is not None:
            u, c = out.chunk(2)
            out = u + gs * (c - u)
        step_kw = {"generator": gen} if "generator" in sch.step.__code__.co_varnames else {}
        x = sch.step(out, t, x, **step_kw).prev_sample
    return x, timesteps


def _image(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed))


def _run_pair(name, strength, cfg=None, seed=0, **kw):
    cfg = cfg or {}
    steps = CASES[name][2]
    image = _image(seed)
    theirs, ts = _diffusers_img2img(name, _scheduler(name, **cfg), image, strength, steps,
                                    torch.Generator().manual_seed(seed), **kw)  # fmt: skip
    cond, gs = kw.get("cond"), kw.get("gs")
    extra = {}
    if cond is not None:
        extra = {"cond": cond[image.shape[0] :], "uncond": cond[: image.shape[0]]}
        extra["guidance_scale"] = gs
    ours = fastdiff.sample(
        _model, steps, sampler=name, schedule=_scheduler(name, **cfg), image=image,
        strength=strength, generator=torch.Generator().manual_seed(seed), **extra,
    )  # fmt: skip
    return ours, theirs, ts


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_img2img_matches_diffusers_pipeline_loop(name):
    """Every sampler, strengths 1 .. one step: sample(image=, strength=) = diffusers' loop."""
    for strength in STRENGTHS:
        ours, theirs, _ = _run_pair(name, strength)
        assert ours.shape == theirs.shape and torch.isfinite(ours).all()
        err = _rel(ours, theirs)
        assert err <= RTOL, f"{name} strength {strength}: rel err {err:.2e}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_img2img_variants_match_diffusers(variant):
    """Karras / exponential grids, SDE noise, order 3, v-prediction, trailing spacing."""
    name, cfg = VARIANTS[variant]
    for strength in (0.8, 0.37):
        ours, theirs, _ = _run_pair(name, strength, cfg)
        err = _rel(ours, theirs)
        assert err <= RTOL, f"{variant} strength {strength}: rel err {err:.2e}"


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "heun", "flow_euler", "edm_euler",
                                  "unipc", "lcm"])  # fmt: skip
def test_img2img_with_guidance_matches_diffusers(name):
    """cond / uncond / guidance_scale with an image: the [uncond, cond] batch as the pipeline."""
    cond = torch.randn(2 * SHAPE[0], 3, generator=torch.Generator().manual_seed(7))
    # DDIM: SD's config (no x0 clipping; fastdiff's guided default re-derives eps from it)
    cfg = {"clip_sample": False} if name == "ddim" else None
    ours, theirs, _ = _run_pair(name, 0.6, cfg, cond=cond, gs=4.0)
    assert _rel(ours, theirs) <= RTOL


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm2_a", "tcd", "heun", "pndm"])
def test_generator_list_equals_single_sample_runs(name):
    """A generator list: sample k of the batch = the single-sample run with generator k (the
    image noise and the steps' noise both drawn per sample)."""
    image = _image(3)
    batch = fastdiff.sample(
        _model, CASES[name][2], sampler=name, schedule=_scheduler(name), image=image,
        strength=0.7, generator=[torch.Generator().manual_seed(k) for k in range(2)],
    )  # fmt: skip
    for k in range(2):
        one = fastdiff.sample(
            _model, CASES[name][2], sampler=name, schedule=_scheduler(name),
            image=image[k : k + 1], strength=0.7, generator=torch.Generator().manual_seed(k),
        )  # fmt: skip
        torch.testing.assert_close(batch[k : k + 1], one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpm++", "flow_euler", "lcm"])
def test_noise_is_the_noise_added_to_the_image(name):
    """noise= is diffusers' noise of add_noise / scale_noise: equal to the generator run whose
    first draw it is; the samples differ from starting at pure noise."""
    image, steps = _image(1), CASES[name][2]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    kw = {"sampler": name, "schedule": _scheduler(name), "image": image, "strength": 0.5}
    if name in ("ddim", "heun", "dpm++", "flow_euler"):  # deterministic samplers
        a = fastdiff.sample(_model, steps, noise=z, **kw)
        b = fastdiff.sample(_model, steps, generator=torch.Generator().manual_seed(5), **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pure = fastdiff.sample(_model, steps, sampler=name, schedule=_scheduler(name), noise=z)
    assert _rel(fastdiff.sample(_model, steps, noise=z, **kw), pure) > 1e-3


@pytest.mark.parametrize("name", ["heun", "dpm++", "pndm", "flow_euler"])
def test_callback_and_trajectory_of_a_run_from_call_s(name):
    """callback(i, t, x): i = 0 .. the calls run, t = the pipeline's sliced timesteps; the
    trajectory's timesteps are those, its x rows the noised image then each call's result."""
    image, steps = _image(2), CASES[name][2]
    seen = []
    out, traj = fastdiff.sample(
        _model, steps, sampler=name, schedule=_scheduler(name), image=image, strength=0.55,
        generator=torch.Generator().manual_seed(2), return_trajectory=True,
        callback=lambda i, t, x: seen.append((i, t, x.clone())),
    )  # fmt: skip
    _, theirs, ts = _run_pair(name, 0.55, seed=2)
    calls = len(ts)
    assert [i for i, _, _ in seen] == list(range(calls))
    torch.testing.assert_close(torch.tensor([float(t) for _, t, _ in seen]), ts.float().round()
                               if name != "flow_euler" else ts.float())  # fmt: skip
    assert traj["timesteps"].shape == (calls,)
    assert traj["x"].shape == (calls + 1, *SHAPE) and traj["x0"].shape == (calls, *SHAPE)
    for k, (_, _, x) in enumerate(seen):
        torch.testing.assert_close(traj["x"][k + 1], x, rtol=0, atol=0)
    torch.testing.assert_close(traj["x"][-1], out, rtol=0, atol=0)
    # row 0: the image noised to the first call's state
    smp = fastdiff.samplers.make_sampler(name, fastdiff.NoiseSchedule.from_diffusers(
        _scheduler(name)) if "flow" not in name else None, steps,
        **({"strength": 0.55, "shift": 3.0} if name == "flow_euler" else {}))  # fmt: skip
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    start = smp.img2img_start(0.55)
    torch.testing.assert_close(traj["x"][0], smp.add_noise(image, z, start), rtol=1e-6, atol=1e-6)
    assert _rel(out, theirs) <= RTOL


@pytest.mark.parametrize("name", sorted(set(CASES) - set(GRID_STRENGTH) - {"flow_euler"}))
def test_add_noise_is_diffusers_start_in_model_input_units(name):
    """Each sampler's add_noise(x0, z, s) = diffusers' scale_model_input(add_noise(x0, z, t_s))
    after set_begin_index(s), at every start s an img2img run can take (and its start is the
    pipeline's t_start * order)."""
    steps = CASES[name][2]
    image, z = _image(4), torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    from fastdiff._sampler_setup import resolve_sampler

    smp = resolve_sampler(None, name, steps, _scheduler(name), None, None, {})
    for strength in (1.0, 0.9, 0.7, 0.5, 0.35, 0.2, 0.1):
        sch = _scheduler(name)
        sch.set_timesteps(steps)
        s = _t_start(name, steps, strength) * sch.order
        assert smp.img2img_start(strength) == s
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(s)
        t = sch.timesteps[s : s + 1].repeat(SHAPE[0])
        ref = sch.scale_noise(image, t, z) if hasattr(sch, "scale_noise") else sch.add_noise(
            image, z, t)  # fmt: skip
        if hasattr(sch, "scale_model_input"):
            ref = sch.scale_model_input(ref, sch.timesteps[s])
        assert _rel(smp.add_noise(image, z, s), ref) <= RTOL, (name, strength)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(set(CASES) - set(GRID_STRENGTH) - {"flow_euler"}))
def test_add_noise_half_precision_fa_rule(name, dtype):
    """The start in fp16 / bf16 (x0 and z in that dtype): its error vs the float64 start is at
    most 2x diffusers' own in that dtype (its add_noise / scale_noise, then scale_model_input,
    in model-input units), and at most 3 unit roundoffs (measured: <= 1.9; diffusers rounds
    its coefficients to the dtype first, a loose bound alone)."""
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    from fastdiff._sampler_setup import resolve_sampler

    steps = CASES[name][2]
    image, z = _image(10), torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    smp = resolve_sampler(None, name, steps, _scheduler(name), None, None, {})
    for strength in (1.0, 0.7, 0.35):
        s = smp.img2img_start(strength)
        ref = smp.add_noise(image.double(), z.double(), s)
        ours = smp.add_noise(image.to(dtype), z.to(dtype), s)
        assert ours.dtype == dtype
        sch = _scheduler(name)
        sch.set_timesteps(steps)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(s)
        t = sch.timesteps[s : s + 1].repeat(SHAPE[0])
        x0, zz = image.to(dtype), z.to(dtype)
        theirs = sch.scale_noise(x0, t, zz) if hasattr(sch, "scale_noise") else sch.add_noise(
            x0, zz, t)  # fmt: skip
        if hasattr(sch, "scale_model_input"):
            theirs = sch.scale_model_input(theirs, sch.timesteps[s])
        assert theirs.dtype == dtype
        err, bound = _rel(ours, ref), min(2 * _rel(theirs, ref), 3 * u)
        assert err <= bound, f"{name} {dtype} strength {strength}: {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("name", ["dpm++", "unipc", "deis", "pndm", "heun", "dpm++_single"])
def test_cuda_graph_loop_equals_eager_from_call_s(name, fake_cuda_graphs, monkeypatch):
    """The graphed loop (faked on CPU) of a run from call s: the warm-up rows of run_row, the
    history buffers zeroed: the eager loop's samples and trajectory."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def run(graphed, strength):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(
            _model, CASES[name][2], sampler=name, schedule=_scheduler(name), image=_image(5),
            strength=strength, generator=torch.Generator().manual_seed(1),
            return_trajectory=True,
        )  # fmt: skip

    for strength in (0.55, 1.0, 0.75):
        eager, etraj = run(False, strength)
        out, traj = run(True, strength)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["timesteps"], etraj["timesteps"])
    assert len(fake_cuda_graphs) == 1  # one capture, replayed from different starts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dpm++", "unipc", "heun", "euler_a"])
def test_cuda_graph_img2img_equals_eager_on_gpu(name):
    image = _image(6).cuda()
    kw = {"sampler": name, "schedule": _scheduler(name), "image": image, "strength": 0.6}
    eager = fastdiff.sample(_model, 10, generator=torch.Generator("cuda").manual_seed(0), **kw)
    graphed = fastdiff.sample(_model, 10, generator=torch.Generator("cuda").manual_seed(0),
                              cuda_graph=True, **kw)  # fmt: skip
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ errors
def _calls_counter():
    calls = []

    def model(x, t):
        calls.append(1)
        return _model(x, t)

    return model, calls


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"image": [[0.0]]}, TypeError, "image: expected a torch.Tensor"),
        ({"image": torch.zeros(SHAPE, dtype=torch.int64)}, TypeError, "image: expected a floating"),
        ({"image": torch.zeros(()), "shape": None}, ValueError, r"image: expected x_0 of shape"),
        ({"strength": 0.5}, ValueError, "strength: img2img's strength needs image="),
        ({"image": "img", "strength": 0.5}, TypeError, "image: expected a torch.Tensor"),
        ({"image": torch.zeros(SHAPE), "strength": 0.0}, ValueError, r"strength: expected a float"),
        ({"image": torch.zeros(SHAPE), "strength": 1.5}, ValueError, r"strength: expected a float"),
        ({"image": torch.zeros(SHAPE), "strength": float("nan")}, ValueError, "strength: exp"),
        ({"image": torch.zeros(SHAPE), "strength": float("inf")}, ValueError, "strength: exp"),
        ({"image": torch.zeros(SHAPE), "strength": True}, TypeError, "strength: expected"),
        ({"image": torch.zeros(SHAPE), "strength": "0.5"}, TypeError, "strength: expected"),
        ({"image": torch.zeros(SHAPE), "strength": 0.05}, ValueError, "strength: 0.05 leaves no"),
        ({"image": torch.zeros(SHAPE), "batch_size": 3}, ValueError, "batch_size: expected image"),
        ({"image": torch.zeros(SHAPE), "shape": (4, 8, 9)}, ValueError, "shape: expected image's"),
        (
            {"image": torch.zeros(SHAPE), "noise": torch.zeros(2, 4, 8, 9)},
            ValueError,
            "noise: expected image's shape",
        ),  # fmt: skip
        (
            {"image": torch.zeros(SHAPE), "noise": torch.zeros(3, 4, 8, 8)},
            ValueError,
            "noise: expected image's shape",
        ),  # fmt: skip
        (
            {"image": torch.zeros(SHAPE), "generator": [torch.Generator()] * 3},
            ValueError,
            "generator: a list of generators needs one per sample",
        ),  # fmt: skip
        ({"image": torch.zeros(SHAPE), "dtype": torch.float64}, TypeError, "dtype: expected"),
    ],
)
def test_errors_name_the_argument_and_nothing_runs(kw, exc, match):
    model, calls = _calls_counter()
    kw = {"shape": SHAPE[1:], **kw} if "image" not in kw else kw
    with pytest.raises(exc, match=match):
        fastdiff.sample(model, 10, sampler="ddim", **kw)
    assert calls == []


def test_strength_errors_of_grid_samplers():
    """LCM: too few origin timesteps for the strength; a sampler object keeps its own strength;
    DDIM inversion refuses an image."""
    model, calls = _calls_counter()
    image = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="strength"):
        fastdiff.sample(model, 4, sampler="lcm", image=image, strength=0.05)
    smp = fastdiff.samplers.make_sampler("lcm", fastdiff.NoiseSchedule("linear"), 4, strength=0.5)
    with pytest.raises(ValueError, match=r"strength: the sampler object was built with strength"):
        fastdiff.sample(model, sampler=smp, image=image, strength=0.7)
    for steps in (10, 1):  # one step: its timesteps show no direction
        with pytest.raises(ValueError, match="image: .* x_0 -> x_T"):
            fastdiff.sample(model, steps, sampler="ddim_inverse", image=image, strength=1.0)
    assert calls == []


def test_grid_strength_sampler_object_and_default_strengths():
    """An LCM / flow sampler object built with strength runs its grid from call 0 with the image;
    the same as passing strength= by name. Defaults: 0.8 (SD, LCM), 0.6 (SD3 / Flux flow)."""
    image = _image(8)
    sch = fastdiff.NoiseSchedule.from_diffusers(_scheduler("lcm"))
    smp = fastdiff.samplers.make_sampler("lcm", sch, 4, strength=0.5)
    g = torch.Generator().manual_seed(3)
    a = fastdiff.sample(_model, sampler=smp, image=image, generator=g)
    b = fastdiff.sample(_model, 4, sampler="lcm", schedule=sch, image=image, strength=0.5,
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, default in (("ddim", 0.8), ("lcm", 0.8), ("flow_euler", 0.6), ("flow_heun", 0.6)):
        kw = {"sampler": name, "schedule": _scheduler(name), "image": image}
        one = fastdiff.sample(_model, CASES[name][2], generator=torch.Generator(), **kw)
        two = fastdiff.sample(_model, CASES[name][2], strength=default, generator=torch.Generator(),
                              **kw)  # fmt: skip
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_image_sets_batch_dtype_device_and_is_cast():
    """Without noise / batch_size / shape, the image gives them; a float64 image is cast to the
    model's dtype (as diffusers' ``image.to(dtype)``); the input image is not modified."""
    image = _image(9)
    keep = image.clone()
    out = fastdiff.sample(_model, 10, sampler="ddim", image=image, strength=0.5,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == SHAPE and out.dtype == torch.float32
    torch.testing.assert_close(image, keep, rtol=0, atol=0)
    lin = torch.nn.Linear(1, 1)  # a model with fp32 parameters: fp32 sampling
    m = lambda x, t: _model(x, t) + 0 * lin.weight.sum()  # noqa: E731
    m.parameters = lin.parameters  # type: ignore[attr-defined]
    out64 = fastdiff.sample(m, 10, sampler="ddim", image=image.double(), strength=0.5,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, out, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_init_image_reaches_sample_as_model_space_image(tmp_path, monkeypatch):
    """fastdiff sample --init-image / --strength: the picture in the model's channels and size,
    pixels / 127.5 - 1, once per sample, and the strength, reach sample(); a real run writes."""
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    pix = ((np.arange(16 * 16 * 3).reshape(16, 16, 3) * 7) % 256).astype(np.uint8)
    src = tmp_path / "in.png"
    Image.fromarray(pix).save(src)  # RGB, the digits model's 16 x 16: converted to grayscale
    gray = np.asarray(Image.fromarray(pix).convert("L"), dtype=np.float32)
    seen = record_sample_calls(monkeypatch, run=True)
    out = tmp_path / "out.png"
    argv = ["sample", "--init-image", str(src), "--strength", "0.5", "--n", "2", "--steps", "4"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0 and out.is_file()
    image = seen[0]["image"]
    assert image.shape == (2, 1, 16, 16) and seen[0]["strength"] == 0.5
    torch.testing.assert_close(image[1, 0], torch.from_numpy(gray) / 127.5 - 1, rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", "missing.png"], "--init-image: file not found"),
        (["--init-image", "{txt}"], "--init-image: cannot read"),
        (["--init-image", "{png}", "--strength", "1.5"], "--strength: expected a number in (0, 1]"),
        (["--init-image", "{png}", "--strength", "0.01"], "strength: 0.01 leaves no step"),
    ],
)
def test_cli_init_image_errors_write_nothing(argv, msg, tmp_path, capsys):
    code, err = cli_sample_fails(argv, tmp_path, capsys)
    assert code == 2 and msg in err


def cli_sample_fails(argv, tmp_path, capsys) -> tuple[int, str]:
    """``fastdiff sample *argv`` into tmp_path/out.png, ``{txt}`` / ``{png}`` in ``argv`` naming
    a text file / a 16 x 16 image there: (its exit code, its stderr); asserts it wrote nothing."""
    from PIL import Image

    from fastdiff.cli import main

    (tmp_path / "t.txt").write_text("not an image")
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    argv = [a.format(txt=tmp_path / "t.txt", png=tmp_path / "a.png") for a in argv]
    out = tmp_path / "out.png"
    code = main(["sample", *argv, "--out", str(out), "--quiet"])
    assert not out.exists()
    return code, capsys.readouterr().err
