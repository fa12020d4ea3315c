"""NoiseSchedule: betas vs diffusers, zero-SNR rescale, q_sample and training targets."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.samplers import spaced_timesteps

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="linear", num_train_timesteps=400, beta_end=0.03),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=True,
        ),  # fmt: skip
    ],
)
def test_matches_diffusers(cfg):
    theirs = diffusers.DDPMScheduler(**cfg)
    for src in (theirs, theirs.config, dict(theirs.config)):
        ours = NoiseSchedule.from_diffusers(src)
        assert ours.betas.dtype == torch.float64
        assert ours.num_train_timesteps == cfg.get("num_train_timesteps", 1000)
        if cfg.get("rescale_betas_zero_snr"):
            # diffusers rescales in fp32 (1 - ratio cancels): compare sqrt(alpha_bar) absolutely
            torch.testing.assert_close(
                ours.sqrt_alphas_cumprod.float(), theirs.alphas_cumprod.sqrt(), rtol=0, atol=2e-6
            )
            continue
        torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(
            ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=2e-5, atol=1e-9
        )


def test_trained_betas_from_diffusers():
    betas = torch.linspace(1e-4, 0.03, 50, dtype=torch.float64)
    theirs = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    ours = NoiseSchedule.from_diffusers(theirs)
    assert ours.beta_schedule == "custom" and ours.num_train_timesteps == 50
    torch.testing.assert_close(ours.betas, betas)


@pytest.mark.parametrize(
    "cls",
    ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "EulerDiscreteScheduler", "DDPMScheduler"],
)
def test_config_dict_missing_keys_take_its_scheduler_class_defaults(cls):
    """A hand-written or trimmed config dict ({"_class_name": ..., "beta_schedule": "linear"})
    gets the named class's beta_start/beta_end (Heun, KDPM2: 0.00085..0.012; DDPM, Euler:
    1e-4..0.02), as diffusers' from_config would; an unknown class keeps DDPM's."""
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, cls)(beta_schedule="linear").betas.double()
    got = NoiseSchedule.from_diffusers({"_class_name": cls, "beta_schedule": "linear"}).betas
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-9)
    plain = NoiseSchedule.from_diffusers(
        {"_class_name": "NoSuchScheduler", "beta_schedule": "linear"}
    )
    torch.testing.assert_close(plain.betas.double(), NoiseSchedule("linear").betas.double())


def test_cosine_definition():
    """Improved DDPM eq. 17: alpha_bar(t) = f(t)/f(0) wherever the 0.999 cap is not hit."""
    s = NoiseSchedule("cosine")
    assert NoiseSchedule("squaredcos_cap_v2").betas.equal(s.betas)

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_defaults_and_ranges():
    lin = NoiseSchedule()
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(
        0.02
    )
    sl = NoiseSchedule("scaled_linear")
    assert sl.betas[0].item() == pytest.approx(0.00085)
    assert sl.betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(sl.betas.sqrt().diff(), sl.betas.sqrt().diff()[0].expand(999))
    assert len(lin) == 1000 and "linear" in repr(lin)
    torch.testing.assert_close(
        lin.log_snr, 0.5 * (lin.alphas_cumprod / (1 - lin.alphas_cumprod)).log()
    )


def test_zero_terminal_snr():
    s = NoiseSchedule("scaled_linear", rescale_betas_zero_snr=True)
    base = NoiseSchedule("scaled_linear")
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-20)
    assert s.sqrt_alphas_cumprod[0].item() == pytest.approx(base.sqrt_alphas_cumprod[0].item())
    assert s.betas[-1].item() == pytest.approx(1.0)


def test_q_sample_and_targets():
    s = NoiseSchedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, eps)
    theirs = diffusers.DDPMScheduler()
    torch.testing.assert_close(xt, theirs.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    v = s.training_target(x0, t, eps, "v_prediction")
    torch.testing.assert_close(v, theirs.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert s.training_target(x0, t, eps, "epsilon") is eps
    assert s.training_target(x0, t, eps, "sample") is x0
    # the predictions invert the forward process for every parameterisation
    xt64, x064, eps64 = xt.double(), x0.double(), eps.double()
    for pred, out in [("epsilon", eps64), ("v_prediction", v.double()), ("sample", x064)]:
        torch.testing.assert_close(s.predict_x0(xt64, t, out, pred), x064, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.predict_eps(xt64, t, out, pred), eps64, rtol=1e-4, atol=1e-4)
    # an int timestep broadcasts
    torch.testing.assert_close(s.q_sample(x0, 3, eps), s.q_sample(x0, torch.full((4,), 3), eps))


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule(num_train_timesteps=0)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(betas=[0.1, 1.5])
    with pytest.raises(TypeError, match="scheduler_or_config"):
        NoiseSchedule.from_diffusers(3)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers({"beta_schedule": "sigmoid"})
    s = NoiseSchedule()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="noise"):
        s.q_sample(x, torch.tensor([1, 2]), torch.randn(2, 4))
    with pytest.raises(TypeError, match="t"):
        s.q_sample(x, torch.tensor([1.0, 2.0]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="prediction_type"):
        s.training_target(x, 1, x, "flow")
    for lo, hi in ((1e-4, 2.0), (-0.1, 0.02), (0.02, 1e-4)):
        with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
            NoiseSchedule("linear", beta_start=lo, beta_end=hi)
    for t in (-1, 1000, torch.tensor([3, -2])):  # no silent wrap-around into the tables
        with pytest.raises(ValueError, match=r"t: expected timesteps in 0\.\.999"):
            s.q_sample(x, t, torch.randn(2, 3))
    with pytest.raises(ValueError, match="noise"):
        s.velocity(x, 1, torch.randn(1, 3))
    # diffusers schedulers whose noise levels are not (only) a beta schedule are refused
    assert NoiseSchedule.from_diffusers({"beta_schedule": "linear", "shift": 1.0})
    for cfg in ({"shift": 3.0, "num_train_timesteps": 1000},  # flow matching: no betas
                {"beta_schedule": "scaled_linear", "snr_shift_scale": 3.0}):  # fmt: skip
        with pytest.raises(ValueError, match="no beta schedule|changes its noise levels"):
            NoiseSchedule.from_diffusers(cfg)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_spaced_timesteps_match_diffusers(spacing, steps):
    theirs = diffusers.DDIMScheduler(
        timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0
    )
    theirs.set_timesteps(steps)
    ours = spaced_timesteps(1000, steps, spacing, 1 if spacing == "leading" else 0)
    assert ours.tolist() == theirs.timesteps.tolist()
