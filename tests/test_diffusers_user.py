"""User-level checks of fastdiff with diffusers models and schedulers (session-6 findings)."""

from __future__ import annotations

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@torch.no_grad()
def _diffusers_loop(unet, sched, steps: int, noise: torch.Tensor) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x).prev_sample
    return x


# ------------------------------------------- scheduler settings the sampler cannot reproduce
UNSUPPORTED = [
    # flow sigmas are implemented (tests/test_flow_multistep.py), not on a VP sigma grid
    (
        "dpm++",
        DPMSolverMultistepScheduler,
        dict(use_flow_sigmas=True, use_karras_sigmas=True),
        "use_flow_sigmas",
    ),
    (
        "dpm-solver++",
        DPMSolverMultistepScheduler,
        dict(use_flow_sigmas=True, use_exponential_sigmas=True),
        "use_flow_sigmas",
    ),
    pytest.param(
        "dpm++",
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
        "algorithm",
        marks=pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
    ),  # non-++ algorithms are deprecated in diffusers, still accepted there
    ("euler", EulerDiscreteScheduler, dict(interpolation_type="log_linear"), "interpolation"),
    ("euler", EulerDiscreteScheduler, dict(timestep_type="continuous"), "timestep_type"),
    ("euler", EulerDiscreteScheduler, dict(final_sigmas_type="sigma_min"), "final_sigmas"),
]


@pytest.mark.parametrize("sampler,cls,kw,word", UNSUPPORTED, ids=lambda v: str(v)[:24])
def test_scheduler_settings_the_sampler_cannot_honour_raise(sampler, cls, kw, word):
    """schedule=<the sampler's own diffusers scheduler> with a setting fastdiff's sampler does
    not implement (Karras sigmas, a third-order solver, ...) was silently dropped: the samples
    then differed from the diffusers loop by 1-38% with no warning. Now a ValueError names it,
    before the model is called."""
    calls = []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    sched = cls(**kw)
    with pytest.raises(ValueError, match=word):
        fastdiff.sample(model, steps=4, sampler=sampler, schedule=sched, shape=(3, 4, 4))
    with pytest.raises(ValueError, match=word):  # the config dict of a saved scheduler too
        cfg = {**sched.config, "_class_name": cls.__name__}
        fastdiff.sample(model, steps=4, sampler=sampler, schedule=cfg, shape=(3, 4, 4))
    assert calls == []


SUPPORTED = [
    ("ddim", DDIMScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("ddim", DDIMScheduler, dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
    ("dpm++", DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min")),
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_order=2, lower_order_final=False)),
    ("dpm++", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),  # DPM++ 2M Karras
    ("dpm++", DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True)),
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_order=3)),  # DPM++ 3M (tests/test_dpm3.py)
    ("dpm++", DPMSolverMultistepScheduler, dict(solver_order=1, solver_type="heun")),
    (
        "dpm++",
        DPMSolverMultistepScheduler,
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    ),
    ("euler", EulerDiscreteScheduler, dict(timestep_spacing="trailing")),
    ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=False, interpolation_type="linear")),
    # Karras / beta grids: whole-loop parity with t rounded as fastdiff's model sees it is in
    # tests/test_euler_ancestral.py (diffusers' fractional model t moves this loop ~4e-4)
    ("euler", EulerDiscreteScheduler, dict(use_exponential_sigmas=True)),
]


@pytest.mark.parametrize("sampler,cls,kw", SUPPORTED, ids=lambda v: str(v)[:24])
def test_scheduler_settings_the_sampler_honours_match_diffusers(sampler, cls, kw):
    """Settings spelled out at their neutral values, and those the sampler takes, still run and
    match diffusers' own scheduler loop on the same x_T."""
    unet = _unet()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_loop(unet, cls(**kw), 6, noise)
    got = fastdiff.sample(unet, steps=6, sampler=sampler, schedule=cls(**kw), noise=noise)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_other_schedulers_settings_do_not_bind_a_different_sampler():
    """A DPM-Solver scheduler with Karras sigmas used only for its betas by the DDIM sampler is
    fine (the settings belong to a different method)."""
    model = _unet()
    noise = torch.randn(1, 3, 8, 8)
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3)
    got = fastdiff.sample(model, steps=3, sampler="ddim", schedule=sched, noise=noise)
    want = fastdiff.sample(model, steps=3, sampler="ddim", noise=noise)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------- guidance_scale checked first
@pytest.mark.parametrize("w,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                   ("2", TypeError), (True, TypeError),
                                   (torch.ones(2), TypeError)])  # fmt: skip
def test_bad_guidance_scale_raises_before_the_model_runs(w, exc):
    """guidance_scale=nan ran one model call and failed inside the sampler op; '2' was parsed
    as 2.0 and a 2-element tensor gave float()'s unnamed error. Now each is named up front."""
    calls = []

    def model(x, t, class_labels):
        calls.append(t)
        return torch.zeros_like(x)

    with pytest.raises(exc, match="guidance_scale"):
        fastdiff.sample(model, steps=2, shape=(3, 4, 4), cond=torch.tensor([1]),
                        uncond=torch.tensor([0]), guidance_scale=w)  # fmt: skip
    assert calls == []
    got = fastdiff.sample(model, steps=2, shape=(3, 4, 4), cond=torch.tensor([1]),
                          uncond=torch.tensor([0]), guidance_scale=torch.tensor(2.0))  # fmt: skip
    assert got.shape == (1, 3, 4, 4)


# ----------------------------------------------- nested conditioning (SDXL added_cond_kwargs)
def _sdxl_like_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("where", ["cond", "model_kwargs"])
@torch.no_grad()
def test_guidance_batches_dicts_inside_cond_and_model_kwargs(n, where):
    """An SDXL-style UNet takes added_cond_kwargs={"text_embeds", "time_ids"}. Under
    guidance the tensors inside that dict were not batched over [uncond, cond]: batch 1
    silently used cond's text_embeds for the unconditional half (3% off diffusers' loop),
    batch 2 crashed with a size mismatch. Now they are, as the top-level tensors are."""
    unet = _sdxl_like_unet()
    g = torch.Generator().manual_seed(n)
    noise, c, te, ti = (torch.randn(*s, generator=g) for s in
                        [(n, 4, 8, 8), (n, 7, 24), (n, 24), (1, 6)])  # fmt: skip
    uc, ute = torch.zeros(n, 7, 24), torch.zeros(n, 24)
    w, steps = 2.5, 3
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        te_in = torch.cat([ute, te]) if where == "cond" else torch.cat([te, te])
        extra = {"text_embeds": te_in, "time_ids": ti.expand(2 * n, -1)}
        o = unet(torch.cat([x, x]), t, torch.cat([uc, c]), added_cond_kwargs=extra).sample
        ou, oc = o.chunk(2)
        x = sched.step(ou + w * (oc - ou), t, x).prev_sample
    extra_c = {"text_embeds": te, "time_ids": ti}
    extra_u = {"text_embeds": ute, "time_ids": ti}  # time_ids batch 1: expanded
    if where == "cond":
        kw = dict(cond={"encoder_hidden_states": c, "added_cond_kwargs": extra_c},
                  uncond={"encoder_hidden_states": uc, "added_cond_kwargs": extra_u})  # fmt: skip
    else:
        extra_c["time_ids"] = ti.expand(n, -1)  # model_kwargs go as given: full batch
        kw = dict(cond=c, uncond=uc, model_kwargs={"added_cond_kwargs": extra_c})
    got = fastdiff.sample(unet, steps=steps, schedule=DDIMScheduler(clip_sample=False),
                          noise=noise, guidance_scale=w, **kw)  # fmt: skip
    assert ((got - x).abs().max() / x.abs().max()).item() < 1e-5


def test_guidance_nested_uncond_must_have_conds_keys():
    unet = _sdxl_like_unet()
    c = {
        "encoder_hidden_states": torch.randn(1, 7, 24),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 24), "time_ids": torch.randn(1, 6)},
    }
    u = {"encoder_hidden_states": torch.zeros(1, 7, 24),
         "added_cond_kwargs": {"text_embeds": torch.zeros(1, 24)}}  # fmt: skip
    with pytest.raises(ValueError, match="added_cond_kwargs.*keys"):
        fastdiff.sample(unet, steps=2, cond=c, uncond=u, guidance_scale=2.0)


# ------------------------------------------------------------------- torch.compile'd models
@torch.no_grad()
def test_compiled_unet2d_condition_model_gets_cond_as_encoder_hidden_states():
    """sample(torch.compile(unet), cond=ctx): the compiled wrapper (OptimizedModule) hid the
    UNet2DConditionModel, so a tensor cond went in as class_labels and the model raised
    "missing 1 required positional argument: 'encoder_hidden_states'"."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    fastdiff.optimize(unet)
    noise, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 24)
    want = fastdiff.sample(unet, steps=2, noise=noise, cond=ctx, uncond=torch.zeros(1, 7, 24),
                           guidance_scale=2.0)  # fmt: skip
    got = fastdiff.sample(torch.compile(unet, backend="eager"), steps=2, noise=noise, cond=ctx,
                          uncond=torch.zeros(1, 7, 24), guidance_scale=2.0)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- class labels the model would ignore
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_class_labels_for_a_unet_without_class_embedding_raise(guidance):
    """A diffusers UNet2DModel without num_class_embeds ignores class_labels silently, so
    sample(unet, cond=labels, guidance_scale=3) ran an unconditional model (guidance a no-op)
    and returned as if conditioned. Now a ValueError says the labels would be ignored."""
    unet = _unet()
    kw = dict(uncond=torch.tensor([0]), guidance_scale=guidance) if guidance else {}
    with pytest.raises(ValueError, match="no class embedding"):
        fastdiff.sample(unet, steps=2, cond=torch.tensor([3]), **kw)
    with pytest.raises(ValueError, match="no class embedding"):
        fastdiff.sample(torch.compile(unet, backend="eager"), steps=2, cond=torch.tensor([3]), **kw)
    torch.manual_seed(0)
    labelled = UNet2DModel(**{**unet.config, "num_class_embeds": 4}).eval()
    assert fastdiff.sample(labelled, steps=2, cond=torch.tensor([3]), **kw).shape == (1, 3, 8, 8)


@torch.no_grad()
def test_dpm_scheduler_with_learned_variance_runs_like_diffusers():
    """DPMSolverMultistepScheduler(variance_type="learned_range") on a 2C-channel model: diffusers
    drops the variance channels, as sample() does; the setting is not refused."""
    torch.manual_seed(0)
    unet = UNet2DModel(**{**_unet().config, "out_channels": 6}).eval()
    noise = torch.randn(1, 3, 8, 8)
    sched = DPMSolverMultistepScheduler(variance_type="learned_range")
    sched.set_timesteps(4)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    again = DPMSolverMultistepScheduler(variance_type="learned_range")
    got = fastdiff.sample(unet, steps=4, sampler="dpm++", noise=noise, schedule=again)
    assert ((got - x).abs().max() / x.abs().max()).item() < 1e-4


# ---------------------------------------------------------------- a pipeline passed as model
def test_pipeline_passed_as_model_names_its_unet():
    """sample(pipe) said "shape: not given and cannot be inferred" (and with shape= it would
    call the pipeline as a model); it now points to pipe.unet. optimize(pipe) optimizes the
    pipeline's diffusers models (tests/test_optimize_vae.py)."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=_unet(), scheduler=DDIMScheduler())
    with pytest.raises(TypeError, match=r"pipe\.unet, schedule=pipe\.scheduler"):
        fastdiff.sample(pipe, steps=2, shape=(3, 8, 8))
    assert fastdiff.optimize(pipe) is pipe
    assert "unet" in pipe.fastdiff_report
