"""Mutation testing, round 7 (session 12): tests that kill the mutants of the older sampler and
schedule code (fastdiff/schedules.py, fastdiff/samplers/{base,ddpm,ddim,euler,euler_ancestral,
sigmas}.py), the conditioning plumbing (fastdiff/_conditioning.py, _prepare.py, _loop.py) and
the attention / group_norm_silu validation that the suite let live. References are diffusers
0.42 or a float64 restatement of the paper's equation, never fastdiff itself; each test names
the behaviour it pins. /work/notes/s12/mutation7_log.md lists the mutants."""

from __future__ import annotations

import pytest
import torch
from helpers import PARITY_SHAPE
from test_samplers_parity import _loop, _schedule

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler, EulerAncestralSampler

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [3.0, 0.5])
def test_from_diffusers_refuses_a_beta_config_with_a_noise_shift(shift):
    """A config with a beta schedule and ``shift`` != 1 (a timestep shift on top of the betas)
    is refused, as ``snr_shift_scale`` is: NoiseSchedule models only the betas (mutant s11)."""
    with pytest.raises(ValueError, match="shift=.*changes its noise levels"):
        NoiseSchedule.from_diffusers({"beta_schedule": "linear", "shift": shift})
    assert NoiseSchedule.from_diffusers({"beta_schedule": "linear", "shift": None})


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_thresholding_step_refuses_a_non_finite_guidance_scale(name, bad):
    """The dynamic-thresholding paths combine CFG in Python before the fused op checks it: a NaN
    or inf guidance_scale must still be a ValueError naming guidance_scale, not NaN samples
    (mutant b8: the sampler-level finiteness check removed)."""
    sch = NoiseSchedule("linear")
    cls = DDIMSampler if name == "ddim" else DDPMSampler
    smp = cls(sch, 10, thresholding=True)
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(4, 3, 4, 4)
    noise = torch.randn_like(x)
    with pytest.raises(ValueError, match="guidance_scale"):
        smp.step(out, 0, x, noise, guidance_scale=bad)
    assert torch.isfinite(smp.step(out, 0, x, noise, guidance_scale=3.0)).all()


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "ddim_eta"])
@pytest.mark.parametrize("count", [1, 3])
def test_step_with_a_generator_list_of_the_wrong_length_names_generator(name, count):
    """A list of generators is one per sample: a list of another length is a ValueError naming
    ``generator`` (not the op's complaint about a ``noise`` the caller never passed; mutant b9)."""
    sch = NoiseSchedule("linear")
    smp = {
        "ddpm": lambda: DDPMSampler(sch, 10),
        "euler_a": lambda: EulerAncestralSampler(sch, 10),
        "ddim_eta": lambda: DDIMSampler(sch, 10, eta=1.0),
    }[name]()
    x = torch.randn(2, 3, 4, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(count)]
    with pytest.raises(ValueError, match=r"generator: .*one per sample \(2\)"):
        smp.step(torch.randn_like(x), 0, x, generator=gens)


@pytest.mark.parametrize("cls", [DDIMSampler, DDPMSampler])
@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_thresholding_ratio_must_lie_in_zero_one(cls, ratio):
    """dynamic_thresholding_ratio is a quantile in (0, 1]: 0 (the per-sample minimum of |x0|)
    is refused like the values outside [0, 1] (mutant b10: the lower bound made inclusive)."""
    sch = NoiseSchedule("linear")
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        cls(sch, 10, thresholding=True, dynamic_thresholding_ratio=ratio)
    cls(sch, 10, thresholding=True, dynamic_thresholding_ratio=1.0)


def test_explicit_noise_wins_over_generator_state():
    """``noise`` given together with ``generator_state``: the step uses the given noise (as
    diffusers' DDIM step with ``variance_noise``) and leaves the Philox state alone (mutant b12:
    the in-kernel generator preferred over the caller's noise)."""
    torch.manual_seed(0)
    ours = DDIMSampler(NoiseSchedule("linear"), 10, eta=1.0)
    theirs = diffusers.DDIMScheduler()
    theirs.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    eps = torch.randn_like(x)
    z = torch.randn_like(x)
    for i in (0, 4):
        t = int(theirs.timesteps[i])
        state = torch.tensor([1234, 0], dtype=torch.int64)
        got = ours.step(eps, i, x, z, generator_state=state)
        want = theirs.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert state.tolist() == [1234, 0]


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_thresholding_with_v_prediction_matches_diffusers(eta, use_clipped):
    """Dynamic thresholding derives (x0, eps) from a v prediction in Python (eps = a v + s x_t,
    Salimans & Ho 2022); the suite ran the thresholding path with eps and x0 predictions only
    (mutant i8: eps = a v - s x_t)."""
    steps = 25
    sch, cfg = _schedule("scaled_linear")
    opts = dict(thresholding=True, sample_max_value=1.5, prediction_type="v_prediction")
    theirs = diffusers.DDIMScheduler(**cfg, **opts)
    theirs.set_timesteps(steps)
    ours = DDIMSampler(sch, steps, eta=eta, use_clipped_model_output=use_clipped, **opts)
    gn = torch.Generator().manual_seed(5)

    def step(mo, t, x, z):
        return theirs.step(
            mo, t, x, eta=eta, variance_noise=z, use_clipped_model_output=use_clipped
        ).prev_sample

    _loop(ours, theirs, step, steps, noise_fn=lambda i, t: torch.randn(PARITY_SHAPE, generator=gn))


@pytest.mark.parametrize("eta", [-0.5, -1e-9, 3.0, float("nan")])
def test_ddim_eta_outside_zero_one_is_refused(eta):
    """eta < 0 is not a noise weight (DDIM eq. 16), and an eta that makes sigma^2 exceed
    1 - alpha_bar_prev leaves sqrt(1 - alpha_bar_prev - sigma^2) undefined (diffusers gives
    NaN); both are a ValueError naming eta, not a silently clamped coefficient (mutants i5, i9)."""
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule("linear"), 10, eta=eta)
    DDIMSampler(NoiseSchedule("linear"), 10, eta=1.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [6, 7])
def test_ddim_step_counts_that_do_not_divide_t_match_diffusers(spacing, steps):
    """diffusers' DDIM moves to prev_t = t - T // steps (floor division) whatever the spacing;
    the suite used step counts with T / steps integral or with a fraction below one half, where
    round() and // agree (mutant i10: round(T / steps))."""
    sch, cfg = _schedule("linear")
    theirs = diffusers.DDIMScheduler(**cfg, timestep_spacing=spacing, clip_sample=False)
    theirs.set_timesteps(steps)
    ours = DDIMSampler(sch, steps, timestep_spacing=spacing, clip_sample=False)
    _loop(ours, theirs, lambda mo, t, x, z: theirs.step(mo, t, x).prev_sample, steps)


def test_tensor_cond_is_class_labels_for_a_model_taking_both_kwargs():
    """README: a tensor ``cond`` goes in as ``class_labels`` (``encoder_hidden_states`` only for
    UNet2DConditionModel or a model without class_labels). A model whose forward takes both (a
    DiT-style Transformer2DModel) gets the labels as class_labels, under guidance as
    ``[uncond, cond]`` (mutant c2: encoder_hidden_states looked up first)."""
    seen = []

    def model(x, t, class_labels=None, encoder_hidden_states=None):
        seen.append((class_labels, encoder_hidden_states))
        return 0.1 * x

    labels, null = torch.tensor([3, 1]), torch.tensor([0, 0])
    fastdiff.sample(model, steps=2, shape=(3, 4, 4), batch_size=2, cond=labels)
    fastdiff.sample(model, steps=2, shape=(3, 4, 4), batch_size=2, cond=labels, uncond=null,
                    guidance_scale=2.0)  # fmt: skip
    assert all(e is None for _, e in seen)
    assert torch.equal(seen[0][0], labels)
    assert torch.equal(seen[-1][0], torch.cat([null, labels]))


def test_guidance_repeats_only_batched_model_kwargs():
    """Under guidance the model's batch is 2N: a model_kwargs tensor with batch N is repeated
    for both halves, one whose first dim is not N (a lookup table, a mask over tokens) is
    passed as given (mutant c11: every tensor kwarg doubled)."""
    seen = []

    def model(x, t, class_labels=None, per_sample=None, table=None):
        seen.append((x.shape[0], per_sample, table))
        return 0.1 * x

    per_sample, table = torch.tensor([5.0, 7.0]), torch.randn(3, 4)
    fastdiff.sample(model, steps=2, shape=(3, 4, 4), batch_size=2, cond=torch.tensor([1, 2]),
                    uncond=torch.tensor([0, 0]), guidance_scale=3.0,
                    model_kwargs={"per_sample": per_sample, "table": table})  # fmt: skip
    for rows, p, tab in seen:
        assert rows == 4
        assert torch.equal(p, torch.cat([per_sample, per_sample]))
        assert torch.equal(tab, table)


def test_a_model_returning_a_tuple_is_read_from_its_first_element():
    """A model returning a tuple (diffusers' return_dict=False, or (prediction, aux)) gives its
    prediction as the first element; an extra element is not the prediction (mutant c9: the
    last element taken, indistinguishable for diffusers' 1-tuples)."""

    def plain(x, t):
        return 0.2 * x + 0.001 * t.float().view(-1, 1, 1, 1)

    def with_aux(x, t):
        return plain(x, t), torch.full_like(x, 100.0)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    want = fastdiff.sample(plain, steps=3, noise=x_T)
    torch.testing.assert_close(fastdiff.sample(with_aux, steps=3, noise=x_T), want)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_attention_refuses_a_non_finite_scale(scale):
    """A NaN / inf softmax scale is a ValueError naming scale, raised before any backend runs
    (mutant a3: the finiteness check removed; every output would be NaN)."""
    from fastdiff.ops.attention import attention

    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, q, q, scale=scale)
    assert torch.isfinite(attention(q, q, q, scale=0.5)).all()


@pytest.mark.parametrize("which", ["k", "v"])
def test_attention_refuses_k_or_v_in_another_dtype(which):
    """q, k and v share one dtype: k or v alone in another is a TypeError naming all three
    dtypes (mutant a4: only k compared with q)."""
    from fastdiff.ops.attention import attention

    q = torch.randn(1, 2, 5, 16)
    args = {"k": q, "v": q, which: q.to(torch.bfloat16)}
    with pytest.raises(TypeError, match="must share a dtype"):
        attention(q, args["k"], args["v"])


@pytest.mark.parametrize("name", ["add", "scale", "shift"])
def test_group_norm_silu_refuses_conditioning_of_higher_rank_than_x(name):
    """add / scale / shift are [N, C] with optional trailing singleton dims, but never of
    higher rank than x: eager ``x + add`` with add [N, C, 1, 1, 1] and x [N, C, H, W] does not
    broadcast (it aligns N against C), and the fused op must not silently accept it as [N, C]
    (mutant g1: the rank bound removed)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    x = torch.randn(2, 4, 3, 3)
    t = torch.randn(2, 4, 1, 1, 1)
    with pytest.raises(RuntimeError):  # eager torch
        x + t
    with pytest.raises(ValueError, match=f"expected {name} of shape"):
        group_norm_silu(x, 2, **{name: t})
    group_norm_silu(x, 2, **{name: t[..., 0]})  # [N, C, 1, 1] is fine


@pytest.mark.parametrize("eps", [float("nan"), -1e-6])
def test_group_norm_silu_refuses_a_nan_or_negative_eps(eps):
    """eps must be a non-negative float: NaN (which ``eps < 0`` lets through and which makes
    every output NaN) is a ValueError naming eps, as a negative eps is (mutant g2)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        group_norm_silu(torch.randn(2, 4, 3, 3), 2, eps=eps)


@pytest.mark.parametrize("name", ["add", "scale", "shift"])
def test_group_norm_silu_refuses_per_pixel_conditioning(name):
    """add / scale / shift are per (sample, channel): a full [N, C, H, W] tensor is a ValueError
    naming it and its expected shape, not reshape's RuntimeError (mutant g5: the trailing dims
    no longer required to be 1)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=rf"expected {name} of shape \[N, C\] = \[2, 4\]"):
        group_norm_silu(x, 2, **{name: torch.randn(2, 4, 3, 3)})


@pytest.mark.parametrize("sampler", ["ddim", "euler", "ddpm"])
def test_sample_refuses_a_generator_list_of_the_wrong_length_up_front(sampler):
    """With x_T given, a deterministic sampler never draws from the generators: a list with
    one generator for a batch of 2 must still be refused, before the first model call (mutant
    p5: the up-front length check removed; DDIM / Euler then ignored the list silently)."""
    calls = []

    def model(x, t):
        calls.append(1)
        return 0.1 * x

    x_T = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"generator: .*one per sample \(batch 2\)"):
        fastdiff.sample(model, steps=3, sampler=sampler, noise=x_T,
                        generator=[torch.Generator().manual_seed(0)])  # fmt: skip
    assert not calls


def test_attention_refuses_empty_keys():
    """Lk = 0 (no keys to attend to) is a ValueError like any other empty dimension, not an
    empty softmax (mutant a5: k's length left out of the >= 1 check)."""
    from fastdiff.ops.attention import attention

    q = torch.randn(1, 2, 5, 16)
    kv = torch.randn(1, 2, 0, 16)
    with pytest.raises(ValueError, match="every dimension must be >= 1"):
        attention(q, kv, kv)


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(4, 1), (4, 2)])
def test_group_norm_silu_refuses_a_non_vector_weight_or_bias(name, shape):
    """weight / bias are [C] vectors as in F.group_norm: a [C, 1] or [C, 2] tensor (whose
    first dim is C) is a ValueError naming it (mutant g3: only the first dim compared)."""
    from fastdiff.ops.group_norm_silu import group_norm_silu

    with pytest.raises(ValueError, match=f"Expected {name} to be a vector"):
        group_norm_silu(torch.randn(2, 4, 3, 3), 2, **{name: torch.randn(shape)})
